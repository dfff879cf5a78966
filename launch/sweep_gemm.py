"""Sweep the Triton grouped GEMM's tile configs against torch's grouped GEMM, layer shapes.

    python launch/sweep_gemm.py [--presets mixtral qwen3] [--tokens 16 64 512 4096 16384]

For each shape: GEMM 1 (gather + gate/up + activation) and GEMM 2 (down), every candidate
checked against torch's path (expand, grouped_mm, fused activation, grouped_mm) and then timed
by CUDA-graph replay; the weights (>= 1.2 GB) never fit in L2. Floors from ceilings measured in
the same run. Best config per shape printed last; all of them in sweep_gemm.json under $OUT.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (copy_ceiling_gbs, graph_time_us, markdown_table, matmul_ceiling_tflops,  # noqa: E402
                    write_json)

from ep_moe.experts import _grouped_mm  # noqa: E402
from ep_moe.kernels.activation import gated_activation  # noqa: E402
from ep_moe.kernels.grouped_gemm import GemmConfig, gemm_config, grouped_gemm  # noqa: E402

SHAPES = {"mixtral": (8, 4096, 14336, 2), "qwen3": (128, 2048, 768, 8)}  # E, D, I, K
# (block_m, block_n, block_k, group_m, warps, stages); gated tiles hold two accumulators
SMALL = [(16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (32, 64, 128, 1, 4, 4),
         (32, 128, 64, 1, 4, 4), (64, 64, 128, 4, 4, 3), (64, 128, 64, 4, 4, 4)]
LARGE = [(64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3),
         (128, 128, 64, 8, 4, 4),
         # deeper pipelines and longer K tiles (Hopper: 227 KiB of shared memory a block)
         (128, 128, 64, 8, 8, 4), (64, 256, 64, 8, 8, 3), (64, 128, 128, 8, 4, 3),
         (128, 64, 128, 8, 4, 3), (128, 128, 64, 16, 8, 3)]
PLAIN_ONLY = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 3),
              (256, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 4)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def routing(T, E, K, dev):
    ids = torch.rand(T, E, device=dev).topk(K, dim=-1).indices.reshape(-1)
    order = torch.sort(ids, stable=True).indices
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(
        0, ids, torch.ones_like(ids))
    return order // K, counts


def gemm_case(T, K, w13, w2, copy_gbs, mm_tflops):
    """T tokens routed at random to K of the weights' experts: the token rows, each sorted
    pair's token, the counts and their running sum, torch's GEMM 1 and GEMM 2 outputs (the
    references), and each GEMM's floor in us from the ceilings."""
    E, I2, D = w13.shape
    I = I2 // 2
    torch.manual_seed(T)
    x = torch.randn(T, D, device=w13.device, dtype=torch.bfloat16)
    src, counts = routing(T, E, K, w13.device)
    P, hit = T * K, int((counts > 0).sum())
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h_ref = gated_activation(_grouped_mm(x[src], w13.transpose(1, 2), offs=offs), "silu")
    y_ref = _grouped_mm(h_ref, w2.transpose(1, 2), offs=offs)
    floors = {
        1: max(2 * P * D * 2 * I / mm_tflops / 1e6,
               (hit * 2 * I * D + T * D + P * I) * 2 / copy_gbs / 1e3),
        2: max(2 * P * I * D / mm_tflops / 1e6,
               (hit * D * I + P * I + P * D) * 2 / copy_gbs / 1e3),
    }
    return x, src, counts, offs, h_ref, y_ref, floors


def check_and_time(row: dict, fn, ref, floor_us: float, calls: int, replays: int) -> dict:
    """Fill `row` for one variant: its error against `ref` (None: not compared, e.g. other
    counts), above 2% an error; then two CUDA-graph timings (us) and the faster over the
    floor. A variant that fails is a result: its exception lands in row["error"]."""
    try:
        if ref is not None:
            err = rel(fn(), ref)
            row["rel_err_vs_torch"] = err
            if not err < 2e-2:
                raise RuntimeError(f"rel err {err:.3g}")
        row["us"] = [graph_time_us([fn], calls, replays) for _ in range(2)]
        row["x_floor"] = min(row["us"]) / floor_us
    except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def balanced_like(counts: torch.Tensor) -> torch.Tensor:
    """The same number of rows split as evenly as the experts allow (the first ones take the
    remainder): what the routed counts would cost without their spread."""
    E, P = counts.shape[0], int(counts.sum())
    balanced = torch.full_like(counts, P // E)
    balanced[: P - int(balanced.sum())] += 1
    return balanced


def write_rows(name: str, dev, copy_gbs: float, mm_tflops: float, rows: list) -> None:
    """The probes' JSON under $OUT: device, the run's ceilings and the rows so far."""
    write_json(name, {"device": torch.cuda.get_device_name(dev), "copy_gbs": copy_gbs,
                      "mm_tflops": mm_tflops, "rows": rows})


def timing_text(row: dict) -> str:
    """'<faster of the two timings> us  <x>x floor', or the variant's error."""
    return (f"{min(row['us']):9.1f} us  {row['x_floor']:.2f}x floor" if "us" in row
            else row["error"])


def ceilings(dev):
    """The copy and matmul ceilings of this run, printed as its first line."""
    copy_gbs, mm_tflops = copy_ceiling_gbs(dev), matmul_ceiling_tflops(dev)
    print(f"# {torch.cuda.get_device_name(dev)}: copy {copy_gbs:.0f} GB/s, "
          f"matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    return copy_gbs, mm_tflops


def gemm_cases(presets, tokens, dev, copy_gbs, mm_tflops, skip=lambda preset, T: False):
    """For each preset (its weights made once, dropped after its last T) and each T not
    skipped: preset, T, top_k, the gate/up and down weights, and `gemm_case`'s tuple."""
    for preset in presets:
        K, w13, w2 = expert_weights(preset, dev)
        for T in tokens:
            if not skip(preset, T):
                yield preset, T, K, w13, w2, gemm_case(T, K, w13, w2, copy_gbs, mm_tflops)
        del w13, w2
        torch.cuda.empty_cache()


def expert_weights(preset, dev):
    """top_k and random bf16 gate/up (E, 2I, D) and down (E, D, I) weights of a preset's
    shape, scaled so the products stay O(1)."""
    E, D, I, K = SHAPES[preset]
    w13 = torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16) * D ** -0.5
    w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) * I ** -0.5
    return K, w13, w2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[16, 64, 512, 4096, 16384])
    args = p.parse_args()
    dev = torch.device("cuda")
    copy_gbs, mm_tflops = ceilings(dev)
    rows = []
    cases = gemm_cases(args.presets, args.tokens, dev, copy_gbs, mm_tflops)
    for preset, T, K, w13, w2, case in cases:
        x, src, counts, offs, h_ref, y_ref, floors = case
        E = w13.shape[0]
        P = T * K
        calls, replays = (2, 6) if T >= 4096 else (10, 20)
        t1 = graph_time_us([lambda: gated_activation(
            _grouped_mm(x[src], w13.transpose(1, 2), offs=offs), "silu")], calls, replays)
        t2 = graph_time_us([lambda: _grouped_mm(h_ref, w2.transpose(1, 2), offs=offs)],
                           calls, replays)
        for gemm, cands, torch_us in ((1, SMALL + LARGE, t1),
                                      (2, SMALL + LARGE + PLAIN_ONLY, t2)):
            best = None
            for c in [GemmConfig(*c) for c in cands] + [None]:
                if gemm == 1:
                    fn = lambda c=c: grouped_gemm(x, w13, counts, a_rows=src,  # noqa: E731
                                                  activation="silu", config=c)
                    ref = h_ref
                else:
                    fn = lambda c=c: grouped_gemm(h_ref, w2, counts, config=c)  # noqa: E731
                    ref = y_ref
                row = {"preset": preset, "T": T, "gemm": gemm,
                       "config": "default" if c is None else list(c),
                       "default_is": list(gemm_config(P / E, gemm == 1, num_experts=E)),
                       "torch_us": torch_us, "floor_us": floors[gemm]}
                try:
                    err = rel(fn(), ref)
                    if not err < 2e-2:
                        raise RuntimeError(f"rel err {err:.3g} vs torch")
                    us = graph_time_us([fn], calls, replays)
                    row.update(us=us, err=err, vs_torch=us / torch_us,
                               vs_floor=us / floors[gemm])
                    if c is not None and (best is None or us < best["us"]):
                        best = row
                except Exception as exc:  # a config that does not fit: note and go on
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                rows.append(row)
                print(row, flush=True)
            if best is not None:
                best = dict(best, best=True)
                rows.append(best)
    write_json("sweep_gemm.json", {"device": torch.cuda.get_device_name(dev),
                                   "copy_ceiling_gbs": copy_gbs,
                                   "matmul_ceiling_tflops": mm_tflops, "rows": rows})
    table = [r for r in rows if r.get("best") or r["config"] == "default"]
    print(markdown_table(table, ["preset", "T", "gemm", "config", "us", "torch_us", "floor_us",
                                 "vs_torch", "vs_floor"]))


if __name__ == "__main__":
    main()
