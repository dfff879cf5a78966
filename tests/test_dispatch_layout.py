"""The all-to-all send layout (ep_moe/kernels/dispatch_layout.py) against a brute-force loop,
and the placement (ep_moe/placement.py) whose owner and table it reads.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (as in CI) and natively on a GPU; the
torch fallback is checked against the same loop.
"""

from __future__ import annotations

import pytest
import torch

import ep_moe.kernels.dispatch_layout as layout_module
from dist_utils import expected_local_experts
from ep_moe import ExpertPlacement
from ep_moe.kernels.dispatch_layout import (_layout_torch, dispatch_layout, gather_send_rows,
                                           packed_row, push_send_rows, split_packed)
from ep_moe.kernels.common import use_triton

from conftest import DEVICE



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
    if not use_triton(ids.to(DEVICE)):
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


@pytest.mark.parametrize("owner", [
    [0, 1, 1, 0],     # E = 4 over 2 ranks: no padding in the table
    [0, 0, 0, 1, 1],  # E = 5: rank 1's table row ends in padding, whose pairs must stay 0
])                    # (not the count of the out-of-range ids)
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_out_of_range_ids_send_nothing(impl, owner):
    # -1 (padding) and ids >= E must neither send a copy nor index the owner table
    ids = torch.tensor([[0, -1], [9, 3], [-5, 100], [2, 2]])
    owner = torch.tensor(owner)
    meta, copy_index, tokens = brute_force(ids, owner, 2)
    got = layout(impl, ids, owner, 2)
    assert torch.equal(got.copy_index.cpu(), copy_index)
    assert copy_index[2].tolist() == [-1, -1]
    assert torch.equal(got.send_tokens[:int(meta[:, 0].sum())].cpu(), tokens)
    assert torch.equal(got.send_meta.cpu(), meta)  # the out-of-range ids counted nowhere


def test_out_of_range_ids_never_read_the_owner_table():
    # owner is a view whose neighbours hold real ranks (rank 1 just before it, rank 0 just
    # past it): a load of owner[-1] or owner[E] would send a copy the brute force does not
    E, W = 4, 2
    buf = torch.tensor([1, 0, 0, 1, 1, 0], device=DEVICE)
    owner = buf[1:1 + E]
    ids = torch.tensor([[-1, 0],    # reads before the table: rank 1 would get a copy
                        [E, 2],     # reads past it: rank 0 would get a copy
                        [-1, E],    # both: no copy at all
                        [1, 3]])    # a plain token to each rank
    meta, copy_index, tokens = brute_force(ids, owner.cpu(), W)
    got = layout("kernel", ids, owner, W)
    assert copy_index.tolist() == [[0, -1], [-1, 2], [-1, -1], [1, 3]]
    assert torch.equal(got.copy_index.cpu(), copy_index)
    assert torch.equal(got.send_meta.cpu(), meta)
    assert torch.equal(got.send_tokens[:int(meta[:, 0].sum())].cpu(), tokens)


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
    monkeypatch.setattr(layout_module, "use_triton", lambda t: False)
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
        if not use_triton(ids.to(DEVICE)):
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
        got = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table.to(DEVICE), capacity=C)
    expected = fixed_rows(copy_index, C)
    assert got.capacity == C and got.send_tokens.shape == (W * C,)
    assert torch.equal(got.send_meta.cpu(), meta)
    assert torch.equal(got.copy_index.cpu(), expected)
    rows, tokens = expected.reshape(-1), torch.arange(T)[:, None].expand(T, W).reshape(-1)
    named = rows >= 0
    assert torch.equal(got.send_tokens.cpu()[rows[named].long()], tokens[named])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [0, 37])  # 0: a rank with no tokens takes the torch path
def test_fixed_capacity_layout_captures_in_a_cuda_graph(T):
    # a fixed-size exchange reads nothing back, so a decode loop captures it in a CUDA graph,
    # a rank with no tokens too: the layout and the send buffer may copy nothing from the host
    # (a `pairs[E] = 0` on the T = 0 path was such a copy)
    K, E, W, C = 2, 8, 4, 40
    ids, owner = routed_ids(T, K, E, seed=3), make_owner(E, W, "linear")
    ids, owner, table = ids.cuda(), owner.cuda(), make_table(owner, W).cuda()
    x = torch.randn(T, 64, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(T, K, device="cuda")

    def step():  # what travels and is read: the metadata, the copy index, each send row's
        # token and routing (not the bytes that pad a row to whole 16-byte lines)
        lay = dispatch_layout(ids, owner, table, capacity=C)
        return lay.send_meta, lay.copy_index, *split_packed(
            gather_send_rows(x, weights, ids, lay), x.shape[1], K)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as capture requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in captured:  # poisoned: the replay must write every element again
        t.fill_(float("nan") if t.is_floating_point() else -7)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


@pytest.mark.parametrize("T,impl", [
    (37, "kernel"),
    (37, "torch"),  # the fallback of a CPU without Triton: rank w's rows found by row % C
    (0, "torch"),   # every row is padding (T = 0 takes the torch path everywhere)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_send_rows_fixed_capacity(T, impl, dtype, monkeypatch):
    K, E, W, C = 8, 16, 3, 41
    ids, owner = routed_ids(T, K, E, seed=5), make_owner(E, W, "round_robin")
    table = make_table(owner, W)
    lay = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table.to(DEVICE), capacity=C) \
        if use_triton(ids.to(DEVICE)) else _layout_torch(ids, owner, table, C)
    copy_index = fixed_rows(brute_force(ids, owner, W)[1], C)
    # padding rows name no token: poison their send_tokens entries, so reading one fails
    real = torch.zeros(W * C, dtype=torch.bool)
    real[copy_index[copy_index >= 0].long()] = True
    lay = lay._replace(send_tokens=torch.where(real.to(DEVICE), lay.send_tokens, 10**9))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, 129, generator=g).to(DEVICE, dtype)
    weights = torch.rand(T, K, generator=g).to(DEVICE)
    # fresh memory may read as zeros: poison it, so unwritten padding would show
    new_empty = torch.Tensor.new_empty

    def poisoned(self, *size, **kw):
        out = new_empty(self, *size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    if impl == "torch":
        monkeypatch.setattr(layout_module, "use_triton", lambda t: False)
    send = gather_send_rows(x, weights, ids.to(DEVICE), lay)
    monkeypatch.undo()
    assert send.shape[0] == W * C
    send_x, send_routing = split_packed(send, 129, K)
    for t in range(T):
        for w in range(W):
            r = int(copy_index[t, w])
            if r >= 0:
                assert torch.equal(send_x[r].cpu(), x[t].cpu())
                assert torch.equal(send_routing[r].cpu(), torch.cat([weights[t].cpu(),
                                                                     ids[t].float()]))
    pad = ~real
    assert pad.sum() >= 3 * W  # C - T rows of padding at least per rank
    # padding: zeros and no slot (ids -1, weights 0), so a receiver may read every row
    assert (send_x.cpu()[pad] == 0).all()
    assert (send_routing.cpu()[pad, :K] == 0).all() and (send_routing.cpu()[pad, K:] == -1).all()


@pytest.mark.parametrize("T,impl,first", [
    (37, "kernel", 0),
    (37, "kernel", 2),  # the programs start with the last rank's rows
    (37, "torch", 1),
    (0, "torch", 0),    # every row is padding
])
def test_push_send_rows_writes_each_ranks_rows_into_its_output(T, impl, first, monkeypatch):
    # the exchange over NVLink: rank w's rows go straight into outputs[w] (here plain tensors
    # standing for views of the other ranks' memory, reached through a table of addresses);
    # real rows as gather_send_rows writes them, padding rows their routing (no slot) and,
    # from the kernel, not their token
    K, E, W, C, D = 8, 16, 3, 41, 129
    ids, owner = routed_ids(T, K, E, seed=5), make_owner(E, W, "round_robin")
    table = make_table(owner, W)
    lay = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table.to(DEVICE), capacity=C) \
        if use_triton(ids.to(DEVICE)) else _layout_torch(ids, owner, table, C)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, D, generator=g).to(DEVICE, torch.bfloat16)
    weights = torch.rand(T, K, generator=g).to(DEVICE)
    want = gather_send_rows(x, weights, ids.to(DEVICE), lay)
    width = packed_row(D, K, x.dtype)[0]
    outputs = [torch.full((C, width), float("nan"), dtype=x.dtype, device=DEVICE)
               for _ in range(W)]
    if impl == "torch":
        monkeypatch.setattr(layout_module, "use_triton", lambda t: False)
    push_send_rows(x, weights, ids.to(DEVICE), lay, outputs, first)
    monkeypatch.undo()
    copies = lay.send_meta[:, 0].cpu()
    for w in range(W):
        got_x, got_routing = split_packed(outputs[w].cpu(), D, K)
        want_x, want_routing = split_packed(want[w * C:(w + 1) * C].cpu(), D, K)
        n = int(copies[w])
        assert torch.equal(got_routing, want_routing)  # every row: padding has ids -1
        assert torch.equal(got_x[:n], want_x[:n])
        if impl == "kernel" and use_triton(x):  # the padding rows' tokens are not sent
            assert got_x[n:].isnan().all()


def test_push_send_rows_validation():
    K, E, W, C, D = 2, 8, 2, 6, 16
    ids, owner = routed_ids(6, K, E, seed=4), make_owner(E, W, "linear")
    table = make_table(owner, W).to(DEVICE)
    x = torch.randn(6, D, device=DEVICE)
    weights = torch.rand(6, K, device=DEVICE)
    fixed = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table, capacity=C)
    width = packed_row(D, K, x.dtype)[0]
    good = [x.new_empty(C, width) for _ in range(W)]
    packed = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), table)
    with pytest.raises(ValueError, match="fixed-size layout"):
        push_send_rows(x, weights, ids.to(DEVICE), packed, good)
    with pytest.raises(ValueError, match=r"outputs must be a list of W = 2 tensors, got 1"):
        push_send_rows(x, weights, ids.to(DEVICE), fixed, good[:1])
    with pytest.raises(ValueError, match=r"outputs\[1\] must be \(6, \d+\)"):
        push_send_rows(x, weights, ids.to(DEVICE), fixed, [good[0], x.new_empty(C, width + 1)])
    with pytest.raises(ValueError, match=r"outputs\[0\] must be .*contiguous rows"):
        push_send_rows(x, weights, ids.to(DEVICE), fixed,
                       [x.new_empty(C, width + 8)[:, :width], good[1]])
    with pytest.raises(ValueError, match=r"first must be an int in \[0, 2\), got 2"):
        push_send_rows(x, weights, ids.to(DEVICE), fixed, good, first=2)
    with pytest.raises(ValueError, match=r"table must be a \(2,\) int64 tensor"):
        push_send_rows(x, weights, ids.to(DEVICE), fixed, good,
                       table=torch.zeros(3, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("capacity", [
    5,    # below T = 6: one rank's copies could overflow its block
    -1,   # negative
    8.0,  # a whole float: the buffer sizes it sets must be ints
])
def test_fixed_capacity_validation(capacity):
    ids, owner = routed_ids(6, 2, 8, seed=4), make_owner(8, 2, "linear")
    with pytest.raises(ValueError, match=r"capacity must be 0 or an int >= T \(6\)"):
        dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), make_table(owner, 2).to(DEVICE),
                        capacity=capacity)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_fixed_capacity_of_exactly_T(impl, monkeypatch):
    # C = T, the least a fixed exchange allows: every token has expert 3 (rank 1's), so rank
    # 1's block is full to its last row, and rank 0 gets the tokens of experts 0 and 1
    T, E, W = 6, 4, 2
    ids = torch.stack([torch.full((T,), 3), torch.arange(T) % 3], 1)  # (T, 2): 3, then 0/1/2
    owner = make_owner(E, W, "linear")  # experts 0, 1 on rank 0; 2, 3 on rank 1
    meta, copy_index, _ = brute_force(ids, owner, W)
    if impl == "torch":
        monkeypatch.setattr(layout_module, "use_triton", lambda t: False)
    elif not use_triton(ids.to(DEVICE)):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    got = dispatch_layout(ids.to(DEVICE), owner.to(DEVICE), make_table(owner, W).to(DEVICE),
                          capacity=T)
    assert meta[:, 0].tolist() == [4, T]  # tokens 0, 1, 3, 4 to rank 0; all to rank 1
    assert torch.equal(got.send_meta.cpu(), meta)
    assert torch.equal(got.copy_index.cpu(), fixed_rows(copy_index, T))
    assert got.send_tokens[T:].tolist() == list(range(T))  # rank 1's block, every row used
    assert got.send_tokens[:4].tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("strided", [
    "transposed",   # last dim not contiguous: must be copied, not read as if it were
    "wider_rows",   # rows of a wider buffer: read through the row stride, not D
])
def test_gather_send_rows_reads_x_through_its_strides(strided):
    T, K, E, W, D = 40, 2, 8, 2, 24
    ids, owner = routed_ids(T, K, E, seed=6), make_owner(E, W, "linear")
    _, _, tokens = brute_force(ids, owner, W)
    lay = layout("kernel", ids, owner, W)
    g = torch.Generator().manual_seed(6)
    x, weights = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    if strided == "transposed":
        x_in = x.t().contiguous().t().to(DEVICE)  # strides (1, T)
    else:  # the columns past D are NaN: never to be read
        x_in = torch.cat([x, torch.full((T, D), float("nan"))], 1).to(DEVICE)[:, :D]
    assert not x_in.is_contiguous()
    send = gather_send_rows(x_in, weights.to(DEVICE), ids.to(DEVICE), lay)
    send_x, send_routing = split_packed(send, D, K)
    S = tokens.shape[0]
    assert torch.equal(send_x[:S].cpu(), x[tokens])
    assert torch.equal(send_routing[:S].cpu(), torch.cat([weights, ids.float()], 1)[tokens])


# --------------------------------------------------------------------------------------------
# Placement: the owner and table the layout reads
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("E,W,kind", [
    (10, 4, "linear"),       # E % W = 2: ranks 0 and 1 hold 3, ranks 2 and 3 hold 2
    (10, 4, "round_robin"),  # the same counts, dealt in turn
    (8, 4, "linear"),        # E divisible by W: no padding column in the table
    (7, 3, "round_robin"),   # W not a power of two, padding on ranks 1 and 2
    (5, 5, "linear"),        # E = W: one expert per rank, the most ranks allowed
    (1, 1, "linear"),        # a single rank owns the single expert
])
def test_placement(E, W, kind):
    experts = expected_local_experts(E, W, kind)
    e_max = max(len(p) for p in experts)
    pl = ExpertPlacement(E, W, kind)
    assert pl.local_experts == tuple(tuple(p) for p in experts)  # local order: ascending ids
    assert pl.max_local_experts == e_max
    owner = pl.owner()
    assert owner.dtype == torch.int64
    assert owner.tolist() == [next(r for r in range(W) if g in experts[r]) for g in range(E)]
    table = pl.padded_local_experts()
    assert table.dtype == torch.int64 and table.shape == (W, e_max)
    assert table.tolist() == [p + [E] * (e_max - len(p)) for p in experts]  # E: padding
    for r in range(W):
        emap = pl.expert_map(r)
        assert emap.dtype == torch.int32
        assert emap.tolist() == [experts[r].index(g) if g in experts[r] else -1
                                 for g in range(E)]
    # the layout of the placement's own owner and table: padding slots count no pairs
    ids = routed_ids(30, min(3, E), E, seed=E + W)
    meta, copy_index, _ = brute_force(ids, owner, W)
    got = _layout_torch(ids, owner, table)
    assert torch.equal(got.send_meta, meta) and torch.equal(got.copy_index, copy_index)


@pytest.mark.parametrize("args,match", [
    ((True, 1), "num_experts must be a positive int"),  # a bool is no count, though an int
    ((8, True), "world_size must be a positive int"),
    ((8.0, 2), "num_experts must be a positive int"),   # a float
    ((4, 8), "at least one expert per rank"),           # W > E
    ((8, 2, "random"), "'linear' or 'round_robin'"),    # no such placement
])
def test_placement_validation(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(*args)
