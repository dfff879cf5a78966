"""The differentiable collectives of `ep_moe.dispatch.collectives` on a gloo group of W = 3
spawned CPU processes: the reduce-scatter (the forward of `_ReduceScatter`, the backward of
`_AllGather`) sums the ranks' bf16 partials in fp32.

The values are chosen so that a bf16 reduction cannot pass: 1 + 2^-8 lies halfway between 1
and the next bf16 (1 + 2^-7) and rounds to even, back to 1. Each column holds 1.0 on one rank
and 2^-8 on the other two, so whatever order the backend adds the three ranks in, some column
adds a 2^-8 to the 1.0 first and a bf16 sum loses both (1.0 instead of 1 + 2^-7), while the
fp32 sum is exact. Row q is scaled by 2^q (exact in both dtypes) so that a rank handed another
rank's chunk shows too. Letters as in the package: W ranks, N rows a rank keeps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn_group
from ep_moe.dispatch.collectives import _AllGather, _ReduceScatter, _reduce_scatter

pytestmark = pytest.mark.distributed

W, N = 3, 2
SMALL = 2.0 ** -8  # half a bf16 ulp of 1.0


def make_partial(rank: int) -> torch.Tensor:
    """This rank's bf16 contribution, (W * N, W): column c is 1.0 on rank c, 2^-8 elsewhere;
    row q scaled by 2^q."""
    x = torch.full((W * N, W), SMALL, dtype=torch.float64)
    x[:, rank] = 1.0
    return (x * 2.0 ** torch.arange(W * N, dtype=torch.float64)[:, None]).to(torch.bfloat16)


def expected_chunk(rank: int) -> torch.Tensor:
    """float64 sum over the ranks of the N rows `rank` keeps: 2^q * (1 + 2 * 2^-8)."""
    rows = torch.arange(rank * N, (rank + 1) * N, dtype=torch.float64)
    return (2.0 ** rows[:, None] * (1.0 + 2 * SMALL)).expand(N, W)


def check_reduce_scatter() -> list[str]:
    """Run on every rank; returns its mismatches (empty: passed)."""
    rank, group = dist.get_rank(), dist.group.WORLD
    x = make_partial(rank)
    want = expected_chunk(rank)
    fails = []
    results = {
        "_reduce_scatter": _reduce_scatter(x, group),
        "_ReduceScatter.apply": _ReduceScatter.apply(x, group),
    }
    # the all-gather's backward reduce-scatters the gradient, then casts it to x's dtype
    # (1 + 2^-7 is a bf16: exact after the cast, 1.0 had the sum run in bf16)
    x_local = torch.zeros(N, W, dtype=torch.bfloat16, requires_grad=True)
    _AllGather.apply(x_local, group).backward(x)
    results["_AllGather backward"] = x_local.grad
    for what, out in results.items():
        dtype = torch.bfloat16 if what == "_AllGather backward" else torch.float32
        if out.dtype != dtype or tuple(out.shape) != (N, W):
            fails.append(f"{what}: {out.dtype} {tuple(out.shape)}, expected {dtype} {(N, W)}")
        elif not torch.equal(out.double(), want):
            fails.append(f"{what}: {out.double().tolist()} != {want.tolist()}")
    return fails


def test_partials_are_known_exactly():
    """The premise: the sum is exact in fp32 and lost in bf16 whichever rank comes last."""
    parts = [make_partial(r) for r in range(W)]
    fp32 = sum(p.float() for p in parts)
    assert torch.equal(fp32.double(), torch.cat([expected_chunk(r) for r in range(W)]))
    for last in range(W):
        first = [parts[r] for r in range(W) if r != last]
        bf16 = (first[0] + first[1]) + parts[last]  # bf16 + bf16 rounds to bf16
        assert not torch.equal(bf16.double(), fp32.double()), last


def test_reduce_scatter_sums_bf16_in_fp32():
    per_rank = spawn_group(check_reduce_scatter, W, timeout=120)
    failures = [f"rank {r}: {msg}" for r, fails in enumerate(per_rank) for msg in fails]
    assert not failures, "\n".join(failures)
