"""Per-expert cuBLAS GEMMs against torch's grouped GEMM (CUTLASS) and ours, one GPU.

    python launch/probe_loop.py [--presets mixtral qwen3] [--tokens 1024 4096 16384]

The layer's expert GEMMs from 1024 rows per expert run torch's grouped GEMM at 1.2-1.3x the
matmul floor (Mixtral), while cuBLAS reaches the ceiling on a dense 8192^3 product. With the
row counts on the host (one sync) each expert's rows are a plain dense product; this times
that, in a CUDA graph (counts read before the capture), for:
  gemm1: gather + gate/up + gated activation;  gemm2: down projection;
  torch: grouped_mm;  loop: one torch.mm per expert into a slice of one buffer;  ours: Triton;
  bmm: the same rows split evenly over the experts, one batched cuBLAS product (what the
       vendor library gets on this balance of bytes and FLOPs: the Qwen3 shape sits at the
       ridge where both bound the time).
Then the experts' forward+backward (a training step's share, eager) on torch's grouped path
against the per-expert loop, and the router's top-k forward+backward, kernel against torch.
Each variant is checked against torch's first. Writes probe_loop.json under $OUT.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_us, time_ms, write_json  # noqa: E402
from sweep_gemm import SHAPES, ceilings, gemm_cases, rel  # noqa: E402

from ep_moe import MoEConfig  # noqa: E402
from ep_moe.experts import Experts, _grouped_mm  # noqa: E402
from ep_moe.kernels.activation import gated_activation  # noqa: E402
from ep_moe.kernels.grouped_gemm import grouped_gemm  # noqa: E402
from ep_moe.kernels.topk import softmax_topk  # noqa: E402


def loop_mm(a, w, counts, out):
    """out[rows of e] = a[rows of e] @ w[e].T for each expert e, counts a host list."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[start:start + n], w[e].t(), out=out[start:start + n])
        start += n
    return out


def gemm_rows(preset, T, K, w13, w2, case, copy_gbs, mm_tflops):
    x, src, counts, offs, h_ref, y_ref, floors = case
    E = w13.shape[0]
    P = T * K
    host = counts.tolist()
    xs = x[src]
    h_raw = torch.empty(P, w13.shape[1], device=x.device, dtype=x.dtype)
    y = torch.empty(P, w2.shape[1], device=x.device, dtype=x.dtype)
    M = P // E  # the balanced split
    xb, hb = xs[:M * E].view(E, M, -1), h_ref[:M * E].view(E, M, -1)
    variants = {
        (1, "torch"): lambda: gated_activation(
            _grouped_mm(x[src], w13.transpose(1, 2), offs=offs), "silu"),
        (1, "loop"): lambda: gated_activation(loop_mm(x[src], w13, host, h_raw), "silu"),
        (1, "ours"): lambda: grouped_gemm(x, w13, counts, a_rows=src, activation="silu"),
        (1, "bmm"): lambda: torch.bmm(xb, w13.transpose(1, 2)),
        (2, "torch"): lambda: _grouped_mm(h_ref, w2.transpose(1, 2), offs=offs),
        (2, "loop"): lambda: loop_mm(h_ref, w2, host, y),
        (2, "ours"): lambda: grouped_gemm(h_ref, w2, counts),
        (2, "bmm"): lambda: torch.bmm(hb, w2.transpose(1, 2)),
    }
    rows = []
    calls, replays = (2, 6) if T >= 4096 else (6, 12)
    for (gemm, name), fn in variants.items():
        ref = h_ref if gemm == 1 else y_ref
        row = {"preset": preset, "T": T, "gemm": gemm, "variant": name,
               "floor_us": floors[gemm], "rows_per_expert": P / E}
        if name != "bmm":
            err = rel(fn(), ref)
            if not err < 2e-2:
                raise RuntimeError(f"{preset} T={T} gemm {gemm} {name}: rel err {err:.3g}")
            row["rel_err_vs_torch"] = err
        row["us"] = [graph_time_us([fn], calls, replays) for _ in range(2)]
        row["x_floor"] = min(row["us"]) / floors[gemm]
        if name == "bmm":  # its own FLOPs (M * E rows) over the matmul ceiling
            n_out = w13.shape[1] if gemm == 1 else w2.shape[1]
            k_in = w13.shape[2] if gemm == 1 else w2.shape[2]
            row["tflops"] = 2 * M * E * n_out * k_in / min(row["us"]) / 1e6
        rows.append(row)
        print(row, flush=True)
    return rows


def training_rows(preset, T, K, w13, w2, case):
    """The experts' forward + backward, eager: torch's grouped path against the loop."""
    x, src, counts, offs, *_ = case
    rows, outs = [], {}
    g = torch.randn(T * K, w2.shape[1], device=x.device, dtype=x.dtype)
    for impl in ("grouped_mm", "loop"):
        cfg = MoEConfig.preset(preset, expert_impl=impl)
        experts = Experts(cfg, w13.shape[0]).to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(w13)
            experts.down_proj.copy_(w2)
        xs = x[src].detach().requires_grad_()

        def step():
            experts.zero_grad(set_to_none=True)
            xs.grad = None
            experts(xs, counts, offs).backward(g)

        step()
        outs[impl] = (xs.grad.clone(), experts.gate_up_proj.grad.clone(),
                      experts.down_proj.grad.clone())
        row = {"preset": preset, "T": T, "what": "experts_fwd_bwd_eager", "variant": impl,
               "ms": [time_ms(step, x.device, iters=5, warmup=1) for _ in range(2)]}
        if impl == "loop":
            row["rel_err_vs_grouped"] = [rel(a, b) for a, b in zip(outs["loop"],
                                                                   outs["grouped_mm"])]
        rows.append(row)
        print(row, flush=True)
        del experts
    return rows


def topk_rows(dev, tokens=(512, 4096, 16384)):
    rows = []
    for preset in ("qwen3", "mixtral"):
        E, _, _, K = SHAPES[preset]
        for T in tokens:
            logits = torch.randn(T, E, device=dev) * 2
            g = torch.randn(T, K, device=dev)
            leaf = logits.clone().requires_grad_()

            def kernel():
                _, w = softmax_topk(leaf, K, True)
                return torch.autograd.grad(w, leaf, g)[0]

            def torch_ops():
                w = leaf.topk(K, dim=-1, sorted=True).values.softmax(-1)
                return torch.autograd.grad(w, leaf, g)[0]

            err = (kernel() - torch_ops()).abs().max().item()
            if not err < 1e-5:
                raise RuntimeError(f"top-k backward {preset} T={T}: {err}")
            row = {"preset": preset, "T": T, "what": "topk_fwd_bwd", "max_abs_diff": err,
                   "kernel_us": [graph_time_us([kernel], 10, 20) for _ in range(2)],
                   "torch_us": [graph_time_us([torch_ops], 10, 20) for _ in range(2)]}
            rows.append(row)
            print(row, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["mixtral", "qwen3"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--train-tokens", nargs="+", type=int, default=[4096])
    args = p.parse_args()
    dev = torch.device("cuda")
    copy_gbs, mm_tflops = ceilings(dev)
    rows = topk_rows(dev)
    for preset, T, K, w13, w2, case in gemm_cases(args.presets, args.tokens, dev, copy_gbs,
                                                  mm_tflops):
        rows += gemm_rows(preset, T, K, w13, w2, case, copy_gbs, mm_tflops)
        if T in args.train_tokens:
            rows += training_rows(preset, T, K, w13, w2, case)
        write_json("probe_loop.json", {"device": torch.cuda.get_device_name(dev),
                                       "copy_gbs": copy_gbs, "mm_tflops": mm_tflops,
                                       "rows": rows})
    print(f"# copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s")
    for r in rows:
        if "gemm" in r:
            print(f"{r['preset']:8s} T={r['T']:6d} gemm{r['gemm']} {r['variant']:6s} "
                  f"{min(r['us']):9.1f} us  {r['x_floor']:.2f}x floor")
        else:
            print({k: v for k, v in r.items() if k not in ("preset",)}, r["preset"])


if __name__ == "__main__":
    main()
