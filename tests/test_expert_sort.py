"""The expert sort (ep_moe/kernels/expert_sort.py) against a brute-force stable sort.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (as in CI) and natively on a GPU; the
torch fallback is checked against the same brute force.
"""

from __future__ import annotations

import pytest
import torch

import ep_moe.kernels.expert_sort as sort_module
from ep_moe.kernels.expert_sort import sort_by_expert
from ep_moe.kernels.common import use_triton

from conftest import DEVICE



def brute_force(ids, e, expert_map=None):
    """Slots in (row, slot) order, grouped by local expert; -1 for slots not local."""
    R, K = ids.shape
    local = []
    for i in ids.reshape(-1).tolist():
        if expert_map is not None:
            i = int(expert_map[i]) if 0 <= i < expert_map.shape[0] else -1
        local.append(i if 0 <= i < e else -1)
    order = [s for x in range(e) for s, l in enumerate(local) if l == x]
    row_index = torch.full((R * K,), -1, dtype=torch.int32)
    row_index[order] = torch.arange(len(order), dtype=torch.int32)
    counts = torch.tensor([local.count(x) for x in range(e)], dtype=torch.int64)
    return torch.tensor(order, dtype=torch.int64) // K, row_index.view(R, K), counts


def run(impl, ids, e, num_pairs, expert_map=None, monkeypatch=None):
    ids = ids.to(DEVICE)
    emap = expert_map.to(DEVICE) if expert_map is not None else None
    if impl == "torch":
        monkeypatch.setattr(sort_module, "use_triton", lambda t: False)
    elif not use_triton(ids):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    return sort_by_expert(ids, e, num_pairs, emap)


def sharded_map(E, W, rank):
    """Linear placement's expert map of `rank`: local id, -1 for other ranks' experts."""
    owner = torch.arange(E) * W // E
    local = torch.cumsum(owner == rank, 0) - 1
    return torch.where(owner == rank, local, -1)


CASES = [  # (R, K, E, W, rank, seed)
    (1, 1, 4, 1, 0, 0),          # one slot
    (37, 2, 8, 1, 0, 1),         # one rank: local ids are the global ones
    (37, 2, 8, 2, 1, 2),         # half the slots local
    (64, 8, 128, 4, 2, 3),       # Qwen3-like: 32 local experts of 128, tile of 256 slots
    (1100, 8, 128, 1, 0, 4),     # 8800 slots over 128 experts: several tiles per program
    (300, 8, 256, 3, 0, 5),      # DeepSeek-like E = 256 over 3 ranks (86 local)
    (50, 3, 5, 5, 4, 6),         # one local expert
    (0, 2, 8, 2, 0, 7),          # no rows
]


@pytest.mark.parametrize("R,K,E,W,rank,seed", CASES)
@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_matches_brute_force(R, K, E, W, rank, seed, impl, dtype, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(R)]) if R else \
        torch.empty(0, K, dtype=torch.int64)
    emap = sharded_map(E, W, rank) if W > 1 else None
    e = int((emap >= 0).sum()) if emap is not None else E
    source_rows, row_index, counts = brute_force(ids, e, emap)
    got = run(impl, ids.to(dtype), e, source_rows.shape[0],
              emap.to(torch.int32) if emap is not None else None, monkeypatch)
    assert torch.equal(got.row_index.cpu(), row_index)
    assert torch.equal(got.source_rows.cpu(), source_rows)
    assert torch.equal(got.num_tokens_per_expert.cpu(), counts)
    assert torch.equal(got.offsets.cpu(), torch.cumsum(counts, 0, dtype=torch.int32))
    # torch.equal ignores dtypes; the grouped GEMMs take int32 offsets, indexing int64 rows
    assert (got.source_rows.dtype, got.row_index.dtype, got.num_tokens_per_expert.dtype,
            got.offsets.dtype) == (torch.int64, torch.int32, torch.int64, torch.int32)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_padding_and_out_of_range_ids_are_skipped(impl, monkeypatch):
    # -1 (padding rows), negative and >= E ids must neither count nor index the map
    ids = torch.tensor([[3, -1], [9, 0], [-7, 2], [100, 3], [1, 1]])
    emap = torch.tensor([-1, 0, 1, 2])  # expert 0 lives elsewhere
    source_rows, row_index, counts = brute_force(ids, 3, emap)
    got = run(impl, ids, 3, source_rows.shape[0], emap, monkeypatch)
    assert torch.equal(got.row_index.cpu(), row_index)
    assert torch.equal(got.source_rows.cpu(), source_rows)
    assert counts.tolist() == [2, 1, 2]


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_too_small_num_pairs_drops_the_tail(impl, monkeypatch):
    # a caller's count below the real one: positions past it are dropped, never written
    ids = torch.tensor([[0, 1], [1, 0], [0, 0]])
    got = run(impl, ids, 2, 3, None, monkeypatch)
    assert got.source_rows.shape == (3,)
    # expert 0 holds slots 0, 3, 4, 5 (positions 0-3), expert 1 slots 1, 2: keep positions < 3
    assert got.row_index.cpu().tolist() == [[0, -1], [-1, 1], [2, -1]]
    assert got.source_rows.cpu().tolist() == [0, 1, 2]


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_int64_ids_past_int32_are_out_of_range(impl, monkeypatch):
    # 2^32 + 1 must not wrap to expert 1 on the way to int32
    ids = torch.tensor([[2**32 + 1, 0], [1, -2**33]])
    for emap in (None, torch.tensor([0, 1])):
        got = run(impl, ids, 2, 2, emap, monkeypatch)
        assert got.num_tokens_per_expert.cpu().tolist() == [1, 1]
        assert got.row_index.cpu().tolist() == [[-1, 0], [1, -1]]


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_too_large_num_pairs_names_no_extra_slot(impl, monkeypatch):
    # P above the real count: no slot that is not local gets a position, and the positions
    # past the real pairs point at row 0 (valid memory), not at garbage
    ids = torch.tensor([[0, -1], [1, 5]])
    got = run(impl, ids, 2, 4, None, monkeypatch)
    assert got.row_index.cpu().tolist() == [[0, -1], [1, -1]]
    assert got.source_rows.cpu().tolist()[:2] == [0, 1]
    assert got.source_rows.cpu().tolist()[2:] == [0, 0]


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_id_equal_to_map_length_is_skipped(impl, monkeypatch):
    # id E is one past the map: it must not read it. The map is a view of a longer tensor
    # whose next element is local expert 0, so a read one past the end would count the slot.
    backing = torch.tensor([-1, 0, 1, 0])
    emap = backing[:3]  # E = 3 global experts, e = 2 local
    ids = torch.tensor([[3, 1], [2, 3], [1, 2]])
    source_rows, row_index, counts = brute_force(ids, 2, emap)
    got = run(impl, ids, 2, source_rows.shape[0], emap, monkeypatch)
    assert counts.tolist() == [2, 2]
    assert torch.equal(got.num_tokens_per_expert.cpu(), counts)
    assert torch.equal(got.row_index.cpu(), row_index)
    assert torch.equal(got.source_rows.cpu(), source_rows)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("e", [
    3,  # e below its power of 2: id e has a lane of its own in the kernel's one-hot
    4,  # e a power of 2: id e has no lane
])
def test_id_equal_to_num_local_experts_is_skipped(impl, e, monkeypatch):
    # without a map, ids are local ones: e is the first that is not. P = 6, a bound above the
    # 3 real pairs, so that no position a slot of id e might take is cut off by P
    ids = torch.tensor([[e, 0], [1, e], [e - 1, e]])
    source_rows, row_index, counts = brute_force(ids, e, None)
    got = run(impl, ids, e, 6, None, monkeypatch)
    assert row_index.tolist() == [[-1, 0], [1, -1], [2, -1]]
    assert torch.equal(got.row_index.cpu(), row_index)
    assert got.source_rows.cpu().tolist() == source_rows.tolist() + [0, 0, 0]
    assert torch.equal(got.num_tokens_per_expert.cpu(), counts)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("P", [
    # e = 64 local experts give the kernel 128-slot tiles, so 400 slots run in 4 programs,
    # each zeroing its share of the P positions
    10,  # not a multiple of 4: the shares are rounded up, the last one ends at P
    4,   # one position per program: the last program writes the only tail position
])
def test_tail_past_the_real_pairs_is_row_zero(impl, P, monkeypatch):
    # a bound P above the 3 real pairs (fixed-size exchange): every position from 3 on reads
    # row 0, whatever the output buffer held before (poisoned here)
    R, K = 100, 4
    ids = torch.full((R, K), -1, dtype=torch.int64)
    ids[1, 1], ids[R - 1, 0], ids[R // 2, K - 1] = 5, 63, 5
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(-5))
    got = run(impl, ids, 64, P, None, monkeypatch)
    monkeypatch.undo()
    assert got.source_rows.cpu().tolist() == [1, R // 2, R - 1] + [0] * (P - 3)
    assert got.num_tokens_per_expert.cpu()[[5, 63]].tolist() == [2, 1]


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_num_pairs_above_all_slots(impl, monkeypatch):
    # P is a bound: even one above R * K gives (P,) source_rows, row 0 past the real pairs.
    # Expert 0 holds slot 2 (row 1), expert 1 slots 0 (row 0) and 3 (row 1).
    ids = torch.tensor([[1, -1], [0, 1]])
    got = run(impl, ids, 2, 6, None, monkeypatch)
    assert got.row_index.cpu().tolist() == [[1, -1], [0, 2]]
    assert got.source_rows.cpu().tolist() == [1, 0, 1, 0, 0, 0]


def test_deterministic():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (200, 4), generator=g).to(DEVICE)
    if not use_triton(ids):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    a, b = sort_by_expert(ids, 16, 800), sort_by_expert(ids, 16, 800)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bad,match", [
    (lambda ids, emap: (ids[0], emap), "topk_ids"),              # 1-D ids
    (lambda ids, emap: (ids.float(), emap), "topk_ids"),         # float ids
    (lambda ids, emap: (ids, emap[None]), "expert_map"),         # 2-D map
    (lambda ids, emap: (ids, emap.float()), "expert_map"),       # float map
    (lambda ids, emap: (ids, emap.to("meta")), "expert_map"),    # another device
])
def test_validation(bad, match):
    ids, emap = torch.zeros(4, 2, dtype=torch.int64), torch.tensor([0, -1])
    ids_, emap_ = bad(ids, emap)
    with pytest.raises(ValueError, match=match):
        sort_by_expert(ids_, 1, 8, emap_)
