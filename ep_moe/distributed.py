"""Process-group plumbing: the only place that reads rank and world size from the environment
or calls `init_process_group`. Everything else receives a `ProcessGroup` and asks it."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def init_distributed(backend: Optional[str] = None) -> Optional[ProcessGroup]:
    """Join the job torchrun started: NCCL with one GPU per local rank, else gloo on CPU.

    Returns the world group, or None when not launched by torchrun (a single process).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.group.WORLD


def group_rank_and_size(group: Optional[ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_same_config(config, group: ProcessGroup) -> None:
    """Raise the same ValueError on every rank unless all ranks hold an equal config."""
    configs = [None] * dist.get_world_size(group)
    dist.all_gather_object(configs, config, group=group)
    diffs = []
    for rank, other in enumerate(configs):
        for field in dataclasses.fields(configs[0]):
            a, b = getattr(configs[0], field.name), getattr(other, field.name)
            if a != b:
                diffs.append(f"{field.name}: rank 0 has {a!r}, rank {rank} has {b!r}")
    if diffs:
        raise ValueError("MoEConfig differs between the ranks of the expert-parallel group: "
                         + "; ".join(diffs))


def all_gather_rows(local: torch.Tensor, rows_per_rank: list[int],
                    group: ProcessGroup) -> list[torch.Tensor]:
    """Gather a tensor whose first dim differs by rank; returns one tensor per rank."""
    longest = max(rows_per_rank)
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in rows_per_rank]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p[:n] for p, n in zip(parts, rows_per_rank)]
