"""Sort the (row, slot) pairs of a batch by local expert: a counting sort in two launches.

The experts' grouped GEMMs want the pairs grouped by expert. In torch that is a dozen small
ops (map global ids to local ones, stable sort, invert the permutation, count per expert), each
a few tens of microseconds of host time while the GPU idles at small batches. Here:
1. count: each program counts its slots per local expert;
2. place: each program sums the counts of the programs before it, then walks its slots in
   order, so pairs of one expert keep their (row, slot) order: the result equals a stable sort
   of the flattened ids, bit for bit, and is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import use_triton


class ExpertSort(NamedTuple):
    """(row, slot) pairs whose expert is local, sorted by local expert.

    source_rows: (P,) int64 row of each sorted pair.
    row_index: (R, K) int32 position of slot (r, k) in the sorted order, -1 if not local.
    num_tokens_per_expert: (e,) int64 pairs per local expert.
    offsets: (e,) int32 running sum of num_tokens_per_expert (the `offs` of grouped GEMMs).
    """

    source_rows: torch.Tensor
    row_index: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    offsets: torch.Tensor


# --------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _local_experts(ids_ptr, map_ptr, s, num_slots, E, e, HAS_MAP: tl.constexpr):
    """Local expert of each slot in `s`, or -1 (not local, padding, out of range). Ranges are
    checked in the ids' own width: an int64 id past 2^31 must not wrap into range."""
    ids = tl.load(ids_ptr + s, mask=s < num_slots, other=-1)
    if HAS_MAP:
        ok = (ids >= 0) & (ids < E)  # out-of-range ids never index the map
        local = tl.load(map_ptr + ids, mask=ok, other=-1)
    else:
        local = ids
    return tl.where((local >= 0) & (local < e), local, -1).to(tl.int32)


@triton.jit
def _count_kernel(
    # pointers
    ids_ptr, map_ptr, block_counts_ptr,
    # sizes
    num_slots, E, e, tiles,
    # meta-parameters
    HAS_MAP: tl.constexpr, E_POW2: tl.constexpr, TILE: tl.constexpr,
):
    """Slots per local expert among this program's tiles * TILE slots -> block_counts[pid]."""
    pid = tl.program_id(0).to(tl.int64)
    x = tl.arange(0, E_POW2)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for i in range(tiles):
        s = (pid * tiles + i) * TILE + tl.arange(0, TILE)
        local = _local_experts(ids_ptr, map_ptr, s, num_slots, E, e, HAS_MAP)
        counts += tl.sum((local[:, None] == x[None, :]).to(tl.int32), axis=0)
    tl.store(block_counts_ptr + pid * E_POW2 + x, counts)


@triton.jit
def _place_kernel(
    # pointers
    ids_ptr, map_ptr, block_counts_ptr, row_index_ptr, source_rows_ptr, counts_ptr, offsets_ptr,
    # sizes
    num_slots, E, e, K, num_blocks, tiles, num_pairs,
    # meta-parameters
    HAS_MAP: tl.constexpr, E_POW2: tl.constexpr, TILE: tl.constexpr, NB_POW2: tl.constexpr,
):
    """Position of each slot = start of its expert + its expert's slots in earlier programs +
    those earlier in this program; the row of each position; program 0 writes the counts.
    Positions from num_pairs on (a caller's count too small) are dropped, as a sort's tail."""
    pid = tl.program_id(0)
    x = tl.arange(0, E_POW2)
    b = tl.arange(0, NB_POW2)
    blocks = tl.load(block_counts_ptr + b[:, None] * E_POW2 + x[None, :],
                     mask=b[:, None] < num_blocks, other=0)  # (NB_POW2, E_POW2)
    totals = tl.sum(blocks, axis=0)
    if pid == 0:
        tl.store(counts_ptr + x, totals.to(tl.int64), mask=x < e)
        tl.store(offsets_ptr + x, tl.cumsum(totals, 0), mask=x < e)
    # a num_pairs above the real count (a bound: a fixed-size exchange) leaves a tail no slot
    # fills: row 0 there, never uninitialised memory (the row index names none of it); each
    # program writes its share of the positions
    found = tl.sum(totals)
    share = tl.cdiv(num_pairs, num_blocks)
    for p0 in range(pid * share, (pid + 1) * share, TILE):
        p = p0 + tl.arange(0, TILE)
        tl.store(source_rows_ptr + p, tl.zeros_like(p).to(tl.int64),
                 mask=(p >= found) & (p < num_pairs) & (p < (pid + 1) * share))
    # where this program's pairs of each expert begin (exclusive scans over experts and blocks)
    base = tl.cumsum(totals, 0) - totals + tl.sum(tl.where(b[:, None] < pid, blocks, 0), axis=0)
    for i in range(tiles):
        s = (pid.to(tl.int64) * tiles + i) * TILE + tl.arange(0, TILE)
        local = _local_experts(ids_ptr, map_ptr, s, num_slots, E, e, HAS_MAP)
        hit = (local[:, None] == x[None, :]).to(tl.int32)  # (TILE, E_POW2) one-hot
        before = tl.cumsum(hit, 0) - hit  # earlier slots of this tile with the same expert
        pos = tl.sum(hit * (base[None, :] + before), axis=1)
        kept = (local >= 0) & (pos < num_pairs)
        tl.store(row_index_ptr + s, tl.where(kept, pos, -1), mask=s < num_slots)
        tl.store(source_rows_ptr + pos.to(tl.int64), s // K, mask=(s < num_slots) & kept)
        base += tl.sum(hit, axis=0)


# --------------------------------------------------------------------------------------------
# 2. Launcher, and the torch path (a CPU without the interpreter, more than 1024 local experts)
# --------------------------------------------------------------------------------------------

def _sort_torch(topk_ids, num_local_experts, num_pairs, expert_map) -> ExpertSort:
    R, K = topk_ids.shape
    e, flat = num_local_experts, topk_ids.reshape(-1).long()
    if expert_map is not None:
        E = expert_map.shape[0]
        ok = (flat >= 0) & (flat < E)
        flat = torch.where(ok, expert_map[flat.clamp(0, max(E - 1, 0))].long(), -1)
    key = torch.where((flat >= 0) & (flat < e), flat, e)  # not local: after every expert
    # stable: pairs of one expert keep their (row, slot) order, so the result is deterministic
    order = torch.sort(key, stable=True).indices[:num_pairs]
    position = torch.arange(order.shape[0], dtype=torch.int32, device=flat.device)
    # a num_pairs above the real count would reach slots that are not local: they stay -1 and
    # their positions read row 0, as in the kernel
    local = key[order] < e
    row_index = torch.full((R * K,), -1, dtype=torch.int32, device=flat.device)
    row_index[order] = torch.where(local, position, -1)
    counts = torch.zeros(e + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:e]
    source_rows = torch.where(local, order // K, 0)
    if num_pairs > source_rows.shape[0]:  # a bound above every slot: the tail reads row 0
        source_rows = torch.cat([source_rows, source_rows.new_zeros(
            num_pairs - source_rows.shape[0])])
    return ExpertSort(source_rows, row_index.view(R, K), counts,
                      torch.cumsum(counts, 0, dtype=torch.int32))


def _sort(topk_ids: torch.Tensor, num_local_experts: int, num_pairs: int,
          expert_map: Optional[torch.Tensor]) -> ExpertSort:
    R, K = topk_ids.shape
    e, num_slots = num_local_experts, R * K
    e_pow2 = triton.next_power_of_2(max(e, 1))
    tile = max(16, 8192 // e_pow2)  # the (TILE, E_POW2) one-hot stays at 8K-16K lanes
    max_blocks = max(1, min(128, 16384 // e_pow2))  # so does each program's block-count tile
    tiles = triton.cdiv(triton.cdiv(max(num_slots, 1), tile), max_blocks)
    num_blocks = triton.cdiv(num_slots, tile * tiles)
    if not use_triton(topk_ids) or num_slots == 0 or e_pow2 > 1024:
        return _sort_torch(topk_ids, e, num_pairs, expert_map)
    dev = topk_ids.device
    block_counts = torch.empty(num_blocks, e_pow2, dtype=torch.int32, device=dev)
    row_index = torch.empty(R, K, dtype=torch.int32, device=dev)
    source_rows = torch.empty(num_pairs, dtype=torch.int64, device=dev)
    counts = torch.empty(e, dtype=torch.int64, device=dev)
    offsets = torch.empty(e, dtype=torch.int32, device=dev)
    ids = topk_ids.contiguous()
    has_map = expert_map is not None
    emap = expert_map.contiguous() if has_map else ids  # a dummy pointer, never read
    E = expert_map.shape[0] if has_map else e
    meta = dict(HAS_MAP=has_map, E_POW2=e_pow2, TILE=tile, num_warps=4)
    _count_kernel[(num_blocks,)](ids, emap, block_counts, num_slots, E, e, tiles, **meta)
    # NB_POW2 fixed per e: one compiled variant whatever the batch size
    _place_kernel[(num_blocks,)](ids, emap, block_counts, row_index, source_rows, counts,
                                 offsets, num_slots, E, e, K, num_blocks, tiles, num_pairs,
                                 NB_POW2=triton.next_power_of_2(max_blocks), **meta)
    return ExpertSort(source_rows, row_index, counts, offsets)


# --------------------------------------------------------------------------------------------
# 3. Custom op: torch.compile calls the kernels, never traces them (no gradient: indices)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ep_moe::sort_by_expert", mutates_args=())
def _sort_op(topk_ids: torch.Tensor, num_local_experts: int, num_pairs: int,
             expert_map: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor]:
    return tuple(_sort(topk_ids, num_local_experts, num_pairs, expert_map))


@_sort_op.register_fake
def _(topk_ids, num_local_experts, num_pairs, expert_map):
    e = num_local_experts
    return (topk_ids.new_empty(num_pairs, dtype=torch.int64),
            topk_ids.new_empty(topk_ids.shape, dtype=torch.int32),
            topk_ids.new_empty(e, dtype=torch.int64), topk_ids.new_empty(e, dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# 4. Public function
# --------------------------------------------------------------------------------------------

def sort_by_expert(topk_ids: torch.Tensor, num_local_experts: int, num_pairs: int,
                   expert_map: Optional[torch.Tensor] = None) -> ExpertSort:
    """Group the slots of `topk_ids` by local expert, stably.

    Args:
        topk_ids: (R, K) int32/int64 expert ids: global ones with `expert_map`, local ones
            (in [0, e)) without. -1 and ids outside the map or [0, e) mark slots that are not
            local; they are skipped.
        num_local_experts: e.
        num_pairs: P, the number of local slots, known on the host (the dispatch exchange
            says it), so that nothing is read back here. A smaller P drops the last positions
            (their slots get -1); a larger one leaves positions no slot names (row 0 there).
        expert_map: optional (E,) int32/int64 local id of each global expert, -1 elsewhere.

    Returns:
        ExpertSort; the same tensors as a stable torch sort of the flattened local ids.
    """
    if topk_ids.ndim != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be (R, K) int32/int64, got {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype}")
    if expert_map is not None and (expert_map.ndim != 1 or expert_map.device != topk_ids.device
                                   or expert_map.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"expert_map must be a 1-D int32/int64 tensor on {topk_ids.device}, "
                         f"got {tuple(expert_map.shape)} {expert_map.dtype} on "
                         f"{expert_map.device}")
    if torch.compiler.is_compiling():
        return ExpertSort(*_sort_op(topk_ids, num_local_experts, num_pairs, expert_map))
    return _sort(topk_ids, num_local_experts, num_pairs, expert_map)
