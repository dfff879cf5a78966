"""Which kernels a single-GPU layer forward spends its device time in.

    python launch/profile_layer.py [--presets qwen3 mixtral] [--tokens 512 4096 16384]

torch.profiler over a few inference forwards per (preset, T); the device time of each kernel
(summed over the forwards, divided by their number) goes to one text file under $OUT, with
the share of the forward it takes: where the layer stands against its floor
(launch/bench_layer.py) and what to speed up first.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir  # noqa: E402

from ep_moe import MoE, MoEConfig  # noqa: E402


def kernel_times(layer: MoE, x: torch.Tensor, reps: int = 5) -> list[tuple[str, float, int]]:
    """(kernel name, device µs per forward, launches per forward), longest first."""
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                layer(x)
            torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:90]
            t = totals.setdefault(name, [0.0, 0])
            t[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
            t[1] += 1
    rows = [(n, us / reps, count // reps) for n, (us, count) in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen3", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    args = p.parse_args()
    lines = [f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}"]
    for preset in args.presets:
        cfg = MoEConfig.preset(preset)
        torch.manual_seed(0)
        layer = MoE(cfg, device="cuda", dtype=torch.bfloat16).eval()
        for T in args.tokens:
            x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
            rows = kernel_times(layer, x)
            total = sum(r[1] for r in rows)
            lines.append(f"\n## {preset} T={T}: {total:.1f} us of kernels per forward")
            for name, us, n in rows[:14]:
                lines.append(f"{us:9.1f} us {100 * us / total:5.1f}%  x{n:<3d} {name}")
        del layer
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(out_dir(), "profile_layer.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
