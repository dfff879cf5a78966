"""Which rank owns which expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """E global experts over W ranks.

    "linear": contiguous blocks, the first E % W ranks one expert more.
    "round_robin": expert g on rank g % W.
    `local_experts[r]` lists rank r's global expert ids in local order.
    """

    num_experts: int
    world_size: int
    kind: str = "linear"

    def __post_init__(self) -> None:
        for name in ("num_experts", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ExpertPlacement.{name} must be a positive int, got {value!r}")
        if self.world_size > self.num_experts:
            raise ValueError(
                f"expert parallelism needs at least one expert per rank: got "
                f"num_experts={self.num_experts} for a group of {self.world_size} ranks")
        if self.kind not in ("linear", "round_robin"):
            raise ValueError(f"placement must be 'linear' or 'round_robin', got {self.kind!r}")

    @property
    def local_experts(self) -> tuple[tuple[int, ...], ...]:
        E, W = self.num_experts, self.world_size
        if self.kind == "round_robin":
            return tuple(tuple(range(r, E, W)) for r in range(W))
        sizes = [E // W + (r < E % W) for r in range(W)]
        starts = [sum(sizes[:r]) for r in range(W)]
        return tuple(tuple(range(s, s + n)) for s, n in zip(starts, sizes))

    @property
    def max_local_experts(self) -> int:
        return -(-self.num_experts // self.world_size)

    def owner(self, device=None) -> torch.Tensor:
        """(E,) int64 rank that owns each global expert."""
        owner = torch.empty(self.num_experts, dtype=torch.int64)
        for r, experts in enumerate(self.local_experts):
            owner[list(experts)] = r
        return owner.to(device)

    def expert_map(self, rank: int, device=None) -> torch.Tensor:
        """(E,) int32 local id of each global expert on `rank`, -1 where another rank owns it."""
        emap = torch.full((self.num_experts,), -1, dtype=torch.int32)
        experts = list(self.local_experts[rank])
        emap[experts] = torch.arange(len(experts), dtype=torch.int32)
        return emap.to(device)

    def padded_local_experts(self, device=None) -> torch.Tensor:
        """(W, ceil(E/W)) int64 global ids per rank, padded with E (a slot past the end)."""
        table = torch.full((self.world_size, self.max_local_experts), self.num_experts,
                           dtype=torch.int64)
        for r, experts in enumerate(self.local_experts):
            table[r, :len(experts)] = torch.tensor(experts, dtype=torch.int64)
        return table.to(device)
