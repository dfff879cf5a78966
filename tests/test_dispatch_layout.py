"""The all-to-all send layout (ep_moe/kernels/dispatch_layout.py) against a brute-force loop.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (as in CI) and natively on a GPU; the
torch fallback is checked against the same loop.
"""

from __future__ import annotations

import pytest
import torch

from ep_moe.kernels.dispatch_layout import _layout_torch, dispatch_layout
from ep_moe.kernels.fused_mul_sum import _use_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def brute_force(topk_ids, owner, W):
    """Send rows grouped by rank, tokens in order; copy_index[t, w] the row of (t, w)."""
    T, E = topk_ids.shape[0], owner.shape[0]
    copy_index = torch.full((T, W), -1, dtype=torch.int32)
    tokens = []
    for w in range(W):
        for t in range(T):
            if any(0 <= e < E and owner[e] == w for e in topk_ids[t].tolist()):
                copy_index[t, w] = len(tokens)
                tokens.append(t)
    counts = (copy_index >= 0).sum(0).to(torch.int32)
    return counts, copy_index, torch.tensor(tokens, dtype=torch.int64)


def routed_ids(T, K, E, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)


CASES = [  # (T, K, E, W, owner)
    (1, 1, 4, 2, "linear"),        # one token, one slot
    (7, 2, 8, 4, "linear"),        # T below one block
    (37, 8, 16, 3, "round_robin"),  # top-8, W not a power of two
    (600, 2, 8, 2, "linear"),      # several token blocks: the earlier blocks' counts add up
    (300, 8, 128, 8, "round_robin"),  # Qwen3-like: most tokens go to every rank
    (50, 3, 5, 5, "linear"),       # one expert per rank
    (0, 2, 8, 2, "linear"),        # a rank with no tokens
]


def make_owner(E, W, kind):
    return torch.arange(E) % W if kind == "round_robin" else torch.arange(E) * W // E


@pytest.mark.parametrize("T,K,E,W,kind", CASES)
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_matches_brute_force(T, K, E, W, kind, impl):
    ids, owner = routed_ids(T, K, E, seed=T + K), make_owner(E, W, kind)
    counts, copy_index, tokens = brute_force(ids, owner, W)
    if impl == "kernel":
        if not _use_triton(ids.to(DEVICE)):
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
        got = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), W)
    else:
        got = _layout_torch(ids, owner, W)
    S = int(counts.sum())
    assert torch.equal(got.send_counts.cpu(), counts)
    assert torch.equal(got.copy_index.cpu(), copy_index)
    assert got.send_tokens.shape == (W * T,)
    assert torch.equal(got.send_tokens[:S].cpu(), tokens)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_out_of_range_ids_send_nothing(impl):
    # -1 (padding) and ids >= E must neither send a copy nor index the owner table
    ids = torch.tensor([[0, -1], [9, 3], [-5, 100], [2, 2]])
    owner = torch.tensor([0, 1, 1, 0])
    counts, copy_index, tokens = brute_force(ids, owner, 2)
    if impl == "kernel":
        if not _use_triton(ids.to(DEVICE)):
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
        got = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), 2)
    else:
        got = _layout_torch(ids, owner, 2)
    assert torch.equal(got.copy_index.cpu(), copy_index)
    assert copy_index[2].tolist() == [-1, -1]
    assert torch.equal(got.send_tokens[:int(counts.sum())].cpu(), tokens)


def test_int32_ids_and_owner():
    ids, owner = routed_ids(40, 2, 8, seed=1), make_owner(8, 2, "linear")
    a = dispatch_layout(ids.to(DEVICE, torch.int32), owner.to(DEVICE, torch.int32), 2)
    b = brute_force(ids, owner, 2)
    assert torch.equal(a.copy_index.cpu(), b[1])


@pytest.mark.parametrize("bad,match", [
    (lambda ids, owner: (ids[0], owner, 2), "topk_ids"),             # 1-D ids
    (lambda ids, owner: (ids.float(), owner, 2), "topk_ids"),        # float ids
    (lambda ids, owner: (ids, owner[None], 2), "owner"),             # 2-D owner
    (lambda ids, owner: (ids, owner, 0), "world_size"),              # no ranks
    (lambda ids, owner: (ids, owner.to("meta"), 2), "owner"),        # another device
])
def test_validation(bad, match):
    ids, owner = routed_ids(4, 2, 8, seed=0), make_owner(8, 2, "linear")
    with pytest.raises(ValueError, match=match):
        dispatch_layout(*bad(ids, owner))
