"""Send layout of an all-to-all dispatch: which ranks need each token, and where its copies go.

A token goes once to every rank that owns at least one of its K experts. The send buffer holds
the copies grouped by destination rank, tokens in order within a rank. Two Triton launches
compute the whole layout (count per block of tokens, then place: each program sums the counts
of the blocks before it), replacing some twenty small torch ops whose host time, not their GPU
time, bounded the dispatch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fused_mul_sum import _use_triton


class SendLayout(NamedTuple):
    """send_counts: (W,) int32 copies for each rank.
    copy_index: (T, W) int32 row of token t's copy for rank w in the send buffer, -1 if none.
    send_tokens: (W*T,) int64; the first sum(send_counts) entries name the token of each send
        row, the rest are unused."""

    send_counts: torch.Tensor
    copy_index: torch.Tensor
    send_tokens: torch.Tensor


@triton.jit
def _destinations(ids_ptr, owner_ptr, t0, T, K, E,
                  K_POW2: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
    """(BLOCK_T, W_POW2) int32: 1 where rank w owns one of token t's experts."""
    t = t0 + tl.arange(0, BLOCK_T)
    k = tl.arange(0, K_POW2)
    ok = (t[:, None] < T) & (k[None, :] < K)
    ids = tl.load(ids_ptr + t[:, None].to(tl.int64) * K + k[None, :], mask=ok, other=-1)
    ok = ok & (ids >= 0) & (ids < E)  # out-of-range ids never index the owner table
    ranks = tl.load(owner_ptr + ids, mask=ok, other=-1)  # (BLOCK_T, K_POW2)
    w = tl.arange(0, W_POW2)
    hit = (ranks[:, :, None] == w[None, None, :]).to(tl.int32)  # (BLOCK_T, K_POW2, W_POW2)
    return tl.max(hit, axis=1)


@triton.jit
def _count_kernel(
    # pointers
    ids_ptr, owner_ptr, block_counts_ptr,
    # sizes
    T, K, E, W,
    # meta-parameters
    K_POW2: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Copies per rank among this program's BLOCK_T tokens -> block_counts[pid, :]."""
    pid = tl.program_id(0)
    w = tl.arange(0, W_POW2)
    dest = _destinations(ids_ptr, owner_ptr, pid * BLOCK_T, T, K, E, K_POW2, W_POW2, BLOCK_T)
    tl.store(block_counts_ptr + pid * W + w, tl.sum(dest, axis=0), mask=w < W)


@triton.jit
def _place_kernel(
    # pointers
    ids_ptr, owner_ptr, block_counts_ptr, send_counts_ptr, copy_index_ptr, send_tokens_ptr,
    # sizes
    T, K, E, W, num_blocks,
    # meta-parameters
    K_POW2: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr, NB_POW2: tl.constexpr,
):
    """Row of each copy = start of its rank's block + copies for that rank in earlier token
    blocks + earlier tokens of this block; and the token of each send row."""
    pid = tl.program_id(0)
    w = tl.arange(0, W_POW2)
    b = tl.arange(0, NB_POW2)
    counts = tl.load(block_counts_ptr + b[:, None] * W + w[None, :],
                     mask=(b[:, None] < num_blocks) & (w[None, :] < W), other=0)
    totals = tl.sum(counts, axis=0)  # (W_POW2,) copies per rank
    earlier = tl.sum(tl.where(b[:, None] < pid, counts, 0), axis=0)
    first_row = tl.cumsum(totals, 0) - totals + earlier
    if pid == 0:
        tl.store(send_counts_ptr + w, totals, mask=w < W)
    t0 = pid * BLOCK_T
    dest = _destinations(ids_ptr, owner_ptr, t0, T, K, E, K_POW2, W_POW2, BLOCK_T)
    row = first_row[None, :] + tl.cumsum(dest, 0) - 1  # (BLOCK_T, W_POW2)
    t = t0 + tl.arange(0, BLOCK_T)
    in_t = (t[:, None] < T) & (w[None, :] < W)
    tl.store(copy_index_ptr + t[:, None].to(tl.int64) * W + w[None, :],
             tl.where(dest > 0, row, -1), mask=in_t)
    t_2d = t[:, None] + tl.zeros((BLOCK_T, W_POW2), dtype=tl.int32)
    tl.store(send_tokens_ptr + row.to(tl.int64), t_2d.to(tl.int64), mask=in_t & (dest > 0))


def _layout_torch(topk_ids: torch.Tensor, owner: torch.Tensor, W: int) -> SendLayout:
    T, E = topk_ids.shape[0], owner.shape[0]
    valid = (topk_ids >= 0) & (topk_ids < E)
    ranks = torch.where(valid, owner[topk_ids.clamp(0, max(E - 1, 0))], W)  # W: a dump column
    dest = torch.zeros(T, W + 1, dtype=torch.int32, device=topk_ids.device)
    dest = dest.scatter_(1, ranks, 1)[:, :W]  # (T, W)
    position = dest.cumsum(0, dtype=torch.int32)  # 1-based row among rank w's copies
    counts = dest.sum(0, dtype=torch.int32)
    start = counts.cumsum(0, dtype=torch.int32) - counts
    copy_index = torch.where(dest > 0, position - 1 + start, -1).to(torch.int32)
    send_tokens = torch.zeros(W * T + 1, dtype=torch.int64, device=topk_ids.device)
    dump = torch.where(dest > 0, copy_index, W * T).long()
    tokens = torch.arange(T, device=topk_ids.device)[:, None].expand(T, W)
    send_tokens.scatter_(0, dump.reshape(-1), tokens.reshape(-1))
    return SendLayout(counts, copy_index, send_tokens[:W * T])


def dispatch_layout(topk_ids: torch.Tensor, owner: torch.Tensor, world_size: int) -> SendLayout:
    """Where each token's copies go in an all-to-all send buffer.

    Args:
        topk_ids: (T, K) int32/int64 global expert ids; ids outside [0, E) send nothing.
        owner: (E,) int32/int64 rank that owns each expert, on topk_ids' device.
        world_size: W.

    Returns:
        SendLayout (see its fields). Device-side only: nothing is read back to the host.
    """
    if topk_ids.ndim != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be (T, K) int32/int64, got {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype}")
    if owner.ndim != 1 or owner.device != topk_ids.device:
        raise ValueError(f"owner must be (E,) on {topk_ids.device}, got "
                         f"{tuple(owner.shape)} on {owner.device}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    T, K = topk_ids.shape
    if not _use_triton(topk_ids) or T == 0:
        return _layout_torch(topk_ids, owner, world_size)
    dev = topk_ids.device
    k_pow2, w_pow2 = triton.next_power_of_2(max(K, 1)), triton.next_power_of_2(world_size)
    # tokens per program: the (BLOCK_T, K, W) tile stays small, and at most 1024 blocks so
    # every program can sum the earlier blocks' counts itself
    block_t = max(16, min(256, 4096 // (k_pow2 * w_pow2)), triton.next_power_of_2(T) // 1024)
    num_blocks = triton.cdiv(T, block_t)
    block_counts = torch.empty(num_blocks, world_size, dtype=torch.int32, device=dev)
    counts = torch.empty(world_size, dtype=torch.int32, device=dev)
    copy_index = torch.empty(T, world_size, dtype=torch.int32, device=dev)
    send_tokens = torch.empty(world_size * T, dtype=torch.int64, device=dev)
    ids = topk_ids.contiguous()
    meta = dict(K_POW2=k_pow2, W_POW2=w_pow2, BLOCK_T=block_t, num_warps=4)
    _count_kernel[(num_blocks,)](ids, owner, block_counts, T, K, owner.shape[0], world_size,
                                 **meta)
    _place_kernel[(num_blocks,)](ids, owner, block_counts, counts, copy_index, send_tokens,
                                 T, K, owner.shape[0], world_size, num_blocks,
                                 NB_POW2=triton.next_power_of_2(num_blocks), **meta)
    return SendLayout(counts, copy_index, send_tokens)
