"""Timing and ceiling helpers shared by the launch/ scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch


def out_dir() -> str:
    path = os.environ.get("OUT", "out")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(name: str, payload) -> str:
    path = os.path.join(out_dir(), name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int = 20, warmup: int = 3, barrier=None) -> float:
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter on the CPU.
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


def time_fwd_and_fwd_bwd(module, x, g, device, iters, barrier=None) -> dict:
    """Median forward (no grad) and forward+backward ms of module(x), with peak device memory
    of the forward+backward: absolute, and above what was allocated before it.

    Each forward+backward starts from gradients set to None, as a training step does after
    `zero_grad(set_to_none=True)`: the backward writes the gradients, and the time holds no
    addition into the last call's (for Mixtral's 2.8 GB of expert weights that addition alone
    took 2.8 ms of a 7.4 ms step on an H100: launch/profile_layer.py --backward)."""
    xg = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).backward(g)

    res = {"fwd_ms": time_ms(fwd, device, iters, barrier=barrier)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    res["fwd_bwd_ms"] = time_ms(fwd_bwd, device, iters, barrier=barrier)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        res["peak_mem_gib"], res["peak_extra_gib"] = peak / 2**30, (peak - base) / 2**30
    module.zero_grad(set_to_none=True)
    return res


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


def graph_time_us(fns, calls=12, replays=30, capture_error_mode="global"):
    """Median per call of a graph that cycles through `fns` (one per input set)."""
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
    return statistics.median(times)


def copy_ceiling_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=20)
    del src, dst
    return 2 * nbytes / ms / 1e6


def matmul_ceiling_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = time_ms(lambda: a @ b, device, iters=20)
    return 2 * n**3 / ms / 1e9


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def layer_cases(presets, tokens, device):
    """For each preset (its bf16 layer made once) and T: preset, config, layer, T and a
    no-grad forward of T random tokens."""
    from ep_moe import MoE, MoEConfig
    for preset in presets:
        cfg = MoEConfig.preset(preset)
        layer = MoE(cfg, device=device, dtype=torch.bfloat16)
        for T in tokens:
            x = torch.randn(T, cfg.hidden_size, device=device, dtype=torch.bfloat16)

            def fwd(layer=layer, x=x):
                with torch.no_grad():
                    return layer(x)

            yield preset, cfg, layer, T, fwd
        del layer
        torch.cuda.empty_cache()


def on_off(fns: dict, switch, calls: int, rounds: int = 4):
    """A policy on and off in turn: each of `fns` (name -> callable) run once with `switch(True)`
    and once with `switch(False)`, then timed by CUDA-graph replay, on then off, `rounds` times.
    Returns ({name: [output on, output off]}, {f"{name}_on_us": [...], f"{name}_off_us": [...]});
    the switch is left on."""
    outs, times = {}, {}
    try:
        for on in (True, False):
            switch(on)
            for name, fn in fns.items():
                outs.setdefault(name, []).append(fn())
        for _ in range(rounds):
            for on in (True, False):
                switch(on)
                for name, fn in fns.items():
                    times.setdefault(f"{name}_{'on' if on else 'off'}_us", []).append(
                        graph_time_us([fn], calls, 20))
    finally:
        switch(True)
    return outs, times


def layer_config_ab(presets, tokens, device, other, what: str, extra=None) -> list[dict]:
    """The single-GPU layer's no-grad graph forward with `gemm_config` as shipped and as
    `other(shipped)` returns it, in turn (`on_off`, four rounds): one row per (preset, T) with
    both outputs' largest difference and the times; `extra(shipped, cfg, T)` adds fields."""
    import ep_moe.experts as experts_module
    shipped = experts_module.gemm_config
    alternative = other(shipped)

    def switch(on):
        experts_module.gemm_config = shipped if on else alternative

    rows = []
    for preset, cfg, layer, T, fwd in layer_cases(presets, tokens, device):
        outs, times = on_off({"layer": fwd}, switch, 2 if T >= 4096 else 10)
        on, off = outs["layer"]
        row = {"preset": preset, "T": T, "what": what, **(extra(shipped, cfg, T) if extra else {}),
               "max_abs_diff": (on.float() - off.float()).abs().max().item(),
               "on_us": times["layer_on_us"], "off_us": times["layer_off_us"]}
        rows.append(row)
        print(row, flush=True)
    return rows


def write_layer_rows(name: str, rows: list) -> None:
    """An A/B probe's layer rows under $OUT, with the GPU's name."""
    write_json(name, {"device": torch.cuda.get_device_name(), "rows": rows})


def spans(us) -> str:
    """Timings of the rounds as '757/762/776' (us)."""
    return "/".join(f"{u:.0f}" for u in us)
