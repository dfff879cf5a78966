"""Send layout of an all-to-all dispatch: which ranks need each token, and where its copies go.

A token goes once to every rank that owns at least one of its K experts. The send buffer holds
the copies grouped by destination rank, tokens in order within a rank. Two Triton launches
compute the whole layout (count per block of tokens, then place: each program sums the counts
of the blocks before it), replacing some twenty small torch ops whose host time, not their GPU
time, bounded the dispatch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..fp8 import quantize_groups
from .common import FLOAT_DTYPES, check_split_outputs, quantize_fp8, use_triton


META_COPIES, META_PAIRS = 0, 1  # send_meta columns: copies for a rank, then its experts' pairs


class SendLayout(NamedTuple):
    """meta: (2, W, 1 + e_max) int64: `send_meta` and, unwritten, `recv_meta`, one buffer so
        that both reach the host in one copy.
    send_meta (= meta[0]): row w = [copies sent to rank w (column META_COPIES), then the
        (token, slot) pairs of each of w's experts in `table` order, 0 on padding (from column
        META_PAIRS)]: the message each rank sends ahead of the tokens.
    recv_meta (= meta[1]): where the other ranks' messages to this rank are to land.
    copy_index: (T, W) int32 row of token t's copy for rank w in the send buffer, -1 if none.
    send_tokens: (T * min(K, W),) int64; the first sum(send_meta[:, 0]) entries name the token
        of each send row, the rest are unused (a token goes to at most min(K, W) ranks).
        With a fixed `capacity` C: (W * C,), rank w's rows at [w * C, w * C + send_meta[w, 0]).
    capacity: 0 for the packed layout, else C, the rows each rank gets whatever it needs."""

    meta: torch.Tensor
    copy_index: torch.Tensor
    send_tokens: torch.Tensor
    capacity: int = 0

    @property
    def send_meta(self) -> torch.Tensor:
        return self.meta[0]

    @property
    def recv_meta(self) -> torch.Tensor:
        return self.meta[1]


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
    ids_ptr, owner_ptr, block_counts_ptr, pairs_ptr,
    # sizes
    T, K, E, W,
    # meta-parameters
    K_POW2: tl.constexpr, W_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Copies per rank among this program's BLOCK_T tokens -> block_counts[pid, :], and its
    (token, slot) pairs per expert added into pairs (E,) (integer atomics: any order gives
    the same sums)."""
    pid = tl.program_id(0)
    w = tl.arange(0, W_POW2)
    t0 = pid * BLOCK_T
    dest = _destinations(ids_ptr, owner_ptr, t0, T, K, E, K_POW2, W_POW2, BLOCK_T)
    tl.store(block_counts_ptr + pid * W + w, tl.sum(dest, axis=0), mask=w < W)
    t = t0 + tl.arange(0, BLOCK_T)
    e = tl.arange(0, E_POW2)
    pairs = tl.zeros((E_POW2,), dtype=tl.int32)
    for k in range(0, K):
        ids = tl.load(ids_ptr + t.to(tl.int64) * K + k, mask=t < T, other=-1)
        pairs += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.atomic_add(pairs_ptr + e, pairs, mask=(e < E) & (pairs > 0))


@triton.jit
def _place_kernel(
    # pointers
    ids_ptr, owner_ptr, block_counts_ptr, pairs_ptr, table_ptr, send_meta_ptr, copy_index_ptr,
    send_tokens_ptr,
    # sizes
    T, K, E, W, num_blocks, e_max, capacity,
    # meta-parameters
    K_POW2: tl.constexpr, W_POW2: tl.constexpr, BLOCK_T: tl.constexpr, NB_POW2: tl.constexpr,
    EMAX_POW2: tl.constexpr,
):
    """Row of each copy = start of its rank's block (the copies of earlier ranks, or w *
    capacity for a fixed-size exchange) + copies for that rank in earlier token blocks +
    earlier tokens of this block; the token of each send row; and (program 0) the
    send metadata: copies and pairs per local expert of each rank. send_meta_ptr is the
    layout's (2, W, 1 + e_max) buffer: its first half, at offset 0, is send_meta."""
    pid = tl.program_id(0)
    w = tl.arange(0, W_POW2)
    b = tl.arange(0, NB_POW2)
    counts = tl.load(block_counts_ptr + b[:, None] * W + w[None, :],
                     mask=(b[:, None] < num_blocks) & (w[None, :] < W), other=0)
    totals = tl.sum(counts, axis=0)  # (W_POW2,) copies per rank
    earlier = tl.sum(tl.where(b[:, None] < pid, counts, 0), axis=0)
    if capacity > 0:
        first_row = w * capacity + earlier
    else:
        first_row = tl.cumsum(totals, 0) - totals + earlier
    if pid == 0:  # send_meta[w] = [copies for w, pairs for w's experts (table order)]
        j = tl.arange(0, EMAX_POW2)
        in_table = (w[:, None] < W) & (j[None, :] < e_max)
        experts = tl.load(table_ptr + w[:, None] * e_max + j[None, :], mask=in_table, other=E)
        pairs = tl.load(pairs_ptr + experts, mask=in_table & (experts >= 0) & (experts < E),
                        other=0)
        row = send_meta_ptr + w[:, None] * (1 + e_max)
        tl.store(row + 1 + j[None, :], pairs.to(tl.int64), mask=in_table)
        tl.store(send_meta_ptr + w * (1 + e_max), totals.to(tl.int64), mask=w < W)
    t0 = pid * BLOCK_T
    dest = _destinations(ids_ptr, owner_ptr, t0, T, K, E, K_POW2, W_POW2, BLOCK_T)
    row = first_row[None, :] + tl.cumsum(dest, 0) - 1  # (BLOCK_T, W_POW2)
    t = t0 + tl.arange(0, BLOCK_T)
    in_t = (t[:, None] < T) & (w[None, :] < W)
    tl.store(copy_index_ptr + t[:, None].to(tl.int64) * W + w[None, :],
             tl.where(dest > 0, row, -1), mask=in_t)
    t_2d = t[:, None] + tl.zeros((BLOCK_T, W_POW2), dtype=tl.int32)
    tl.store(send_tokens_ptr + row.to(tl.int64), t_2d.to(tl.int64), mask=in_t & (dest > 0))


def send_capacity(T: int, K: int, W: int) -> int:
    """Most send rows T tokens can need: each goes to at most min(K, W) ranks."""
    return T * min(K, W)


def _layout_torch(topk_ids: torch.Tensor, owner: torch.Tensor, table: torch.Tensor,
                  capacity: int = 0) -> SendLayout:
    T, E, W = topk_ids.shape[0], owner.shape[0], table.shape[0]
    valid = (topk_ids >= 0) & (topk_ids < E)
    ids = topk_ids.clamp(0, max(E - 1, 0))
    ranks = torch.where(valid, owner[ids], W)  # W: a dump column
    dest = torch.zeros(T, W + 1, dtype=torch.int32, device=topk_ids.device)
    dest = dest.scatter_(1, ranks, 1)[:, :W]  # (T, W)
    position = dest.cumsum(0, dtype=torch.int32)  # 1-based row among rank w's copies
    counts = dest.sum(0, dtype=torch.int32)
    if capacity:
        start = torch.arange(W, dtype=torch.int32, device=dest.device) * capacity
    else:
        start = counts.cumsum(0, dtype=torch.int32) - counts
    copy_index = torch.where(dest > 0, position - 1 + start, -1).to(torch.int32)
    cap = W * capacity if capacity else send_capacity(T, topk_ids.shape[1], W)
    send_tokens = torch.zeros(cap + 1, dtype=torch.int64, device=topk_ids.device)
    dump = torch.where(dest > 0, copy_index, cap).long()
    tokens = torch.arange(T, device=topk_ids.device)[:, None].expand(T, W)
    send_tokens.scatter_(0, dump.reshape(-1), tokens.reshape(-1))
    pairs = torch.zeros(E + 1, dtype=torch.int64, device=topk_ids.device)  # E: padding / dump
    pairs.scatter_add_(0, torch.where(valid, ids, E).reshape(-1),
                       torch.ones(topk_ids.numel(), dtype=torch.int64, device=ids.device))
    pairs[E:].zero_()  # a kernel, not a host-to-device copy: capturable in a CUDA graph
    meta = counts.new_empty(2, W, 1 + table.shape[1], dtype=torch.int64)
    meta[0] = torch.cat([counts[:, None].long(), pairs[table]], 1)
    return SendLayout(meta, copy_index, send_tokens[:cap], capacity)


def dispatch_layout(topk_ids: torch.Tensor, owner: torch.Tensor, table: torch.Tensor,
                    capacity: int = 0) -> SendLayout:
    """Where each token's copies go in an all-to-all send buffer, and what to tell each rank.

    Args:
        topk_ids: (T, K) int32/int64 global expert ids; ids outside [0, E) send nothing.
        owner: (E,) int32/int64 rank in [0, W) that owns each expert, on topk_ids' device.
        table: (W, e_max) int64 global experts of each rank, padded with E (as
            `ExpertPlacement.padded_local_experts`), on topk_ids' device.
        capacity: 0 packs the copies rank after rank; C > 0 gives every rank C rows, at
            w * C, whatever it needs: a fixed-size exchange, whose split sizes the host knows
            without reading the device (a token goes to a rank at most once, so C >= T fits).

    Returns:
        SendLayout (see its fields). Device-side only: nothing is read back to the host.
    """
    if topk_ids.ndim != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be (T, K) int32/int64, got {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype}")
    for name, t, ndim in (("owner", owner, 1), ("table", table, 2)):
        if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.device != topk_ids.device:
            raise ValueError(f"{name} must be a {ndim}-D tensor on {topk_ids.device}, got "
                             f"{getattr(t, 'shape', type(t))} on {getattr(t, 'device', None)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32/int64, got {t.dtype}")
    if table.shape[0] < 1:
        raise ValueError(f"table must have a row per rank (W >= 1), got {tuple(table.shape)}")
    T, K = topk_ids.shape
    if not isinstance(capacity, int) or capacity < 0 or (capacity and capacity < T):
        raise ValueError(f"capacity must be 0 or an int >= T ({T}), got {capacity!r}")
    if not use_triton(topk_ids) or T == 0:
        return _layout_torch(topk_ids, owner, table, capacity)
    dev, E, (W, e_max) = topk_ids.device, owner.shape[0], table.shape
    k_pow2, w_pow2 = triton.next_power_of_2(max(K, 1)), triton.next_power_of_2(W)
    e_pow2 = triton.next_power_of_2(max(E, 1))
    # tokens per program: the (BLOCK_T, K, W) and (BLOCK_T, E) tiles stay small, and at most
    # 1024 blocks so every program can sum the earlier blocks' counts itself
    block_t = max(16, min(256, 8192 // max(k_pow2 * w_pow2, e_pow2)),
                  triton.next_power_of_2(T) // 1024)
    if block_t * max(k_pow2 * w_pow2, e_pow2) > 1 << 17:  # millions of tokens: tiles too big
        return _layout_torch(topk_ids, owner, table, capacity)
    num_blocks = triton.cdiv(T, block_t)
    block_counts = torch.empty(num_blocks, W, dtype=torch.int32, device=dev)
    pairs = torch.zeros(E, dtype=torch.int32, device=dev)
    meta_buf = torch.empty(2, W, 1 + e_max, dtype=torch.int64, device=dev)
    copy_index = torch.empty(T, W, dtype=torch.int32, device=dev)
    rows = W * capacity if capacity else send_capacity(T, K, W)
    send_tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    ids, owner = topk_ids.contiguous(), owner.contiguous()
    meta = dict(K_POW2=k_pow2, W_POW2=w_pow2, BLOCK_T=block_t, num_warps=4)
    _count_kernel[(num_blocks,)](ids, owner, block_counts, pairs, T, K, E, W,
                                 E_POW2=e_pow2, **meta)
    _place_kernel[(num_blocks,)](ids, owner, block_counts, pairs, table.contiguous(), meta_buf,
                                 copy_index, send_tokens, T, K, E, W, num_blocks, e_max,
                                 capacity, NB_POW2=triton.next_power_of_2(num_blocks),
                                 EMAX_POW2=triton.next_power_of_2(max(e_max, 1)), **meta)
    return SendLayout(meta_buf, copy_index, send_tokens, capacity)


# --------------------------------------------------------------------------------------------
# Send buffers
# --------------------------------------------------------------------------------------------

@triton.jit
def _gather_send_kernel(
    # pointers
    x_ptr, weights_ptr, ids_ptr, send_tokens_ptr, send_meta_ptr, send_ptr, table_ptr,
    # sizes
    D, Dp, K, W, meta_cols, capacity, first,
    # strides
    stride_x, stride_send,
    # meta-parameters
    W_POW2: tl.constexpr, K_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
    ZERO_PADDING: tl.constexpr, OUT_TABLE: tl.constexpr, FP8: tl.constexpr,
    G_POW2: tl.constexpr,
):
    """Send row r = [x[send_tokens[r]], then its topk_weights and topk_ids as fp32 words from
    element Dp on]. FP8 (a uint8 send buffer): the token as D e4m3 bytes quantized per 128
    columns, its D / 128 fp32 scales from byte D on (G_POW2 lanes cover them), the routing
    from byte Dp on.

    Program q writes one row. Without OUT_TABLE, row first + q is written to row q at
    send_ptr. With OUT_TABLE (a fixed layout), q goes to rank w = (first + q % W) % W,
    row j = q // W of its block: send row w * capacity + j, written to row j of the output
    whose address table_ptr[w] holds; consecutive programs write to different ranks.
    Packed layout (capacity 0): for r below the rows sent (summed from send_meta on the
    device: the first half, at offset 0, of the layout's meta buffer); the rest stay unwritten.
    Fixed layout: rank w's rows are [w * capacity, w * capacity + send_meta[w, 0]); every other
    row is padding: ids -1 (no slot), so a receiver can read all rows, and with ZERO_PADDING
    zeros for the token (a receiver never reads a padding row's token)."""
    k = tl.arange(0, K_POW2)
    q = tl.program_id(0).to(tl.int64)
    if OUT_TABLE:
        dest = (first + q % W) % W
        j = q // W
        r = dest * capacity + j
        base = tl.load(table_ptr + dest).to(tl.pointer_type(send_ptr.dtype.element_ty))
        out = base + j * stride_send
    else:
        r = first + q
        out = send_ptr + q * stride_send
    routing = (out + Dp).to(tl.pointer_type(tl.float32), bitcast=True)
    if capacity > 0:
        dest = r // capacity
        valid = (r - dest * capacity) < tl.load(send_meta_ptr + dest * meta_cols)
    else:
        w = tl.arange(0, W_POW2)
        valid = r < tl.sum(tl.load(send_meta_ptr + w * meta_cols, mask=w < W, other=0))
    if valid:
        t = tl.load(send_tokens_ptr + r)
        if FP8:  # BLOCK_D a multiple of 128: whole groups, one a row of the tile
            scales = (out + D).to(tl.pointer_type(tl.float32), bitcast=True)
            c = tl.arange(0, 128)
            for d0 in range(0, D, BLOCK_D):
                group = d0 // 128 + tl.arange(0, BLOCK_D // 128)
                d = group[:, None] * 128 + c[None, :]
                values, scale = quantize_fp8(tl.load(x_ptr + t * stride_x + d, mask=d < D,
                                                     other=0.0))
                tl.store(out + d, values.to(tl.uint8, bitcast=True), mask=d < D)
                tl.store(scales + group, scale, mask=group * 128 < D)
        else:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                row = tl.load(x_ptr + t * stride_x + d, mask=d < D)
                tl.store(out + d, row, mask=d < D)
        weights = tl.load(weights_ptr + t * K + k, mask=k < K).to(tl.float32)
        ids = tl.load(ids_ptr + t * K + k, mask=k < K).to(tl.float32)
        tl.store(routing + k, weights, mask=k < K)
        tl.store(routing + K + k, ids, mask=k < K)
    elif capacity > 0:
        if ZERO_PADDING:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                zeros = tl.zeros((BLOCK_D,), dtype=send_ptr.dtype.element_ty)
                tl.store(out + d, zeros, mask=d < D)
            if FP8:
                group = tl.arange(0, G_POW2)
                scales = (out + D).to(tl.pointer_type(tl.float32), bitcast=True)
                tl.store(scales + group, tl.zeros((G_POW2,), dtype=tl.float32),
                         mask=group * 128 < D)
        no_slot = tl.zeros((K_POW2,), dtype=tl.float32)
        tl.store(routing + k, no_slot, mask=k < K)
        tl.store(routing + K + k, no_slot - 1.0, mask=k < K)


# FP8 send rows are bytes (uint8): e4m3 values, fp32 scales and the routing in one row, and
# gloo's all-to-all takes no float8 dtype
FP8_ROWS = torch.uint8


def packed_row(D: int, K: int, dtype: torch.dtype) -> tuple[int, int]:
    """(width, Dp) of a send row in elements of `dtype`: the token's D values, padded to Dp (a
    whole number of 4-byte words), then its 2K routing values as fp32 words, bit for bit, then
    padding to a whole number of 16 bytes: NCCL moved chunks off a 16-byte boundary at half
    speed (docs/performance.md).

    FP8 rows (`dtype` FP8_ROWS, D a multiple of 128), in bytes: the token's D e4m3 values, its
    D / 128 fp32 scales, then (from Dp) the routing: D + D / 32 + 8K bytes and padding, against
    bf16's 2D + 8K (DeepSeek-V3's D 7168, K 8: 7456 bytes against 14400, 0.52x)."""
    if dtype == FP8_ROWS:
        Dp = D + 4 * (D // 128)
        return -(-(Dp + 8 * K) // 16) * 16, Dp
    size = dtype.itemsize
    per_word, per_16 = 4 // size, 16 // size
    Dp = -(-D // per_word) * per_word
    return -(-(Dp + 2 * K * per_word) // per_16) * per_16, Dp


def split_packed(rows: torch.Tensor, D: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of packed rows (R, width): the tokens (R, D) (e4m3 for FP8 rows: their scales
    are `packed_scales`) and the routing (R, 2K) fp32 [weights, ids as floats]; both strided,
    no copy."""
    _, Dp = packed_row(D, K, rows.dtype)
    first = Dp // (4 // rows.element_size())  # the routing's first fp32 word
    tokens = rows[:, :D].view(torch.float8_e4m3fn) if rows.dtype == FP8_ROWS else rows[:, :D]
    return tokens, rows.view(torch.float32)[:, first:first + 2 * K]


def packed_scales(rows: torch.Tensor, D: int) -> Optional[torch.Tensor]:
    """(R, D / 128) fp32 view of FP8 rows' scales (strided, no copy); None for other rows."""
    if rows.dtype != FP8_ROWS:
        return None
    return rows.view(torch.float32)[:, D // 4:D // 4 + D // 128]


def gather_send_rows(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     layout: SendLayout, fp8: bool = False) -> torch.Tensor:
    """Fill the send buffer of `layout` before the split sizes reach the host.

    Args:
        x: (T, D) float32/float16/bfloat16 token rows (last dim contiguous); topk_weights (T, K)
            float and topk_ids (T, K) int32/int64 of the same tokens.
        layout: `dispatch_layout` of topk_ids.
        fp8: send each token as e4m3 with a scale per 128 columns (FP8 experts; D a multiple
            of 128), quantized here as the kernel gathers it (`ep_moe.fp8`).

    Returns:
        (T * min(K, W), width) of x's dtype, or FP8_ROWS bytes (`packed_row`): each row a
        token and its routing (weights, then ids as floats: exact below 2^24), so one
        all-to-all moves both; see `split_packed` (and `packed_scales`). Only the first
        sum(send_meta[:, 0]) rows are written; the buffer is sized by the bound, so no host
        sync is needed.
        With a fixed layout (capacity C): (W * C, width), every row written, padding rows as
        zeros with weights 0 and ids -1.
    """
    _check_send_args(x, topk_weights, topk_ids, layout, fp8)
    K = topk_ids.shape[1]
    cap, D = layout.send_tokens.shape[0], x.shape[1]
    row_dtype = FP8_ROWS if fp8 else x.dtype
    send = x.new_empty(cap, packed_row(D, K, row_dtype)[0], dtype=row_dtype)
    if cap == 0:
        return send
    if not use_triton(x) or x.shape[0] == 0:
        _gather_send_torch(x, topk_weights, topk_ids, layout, send)
        return send
    _launch_gather_send(x, topk_weights, topk_ids, layout, send, None, 0, cap,
                        zero_padding=True)
    return send


def push_send_rows(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   layout: SendLayout, outputs: list, first: int = 0,
                   table: Optional[torch.Tensor] = None, fp8: bool = False) -> None:
    """The send rows of a fixed `layout` written straight into each rank's buffer.

    Rank w's C rows (`gather_send_rows`' rows [w * C, (w + 1) * C)) go to outputs[w], a (C,
    width) tensor on x's device: on CUDA a view of rank w's memory (symmetric memory over
    NVLink), so the kernel's stores are the exchange. One launch writes every rank's rows,
    consecutive programs to different ranks (starting with rank `first`), so every peer
    takes stores at once. A padding row gets its routing (weights 0, ids -1) and not its
    token: the receiver never reads a padding row's token, and the bytes are not sent.

    Args:
        x, topk_weights, topk_ids, layout, fp8: as in `gather_send_rows`; layout.capacity > 0.
        outputs: W tensors (C, width) of x's dtype (FP8_ROWS with fp8), rows contiguous.
        first: the rank whose rows the first programs write (each rank starting with another).
        table: (W,) int64 tensor on x's device holding outputs[w].data_ptr(); built here when
            None (a host-to-device copy, which a CUDA graph cannot capture: pass it built).
    """
    _check_send_args(x, topk_weights, topk_ids, layout, fp8)
    C, (W, _) = layout.capacity, layout.meta.shape[1:]
    if C == 0:
        raise ValueError("layout must be a fixed-size layout (capacity > 0), got capacity 0")
    row_dtype = FP8_ROWS if fp8 else x.dtype
    width, Dp = packed_row(x.shape[1], topk_ids.shape[1], row_dtype)
    table = check_split_outputs(outputs, W, (C, width), x.new_empty(0, dtype=row_dtype), first,
                                table)
    if not use_triton(x) or x.shape[0] == 0:
        send = x.new_empty(W * C, width, dtype=row_dtype)
        _gather_send_torch(x, topk_weights, topk_ids, layout, send)
        for w, out in enumerate(outputs):
            out.copy_(send[w * C:(w + 1) * C])
        return
    _launch_gather_send(x, topk_weights, topk_ids, layout, outputs[0], table, first, W * C,
                        zero_padding=False)


def _check_send_args(x, topk_weights, topk_ids, layout, fp8):
    T, K = topk_ids.shape
    if x.ndim != 2 or x.shape[0] != T or tuple(topk_weights.shape) != (T, K):
        raise ValueError(f"x (T, D) and topk_weights (T, K) must match topk_ids (T, K) = "
                         f"{(T, K)}, got {tuple(x.shape)} and {tuple(topk_weights.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    if fp8 and x.shape[1] % 128:
        raise ValueError(f"fp8 send rows need x's D to be a multiple of 128 (the scale "
                         f"groups), got x of shape {tuple(x.shape)}")
    if layout.copy_index.shape[0] != T:  # a layout of other ids would index x out of bounds
        raise ValueError(f"layout must be the dispatch_layout of these {T} tokens, got one of "
                         f"{layout.copy_index.shape[0]}")
    devices = {t.device for t in (x, topk_weights, topk_ids, layout.meta, layout.copy_index,
                                  layout.send_tokens)}
    if len(devices) != 1:
        raise ValueError(f"x, topk_weights, topk_ids and layout must share a device, got "
                         f"{sorted(map(str, devices))}")


def _gather_send_torch(x, topk_weights, topk_ids, layout, send):
    """The torch version of the kernel over all of `send` (padding rows zeroed)."""
    cap, D, K, C = send.shape[0], x.shape[1], topk_ids.shape[1], layout.capacity
    send_x, send_routing = split_packed(send, D, K)
    send_scales = packed_scales(send, D)
    with torch.no_grad():
        rows = torch.arange(cap, device=x.device)
        copies = layout.send_meta[:, META_COPIES]
        valid = rows % C < copies[rows // C] if C else rows < copies.sum()
        tokens = torch.where(valid, layout.send_tokens, 0)
        routing = torch.cat([topk_weights.float(), topk_ids.float()], 1)
        if x.shape[0] == 0:  # padding rows only
            x, routing = x.new_zeros(1, D), routing.new_zeros(1, 2 * K)
        no_slot = torch.cat([routing.new_zeros(K), routing.new_full((K,), -1.0)])
        if send_scales is not None:  # FP8 rows: e4m3 bytes and scales (torch.where has no e4m3)
            q, scales = quantize_groups(x)
            send_x = send_x.view(torch.uint8)
            x = q.view(torch.uint8)
            send_scales.copy_(torch.where(valid[:, None], scales[tokens], 0))
        send_x.copy_(torch.where(valid[:, None], x[tokens], 0))
        send_routing.copy_(torch.where(valid[:, None], routing[tokens], no_slot))


def _launch_gather_send(x, topk_weights, topk_ids, layout, out, table, first, num_rows,
                        zero_padding):
    """`out`'s dtype says the rows' format: FP8_ROWS for FP8 rows, else x's."""
    D, K = x.shape[1], topk_ids.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    _, Dp = packed_row(D, K, out.dtype)
    W, meta_cols = layout.meta.shape[1:]
    _gather_send_kernel[(num_rows,)](
        x, topk_weights.contiguous(), topk_ids.contiguous(), layout.send_tokens,
        layout.meta, out, table if table is not None else out,  # meta[0]: send_meta
        D, Dp, K, W, meta_cols, layout.capacity, first, x.stride(0), out.stride(0),
        W_POW2=triton.next_power_of_2(W), K_POW2=triton.next_power_of_2(K),
        # FP8: whole 128-column groups (D >= 128), 16 of them (a (16, 128) tile) at most
        BLOCK_D=min(triton.next_power_of_2(D), 2048), ZERO_PADDING=zero_padding,
        OUT_TABLE=table is not None, FP8=out.dtype == FP8_ROWS,
        G_POW2=triton.next_power_of_2(max(D // 128, 1)), num_warps=4)
