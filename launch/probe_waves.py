"""Tile shapes for few experts with a long K loop (Mixtral), one GPU.

probe_tail.py (stop 17, H100 m53) found Mixtral's down projection (K = I = 14336) at 1024
tokens 513 us on the routed rows against 385 on the same number of rows split evenly, and tail
tiles taking only 1% of it: 128 x 256 tiles each run ~170 us, so the grid is a few waves and a
third row block for half the experts adds a wave. At 512 tokens 396 against 342 us. This times
other tiles (shorter N: more, shorter programs; tails) for both GEMMs against `gemm_config`'s
choice, on the routed rows of two draws per size and on balanced counts. Each variant is
checked against torch's path, then timed by CUDA-graph replay, twice. Writes probe_waves.json
under $OUT.

    python launch/probe_waves.py [--tokens 512 520 1024 1032] [--layer]

--layer: the layer's graph forward with stop 17's `gemm_config` and stop 16's, in turn.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_us, layer_cases, on_off, write_json  # noqa: E402
from sweep_gemm import ceilings, gemm_cases, rel  # noqa: E402

from ep_moe.kernels.grouped_gemm import GemmConfig, gemm_config, grouped_gemm  # noqa: E402

# (block_m, block_n, block_k, group_m, warps, stages, tail_m)
DOWN = [(128, 128, 128, 16, 8, 3, 0), (128, 128, 128, 16, 8, 3, 64), (128, 128, 64, 8, 8, 4, 0),
        (128, 128, 64, 8, 8, 4, 64), (128, 128, 64, 16, 8, 4, 32), (128, 256, 64, 8, 8, 4, 0),
        (128, 256, 64, 8, 8, 4, 64), (128, 64, 128, 8, 4, 3, 0), (128, 64, 128, 8, 4, 4, 64),
        (64, 128, 128, 8, 4, 3, 0), (64, 256, 64, 8, 8, 3, 0)]
GATE_UP = [(128, 128, 64, 16, 8, 4, 0), (128, 128, 64, 16, 8, 4, 64), (128, 128, 64, 8, 8, 4, 32),
           (128, 128, 64, 8, 8, 4, 64), (128, 64, 64, 8, 4, 4, 0), (64, 128, 64, 8, 4, 4, 0)]


def stop16_config(*args, **kwargs):
    """gemm_config as stop 16 shipped it: no tail on few experts' down projection at 33-128
    rows an expert, groups of 8 for their gated tiles at 129-384."""
    cfg = gemm_config(*args, **kwargs)
    if cfg.block_m == 128 and cfg.group_m == 16:
        cfg = cfg._replace(tail_m=0) if cfg.block_k == 128 else cfg
        cfg = cfg._replace(group_m=8) if cfg.tail_m else cfg
    return cfg


def layer_rows(tokens, dev):
    """The single-GPU Mixtral layer's no-grad graph forward with stop 17's configs and stop
    16's, in turn, four rounds."""
    import ep_moe.experts as experts_module
    shipped = experts_module.gemm_config

    def switch(on):
        experts_module.gemm_config = shipped if on else stop16_config

    rows = []
    for preset, cfg, layer, T, fwd in layer_cases(["mixtral"], tokens, dev):
        outs, times = on_off({"layer": fwd}, switch, 10)
        on, off = outs["layer"]
        row = {"preset": preset, "T": T, "what": "layer_stop17_vs_stop16_configs",
               "max_abs_diff": (on.float() - off.float()).abs().max().item(),
               "on_us": times["layer_on_us"], "off_us": times["layer_off_us"]}
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 520, 1024, 1032])
    p.add_argument("--layer", action="store_true", help="the layer, stop 17's configs and 16's")
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.layer:
        rows = layer_rows(args.tokens, dev)
        write_json("probe_waves_layer.json", {"device": torch.cuda.get_device_name(dev),
                                              "rows": rows})
        for r in rows:
            print(f"T={r['T']:6d} stop 17 {'/'.join(f'{u:.0f}' for u in r['on_us'])} against "
                  f"stop 16 {'/'.join(f'{u:.0f}' for u in r['off_us'])} us")
        return
    copy_gbs, mm_tflops = ceilings(dev)
    rows = []
    for preset, T, K, w13, w2, case in gemm_cases(["mixtral"], args.tokens, dev, copy_gbs,
                                                  mm_tflops):
        x, src, counts, offs, h_ref, y_ref, floors = case
        E = w13.shape[0]
        P = T * K
        balanced = torch.full_like(counts, P // E)
        balanced[: P - int(balanced.sum())] += 1
        variants = {}
        for gemm, gated, table in ((1, True, GATE_UP), (2, False, DOWN)):
            shipped = gemm_config(P / E, gated, 2, num_experts=E)
            configs = {"shipped": shipped, **{str(c): GemmConfig(*c) for c in table}}
            for name, cfg in configs.items():
                for which, n in (("routed", counts), ("balanced", balanced)):
                    if which == "balanced" and name != "shipped":
                        continue
                    if gemm == 1:
                        fn = (lambda cfg=cfg, n=n: grouped_gemm(
                            x, w13, n, a_rows=src, activation="silu", config=cfg))
                    else:
                        fn = lambda cfg=cfg, n=n: grouped_gemm(h_ref, w2, n, config=cfg)  # noqa: E731
                    variants[(gemm, name, which)] = (cfg, fn)
        for (gemm, name, which), (cfg, fn) in variants.items():
            row = {"T": T, "gemm": gemm, "variant": name, "counts": which, "config": list(cfg),
                   "floor_us": floors[gemm], "counts_list": counts.tolist()}
            try:
                if which == "routed":
                    err = rel(fn(), h_ref if gemm == 1 else y_ref)
                    row["rel_err_vs_torch"] = err
                    if not err < 2e-2:
                        raise RuntimeError(f"rel err {err:.3g}")
                row["us"] = [graph_time_us([fn], 6, 12) for _ in range(2)]
                row["x_floor"] = min(row["us"]) / floors[gemm]
            except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
        write_json("probe_waves.json", {"device": torch.cuda.get_device_name(dev),
                                        "copy_gbs": copy_gbs, "mm_tflops": mm_tflops,
                                        "rows": rows})
    print(f"# copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s")
    for r in rows:
        res = (f"{min(r['us']):8.1f} us  {r['x_floor']:.2f}x floor" if "us" in r
               else r["error"])
        print(f"T={r['T']:5d} gemm{r['gemm']} {r['variant']:30s} {r['counts']:8s} {res}"
              + (f"  {r['config']}" if r["variant"] == "shipped" else ""))


if __name__ == "__main__":
    main()
