"""Where the expert-parallel forward's time goes in a CUDA graph: every rank's kernel timeline.

    torchrun --nproc-per-node 4 launch/probe_pipeline.py --preset qwen3 --tokens 8192 --chunks 1 3
        [--exchange nvlink]

For each chunk count the no-grad forward (fixed-size exchange) is captured in a CUDA graph, timed,
then replayed alone under torch.profiler a few times; the single-GPU layer likewise. Each rank
writes its kernels (name, stream, start and duration in us from the replay's first kernel) to
pipeline_<preset>_r<rank>.json, and rank 0 prints, per variant, the span, each kind of kernel's
busy time (NCCL, GEMM, other) and how much of the GEMMs ran beside an NCCL kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import capture_graph, graph_time_us, out_dir  # noqa: E402

from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.distributed import group_rank_and_size, init_distributed  # noqa: E402


def kernels_of(graph: torch.cuda.CUDAGraph, barrier) -> list[dict]:
    """One replay under the profiler: its kernels, times relative to the first one's start."""
    torch.cuda.synchronize()
    barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    ks = [e for e in events if e.get("cat") == "kernel"]
    t0 = min((e["ts"] for e in ks), default=0.0)
    return sorted(({"name": e["name"][:90], "stream": e.get("args", {}).get("stream"),
                    "start": round(e["ts"] - t0, 2), "dur": round(e["dur"], 2)} for e in ks),
                  key=lambda k: k["start"])


def kind(name: str) -> str:
    n = name.lower()
    if "nccl" in n or "barrier" in n:  # NCCL's kernels, or symmetric memory's barriers
        return "nccl"
    if "gemm" in n or "cutlass" in n or "sm90" in n or "matmul" in n:
        return "gemm"
    return "other"


def summary(ks: list[dict]) -> dict:
    """Span, busy time per kind, and the GEMMs' time that overlapped an NCCL kernel."""
    span = max((k["start"] + k["dur"] for k in ks), default=0.0)
    spans = {"nccl": [], "gemm": [], "other": []}  # (start, end) of each kernel, by kind
    for k in ks:
        spans[kind(k["name"])].append((k["start"], k["start"] + k["dur"]))
    busy = {n: sum(b - a for a, b in v) for n, v in spans.items() if v}
    beside = sum(max(0.0, min(b, d) - max(a, c))
                 for a, b in spans["gemm"] for c, d in spans["nccl"])
    return {"span_us": round(span, 1), **{f"{n}_us": round(v, 1) for n, v in busy.items()},
            "gemm_beside_nccl_us": round(beside, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 3])
    p.add_argument("--replays", type=int, default=3, help="profiled replays per variant")
    p.add_argument("--exchange", default="collective", choices=["collective", "nvlink"])
    args = p.parse_args()
    group = init_distributed()
    rank, W = group_rank_and_size(group)
    device = torch.device("cuda", torch.cuda.current_device())
    barrier = lambda: dist.barrier(group)  # noqa: E731
    dtype, T = torch.bfloat16, args.tokens
    torch.manual_seed(rank)
    x = torch.randn(T, MoEConfig.preset(args.preset).hidden_size, dtype=dtype, device=device)
    report = {"W": W, "rank": rank, "preset": args.preset, "T": T,
              "device": torch.cuda.get_device_name(device), "variants": {}}
    variants = [("single", None)] + [(f"c{c}", c) for c in args.chunks]
    for name, chunks in variants:
        cfg = MoEConfig.preset(args.preset, max_tokens_per_rank=T, dispatch_chunks=chunks or 1,
                               exchange=args.exchange if chunks else "collective")
        torch.manual_seed(0)
        layer = MoE(cfg, process_group=None if chunks is None else group, device=device,
                    dtype=dtype)

        def fwd():
            with torch.no_grad():
                layer(x)

        barrier()
        # thread-local capture: NCCL's watchdog thread queries events meanwhile
        graph = capture_graph([fwd], 1, "thread_local")
        barrier()
        ms = graph_time_us([fwd], 3, 20, "thread_local") / 1e3
        replays = [kernels_of(graph, barrier) for _ in range(args.replays)]
        if rank == 0 and not replays[0]:
            print(f"{name}: the profiler recorded no kernel of the graph's replay", flush=True)
        report["variants"][name] = {"graph_fwd_ms": ms, "replays": replays,
                                    "summaries": [summary(r) for r in replays]}
        if rank == 0:
            print(f"{name}: graph fwd {ms:.3f} ms;", report["variants"][name]["summaries"],
                  flush=True)
        del graph
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir(), f"pipeline_{args.preset}_r{rank}.json"), "w") as f:
        json.dump(report, f)
    barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
