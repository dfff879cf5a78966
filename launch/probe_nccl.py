"""Host time of one NCCL call on this machine: what an all-to-all costs the CPU to issue.

    torchrun --nproc-per-node N launch/probe_nccl.py

The dispatch is host-bound (launch/NOTES.md): this separates the collective's own issue cost
from ours. Each variant issues `n` small asynchronous calls back to back and reports the host
microseconds per call (median of 5 rounds, device drained and ranks lined up before each),
then the same for a small all_reduce, one torch op (`torch.add`, one kernel) and one
allocation (`torch.empty`, no kernel) as yardsticks.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402


def per_call_us(issue, n=50, rounds=5) -> float:
    times = []
    for _ in range(rounds + 1):  # the first round warms up
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        works = [issue() for _ in range(n)]
        times.append((time.perf_counter() - t0) / n * 1e6)
        for w in works:
            if hasattr(w, "wait"):  # a Work; the torch ops return tensors
                w.wait()
    return statistics.median(times[1:])


def main():
    dist.init_process_group("nccl")
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device("cuda")
    src = torch.randn(W * 64, 128, device=dev)
    dst = torch.empty_like(src)
    splits = [64] * W
    side = torch.cuda.Stream()

    def on_side():
        with torch.cuda.stream(side):
            return dist.all_to_all_single(dst, src, splits, splits, async_op=True)

    def p2p():
        ops = [op for peer in range(W) for op in (
            dist.P2POp(dist.isend, src[peer * 64:(peer + 1) * 64], peer),
            dist.P2POp(dist.irecv, dst[peer * 64:(peer + 1) * 64], peer))]
        return dist.batch_isend_irecv(ops)[-1]

    variants = {
        "all_to_all_single_splits": lambda: dist.all_to_all_single(
            dst, src, splits, splits, async_op=True),
        "all_to_all_single_even": lambda: dist.all_to_all_single(dst, src, async_op=True),
        "all_to_all_single_side_stream": on_side,
        "batch_isend_irecv": p2p,
        "all_reduce_small": lambda: dist.all_reduce(src[:1], async_op=True),
        "torch_add": lambda: torch.add(src, 1.0),
        "torch_empty": lambda: torch.empty(1024, device=dev),
    }
    res = {name: per_call_us(fn) for name, fn in variants.items()}
    env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL"))}
    if rank == 0:
        for name, us in res.items():
            print(f"{name:34s} {us:8.1f} us host per call", flush=True)
        write_json(f"probe_nccl_W{W}.json", {"W": W, "host_us_per_call": res, "env": env,
                                             "torch": torch.__version__,
                                             "nccl": ".".join(map(str, torch.cuda.nccl.version()))})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
