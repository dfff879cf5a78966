"""The exchanges of `ep_moe.dispatch` on gloo groups of W = 3 spawned CPU processes, and the
host-side arithmetic of its pipelined exchange.

The differentiable collectives (`ep_moe.dispatch.collectives`): the reduce-scatter (the forward
of `ReduceScatter`, the backward of `AllGather`) sums the ranks' bf16 partials in fp32.
The values are chosen so that a bf16 reduction cannot pass: 1 + 2^-8 lies halfway between 1
and the next bf16 (1 + 2^-7) and rounds to even, back to 1. Each column holds 1.0 on one rank
and 2^-8 on the other two, so whatever order the backend adds the three ranks in, some column
adds a 2^-8 to the 1.0 first and a bf16 sum loses both (1.0 instead of 1 + 2^-7), while the
fp32 sum is exact. Row q is scaled by 2^q (exact in both dtypes) so that a rank handed another
rank's chunk shows too.

The dispatchers (`ep_moe.dispatch.dispatchers`), driven directly: rows tagged with their source
rank and token, received and combined on every rank, against the rows and sums derived by hand
from every rank's (reproducible) routing. Letters as in the package: W ranks, N rows a rank
keeps, T tokens, E experts, K top-k, C rows per rank of a fixed-size exchange.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn_group
from ep_moe import ExpertPlacement
from ep_moe.dispatch import AllGatherDispatcher, AllToAllDispatcher, chunk_bounds
from ep_moe.dispatch.collectives import AllGather, ReduceScatter, reduce_scatter
from ep_moe.plan import ForwardPlan

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
        "reduce_scatter": reduce_scatter(x, group),
        "ReduceScatter.apply": ReduceScatter.apply(x, group),
    }
    # the all-gather's backward reduce-scatters the gradient, then casts it to x's dtype
    # (1 + 2^-7 is a bf16: exact after the cast, 1.0 had the sum run in bf16)
    x_local = torch.zeros(N, W, dtype=torch.bfloat16, requires_grad=True)
    AllGather.apply(x_local, group).backward(x)
    results["AllGather backward"] = x_local.grad
    for what, out in results.items():
        dtype = torch.bfloat16 if what == "AllGather backward" else torch.float32
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


@pytest.mark.distributed
def test_reduce_scatter_sums_bf16_in_fp32():
    per_rank = spawn_group(check_reduce_scatter, W, timeout=120)
    failures = [f"rank {r}: {msg}" for r, fails in enumerate(per_rank) for msg in fails]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------
# The dispatchers: which rows reach which rank, and what comes back
# --------------------------------------------------------------------------------------------

E, K = 7, 2
OWNER = [0, 0, 0, 1, 1, 2, 2]  # linear, E = 7 over W = 3: rank 0 holds one expert more
TOKENS = (5, 0, 4)            # rank 1 sends nothing (and still receives)
C = 6                         # fixed-size exchange: above every rank's T, so padding travels


def make_tokens(rank: int):
    """Rank `rank`'s x (T, 3) = [rank, token, a small int], topk_ids (T, K) distinct experts
    and topk_weights (T, K), the same wherever built. Integer-valued x keeps every sum below
    exact in fp32."""
    g = torch.Generator().manual_seed(100 + rank)
    T = TOKENS[rank]
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    x = torch.stack([torch.full((T,), float(rank)), torch.arange(T, dtype=torch.float32),
                     torch.randint(-8, 8, (T,), generator=g).float()], 1)
    return x, ids, torch.rand(T, K, generator=g)


def sent_to(ids: torch.Tensor, rank: int) -> torch.Tensor:
    """(T,) bool: the tokens with at least one expert on `rank`."""
    return torch.tensor([any(OWNER[e] == rank for e in row) for row in ids.tolist()],
                        dtype=torch.bool)


def _plan(exchange: str, chunks: int = 1, grad: bool = False) -> ForwardPlan:
    """What the planner would hand an all-to-all dispatcher (only the exchange fields count)."""
    return ForwardPlan(router_topk="torch", dispatcher="all_to_all", exchange=exchange,
                       chunks=chunks, experts="grouped_mm", rows=0, pairs=0, grad=grad)


def _expect(what, ok, fails):
    if not ok:
        fails.append(what)


def check_dispatchers() -> list[str]:
    """Run on every rank; returns its mismatches (empty: passed)."""
    me, W, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    placement = ExpertPlacement(E, W, "linear")
    tokens = [make_tokens(w) for w in range(W)]
    x, ids, weights = tokens[me]
    local = {e for e in range(E) if OWNER[e] == me}
    # by hand: the rows each rank sends me, in rank then token order
    mine = [sent_to(tokens[w][1], me) for w in range(W)]
    recv_x = torch.cat([tokens[w][0][mine[w]] for w in range(W)])
    recv_ids = torch.cat([tokens[w][1][mine[w]] for w in range(W)])
    recv_w = torch.cat([tokens[w][2][mine[w]] for w in range(W)])
    # compute: each rank scales its rows by rank + 1, so token t comes home as x[t] times the
    # sum of (w + 1) over the ranks w it visited
    def compute(sent):
        return sent.x * (me + 1)

    visits = sum((w + 1) * sent_to(ids, w).float() for w in range(W))
    y_a2a = x * visits[:, None]
    fails = []

    # all-to-all, split sizes exchanged: exactly the rows needed
    d = AllToAllDispatcher(placement, group)
    sent = d.dispatch(x, ids, weights)
    h = sent.handle
    _expect(f"a2a input_splits {h.input_splits}", h.input_splits == tuple(
        int(sent_to(ids, w).sum()) for w in range(W)), fails)
    _expect(f"a2a output_splits {h.output_splits}",
            h.output_splits == tuple(int(m.sum()) for m in mine), fails)
    _expect("a2a rows", torch.equal(sent.x, recv_x), fails)
    _expect("a2a topk_ids", torch.equal(sent.topk_ids, recv_ids), fails)
    _expect("a2a topk_weights", torch.equal(sent.topk_weights, recv_w), fails)
    pairs = sum(e in local for e in recv_ids.reshape(-1).tolist())
    _expect(f"a2a num_local_pairs {h.num_local_pairs} != {pairs}",
            h.num_local_pairs == pairs and sent.pairs_exact, fails)
    _expect("a2a combine", torch.equal(d.combine(compute(sent), h), y_a2a), fails)
    # backward: the reverse exchanges (uneven splits: swapped sizes would show)
    x_grad = x.clone().requires_grad_()
    y = d.run(x_grad, ids, weights, compute, _plan("exact", grad=True))
    y.backward(torch.ones_like(y))
    _expect("a2a run (grad)", torch.equal(y.detach(), y_a2a), fails)
    _expect("a2a run: x.grad", torch.equal(x_grad.grad, visits[:, None].expand(-1, 3)), fails)

    # all-to-all, fixed size: rank w's rows at [w * C, w * C + n_w), the rest padding
    d = AllToAllDispatcher(placement, group, capacity=C)
    sent = d.dispatch(x, ids, weights)
    h = sent.handle
    _expect(f"fixed splits {h.input_splits} {h.output_splits}",
            h.input_splits == h.output_splits == (C,) * W, fails)
    _expect(f"fixed rows {tuple(sent.x.shape)}", sent.x.shape == (W * C, 3), fails)
    real = torch.cat([torch.arange(int(m.sum())) + w * C for w, m in enumerate(mine)])
    pad = torch.ones(W * C, dtype=torch.bool)
    pad[real] = False
    _expect("fixed rows", torch.equal(sent.x[real], recv_x), fails)
    _expect("fixed topk_ids", torch.equal(sent.topk_ids[real], recv_ids), fails)
    _expect("fixed topk_weights", torch.equal(sent.topk_weights[real], recv_w), fails)
    _expect("fixed padding: rows 0, ids -1, weights 0", (sent.x[pad] == 0).all()
            and (sent.topk_ids[pad] == -1).all() and (sent.topk_weights[pad] == 0).all(), fails)
    _expect(f"fixed num_local_pairs {h.num_local_pairs}: the bound W * C * K",
            h.num_local_pairs == W * C * K and not sent.pairs_exact, fails)
    _expect("fixed combine", torch.equal(d.combine(compute(sent), h), y_a2a), fails)
    # a chunk of the pipeline passes its own capacity: W * 2 rows, not W * C
    part = d.dispatch(x[:2], ids[:2], weights[:2], capacity=2)
    _expect(f"capacity=2 dispatch: {tuple(part.x.shape)}, splits {part.handle.input_splits}",
            part.x.shape[0] == W * 2 and part.handle.input_splits == (2,) * W, fails)
    # the pipeline in 3 chunks (2, 3 and 1 tokens of C = 6), inference and training; each
    # chunk's exchanges carry that chunk's rows per rank, out (all chunks) then back
    d = AllToAllDispatcher(placement, group, capacity=C)
    all_to_all, splits = dist.all_to_all_single, []

    def recording(out, x, output_split_sizes=None, *args, **kwargs):
        splits.append(output_split_sizes and tuple(output_split_sizes))  # None: even
        return all_to_all(out, x, output_split_sizes, *args, **kwargs)

    want = [(c,) * W for c in (2, 3, 1)] * 2
    x_grad = x.clone().requires_grad_()
    dist.all_to_all_single = recording
    try:
        y_inf = d.run(x, ids, weights, compute, _plan("fixed", chunks=3, grad=False))
        splits_inf, splits[:] = list(splits), []
        y = d.run(x_grad, ids, weights, compute, _plan("fixed", chunks=3, grad=True))
        splits_grad = list(splits)
    finally:
        dist.all_to_all_single = all_to_all
    _expect("chunked run (no grad)", torch.equal(y_inf, y_a2a), fails)
    _expect(f"chunked run (no grad): splits {splits_inf}", splits_inf == want, fails)
    _expect(f"chunked run (grad): splits {splits_grad}", splits_grad == want, fails)
    y.backward(torch.ones_like(y))
    _expect("chunked run (grad)", torch.equal(y.detach(), y_a2a), fails)
    _expect("chunked run: x.grad", torch.equal(x_grad.grad, visits[:, None].expand(-1, 3)),
            fails)

    # all-gather: every rank's tokens, each padded to the most any rank has (or to C)
    for capacity in (None, C):
        what = f"allgather (capacity {capacity})"
        d = AllGatherDispatcher(placement, group, me, capacity=capacity)
        sent = d.dispatch(x, ids, weights)
        h = sent.handle
        P = capacity or max(TOKENS)
        _expect(f"{what}: tokens_per_rank {h.tokens_per_rank}",
                h.tokens_per_rank == ((P,) * W if capacity else TOKENS), fails)
        _expect(f"{what}: rows {tuple(sent.x.shape)}", sent.x.shape == (W * P, 3), fails)
        for w, (xw, idsw, ww) in enumerate(tokens):
            rows, T = slice(w * P, w * P + TOKENS[w]), TOKENS[w]
            _expect(f"{what}: rank {w}'s rows", torch.equal(sent.x[rows], xw)
                    and torch.equal(sent.topk_ids[rows], idsw)
                    and torch.equal(sent.topk_weights[rows], ww), fails)
            _expect(f"{what}: rank {w}'s padding ids", (sent.topk_ids[w * P + T:(w + 1) * P]
                                                        == -1).all(), fails)
        pairs = sum(e in local for w in range(W) for e in tokens[w][1].reshape(-1).tolist())
        _expect(f"{what}: num_local_pairs {h.num_local_pairs}",
                h.num_local_pairs == (W * P * K if capacity else pairs)
                and sent.pairs_exact == (capacity is None), fails)
        # every rank computes every token: x[t] * (1 + 2 + 3), summed in fp32 and returned in
        # the partials' dtype (small integers: exact in bf16 too)
        for dtype in (torch.float32, torch.bfloat16):
            y = d.combine(compute(sent).to(dtype), h)
            _expect(f"{what}: combine in {dtype}", y.dtype == dtype
                    and torch.equal(y.float(), x * 6.0), fails)
    return fails


@pytest.mark.distributed
def test_dispatchers_route_rows_by_hand():
    per_rank = spawn_group(check_dispatchers, W, timeout=120)
    failures = [f"rank {r}: {msg}" for r, fails in enumerate(per_rank) for msg in fails]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("capacity,chunks,bounds", [
    (7, 2, [(0, 4), (4, 7)]),                    # halves, the odd token to the first (ceil)
    (7, 3, [(0, 2), (2, 6), (6, 7)]),            # tapered 1:2:1, edges rounded up: 2, 4, 1
    (24, 3, [(0, 6), (6, 18), (18, 24)]),        # three chunks taper exactly: 6, 12, 6
    (10, 4, [(0, 2), (2, 5), (5, 9), (9, 10)]),  # 1:2:2:1 of 10, edges ceil(10 * i / 6)
    (5, 1, [(0, 5)]),                            # one chunk: the whole capacity
    (2, 4, [(0, 1), (1, 2)]),                    # more chunks than tokens: empty ones dropped
])
def test_chunk_bounds(capacity, chunks, bounds):
    # every rank derives the same ranges from the config: they must be these exactly
    assert chunk_bounds(capacity, chunks) == bounds
