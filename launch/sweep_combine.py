"""Sweep the forward combine kernel's configs (BLOCK_D, num_warps, programs per SM) over PERF.md's shapes.

    python launch/sweep_combine.py     # one GPU; picks the heuristic in `_fwd_config`

Each config is checked against the torch path, then timed by CUDA-graph replay over 4 rotating
input sets (so the inputs do not sit in L2). Prints the best config per shape and writes JSON.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_ceiling_gbs, graph_time_us, write_json  # noqa: E402

import ep_moe.kernels.fused_mul_sum as fms  # noqa: E402

E = 64
CONFIGS = [fms.FwdConfig(bd, nw, pps)
           for bd, nw in [(512, 2), (1024, 2), (1024, 4), (2048, 4), (2048, 8)]
           for pps in (0, 8, 16, 32)]
SHAPES = [(4096, 2, 4096), (16384, 2, 4096), (4096, 8, 2048), (16384, 8, 2048), (8192, 8, 7168)]


def inputs(T, K, D, W, dev, n_sets=4):
    sets = []
    for _ in range(n_sets):
        x = torch.randn(T, K, D, device=dev, dtype=torch.bfloat16)
        w = torch.rand(T, K, device=dev)
        if W == 1:
            sets.append((x, w, None, None))
            continue
        ids = torch.rand(T, E, device=dev).argsort(1)[:, :K].to(torch.int32)
        emap = torch.full((E,), -1, dtype=torch.int32, device=dev)
        emap[:E // W] = torch.arange(E // W, dtype=torch.int32, device=dev)
        sets.append((x, w, ids, emap))
    return sets


def main():
    dev = torch.device("cuda")
    ceiling = copy_ceiling_gbs(dev)
    results = []
    original = fms._fwd_config
    for T, K, D in SHAPES:
        for W in (1, 2, 4):
            sets = inputs(T, K, D, W, dev)
            x, w, ids, emap = sets[0]
            ref = torch.empty(T, D, device=dev, dtype=torch.bfloat16)
            fms._fwd_torch(x, w, ids, emap, None, ref)
            n_local = T * K if ids is None else int((ids < E // W).sum())
            moved = n_local * D * 2 + T * D * 2 + T * K * (4 + (4 if ids is not None else 0))
            outs = [torch.empty(T, D, device=dev, dtype=torch.bfloat16) for _ in sets]
            row = {"T": T, "K": K, "D": D, "W": W, "bytes": moved, "configs": {}}
            for cfg in CONFIGS + [None]:
                fms._fwd_config = original if cfg is None else (lambda *a, c=cfg: c)
                out = torch.full_like(ref, float("nan"))
                fms._fwd_triton(x, w, ids, emap, None, out)
                err = ((out.float() - ref.float()).abs().max()).item()
                if not err < 0.05:
                    raise SystemExit(f"config {cfg} wrong on {(T, K, D, W)}: max err {err}")
                fns = [lambda s=s, o=o: fms._fwd_triton(s[0], s[1], s[2], s[3], None, o)
                       for s, o in zip(sets, outs)]
                us = graph_time_us(fns)
                row["configs"][str(tuple(cfg)) if cfg else "heuristic"] = {"us": us, "pct": 100 * moved / us / 1e3 / ceiling}
            fms._fwd_config = original
            best = min(row["configs"].items(), key=lambda kv: kv[1]["us"])
            row["best"] = best[0]
            results.append(row)
            h = row["configs"]["heuristic"]
            print(f"T={T} K={K} D={D} W={W}: best {best[0]} {best[1]['us']:.1f}us "
                  f"{best[1]['pct']:.0f}% | heuristic {h['us']:.1f}us {h['pct']:.0f}%", flush=True)
            del sets, outs
    write_json("sweep_combine.json", {"copy_ceiling_gbs": ceiling,
                                      "device": torch.cuda.get_device_name(), "rows": results})


if __name__ == "__main__":
    main()
