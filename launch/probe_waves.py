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
from common import layer_config_ab, spans, write_layer_rows  # noqa: E402
from sweep_gemm import (balanced_like, ceilings, check_and_time, gemm_cases,  # noqa: E402
                        timing_text, write_rows)

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
    return layer_config_ab(["mixtral"], tokens, dev, lambda shipped: stop16_config,
                           "layer_stop17_vs_stop16_configs")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 520, 1024, 1032])
    p.add_argument("--layer", action="store_true", help="the layer, stop 17's configs and 16's")
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.layer:
        rows = layer_rows(args.tokens, dev)
        write_layer_rows("probe_waves_layer.json", rows)
        for r in rows:
            print(f"T={r['T']:6d} stop 17 {spans(r['on_us'])} against stop 16 "
                  f"{spans(r['off_us'])} us")
        return
    copy_gbs, mm_tflops = ceilings(dev)
    rows = []
    for preset, T, K, w13, w2, case in gemm_cases(["mixtral"], args.tokens, dev, copy_gbs,
                                                  mm_tflops):
        x, src, counts, offs, h_ref, y_ref, floors = case
        E = w13.shape[0]
        P = T * K
        balanced = balanced_like(counts)
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
            ref = (h_ref if gemm == 1 else y_ref) if which == "routed" else None
            rows.append(check_and_time(row, fn, ref, floors[gemm], 6, 12))
        write_rows("probe_waves.json", dev, copy_gbs, mm_tflops, rows)
    print(f"# copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s")
    for r in rows:
        print(f"T={r['T']:5d} gemm{r['gemm']} {r['variant']:30s} {r['counts']:8s} "
              f"{timing_text(r)}"
              + (f"  {r['config']}" if r["variant"] == "shipped" else ""))


if __name__ == "__main__":
    main()
