"""Which kernels a single-GPU layer forward (or forward+backward) spends its device time in.

    python launch/profile_layer.py [--presets qwen3 mixtral] [--tokens 512 4096 16384]
                                   [--backward]

torch.profiler over a few inference forwards per (preset, T), or training steps' forward and
backward with --backward; the device time of each kernel (summed over the calls, divided by
their number) goes to one text file under $OUT, with the share it takes, and the wall time of
a call beside the kernels' sum (a wall time far above it: the host is the bound). Where the
layer stands against its floor (launch/bench_layer.py) and what to speed up first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir  # noqa: E402

from ep_moe import MoE, MoEConfig  # noqa: E402


def kernel_times(layer: MoE, x: torch.Tensor, backward: bool = False,
                 reps: int = 5) -> tuple[list[tuple[str, float, int]], float]:
    """(kernel name, device µs per call, launches per call), longest first, and the wall µs of
    a call outside the profiler. A call: one no-grad forward, or forward and backward."""
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
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / reps * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:90]
            t = totals.setdefault(name, [0.0, 0])
            t[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
            t[1] += 1
    rows = [(n, us / reps, count // reps) for n, (us, count) in totals.items()]
    return sorted(rows, key=lambda r: -r[1]), wall_us


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen3", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    p.add_argument("--backward", action="store_true", help="forward and backward (training)")
    args = p.parse_args()
    what = "forward+backward" if args.backward else "forward"
    lines = [f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}"]
    for preset in args.presets:
        cfg = MoEConfig.preset(preset)
        torch.manual_seed(0)
        layer = MoE(cfg, device="cuda", dtype=torch.bfloat16).train(args.backward)
        for T in args.tokens:
            x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
            rows, wall_us = kernel_times(layer, x, args.backward)
            total = sum(r[1] for r in rows)
            lines.append(f"\n## {preset} T={T}: {total:.1f} us of kernels per {what}, "
                         f"{wall_us:.1f} us wall")
            for name, us, n in rows[:24 if args.backward else 14]:
                lines.append(f"{us:9.1f} us {100 * us / total:5.1f}%  x{n:<3d} {name}")
        del layer
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text, flush=True)
    name = "profile_layer_bwd.txt" if args.backward else "profile_layer.txt"
    with open(os.path.join(out_dir(), name), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
