"""Tail tiles in the grouped GEMM: an expert's last row block in a shorter tile where its rows
fit, against every block at full height, one GPU.

probe_loop.py (stop 16) found cuBLAS's batched product on balanced rows at 1.28x / 1.06x
the floor for Qwen3 at 4096 tokens where ours runs at 1.54x / 1.28x, and with 256 +- 16 rows
an expert half the experts take a third, mostly empty 128-row block. Here, for the config
`gemm_config` picks: tail_m 0 (off), 64 and 32 on the routed rows; the same config on
balanced counts (every expert the mean: the bound tails approach); and for the down
projection the flattened persistent launch (`persistent=None`). Each variant is checked
against torch's path first, then all timed by CUDA-graph replay, twice. Writes
probe_tail.json under $OUT.

    python launch/probe_tail.py [--presets qwen3 deepseek_v3 mixtral] [--tokens 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_gemm  # noqa: E402
from common import layer_config_ab, spans, write_layer_rows  # noqa: E402
from sweep_gemm import (balanced_like, ceilings, check_and_time, gemm_cases,  # noqa: E402
                        timing_text, write_rows)

from ep_moe.kernels.grouped_gemm import gemm_config, grouped_gemm  # noqa: E402

sweep_gemm.SHAPES.setdefault("deepseek_v3", (256, 7168, 2048, 8))  # E, D, I, K


def layer_rows(presets, tokens, dev):
    """The single-GPU layer's no-grad graph forward with `gemm_config`'s tails as shipped and
    forced off, in turn, four rounds."""
    def no_tails(shipped):
        return lambda *a, **k: shipped(*a, **k)._replace(tail_m=0)

    def tail_m(shipped, cfg, T):
        return {"tail_m": shipped(T * cfg.top_k / cfg.num_experts, True, 2,
                                  num_experts=cfg.num_experts).tail_m}

    return layer_config_ab(presets, tokens, dev, no_tails, "layer_tails_on_off", tail_m)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layer", action="store_true", help="the layer with tails on and off")
    p.add_argument("--presets", nargs="+", default=["qwen3", "deepseek_v3", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--tails", nargs="+", type=int, default=[0, 64, 32])
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.layer:
        rows = layer_rows(args.presets, args.tokens, dev)
        write_layer_rows("probe_tail_layer.json", rows)
        for r in rows:
            print(f"{r['preset']:8s} T={r['T']:6d} tail_m={r['tail_m']} on "
                  f"{spans(r['on_us'])} against off {spans(r['off_us'])} us")
        return
    copy_gbs, mm_tflops = ceilings(dev)
    rows = []
    skip = lambda preset, T: preset == "mixtral" and T > 1024  # torch's GEMMs there  # noqa: E731
    for preset, T, K, w13, w2, case in gemm_cases(args.presets, args.tokens, dev, copy_gbs,
                                                  mm_tflops, skip):
        x, src, counts, offs, h_ref, y_ref, floors = case
        E = w13.shape[0]
        P = T * K
        balanced = balanced_like(counts)
        variants = {}
        for gemm, gated in ((1, True), (2, False)):
            base = gemm_config(P / E, gated, 2, num_experts=E)
            for tail in args.tails:
                if tail and tail >= base.block_m:
                    continue
                cfg = base._replace(tail_m=tail)
                if gemm == 1:
                    variants[(1, f"tail{tail}")] = lambda cfg=cfg: grouped_gemm(
                        x, w13, counts, a_rows=src, activation="silu", config=cfg)
                else:
                    variants[(2, f"tail{tail}")] = lambda cfg=cfg: grouped_gemm(
                        h_ref, w2, counts, config=cfg)
            if gemm == 1:
                variants[(1, "balanced")] = lambda cfg=base: grouped_gemm(
                    x, w13, balanced, a_rows=src, activation="silu", config=cfg)
            else:
                variants[(2, "balanced")] = lambda cfg=base: grouped_gemm(
                    h_ref, w2, balanced, config=cfg)
                variants[(2, "auto")] = lambda cfg=base: grouped_gemm(
                    h_ref, w2, counts, config=cfg, persistent=None)
        calls, replays = (2, 6) if T >= 4096 else (6, 12)
        for (gemm, name), fn in variants.items():
            row = {"preset": preset, "T": T, "gemm": gemm, "variant": name,
                   "floor_us": floors[gemm], "rows_per_expert": P / E,
                   "config": list(gemm_config(P / E, gemm == 1, 2, num_experts=E))}
            ref = None if name == "balanced" else (h_ref if gemm == 1 else y_ref)
            check_and_time(row, fn, ref, floors[gemm], calls, replays)
            rows.append(row)
            print(row, flush=True)
        write_rows("probe_tail.json", dev, copy_gbs, mm_tflops, rows)
    print(f"# copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s")
    for r in rows:
        print(f"{r['preset']:11s} T={r['T']:6d} gemm{r['gemm']} {r['variant']:9s} "
              f"{timing_text(r)}")


if __name__ == "__main__":
    main()
