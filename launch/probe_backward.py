"""The experts' backward GEMMs in Triton against torch's grouped GEMM, on the layer's shapes.

For T tokens routed at random (bf16), the four products of the backward of
`y = (act(x @ w1.T) * (x @ w3.T)) @ w2.T` over expert-sorted rows:
  1. d_act = dy @ w2[i]            grouped_gemm(w_layout="kn")  vs  grouped_mm(dy, w2)
  2. dw2   = dy_i.T @ act_i        grouped_wgrad                vs  grouped_mm(dy.T, act)
  3. dx    = d_h13 @ w13[i]        grouped_gemm(w_layout="kn")  vs  grouped_mm(d_h13, w13)
  4. dw13  = d_h13_i.T @ x_i       grouped_wgrad                vs  grouped_mm(d_h13.T, x)
each checked against torch's result, then timed by CUDA-graph replay (default tiles and a few
others, twice, in turn), with its floor from the ceilings measured in the same run; then the
whole expert MLP's forward+backward (`gated_expert_mlp` against torch's grouped GEMMs and the
fused activation, through torch.autograd.grad, captured in a graph). Writes
probe_backward.json under $OUT.

    python launch/probe_backward.py [--presets qwen3 mixtral] [--tokens 512 4096 16384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (copy_ceiling_gbs, graph_time_us, markdown_table,  # noqa: E402
                    matmul_ceiling_tflops, write_json)
from sweep_gemm import SHAPES, rel, routing  # noqa: E402

from ep_moe.experts import _grouped_mm  # noqa: E402
from ep_moe.kernels.activation import gated_activation  # noqa: E402
from ep_moe.kernels.expert_mlp import gated_expert_mlp  # noqa: E402
from ep_moe.kernels.gemm_configs import gemm_config  # noqa: E402
from ep_moe.kernels.grouped_gemm import GemmConfig, grouped_gemm  # noqa: E402
from ep_moe.kernels.grouped_wgrad import grouped_wgrad, wgrad_config  # noqa: E402

# other tiles to try: (block_m, block_n, block_k, group_m, warps, stages); wgrad's block_k is
# replaced by its default rows a step
KN_TILES = [(128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (64, 128, 64, 4, 4, 4)]
WGRAD_TILES = [(128, 128, 0, 8, 8, 4), (128, 256, 0, 8, 8, 3), (64, 128, 0, 8, 4, 3),
               (128, 64, 0, 8, 4, 3)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["qwen3", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    args = p.parse_args()
    dev = torch.device("cuda")
    copy_gbs, mm_tflops = copy_ceiling_gbs(dev), matmul_ceiling_tflops(dev)
    print(f"# {torch.cuda.get_device_name(dev)}: copy {copy_gbs:.0f} GB/s, "
          f"matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    rows, mlp_rows = [], []
    for preset in args.presets:
        E, D, I, K = SHAPES[preset]
        w13 = torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16) * D ** -0.5
        w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) * I ** -0.5
        for T in args.tokens:
            torch.manual_seed(T)
            src, counts = routing(T, E, K, dev)
            P, hit = T * K, int((counts > 0).sum())
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            x = torch.randn(P, D, device=dev, dtype=torch.bfloat16)  # sorted rows
            dy = torch.randn(P, D, device=dev, dtype=torch.bfloat16)
            act = torch.randn(P, I, device=dev, dtype=torch.bfloat16)
            d_h13 = torch.randn(P, 2 * I, device=dev, dtype=torch.bfloat16)
            cfg = gemm_config(P / E, False, num_experts=E)
            wcfg = wgrad_config(P / E)
            flops = {1: 2 * P * D * I, 2: 2 * P * D * I, 3: 4 * P * I * D, 4: 4 * P * I * D}
            nbytes = {1: (hit * D * I + P * D + P * I) * 2, 2: (E * D * I + P * (D + I)) * 2,
                      3: (hit * 2 * I * D + P * 2 * I + P * D) * 2,
                      4: (E * 2 * I * D + P * (2 * I + D)) * 2}
            ours = {
                1: lambda c: grouped_gemm(dy, w2, counts, config=c, w_layout="kn"),
                2: lambda c: grouped_wgrad(dy, act, counts, config=c),
                3: lambda c: grouped_gemm(d_h13, w13, counts, config=c, w_layout="kn"),
                4: lambda c: grouped_wgrad(d_h13, x, counts, config=c),
            }
            theirs = {
                1: lambda: _grouped_mm(dy, w2, offs=offs),
                2: lambda: _grouped_mm(dy.t(), act, offs=offs),
                3: lambda: _grouped_mm(d_h13, w13, offs=offs),
                4: lambda: _grouped_mm(d_h13.t(), x, offs=offs),
            }
            calls, replays = (2, 10) if T >= 4096 else (10, 20)
            for op in (1, 2, 3, 4):
                wgrad = op in (2, 4)
                default = wcfg if wgrad else cfg
                tiles = [GemmConfig(*(t[:2] + (wcfg.block_k,) + t[3:])) for t in WGRAD_TILES] \
                    if wgrad else [GemmConfig(*t) for t in KN_TILES]
                cfgs = [default] + [c for c in tiles if c != default]
                ref = theirs[op]()
                for c in cfgs:
                    err = rel(ours[op](c), ref)
                    if not err < 1e-2:
                        raise RuntimeError(f"{preset} T={T} op {op} {c}: rel err {err}")
                floor = max(flops[op] / mm_tflops / 1e6, nbytes[op] / copy_gbs / 1e3)
                times = {str(tuple(c)): [] for c in cfgs}
                torch_us = []
                for _ in range(2):
                    torch_us.append(graph_time_us([theirs[op]], calls, replays))
                    for c in cfgs:
                        times[str(tuple(c))].append(
                            graph_time_us([lambda c=c: ours[op](c)], calls, replays))
                best = min(times, key=lambda k: min(times[k]))
                row = {"preset": preset, "T": T, "op": op, "floor_us": floor,
                       "torch_us": min(torch_us), "torch_us_2": max(torch_us),
                       "default_us": min(times[str(tuple(default))]),
                       "default_us_2": max(times[str(tuple(default))]),
                       "best_tiles": best, "best_us": min(times[best]),
                       "default_vs_floor": min(times[str(tuple(default))]) / floor,
                       "default_vs_torch": min(times[str(tuple(default))]) / min(torch_us),
                       "all_us": times}
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v)
                       for k, v in row.items() if k != "all_us"}, flush=True)
            mlp_rows.append(time_mlp(preset, T, x, counts, offs, w13, w2, dy, calls, replays))
            del x, dy, act, d_h13
            torch.cuda.empty_cache()
    write_json("probe_backward.json", {"device": torch.cuda.get_device_name(dev),
                                       "copy_ceiling_gbs": copy_gbs,
                                       "matmul_ceiling_tflops": mm_tflops,
                                       "rows": rows, "mlp": mlp_rows})
    print(markdown_table(rows, ["preset", "T", "op", "floor_us", "torch_us", "default_us",
                                "default_us_2", "best_us", "best_tiles", "default_vs_floor",
                                "default_vs_torch"]))
    print(markdown_table(mlp_rows, ["preset", "T", "torch_ms", "ours_ms", "ours_vs_torch",
                                    "err_vs_torch"]))


def time_mlp(preset, T, x, counts, offs, w13, w2, dy, calls, replays):
    """The expert MLP's forward+backward (gradients of x, w13, w2), ours against torch's path,
    each captured in a CUDA graph through torch.autograd.grad (no accumulation)."""
    xs = x.detach().requires_grad_()
    w13 = w13.detach().requires_grad_()
    w2 = w2.detach().requires_grad_()
    num_rows = offs[-1:]

    def ours():
        y = gated_expert_mlp(xs, w13, w2, counts, num_rows, "silu")
        return torch.autograd.grad(y, (xs, w13, w2), dy)

    def theirs():
        h = gated_activation(_grouped_mm(xs, w13.transpose(1, 2), offs=offs), "silu")
        y = _grouped_mm(h, w2.transpose(1, 2), offs=offs)
        return torch.autograd.grad(y, (xs, w13, w2), dy)

    try:
        return _time_mlp(preset, T, ours, theirs, calls, replays)
    except RuntimeError as exc:  # a capture that fails must not lose the rows before it
        print(f"{preset} T={T}: expert MLP not timed: {exc}", flush=True)
        return {"preset": preset, "T": T, "error": str(exc)[:300]}


def _time_mlp(preset, T, ours, theirs, calls, replays):
    err = max(rel(a, b) for a, b in zip(ours(), theirs()))
    if not err < 2e-2:
        raise RuntimeError(f"{preset} T={T}: expert MLP gradients off torch's by {err}")
    t_torch = [graph_time_us([theirs], calls, replays) / 1e3]
    t_ours = [graph_time_us([ours], calls, replays) / 1e3]
    t_torch.append(graph_time_us([theirs], calls, replays) / 1e3)
    t_ours.append(graph_time_us([ours], calls, replays) / 1e3)
    row = {"preset": preset, "T": T, "torch_ms": min(t_torch), "torch_ms_2": max(t_torch),
           "ours_ms": min(t_ours), "ours_ms_2": max(t_ours),
           "ours_vs_torch": min(t_ours) / min(t_torch), "err_vs_torch": err}
    print(row, flush=True)
    return row


if __name__ == "__main__":
    main()
