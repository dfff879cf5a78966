"""Timers, ceilings and report helpers shared by the launch/ tools (not part of the package).

Timers, as docs/performance.md describes them:
- `graph_time_us`: several calls captured in one CUDA graph and replayed; the median per call.
  For launch-bound sizes, where a Python call would time the host, not the GPU.
- `bench_ms`: `triton.testing.do_bench` median on CUDA (it flushes L2 between calls); on the
  CPU a few wall-clock calls, which only show that the code runs.
- `time_ms`: CUDA events (or the wall clock) around each call, with an optional barrier that
  lines the ranks up first: what the multi-process harness needs.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time

import torch


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def out_dir() -> str:
    """The output folder: $OUT when set, else ./out (created if missing)."""
    path = os.environ.get("OUT") or os.path.join(".", "out")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(name: str, payload) -> str:
    path = os.path.join(out_dir(), name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def run_info(device: torch.device) -> dict:
    """What a figure needs beside it: the card, the date and the versions."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": card, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton_version}


def markdown_table(rows: list[dict], columns: list[str], headers: dict | None = None) -> str:
    """Rows as a markdown table; `headers` renames columns, missing cells stay empty."""
    def fmt(v):
        if v is None:
            return ""
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    names = [(headers or {}).get(c, c) for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def note(msg: str) -> None:
    print(f"note: {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int = 20, warmup: int = 3, barrier=None) -> float:
    """Median time of fn() in ms: CUDA events on a GPU, perf_counter on the CPU.
    `barrier` (callable) lines the ranks up before each timed call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if barrier is not None:
            barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_ms(fn, device: torch.device, cpu_iters: int = 3) -> float:
    """Median ms of fn(): `triton.testing.do_bench` on CUDA, a few wall-clock calls on the CPU."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return time_ms(fn, device, iters=cpu_iters, warmup=1)


def capture_graph(fns, calls=1, capture_error_mode="global") -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` calls cycling through `fns` (one per input set), each fn run
    once on a side stream first (warm-up, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        for i in range(calls):
            fns[i % len(fns)]()
    return graph


def graph_time_us(fns, calls=10, replays=30, capture_error_mode="global") -> float:
    """Median µs per call of a CUDA graph that holds `calls` calls cycling through `fns`
    (pass several input sets to keep them out of L2)."""
    graph = capture_graph(fns, calls, capture_error_mode)
    graph.replay()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    del graph
    return statistics.median(times)


def time_fwd_and_fwd_bwd(module, x, g, device, iters, barrier=None, warmup=3) -> dict:
    """Median forward (no grad) and training-step ms of module(x), and the peak device memory
    of the training step: absolute, and above what was allocated before it.

    A training step starts from gradients set to None, as after `zero_grad(set_to_none=True)`:
    the backward writes the gradients rather than adding into the last call's (for Mixtral's
    2.8 GB of expert weights that addition alone is ~1.4 ms at 4096 tokens on an H100)."""
    xg = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).backward(g)

    res = {"fwd_ms": time_ms(fwd, device, iters, warmup, barrier)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    res["fwd_bwd_ms"] = time_ms(fwd_bwd, device, iters, warmup, barrier)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        res["peak_mem_gib"], res["peak_extra_gib"] = peak / 2**30, (peak - base) / 2**30
    module.zero_grad(set_to_none=True)
    return res


def fp8_shape(cfg):
    """`cfg` (a MoEConfig) with D and I rounded up to multiples of 128, which FP8 experts' block
    scales need (the tiny preset's are not); unchanged where they already are."""
    return cfg.replace(**{k: -(-getattr(cfg, k) // 128) * 128
                          for k in ("hidden_size", "intermediate_size")})


# --------------------------------------------------------------------------------------------
# Ceilings, measured in the run that reports against them
# --------------------------------------------------------------------------------------------

def copy_ceiling_gbs(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s); 2 GiB on CUDA."""
    nbytes = 2 << 30 if device.type == "cuda" else 1 << 24
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=20)
    del src, dst
    return 2 * nbytes / ms / 1e6


def fp8_matmul_ceiling_tflops(device: torch.device) -> float | None:
    """e4m3 square matmul (`torch._scaled_mm`, one scale per tensor, bf16 out), 8192^3; None
    where torch has no FP8 matmul for the device (the CPU, GPUs before compute capability 8.9)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major operand
    one = torch.ones((), device=device)
    ms = time_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                          out_dtype=torch.bfloat16), device, iters=20)
    return 2 * n**3 / ms / 1e9


def matmul_ceiling_tflops(device: torch.device) -> float:
    """bf16 square matmul, 8192^3 on CUDA (256^3 on the CPU)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = time_ms(lambda: a @ b, device, iters=20 if device.type == "cuda" else 3)
    return 2 * n**3 / ms / 1e9
