"""The all-to-all send layout (ep_moe/kernels/dispatch_layout.py) against a brute-force loop.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (as in CI) and natively on a GPU; the
torch fallback is checked against the same loop.
"""

from __future__ import annotations

import pytest
import torch

import ep_moe.kernels.dispatch_layout as layout_module
from ep_moe.kernels.dispatch_layout import (_layout_torch, dispatch_layout, gather_send_rows,
                                           packed_row, split_packed)
from ep_moe.kernels.fused_mul_sum import _use_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def brute_force(topk_ids, owner, W):
    """Send rows grouped by rank, tokens in order; copy_index[t, w] the row of (t, w); the
    send metadata: copies per rank, then pairs per expert of that rank (padded with 0)."""
    T, E = topk_ids.shape[0], owner.shape[0]
    copy_index = torch.full((T, W), -1, dtype=torch.int32)
    tokens = []
    for w in range(W):
        for t in range(T):
            if any(0 <= e < E and owner[e] == w for e in topk_ids[t].tolist()):
                copy_index[t, w] = len(tokens)
                tokens.append(t)
    per_rank = [[e for e in range(E) if owner[e] == w] for w in range(W)]
    e_max = max(len(p) for p in per_rank)
    meta = torch.zeros(W, 1 + e_max, dtype=torch.int64)
    meta[:, 0] = (copy_index >= 0).sum(0)
    flat = [e for e in topk_ids.reshape(-1).tolist() if 0 <= e < E]
    for w, experts in enumerate(per_rank):
        for j, e in enumerate(experts):
            meta[w, 1 + j] = flat.count(e)
    return meta, copy_index, torch.tensor(tokens, dtype=torch.int64)


def make_table(owner, W):
    """(W, e_max) experts of each rank, padded with E: ExpertPlacement's layout."""
    E = owner.shape[0]
    per_rank = [[e for e in range(E) if owner[e] == w] for w in range(W)]
    e_max = max(len(p) for p in per_rank)
    return torch.tensor([p + [E] * (e_max - len(p)) for p in per_rank], dtype=torch.int64)


def layout(impl, ids, owner, W):
    table = make_table(owner, W)
    if impl == "torch":
        return _layout_torch(ids, owner, table)
    if not _use_triton(ids.to(DEVICE)):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    return dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table.to(DEVICE))


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
    (700, 8, 256, 3, "linear"),    # DeepSeek-V3-like E = 256 over 3 ranks (uneven): ~22 blocks
    (0, 2, 8, 2, "linear"),        # a rank with no tokens
]


def make_owner(E, W, kind):
    return torch.arange(E) % W if kind == "round_robin" else torch.arange(E) * W // E


@pytest.mark.parametrize("T,K,E,W,kind", CASES)
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_matches_brute_force(T, K, E, W, kind, impl):
    ids, owner = routed_ids(T, K, E, seed=T + K), make_owner(E, W, kind)
    meta, copy_index, tokens = brute_force(ids, owner, W)
    got = layout(impl, ids, owner, W)
    S = int(meta[:, 0].sum())
    assert torch.equal(got.send_meta.cpu(), meta)
    assert torch.equal(got.copy_index.cpu(), copy_index)
    assert got.send_tokens.shape == (T * min(K, W),)  # a token reaches <= min(K, W) ranks
    assert torch.equal(got.send_tokens[:S].cpu(), tokens)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_out_of_range_ids_send_nothing(impl):
    # -1 (padding) and ids >= E must neither send a copy nor index the owner table
    ids = torch.tensor([[0, -1], [9, 3], [-5, 100], [2, 2]])
    owner = torch.tensor([0, 1, 1, 0])
    meta, copy_index, tokens = brute_force(ids, owner, 2)
    got = layout(impl, ids, owner, 2)
    assert torch.equal(got.copy_index.cpu(), copy_index)
    assert copy_index[2].tolist() == [-1, -1]
    assert torch.equal(got.send_tokens[:int(meta[:, 0].sum())].cpu(), tokens)
    assert torch.equal(got.send_meta.cpu(), meta)  # the out-of-range ids counted nowhere


def test_int32_ids_and_owner():
    ids, owner = routed_ids(40, 2, 8, seed=1), make_owner(8, 2, "linear")
    table = make_table(owner, 2).to(DEVICE)
    a = dispatch_layout(ids.to(DEVICE, torch.int32), owner.to(DEVICE, torch.int32), table)
    b = brute_force(ids, owner, 2)
    assert torch.equal(a.copy_index.cpu(), b[1]) and torch.equal(a.send_meta.cpu(), b[0])


@pytest.mark.parametrize("bad,match", [
    (lambda ids, owner, table: (ids[0], owner, table), "topk_ids"),        # 1-D ids
    (lambda ids, owner, table: (ids.float(), owner, table), "topk_ids"),   # float ids
    (lambda ids, owner, table: (ids, owner[None], table), "owner"),        # 2-D owner
    (lambda ids, owner, table: (ids, owner, table[0]), "table"),           # 1-D table
    (lambda ids, owner, table: (ids, owner, table[:0]), "table"),          # no ranks
    (lambda ids, owner, table: (ids, owner.to("meta"), table), "owner"),   # another device
    (lambda ids, owner, table: (ids, owner.float(), table), "owner"),      # float owner
    (lambda ids, owner, table: (ids, owner, table.float()), "table"),      # float table
])
def test_validation(bad, match):
    ids, owner = routed_ids(4, 2, 8, seed=0), make_owner(8, 2, "linear")
    with pytest.raises(ValueError, match=match):
        dispatch_layout(*bad(ids, owner, make_table(owner, 2)))


def test_strided_owner():
    # owner as a column of a wider buffer: read through its stride, not as if contiguous
    ids, owner = routed_ids(40, 2, 8, seed=3), make_owner(8, 2, "round_robin")
    wide = torch.stack([owner, 1 - owner], 1)
    got = layout("kernel", ids, wide[:, 0], 2)
    meta, copy_index, _ = brute_force(ids, owner, 2)
    assert torch.equal(got.copy_index.cpu(), copy_index) and torch.equal(got.send_meta.cpu(), meta)


# --------------------------------------------------------------------------------------------
# Send buffers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,K,E,W,kind", [
    (37, 8, 16, 3, "round_robin"),  # most tokens go to every rank: the buffer nearly full
    (600, 2, 8, 4, "linear"),       # rows past the count stay unwritten (cap = 2T, ~1.7T used)
    (5, 1, 4, 2, "linear"),         # K = 1: one copy per token
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_send_rows(T, K, E, W, kind, dtype):
    ids, owner = routed_ids(T, K, E, seed=T), make_owner(E, W, kind)
    meta, copy_index, tokens = brute_force(ids, owner, W)
    got = layout("kernel", ids, owner, W)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 129, generator=g).to(DEVICE, dtype)  # 129: odd D, not a block multiple
    weights = torch.rand(T, K, generator=g).to(DEVICE)
    send = gather_send_rows(x, weights, ids.to(DEVICE), got)
    width, Dp = packed_row(129, K, dtype)
    assert send.shape == (T * min(K, W), width) and send.dtype == dtype
    assert Dp * send.element_size() % 4 == 0  # the routing starts on a 4-byte word
    # rows hold token and routing, padded to whole 16-byte lines (NCCL chunks stay aligned)
    size = send.element_size()
    used = Dp + 2 * K * 4 // size
    assert width * size % 16 == 0 and used <= width < used + 16 // size
    send_x, send_routing = split_packed(send, 129, K)
    S = tokens.shape[0]
    assert send_x.shape == (T * min(K, W), 129) and send_routing.shape == (T * min(K, W), 2 * K)
    assert torch.equal(send_x[:S].cpu(), x.cpu()[tokens])
    expected = torch.cat([weights.cpu(), ids.float()], 1)[tokens]
    assert torch.equal(send_routing[:S].cpu(), expected)


def test_gather_send_rows_torch_path_masks_unused_rows(monkeypatch):
    # the torch path (CPU without the interpreter) must not index with the unused entries
    ids, owner = routed_ids(30, 2, 8, seed=2), make_owner(8, 2, "linear")
    lay = _layout_torch(ids, owner, make_table(owner, 2))
    _, _, tokens = brute_force(ids, owner, 2)
    S = tokens.shape[0]
    assert S < 60  # some rows unused, so the masking matters
    send_tokens = lay.send_tokens.clone()
    send_tokens[S:] = 10**9  # garbage, as the kernel layout leaves there
    monkeypatch.setattr(layout_module, "_use_triton", lambda t: False)
    x, weights = torch.randn(30, 8), torch.rand(30, 2)
    send = gather_send_rows(x, weights, ids, lay._replace(send_tokens=send_tokens))
    send_x, send_routing = split_packed(send, 8, 2)
    assert torch.equal(send_x[:S], x[tokens])
    assert torch.equal(send_routing[:S], torch.cat([weights, ids.float()], 1)[tokens])


def test_gather_send_rows_validation():
    ids, owner = routed_ids(6, 2, 8, seed=4), make_owner(8, 2, "linear")
    lay = _layout_torch(ids, owner, make_table(owner, 2))
    x, weights = torch.randn(6, 8), torch.rand(6, 2)
    other = _layout_torch(ids[:4], owner, make_table(owner, 2))  # another batch's layout
    with pytest.raises(ValueError, match="layout"):
        gather_send_rows(x, weights, ids, other)
    with pytest.raises(ValueError, match="device"):
        gather_send_rows(x, weights.to("meta"), ids, lay)
    with pytest.raises(ValueError, match="float32"):
        gather_send_rows(x.double(), weights, ids, lay)


# --------------------------------------------------------------------------------------------
# Fixed-size exchange: C rows per rank, whatever the routing
# --------------------------------------------------------------------------------------------

def fixed_rows(copy_index, C):
    """The brute force's packed rows moved to w * C + (position among rank w's copies)."""
    start = torch.cumsum((copy_index >= 0).sum(0), 0) - (copy_index >= 0).sum(0)
    W = copy_index.shape[1]
    moved = copy_index.long() - start[None, :] + torch.arange(W)[None, :] * C
    return torch.where(copy_index >= 0, moved, -1).to(torch.int32)


@pytest.mark.parametrize("T,K,E,W,kind", [
    (7, 2, 8, 4, "linear"),         # T below one block
    (37, 8, 16, 3, "round_robin"),  # most tokens go to every rank: blocks nearly full
    (600, 2, 8, 2, "linear"),       # several token blocks
    (0, 2, 8, 2, "linear"),         # no tokens: padding only
])
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_fixed_capacity_layout(T, K, E, W, kind, impl):
    ids, owner = routed_ids(T, K, E, seed=T + 1), make_owner(E, W, kind)
    meta, copy_index, _ = brute_force(ids, owner, W)
    C = T + 3  # three rows of padding at least in every rank's block
    table = make_table(owner, W)
    if impl == "torch":
        got = _layout_torch(ids, owner, table, C)
    else:
        if not _use_triton(ids.to(DEVICE)):
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
        got = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table.to(DEVICE), capacity=C)
    expected = fixed_rows(copy_index, C)
    assert got.capacity == C and got.send_tokens.shape == (W * C,)
    assert torch.equal(got.send_meta.cpu(), meta)
    assert torch.equal(got.copy_index.cpu(), expected)
    rows, tokens = expected.reshape(-1), torch.arange(T)[:, None].expand(T, W).reshape(-1)
    named = rows >= 0
    assert torch.equal(got.send_tokens.cpu()[rows[named].long()], tokens[named])


@pytest.mark.parametrize("T", [37, 0])  # 0: every row is padding (the torch path)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_send_rows_fixed_capacity(T, dtype, monkeypatch):
    K, E, W, C = 8, 16, 3, 41
    ids, owner = routed_ids(T, K, E, seed=5), make_owner(E, W, "round_robin")
    table = make_table(owner, W)
    lay = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table.to(DEVICE), capacity=C) \
        if _use_triton(ids.to(DEVICE)) else _layout_torch(ids, owner, table, C)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, 129, generator=g).to(DEVICE, dtype)
    weights = torch.rand(T, K, generator=g).to(DEVICE)
    # fresh memory may read as zeros: poison it, so unwritten padding would show
    new_empty = torch.Tensor.new_empty

    def poisoned(self, *size, **kw):
        out = new_empty(self, *size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    send = gather_send_rows(x, weights, ids.to(DEVICE), lay)
    monkeypatch.undo()
    assert send.shape[0] == W * C
    send_x, send_routing = split_packed(send, 129, K)
    copy_index = fixed_rows(brute_force(ids, owner, W)[1], C)
    real = torch.zeros(W * C, dtype=torch.bool)
    for t in range(T):
        for w in range(W):
            r = int(copy_index[t, w])
            if r >= 0:
                real[r] = True
                assert torch.equal(send_x[r].cpu(), x[t].cpu())
                assert torch.equal(send_routing[r].cpu(), torch.cat([weights[t].cpu(),
                                                                     ids[t].float()]))
    pad = ~real
    assert pad.sum() >= 3 * W  # C - T rows of padding at least per rank
    # padding: zeros and no slot (ids -1, weights 0), so a receiver may read every row
    assert (send_x.cpu()[pad] == 0).all()
    assert (send_routing.cpu()[pad, :K] == 0).all() and (send_routing.cpu()[pad, K:] == -1).all()


def test_fixed_capacity_below_T_raises():
    ids, owner = routed_ids(6, 2, 8, seed=4), make_owner(8, 2, "linear")
    with pytest.raises(ValueError, match="capacity"):
        dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), make_table(owner, 2).to(DEVICE),
                        capacity=5)
