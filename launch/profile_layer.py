"""Where a single-GPU layer forward (or training step) spends its device time, kernel by kernel.

    python launch/profile_layer.py [--presets qwen3 mixtral] [--tokens 512 4096 16384]
                                   [--backward]
    python launch/profile_layer.py            # no GPU: the tiny preset, CPU op times

torch.profiler over a few calls per (preset, T): no-grad forwards, or with --backward training
steps (forward and backward from gradients set to None). Each kernel's device time, summed over
the calls and divided by their number, goes into a text report with its share and launches per
call; beside it the wall time of a call outside the profiler (a wall time far above the
kernels' sum: the host is the bound). Compare the total with the floor that
launch/bench_layer.py prints for the same shape. The report goes to
$OUT/profile_layer[_bwd].txt ($OUT defaults to ./out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import note, out_dir, run_info, sync  # noqa: E402

from ep_moe import MoE, MoEConfig  # noqa: E402


def kernel_times(layer: MoE, x: torch.Tensor, backward: bool = False,
                 reps: int = 5) -> tuple[list[tuple[str, float, int]], float]:
    """(kernel name, µs per call, launches per call), longest first, and the wall µs of a call
    outside the profiler. On CUDA the kernels' device time; on the CPU the ops' own CPU time."""
    device = x.device
    if backward:
        x = x.detach().requires_grad_()
        g = torch.randn_like(x)

        def call():  # a training step: gradients from None, not added into the last call's
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(g)
    else:
        def call():
            with torch.no_grad():
                layer(x)
    for _ in range(min(reps, 3)):
        call()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    sync(device)
    wall_us = (time.perf_counter() - t0) / reps * 1e6
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            call()
        sync(device)
    totals: dict[str, list] = {}
    if on_gpu:
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                t = totals.setdefault(ev.name[:90], [0.0, 0])
                t[0] += ev.device_time_total
                t[1] += 1
    else:
        for ev in prof.key_averages():
            if ev.self_cpu_time_total > 0:
                totals[ev.key[:90]] = [ev.self_cpu_time_total, ev.count]
    rows = [(n, us / reps, count // reps) for n, (us, count) in totals.items()]
    return sorted(rows, key=lambda r: -r[1]), wall_us


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None,
                   help="default: qwen3 mixtral on a GPU, tiny on the CPU")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="T per call (default: 512 4096 16384 on a GPU, 16 on the CPU)")
    p.add_argument("--backward", action="store_true", help="training steps, not forwards")
    p.add_argument("--top", type=int, default=None,
                   help="kernels listed per shape (default: 14, or 24 with --backward)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    presets = args.presets or (["qwen3", "mixtral"] if on_gpu else ["tiny"])
    tokens = args.tokens or ([512, 4096, 16384] if on_gpu else [16])
    top = args.top or (24 if args.backward else 14)
    if not on_gpu:
        note("no GPU: the profile lists CPU ops' own time, not kernels' device time")
    what = "training step" if args.backward else "forward"
    info = run_info(device)
    lines = [f"# {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}"]
    for preset in presets:
        cfg = MoEConfig.preset(preset)
        torch.manual_seed(0)
        layer = MoE(cfg, device=device, dtype=torch.bfloat16).train(args.backward)
        for T in tokens:
            x = torch.randn(T, cfg.hidden_size, device=device, dtype=torch.bfloat16)
            rows, wall_us = kernel_times(layer, x, args.backward, reps=5 if on_gpu else 2)
            total = sum(r[1] for r in rows) or 1.0
            unit = "kernels" if on_gpu else "CPU ops"
            lines.append(f"\n## {preset} T={T}: {total:.1f} us of {unit} per {what}, "
                         f"{wall_us:.1f} us wall")
            for name, us, n in rows[:top]:
                lines.append(f"{us:9.1f} us {100 * us / total:5.1f}%  x{n:<3d} {name}")
        del layer
        if on_gpu:
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text, flush=True)
    path = os.path.join(out_dir(), "profile_layer_bwd.txt" if args.backward
                        else "profile_layer.txt")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"\nwrote {path}")
    return text


if __name__ == "__main__":
    main()
