"""Worker for `test_two_node_torchrun`: one process per node, joined through torchrun's
environment by `ep_moe.distributed.init_distributed`; exits non-zero on any mismatch."""

from __future__ import annotations

import sys

import torch.distributed as dist

from dist_utils import Case, failures_by_rank, run_cases
from ep_moe.distributed import init_distributed

CASES = [
    Case("two_node_a2a", tokens=(5, 3), config=dict(num_experts=7, top_k=2)),
    Case("two_node_allgather_rr", tokens=(0, 4),
         config=dict(top_k=3, dispatcher="allgather", placement="round_robin")),
]


def main() -> int:
    group = init_distributed(backend="gloo")
    if group is None:
        print("not launched by torchrun (no RANK / WORLD_SIZE)", file=sys.stderr)
        return 2
    if dist.get_world_size() != 2:
        print(f"expected 2 ranks, got {dist.get_world_size()}", file=sys.stderr)
        return 2
    results = run_cases(CASES)
    rank = dist.get_rank()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    dist.destroy_process_group()
    failed = False
    for case in CASES:
        failures = failures_by_rank(everyone, case.name)
        if failures:
            failed = True
            print(f"rank {rank} sees case {case.name} fail:\n{failures}", file=sys.stderr)
    print(f"rank {rank}: {'FAILED' if failed else 'all cases passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
