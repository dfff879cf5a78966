"""Single-GPU MoE layer: ours against the floor and against transformers' blocks, in one run.

    python launch/bench_layer.py [--presets mixtral qwen3] [--tokens 16 512 4096 16384]

Floor = max(FLOPs / matmul ceiling, expert-weight bytes / copy ceiling), both ceilings
measured in this run. Each shape is checked first: ours against the transformers block on the
same weights, and against the float64 reference at the smallest T. A table last, JSON under $OUT.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (copy_ceiling_gbs, graph_time_us, markdown_table,  # noqa: E402
                    matmul_ceiling_tflops, out_dir, time_fwd_and_fwd_bwd, write_json)

from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.reference import reference_moe  # noqa: E402


def hf_block(preset: str, cfg: MoEConfig):
    if preset == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        hf_cfg = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                               num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k)
        return MixtralSparseMoeBlock(hf_cfg)
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    hf_cfg = Qwen3MoeConfig(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size,
                            num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                            norm_topk_prob=True)
    return Qwen3MoeSparseMoeBlock(hf_cfg)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def profile_forward(module, x, device, name):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        for _ in range(3):
            module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_dev = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(os.path.join(out_dir(), name), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort_dev, row_limit=30))
        f.write("\n\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["mixtral", "qwen3"])
    p.add_argument("--tokens", nargs="+", type=int, default=[16, 512, 4096, 16384])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dense-upto", type=int, default=512,
                   help="also time the dense (every expert on every row) path up to this T "
                        "(ours takes it up to the preset's dense_max_rows)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, fp32")
    p.add_argument("--profile", nargs="*", type=int, default=[],
                   help="write torch.profiler tables of our forward at these T under $OUT")
    args = p.parse_args()
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        args.tokens, args.iters = [4, 16], 1
    copy_gbs = copy_ceiling_gbs(device, nbytes=1 << 24 if smoke else 2 << 30)
    mm_tflops = matmul_ceiling_tflops(device, n=256 if smoke else 8192)
    name = "cpu" if smoke else torch.cuda.get_device_name(device)
    report = {"device": name, "torch": torch.__version__,
              "copy_ceiling_gbs": copy_gbs, "matmul_ceiling_tflops": mm_tflops, "rows": []}
    print(f"# {report['device']}: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s",
          flush=True)
    for preset in args.presets:
        cfg = MoEConfig.preset(preset)
        if smoke:
            cfg = cfg.replace(hidden_size=64, intermediate_size=32)
        torch.manual_seed(0)
        block = hf_block(preset, cfg)
        for prm in block.parameters():
            torch.nn.init.normal_(prm, std=cfg.init_std)
        block = block.to(device=device, dtype=dtype)
        ours = MoE.from_hf(block).to(device=device, dtype=dtype)
        ours.config = ours.config.replace(dense_max_rows=cfg.dense_max_rows)  # as the preset
        dense = MoE.from_hf(block, dtype=dtype, device=device)
        for m in (dense, dense.experts):  # every T through .dense (torch's batched GEMMs)
            m.config = m.config.replace(expert_impl="grouped_mm", dense_max_rows=1 << 30)
        # torch's grouped GEMM in the forward too (what the Triton inference path replaces)
        torch_gemm = MoE.from_hf(block, dtype=dtype, device=device)
        for m in (torch_gemm, torch_gemm.experts):
            m.config = m.config.replace(expert_impl="grouped_mm",
                                        dense_max_rows=cfg.dense_max_rows)
        D, I, K = cfg.hidden_size, cfg.intermediate_size, cfg.top_k
        for T in args.tokens:
            x = torch.randn(1, T, D, device=device, dtype=dtype)
            g = torch.randn(1, T, D, device=device, dtype=dtype)
            with torch.no_grad():
                y, route = ours(x, return_router_output=True)
                y_hf = block(x)
                # float64 reference on the first 256 tokens (routing is per token)
                n = min(T, 256)
                params = {k: v for k, v in ours.state_dict().items()}
                y_ref, _, _ = reference_moe(x[0, :n], params, cfg, topk_ids=route.topk_ids[:n])
                err_ref, err_hf_ref = rel(y[0, :n], y_ref), rel(y_hf[0, :n], y_ref)
                if not err_ref < 2e-2:
                    raise RuntimeError(f"{preset} T={T}: ours vs float64 reference {err_ref}")
                if T <= args.dense_upto:
                    err_dense = rel(dense(x)[0, :n], y_ref)
                    if not err_dense < 2e-2:
                        raise RuntimeError(f"{preset} T={T}: dense vs float64 {err_dense}")
            hit = int((route.num_tokens_per_expert > 0).sum())
            flops = 6 * T * K * D * I
            weight_bytes = hit * 3 * D * I * 2
            floor_fwd = max(flops / mm_tflops / 1e9, weight_bytes / copy_gbs / 1e6)
            floor_fb = max(3 * flops / mm_tflops / 1e9, 3 * weight_bytes / copy_gbs / 1e6)
            mine = time_fwd_and_fwd_bwd(ours, x, g, device, args.iters)
            theirs = time_fwd_and_fwd_bwd(block, x, g, device, args.iters)
            with torch.no_grad():
                err_tg = rel(torch_gemm(x)[0, :n], y_ref)
            tg_ms = time_fwd_and_fwd_bwd(torch_gemm, x, g, device, args.iters)["fwd_ms"]
            row = {
                "preset": preset, "T": T, "err_vs_fp64": err_ref, "hf_err_vs_fp64": err_hf_ref,
                "fwd_ms": mine["fwd_ms"], "fwd_floor_ms": floor_fwd,
                "fwd_vs_floor": mine["fwd_ms"] / floor_fwd,
                "fwd_tflops": flops / mine["fwd_ms"] / 1e9,
                "hf_fwd_ms": theirs["fwd_ms"], "fwd_speedup_vs_hf": theirs["fwd_ms"] / mine["fwd_ms"],
                "fwd_bwd_ms": mine["fwd_bwd_ms"], "fwd_bwd_vs_floor": mine["fwd_bwd_ms"] / floor_fb,
                "hf_fwd_bwd_ms": theirs["fwd_bwd_ms"],
                "fwd_bwd_speedup_vs_hf": theirs["fwd_bwd_ms"] / mine["fwd_bwd_ms"],
                "peak_gib": mine.get("peak_extra_gib"), "hf_peak_gib": theirs.get("peak_extra_gib"),
                "torch_gemm_fwd_ms": tg_ms, "torch_gemm_err_vs_fp64": err_tg,
            }
            if device.type == "cuda":
                # CUDA-graph replay: the GPU's time alone, as decode loops run the layer
                def fwd(m):
                    with torch.no_grad():
                        m(x)
                calls = 2 if T >= 4096 else 10
                row["fwd_graph_ms"] = graph_time_us([lambda: fwd(ours)], calls, 20) / 1e3
                row["fwd_graph_vs_floor"] = row["fwd_graph_ms"] / floor_fwd
                row["torch_gemm_fwd_graph_ms"] = graph_time_us([lambda: fwd(torch_gemm)],
                                                               calls, 20) / 1e3
            if T in args.profile:
                profile_forward(ours, x, device, f"profile_layer_{preset}_T{T}.txt")
            if T <= args.dense_upto:
                d = time_fwd_and_fwd_bwd(dense, x, g, device, args.iters)
                row.update(dense_fwd_ms=d["fwd_ms"], dense_fwd_bwd_ms=d["fwd_bwd_ms"],
                           dense_fwd_vs_floor=d["fwd_ms"] / floor_fwd)
            report["rows"].append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
        del block, ours, dense, torch_gemm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json("bench_layer.json", report)
    cols = ["preset", "T", "fwd_ms", "fwd_vs_floor", "fwd_graph_ms", "fwd_graph_vs_floor",
            "torch_gemm_fwd_ms", "torch_gemm_fwd_graph_ms", "fwd_tflops", "hf_fwd_ms",
            "fwd_speedup_vs_hf",
            "fwd_bwd_ms", "fwd_bwd_vs_floor", "hf_fwd_bwd_ms", "fwd_bwd_speedup_vs_hf",
            "peak_gib", "hf_peak_gib", "dense_fwd_ms", "dense_fwd_bwd_ms"]
    print(markdown_table(report["rows"], cols))


if __name__ == "__main__":
    main()
