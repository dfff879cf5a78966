"""The single-GPU layer with one cuBLAS product per expert after a host sync, against torch's
grouped GEMM with none (or, at few rows, the Triton GEMMs: `expert_impl="auto"`), eager (a
sync cannot be captured in a CUDA graph), one GPU.

    python launch/probe_hostloop.py [--presets mixtral] [--tokens 1024 4096 8192 16384]

At W > 1 the exact exchange reads each local expert's row count with its split sizes, and the
layer then runs large experts (`Experts.loop_wins`) as one dense product each (W = 2, 2x H200,
Mixtral, 8192 tokens per GPU: forward 9.6-9.9 ms against 10.6-10.7 on torch's grouped GEMM).
One GPU has no such read: `expert_impl="loop"` takes the counts with a sync of its own. This
times the layer's no-grad forward and its forward+backward (a training step from gradients
set to None) both ways, in turn, `--rounds` times, and the two outputs' difference. Writes
probe_hostloop.json under $OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_fwd_and_fwd_bwd, write_json  # noqa: E402

from ep_moe import MoE, MoEConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 8192, 16384])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for preset in args.presets:
        cfg = MoEConfig.preset(preset)
        layer = MoE(cfg, device=dev, dtype=torch.bfloat16)
        impls = {"auto": cfg, "loop": dataclasses.replace(cfg, expert_impl="loop")}
        for T in args.tokens:
            x = torch.randn(T, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
            g = torch.randn_like(x)
            outs, row = {}, {"preset": preset, "T": T}
            for _ in range(args.rounds):
                for name, c in impls.items():
                    layer.experts.config = c
                    with torch.no_grad():
                        outs[name] = layer(x).float()
                    res = time_fwd_and_fwd_bwd(layer, x, g, dev, args.iters)
                    for k in ("fwd_ms", "fwd_bwd_ms"):
                        row.setdefault(f"{name}_{k}", []).append(res[k])
            layer.experts.config = cfg
            diff = (outs["loop"] - outs["auto"]).norm() / outs["auto"].norm()
            row["rel_diff"] = diff.item()
            rows.append(row)
            print({k: ([round(t, 3) for t in v] if isinstance(v, list) else v)
                   for k, v in row.items()}, flush=True)
            write_json("probe_hostloop.json", {"device": torch.cuda.get_device_name(dev),
                                               "rows": rows})
        del layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
