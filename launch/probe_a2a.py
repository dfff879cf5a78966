"""Raw all_to_all_single bus bandwidth at a few sizes, under whatever NCCL environment this
process starts with (launch/probe_a2a.sh runs it once per setting).

    torchrun --nproc-per-node N launch/probe_a2a.py NAME

Per-rank messages of 16 to 256 MiB (the layer's exchanges at 8192 tokens per GPU are 120-270
MiB); bus bandwidth = bytes per rank x (W - 1) / W / time, the median of 20 calls after a
barrier each. Rank 0 writes a2a_NAME.json under $OUT.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_ms, write_json  # noqa: E402


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "default"
    dist.init_process_group("nccl")
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device())
    res = {"name": name, "W": W, "env": {k: v for k, v in os.environ.items()
                                          if k.startswith(("NCCL_", "TORCH_NCCL"))}}
    for mib in (16, 64, 128, 256):
        n = mib * 2**20 // 2 // W // 64 * 64 * W  # whole 128-byte lines per rank's chunk
        src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dist.all_to_all_single(dst, src), device, 20,
                     barrier=dist.barrier)
        res[f"busbw_gbs_{mib}MiB"] = n * 2 * (W - 1) / W / ms / 1e6
    if rank == 0:
        write_json(f"a2a_{name}.json", res)
        print(name, {k: round(v, 1) for k, v in res.items() if k.startswith("busbw")},
              flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
