"""Grouped expert GEMMs in Triton, for the forward pass without autograd (inference).

`out[p] = a[rows[p]] @ w[expert(p)].T` over rows sorted by expert, where `expert(p)` comes from
the per-expert row counts (e,) on the device: no host sync, so the layer's forward stays
capturable in a CUDA graph. Two fusions that torch's grouped GEMM cannot do:
- the expand: with `a_rows` the A tile is gathered from the token rows, so the (P, D) copy of
  the expert-sorted tokens is never written;
- the gated activation: the gate and up tiles of one program share their A tile and the
  epilogue writes `act(gate) * up` (P, I), so the (P, 2I) pre-activation never reaches memory.

The tile schedule: expert i owns `ceil(count_i / BLOCK_M)` row blocks, laid end to end; a
program finds its expert by comparing its block number with the cumulative block counts, which
it sums itself from the (e,) counts: no torch op runs before the launch.
Programs are launched for the upper bound `ceil(P / BLOCK_M) + e` and those past the last
block return at once; for a P far above the real rows (a buffer sized by a bound), `persistent`
launches one program per SM that loops over the real tiles instead. Row tiles of one group of
GROUP_M blocks sweep all column tiles before the next group starts, so the A rows stay in L2
while the weights stream.

Only used where nothing needs a gradient: training keeps torch's grouped GEMM, whose backward
torch provides.

FP8 (`grouped_gemm_fp8`, the same kernel under constexpr flags): e4m3 weights with a scale per
128 x 128 block, BLOCK_K = 128 so each K step multiplies e4m3 tiles on the tensor cores and
adds that product, times its row and block scales, into the fp32 accumulator. The rows are
quantized per token and 128 columns as each K block loads (or come quantized, with their
scales: the dispatch's rows, the down GEMM's h), and the first GEMM's epilogue can write its
output quantized the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

try:  # host-side tensor descriptors (Hopper's TMA): triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None

from ..fp8 import quantize_groups
from .activation import ACTIVATIONS, act_and_grad
from .common import (FP8_BLOCK, INTERPRET, capability_major, check_triton, empty_scales,
                     num_sms, per_device, quantize_fp8, to_output, use_triton)
from .gemm_configs import (GemmConfig, check_config, flatten_wins, fp8_gemm_config, gemm_config,
                           shared_budget)

GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# 1. Triton kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the CPU interpreter multiplies bf16 tiles wrongly (triton 3.9): go through fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:  # fp32 operands: full fp32 products, not tf32's 10-bit mantissa
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _grouped_gemm_kernel(
    # pointers (a_desc and w: tensor descriptors with TMA_A / TMA_W; else a_desc is a_ptr;
    # the scales only with FP8)
    a_desc, a_ptr, a_rows_ptr, w_ptr, out_ptr, counts_ptr, a_scale_ptr, w_scale_ptr,
    out_scale_ptr,
    # sizes
    N, K, num_experts, num_pid_m, up_elems, num_rows, num_a_rows, up_scale_rows,
    # strides (the last dim of a, w, out and the scales is contiguous)
    stride_am, stride_we, stride_wn, stride_om, stride_asm, stride_wse, stride_wsn, stride_osm,
    # meta-parameters
    GATHER: tl.constexpr, HAS_ACT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TAIL_M: tl.constexpr, PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr, TMA_A: tl.constexpr,
    TMA_W: tl.constexpr, FP8: tl.constexpr, A_FP8: tl.constexpr, OUT_FP8: tl.constexpr,
):
    # which expert owns which row block: the row and block counts are read and summed here (a
    # vector of E_POW2 lanes), so the launcher runs no torch ops before the kernel
    e = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0).to(tl.int32)
    counts = tl.maximum(counts, 0)  # a negative count must not move other experts' rows
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_ends = tl.cumsum(blocks, 0)
    row_ends = tl.cumsum(counts, 0)
    if PERSISTENT:
        # a few programs loop over the real tiles only, counted from the device counts
        real_m = tl.minimum(tl.sum(blocks), num_pid_m)
        num_tiles = real_m * tl.cdiv(N, BLOCK_N)
        # FLATTEN: the tile loop and the K loop become one pipelined loop, so a tile's first
        # loads start while the last tile's products run
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
            _gemm_tile(tile, real_m, e, counts, blocks, block_ends, row_ends,
                       a_desc, a_ptr, a_rows_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr,
                       out_scale_ptr, N, K, num_experts, up_elems, num_rows, num_a_rows,
                       up_scale_rows, stride_am, stride_we, stride_wn, stride_om, stride_asm,
                       stride_wse, stride_wsn, stride_osm,
                       GATHER, HAS_ACT, GATED, ACT, EVEN_K, IEEE, UPCAST,
                       BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TAIL_M, TMA_A, TMA_W,
                       FP8, A_FP8, OUT_FP8, True)
    else:
        _gemm_tile(tl.program_id(0), num_pid_m, e, counts, blocks, block_ends, row_ends,
                   a_desc, a_ptr, a_rows_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr,
                   out_scale_ptr, N, K, num_experts, up_elems, num_rows, num_a_rows,
                   up_scale_rows, stride_am, stride_we, stride_wn, stride_om, stride_asm,
                   stride_wse, stride_wsn, stride_osm,
                   GATHER, HAS_ACT, GATED, ACT, EVEN_K, IEEE, UPCAST,
                   BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TAIL_M, TMA_A, TMA_W,
                   FP8, A_FP8, OUT_FP8, False)


@triton.jit
def _gemm_tile(
    tile, num_pid_m, e, counts, blocks, block_ends, row_ends,
    a_desc, a_ptr, a_rows_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, out_scale_ptr,
    N, K, num_experts, up_elems, num_rows, num_a_rows, up_scale_rows,
    stride_am, stride_we, stride_wn, stride_om, stride_asm, stride_wse, stride_wsn, stride_osm,
    GATHER: tl.constexpr, HAS_ACT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TAIL_M: tl.constexpr, TMA_A: tl.constexpr, TMA_W: tl.constexpr,
    FP8: tl.constexpr, A_FP8: tl.constexpr, OUT_FP8: tl.constexpr, ALL_REAL: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile; tiles past the last row block write nothing. With
    TAIL_M < BLOCK_M an expert's last row block, where its rows fit, runs as a (TAIL_M,
    BLOCK_N) tile: fewer rows of padding through the tensor cores."""
    # grouped order: GROUP_M row blocks sweep every column tile before the next group
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_m
    pid_n = (tile % (GROUP_M * num_pid_n)) // group_m

    expert = tl.sum((block_ends <= pid_m).to(tl.int32))  # empty experts count as passed
    if ALL_REAL:  # the persistent loop visits real tiles only; no branch, which would keep
        real = True  # Triton from flattening that loop
    else:  # past the last block: the grid is an upper bound
        real = expert < num_experts
    if real:
        mine = e == expert
        row_end = tl.sum(tl.where(mine, row_ends, 0))
        row_begin = row_end - tl.sum(tl.where(mine, counts, 0))
        first_block = tl.sum(tl.where(mine, block_ends - blocks, 0))
        first_row = row_begin + (pid_m - first_block) * BLOCK_M
        tail = False
        if TAIL_M < BLOCK_M:
            tail = row_end - first_row <= TAIL_M
        if tail:
            _tile_product(first_row, row_end, expert, pid_n,
                          a_desc, a_ptr, a_rows_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr,
                          out_scale_ptr, N, K, up_elems, num_rows, num_a_rows, up_scale_rows,
                          stride_am, stride_we, stride_wn, stride_om, stride_asm, stride_wse,
                          stride_wsn, stride_osm,
                          GATHER, HAS_ACT, GATED, ACT, EVEN_K, IEEE, UPCAST,
                          TAIL_M, BLOCK_N, BLOCK_K, False, TMA_W, FP8, A_FP8, OUT_FP8)
        else:
            _tile_product(first_row, row_end, expert, pid_n,
                          a_desc, a_ptr, a_rows_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr,
                          out_scale_ptr, N, K, up_elems, num_rows, num_a_rows, up_scale_rows,
                          stride_am, stride_we, stride_wn, stride_om, stride_asm, stride_wse,
                          stride_wsn, stride_osm,
                          GATHER, HAS_ACT, GATED, ACT, EVEN_K, IEEE, UPCAST,
                          BLOCK_M, BLOCK_N, BLOCK_K, TMA_A, TMA_W, FP8, A_FP8, OUT_FP8)


@triton.jit
def _tile_product(
    first_row, row_end, expert, pid_n,
    a_desc, a_ptr, a_rows_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, out_scale_ptr,
    N, K, up_elems, num_rows, num_a_rows, up_scale_rows,
    stride_am, stride_we, stride_wn, stride_om, stride_asm, stride_wse, stride_wsn, stride_osm,
    GATHER: tl.constexpr, HAS_ACT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA_A: tl.constexpr, TMA_W: tl.constexpr,
    FP8: tl.constexpr, A_FP8: tl.constexpr, OUT_FP8: tl.constexpr,
):
    """Rows [first_row, first_row + TILE_M) before row_end, all of one expert, times one
    BLOCK_N column tile of its weights, written to out.

    With TMA_W, `w_ptr` is a tensor descriptor over w viewed as (e * N', K): whole weight tiles
    come in by the copy engine of the SM (TMA), zero-filled past K and past the last expert; a
    tile that runs past an expert's N columns reads the next rows, whose products land in
    columns that are never stored. With TMA_A (rows not gathered), `a_desc` is one over a
    (M, K) with TILE_M-row boxes: a row tile that runs past its expert's rows reads the next
    expert's, again only into rows that are never stored. Otherwise rows load from `a_ptr`.

    FP8: w is e4m3 with one scale per 128 x 128 block, BLOCK_K = 128, so each step of the K
    loop multiplies e4m3 tiles on the tensor cores (products exact, fp32 sums over at most 128
    terms: Hopper's FP8 accumulation keeps ~14 bits for longer runs, DeepSeek-V3 report
    3.3.2) and adds the block's product times its row and column scales into the fp32
    accumulator. A is e4m3 with its scales (A_FP8: rows quantized by the dispatch, or by the
    first GEMM's epilogue) or quantized here per row of each K block as it loads, so the rows
    are never quantized in a pass of their own. OUT_FP8 (BLOCK_N = 128, one group a row): the
    epilogue writes e4m3 and a scale per row instead of 16-bit values."""
    rows = first_row + tl.arange(0, TILE_M)
    # counts summing past the P output rows must not write past them (device data)
    row_ok = (rows < row_end) & (rows < num_rows)
    if GATHER:
        a_row = tl.load(a_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        a_ok = row_ok & (a_row >= 0) & (a_row < num_a_rows)  # a bad index reads nothing
    else:
        a_row = rows.to(tl.int64)
        a_ok = row_ok
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)

    if not TMA_A:
        a_ptrs = a_ptr + a_row[:, None] * stride_am + ks[None, :]
    if TMA_W:
        w_first = expert * (stride_we // stride_wn) + pid_n * BLOCK_N
    else:
        # (BLOCK_K, BLOCK_N) tile of w[expert].T; w is (e, N', K) with K contiguous
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                  + cols[None, :].to(tl.int64) * stride_wn + ks[:, None])
    if FP8:  # the scales of this tile's columns (BLOCK_K = 128 = a scale block's side)
        ws_ptrs = (w_scale_ptr + expert.to(tl.int64) * stride_wse
                   + (cols // BLOCK_K).to(tl.int64) * stride_wsn)
    acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if TMA_A:
            a = a_desc.load([first_row, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_ok[:, None] & (ks[None, :] < K - k0), other=0.0)
        if TMA_W:
            w = w_ptr.load([w_first, k0]).T
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=(ks[:, None] < K - k0) & col_ok[None, :], other=0.0)
        if FP8:
            kb = k0 // BLOCK_K
            if A_FP8:  # rows that arrived quantized: their scale of this K block
                a_s = tl.load(a_scale_ptr + a_row * stride_asm + kb, mask=a_ok, other=0.0)
            else:  # quantized as it loads: per row and 128 columns
                a, a_s = quantize_fp8(a)
            w_s = tl.load(ws_ptrs + kb, mask=col_ok, other=0.0)
            acc += tl.dot(a, w) * (a_s[:, None] * w_s[None, :])
        else:
            acc = _dot(a, w, acc, IEEE, UPCAST)
        if GATED:
            if TMA_W:  # the up rows: N rows further
                w_up = w_ptr.load([w_first + N, k0]).T
            elif EVEN_K:  # the up rows: N rows further, counted on the host
                w_up = tl.load(w_ptrs + up_elems, mask=col_ok[None, :], other=0.0)
            else:
                w_up = tl.load(w_ptrs + up_elems,
                               mask=(ks[:, None] < K - k0) & col_ok[None, :], other=0.0)
            if FP8:  # the up rows' scales: up_scale_rows = N / 128 block rows further
                w_s_up = tl.load(ws_ptrs + up_scale_rows * stride_wsn + kb, mask=col_ok,
                                 other=0.0)
                acc_up += tl.dot(a, w_up) * (a_s[:, None] * w_s_up[None, :])
            else:
                acc_up = _dot(a, w_up, acc_up, IEEE, UPCAST)
        if not TMA_A:
            a_ptrs += BLOCK_K
        if not TMA_W:
            w_ptrs += BLOCK_K

    if HAS_ACT:
        acc, _ = act_and_grad(acc, ACT)
        if GATED:
            acc = acc * acc_up
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    if OUT_FP8:  # BLOCK_N = 128: the tile's columns are one group of each row
        q, scale = quantize_fp8(acc)
        tl.store(out_ptrs, q, mask=row_ok[:, None] & col_ok[None, :])
        tl.store(out_scale_ptr + rows.to(tl.int64) * stride_osm + pid_n, scale, mask=row_ok)
    else:
        tl.store(out_ptrs, to_output(acc, out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _quantize_rows_kernel(x_ptr, rows_ptr, q_ptr, scale_ptr, num_out, num_rows, num_x_rows,
                          stride_x, stride_q, stride_sr, stride_sg, GATHER: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    """One (BLOCK_R, 128) group of output rows: e4m3 values and a scale per row
    (`quantize_fp8`). GATHER: output row i is x[rows[i]] for i < num_rows, zeros past them (an
    index outside x reads nothing)."""
    out_rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1).to(tl.int64)
    cols = group * 128 + tl.arange(0, 128)
    ok = out_rows < num_out
    if GATHER:
        src = tl.load(rows_ptr + out_rows, mask=out_rows < num_rows, other=-1).to(tl.int64)
        src_ok = (src >= 0) & (src < num_x_rows)
    else:  # output row i is x[i] for i < num_rows (= the rows of x), zeros past them
        src, src_ok = out_rows.to(tl.int64), out_rows < num_rows
    x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=src_ok[:, None],
                other=0.0)
    q, scale = quantize_fp8(x)
    tl.store(q_ptr + out_rows[:, None].to(tl.int64) * stride_q + cols[None, :], q,
             mask=ok[:, None])
    tl.store(scale_ptr + out_rows.to(tl.int64) * stride_sr + group * stride_sg, scale, mask=ok)


# --------------------------------------------------------------------------------------------
# 2. Launcher (arguments validated, tiles and launch shape decided by `grouped_gemm`)
# --------------------------------------------------------------------------------------------

def _descriptors(tma, cfg, a, w, gathered) -> bool:
    """`tma` resolved: None -> for 128-row tiles where `tma_ok` allows; True where it refuses:
    an error."""
    if tma is None:
        return cfg.block_m >= 128 and tma_ok(a, w, gathered)
    if tma and not tma_ok(a, w, gathered):
        raise ValueError("tma=True needs 16-bit a and w (or e4m3, FP8) on a CUDA device of "
                         "compute capability >= 9 (or the interpreter), w contiguous, rows of a "
                         "multiple of 16 bytes and 16-byte aligned bases (a's only when its "
                         f"rows are not gathered); got {a.dtype} on {a.device}, a strides "
                         f"{a.stride()}, w strides {w.stride()}")
    return tma


def _launch(a, w, counts, a_rows, activation, gated, config, persistent, tma, w_scale=None,
            a_scale=None, out_dtype=None):
    """Launch with tensor-descriptor loads and the persistent launch decided here, where the
    tensors' addresses are known (`tma_ok` reads them; torch.compile's tracing cannot).
    Returns (out, out_scale): out_scale (P, N'/128) fp32 where out_dtype is e4m3, else None.
    FP8 where `w_scale` is given (w e4m3), with a e4m3 where `a_scale` is."""
    cfg = GemmConfig(*config)
    num_experts, n_total, k_dim = w.shape
    num_rows = a_rows.shape[0] if a_rows is not None else a.shape[0]
    n_out = n_total // 2 if gated else n_total
    out_fp8 = out_dtype == torch.float8_e4m3fn
    out = a.new_empty(num_rows, n_out, dtype=out_dtype or a.dtype)
    out_scale = a.new_empty(num_rows, n_out // FP8_BLOCK, dtype=torch.float32) \
        if out_fp8 else None
    if num_rows == 0 or n_out == 0:
        return out, out_scale
    if k_dim == 0:  # (not FP8: it takes K >= 128)
        return out.zero_(), out_scale  # an empty product, and act(0) * 0 = 0
    gathered = a_rows is not None
    tma = _descriptors(tma, cfg, a, w, gathered)
    tma_a = tma and not gathered
    # FP8: never the flattened loop (not measured on FP8 tiles)
    wins = w_scale is None and flatten_wins(cfg, tma_a, num_experts, shared_budget(a.device))
    persistent = wins if persistent is None else persistent
    flatten = wins and persistent
    a_arg, w_arg = a, w
    if tma:
        w_arg = TensorDescriptor.from_tensor(w.view(num_experts * n_total, k_dim),
                                             [cfg.block_n, cfg.block_k])
    if tma_a:
        a_arg = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
    num_pid_m = triton.cdiv(num_rows, cfg.block_m) + num_experts  # upper bound on row blocks
    num_tiles = num_pid_m * triton.cdiv(n_out, cfg.block_n)
    grid = (min(num_tiles, num_sms(a.device)) if persistent else num_tiles,)
    fp8, a_fp8 = w_scale is not None, a_scale is not None
    unused = out  # a pointer for the scales a launch without them never reads
    _grouped_gemm_kernel[grid](
        a_arg, a, a_rows if a_rows is not None else a, w_arg, out, counts,
        a_scale if a_fp8 else unused, w_scale if fp8 else unused,
        out_scale if out_fp8 else unused,
        n_out, k_dim, num_experts, num_pid_m, n_out * w.stride(1), num_rows, a.shape[0],
        n_out // FP8_BLOCK,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        a_scale.stride(0) if a_fp8 else 0, w_scale.stride(0) if fp8 else 0,
        w_scale.stride(1) if fp8 else 0, out_scale.stride(0) if out_fp8 else 0,
        GATHER=a_rows is not None, HAS_ACT=activation is not None, GATED=gated,
        ACT=ACTIVATIONS[activation or "silu"], EVEN_K=k_dim % cfg.block_k == 0,
        IEEE=a.dtype == torch.float32, UPCAST=INTERPRET and a.dtype == torch.bfloat16,
        E_POW2=triton.next_power_of_2(num_experts),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        # a flattened loop takes no branch: no tail tiles there
        TAIL_M=cfg.tail_m if cfg.tail_m and not flatten else cfg.block_m,
        PERSISTENT=persistent, FLATTEN=flatten, TMA_A=tma_a, TMA_W=tma,
        FP8=fp8, A_FP8=a_fp8, OUT_FP8=out_fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, out_scale


# --------------------------------------------------------------------------------------------
# 3. Custom ops: torch.compile calls the kernel, never traces it (inference: no autograd)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ep_moe::grouped_gemm", mutates_args=())
def _grouped_gemm_op(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                     a_rows: Optional[torch.Tensor], activation: Optional[str], gated: bool,
                     config: list[int], persistent: Optional[bool],
                     tma: Optional[bool]) -> torch.Tensor:
    return _launch(a, w, counts, a_rows, activation, gated, config, persistent, tma)[0]


@_grouped_gemm_op.register_fake
def _(a, w, counts, a_rows, activation, gated, config, persistent, tma):
    num_rows = a_rows.shape[0] if a_rows is not None else a.shape[0]
    return a.new_empty(num_rows, w.shape[1] // 2 if gated else w.shape[1])


@torch.library.custom_op("ep_moe::grouped_gemm_fp8", mutates_args=())
def _grouped_gemm_fp8_op(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         counts: torch.Tensor, a_rows: Optional[torch.Tensor],
                         a_scale: Optional[torch.Tensor], activation: Optional[str],
                         gated: bool, out_dtype: torch.dtype, config: list[int],
                         persistent: Optional[bool],
                         tma: Optional[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    out, out_scale = _launch(a, w, counts, a_rows, activation, gated, config, persistent, tma,
                             w_scale, a_scale, out_dtype)
    # an op returns tensors: an empty scale where the output is not e4m3
    return out, out_scale if out_scale is not None else out.new_empty(0, dtype=torch.float32)


@_grouped_gemm_fp8_op.register_fake
def _(a, w, w_scale, counts, a_rows, a_scale, activation, gated, out_dtype, config, persistent,
      tma):
    num_rows = a_rows.shape[0] if a_rows is not None else a.shape[0]
    n_out = w.shape[1] // 2 if gated else w.shape[1]
    scale_shape = (num_rows, n_out // FP8_BLOCK) if out_dtype == torch.float8_e4m3fn else (0,)
    return (a.new_empty(num_rows, n_out, dtype=out_dtype),
            a.new_empty(scale_shape, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# 4. Public functions: validation, tile config (gemm_configs.py), launch shape
# --------------------------------------------------------------------------------------------

def _check(name: str, t: torch.Tensor, ndim: int, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_operands(a, w, num_tokens_per_expert, a_rows, activation, gated, config, persistent):
    """The checks `grouped_gemm` and `grouped_gemm_fp8` share (dtypes are each one's own);
    returns (num_rows, gated)."""
    _check("num_tokens_per_expert", num_tokens_per_expert, 1, (torch.int32, torch.int64))
    if w.shape[2] != a.shape[1]:
        raise ValueError(f"w must be (e, N, K={a.shape[1]}), got shape {tuple(w.shape)}")
    num_experts, n_total, k_dim = w.shape
    if num_tokens_per_expert.shape[0] != num_experts:
        raise ValueError(f"num_tokens_per_expert must be ({num_experts},), got shape "
                         f"{tuple(num_tokens_per_expert.shape)}")
    if a_rows is not None:
        _check("a_rows", a_rows, 1, (torch.int32, torch.int64))
        if a.shape[0] == 0 and a_rows.shape[0] > 0:
            raise ValueError(f"a_rows selects {a_rows.shape[0]} rows of an empty a")
    for name, t in (("w", w), ("num_tokens_per_expert", num_tokens_per_expert),
                    ("a_rows", a_rows)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} must be on a's device {a.device}, got {t.device}")
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r}")
        if gated and n_total % 2:
            raise ValueError(f"w must have an even N (gate | up) with activation, got {n_total}")
    if a.stride(1) != 1 or w.stride(2) != 1:
        raise ValueError("a and w must have a contiguous last dim, got strides "
                         f"{a.stride()} and {w.stride()}")
    num_rows = a_rows.shape[0] if a_rows is not None else a.shape[0]
    if num_experts == 0 and num_rows and k_dim and n_total:
        raise ValueError(f"w must hold at least one expert for {num_rows} rows, got shape "
                         f"{tuple(w.shape)}")
    if config is not None:
        check_config(config)
    if persistent is not None and not isinstance(persistent, bool):
        raise TypeError(f"persistent must be True, False or None, got {persistent!r}")
    return num_rows, gated and activation is not None


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                 a_rows: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                 gated: bool = True, config: Optional[GemmConfig] = None,
                 persistent: Optional[bool] = False, tma: Optional[bool] = None) -> torch.Tensor:
    """Per-expert `a_sorted @ w[i].T`, optionally gathering rows and applying an activation.

    Args:
        a: (M, K) rows, contiguous last dim, float32 / float16 / bfloat16.
        w: (e, N, K) per-expert weights (K contiguous), a's dtype. With a gated `activation`
            the rows [0, N/2) are the gate and [N/2, N) the up projection.
        num_tokens_per_expert: (e,) int32/int64 on a's device: rows of each expert, in order.
            They must sum to P, the number of output rows (device data: not checked here,
            which would cost a host sync). Rows past their sum are left unwritten; counts past
            P are cut at P (nothing is written outside the output); negative counts count 0.
        a_rows: optional (P,) int32/int64: sorted row p reads a[a_rows[p]] (the expand fused
            into the load; an index outside [0, M) reads zeros, never memory outside a).
            Without it, row p reads a[p] and P = M.
        activation: None, or "silu" / "gelu" / "relu": `act(gate) * up` when `gated`, else
            `act(h)`.
        config: tile sizes; default `gemm_config(P / e, gated, a.element_size(),
            shared_budget(a.device), e)`.
        persistent: one program per SM, each looping over the tiles of the real row blocks
            (counted on the device). For a P far above the counts' sum (a buffer sized by a
            bound), where the grid sized by P would be mostly programs that exit at once,
            each still holding its SM's shared memory while it starts. Where `flatten_wins`
            says so, the tile loop and the K loop are flattened into one pipelined loop (and
            the config's `tail_m` is not used: a branch would stop the flattening). None:
            persistent where `flatten_wins` says so, else the grid.
        tma: load the weight tiles (and a's, when rows are not gathered) through tensor
            descriptors (Hopper's TMA) instead of per-thread pointers. None: for 128-row
            tiles wherever `tma_ok` allows it (H100: 3-16% faster GEMMs there; the same time
            with shorter tiles, where each launch's ~35 us more of host time would be a loss
            when eager); True where `tma_ok` refuses is an error.

    Returns:
        (P, N) — (P, N/2) with a gated `activation` — in a's dtype, fp32 accumulation (fp32
        inputs multiply in full fp32, not tf32). P is read on the host from `a_rows` or M, never
        from the counts.
    """
    _check("a", a, 2, GEMM_DTYPES)
    _check("w", w, 3, GEMM_DTYPES)
    if w.dtype != a.dtype:
        raise TypeError(f"w must have a's dtype {a.dtype}, got {w.dtype}")
    num_rows, gated = _check_operands(a, w, num_tokens_per_expert, a_rows, activation, gated,
                                      config, persistent)
    check_triton("grouped_gemm", a)
    num_experts = w.shape[0]
    cfg = config or gemm_config(num_rows / max(num_experts, 1), gated, a.element_size(),
                                shared_budget(a.device), max(num_experts, 1))
    if tma is not None and not isinstance(tma, bool):
        raise TypeError(f"tma must be True, False or None, got {tma!r}")
    args = (a, w, num_tokens_per_expert.contiguous(),
            a_rows.contiguous() if a_rows is not None else None, activation, gated, list(cfg),
            persistent, tma)
    if torch.compiler.is_compiling():
        return _grouped_gemm_op(*args)
    return _launch(*args)[0]


def grouped_gemm_fp8(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                     num_tokens_per_expert: torch.Tensor, a_rows: Optional[torch.Tensor] = None,
                     a_scale: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                     gated: bool = True, out_dtype: torch.dtype = torch.bfloat16,
                     config: Optional[GemmConfig] = None, persistent: Optional[bool] = False,
                     tma: Optional[bool] = None):
    """`grouped_gemm` with e4m3 weights in 128 x 128 scale blocks, on FP8 tensor cores:
    per expert `rows @ (w[i] * w_scale[i] by block).T`, the rows quantized to e4m3 per row and
    128 columns (`ep_moe.fp8`), fp32 accumulation with the scales applied at each 128-wide K
    step.

    Args:
        a: (M, K) rows, contiguous last dim: e4m3 with `a_scale`, or float32 / float16 /
            bfloat16, then quantized as each K block loads (no pass over the rows of its own).
        w: (e, N, K) e4m3 (K contiguous); K and N (N / 2 per half with a gated activation)
            multiples of 128.
        w_scale: (e, N/128, K/128) fp32, the weight a block stands for is w times its scale
            (transformers' `*_scale_inv`); last dim contiguous.
        num_tokens_per_expert, a_rows, activation, gated: as in `grouped_gemm`.
        a_scale: (M, K/128) fp32 scales of an e4m3 a (row r, group j stands for a[r, 128 j:
            128 (j + 1)] * a_scale[r, j]); any row stride (packed dispatch rows), last dim
            contiguous. Rows that `a_rows` never picks are not read.
        out_dtype: float32 / float16 / bfloat16; or torch.float8_e4m3fn: the epilogue quantizes
            each row's 128-column groups (the next GEMM's e4m3 a), and the config's block_n
            must be 128.
        config: default `fp8_gemm_config(P / e, out_dtype is e4m3, a.element_size(),
            shared_budget(a.device))`; its block_k must be 128.
        persistent, tma: as in `grouped_gemm` (never a flattened loop: not measured in FP8).

    Returns:
        (P, N') of out_dtype, N' = N / 2 with a gated activation, else N; with e4m3 out_dtype
        (out (P, N') e4m3, out_scale (P, N' / 128) fp32). Rows past the counts' sum unwritten.
    """
    e4m3 = torch.float8_e4m3fn
    _check("a", a, 2, (*GEMM_DTYPES, e4m3))
    _check("w", w, 3, (e4m3,))
    _check("w_scale", w_scale, 3, (torch.float32,))
    num_rows, gated = _check_operands(a, w, num_tokens_per_expert, a_rows, activation, gated,
                                      config, persistent)
    num_experts, n_total, k_dim = w.shape
    n_out = n_total // 2 if gated else n_total
    if k_dim % FP8_BLOCK or k_dim == 0 or n_out % FP8_BLOCK:
        raise ValueError(f"w must be (e, N, K) with K > 0 and {'N / 2' if gated else 'N'} "
                         f"multiples of {FP8_BLOCK} (the scale blocks), got shape "
                         f"{tuple(w.shape)}")
    blocks = (num_experts, n_total // FP8_BLOCK, k_dim // FP8_BLOCK)
    if tuple(w_scale.shape) != blocks or w_scale.stride(2) != 1:
        raise ValueError(f"w_scale must be {blocks} (one scale per 128 x 128 block of w) with "
                         f"a contiguous last dim, got shape {tuple(w_scale.shape)} strides "
                         f"{w_scale.stride()}")
    if (a.dtype == e4m3) != (a_scale is not None):
        raise ValueError(f"a_scale must be given exactly when a is e4m3, got a {a.dtype} and "
                         f"a_scale {'None' if a_scale is None else tuple(a_scale.shape)}")
    if a_scale is not None:
        _check("a_scale", a_scale, 2, (torch.float32,))
        want = (a.shape[0], k_dim // FP8_BLOCK)
        if tuple(a_scale.shape) != want or a_scale.stride(1) != 1:
            raise ValueError(f"a_scale must be {want} with a contiguous last dim, got shape "
                             f"{tuple(a_scale.shape)} strides {a_scale.stride()}")
    for name, t in (("w_scale", w_scale), ("a_scale", a_scale)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} must be on a's device {a.device}, got {t.device}")
    if out_dtype not in (*GEMM_DTYPES, e4m3):
        raise TypeError(f"out_dtype must be float32, float16, bfloat16 or float8_e4m3fn, got "
                        f"{out_dtype}")
    out_fp8 = out_dtype == e4m3
    check_triton("grouped_gemm_fp8", a)
    check_fp8_device(a.device)
    cfg = config or fp8_gemm_config(num_rows / max(num_experts, 1), out_fp8, a.element_size(),
                                    shared_budget(a.device))
    if cfg.block_k != FP8_BLOCK or (out_fp8 and cfg.block_n != FP8_BLOCK):
        tile_n = " and block_n = 128 (an e4m3 output row group a tile)" if out_fp8 else ""
        raise ValueError(f"config must have block_k = {FP8_BLOCK} (a scale block a K step)"
                         f"{tile_n}, got {cfg}")
    if tma is not None and not isinstance(tma, bool):
        raise TypeError(f"tma must be True, False or None, got {tma!r}")
    counts = num_tokens_per_expert.contiguous()
    rows = a_rows.contiguous() if a_rows is not None else None
    if torch.compiler.is_compiling():
        out, out_scale = _grouped_gemm_fp8_op(a, w, w_scale, counts, rows, a_scale, activation,
                                              gated, out_dtype, list(cfg), persistent, tma)
    else:
        out, out_scale = _launch(a, w, counts, rows, activation, gated, list(cfg), persistent,
                                 tma, w_scale, a_scale, out_dtype)
    return (out, out_scale) if out_fp8 else out


def quantize_rows(x: torch.Tensor, rows: Optional[torch.Tensor] = None,
                  num_out: Optional[int] = None,
                  column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, D) rows -> (q (R, D) e4m3, scale (R, D/128) fp32) per row and 128 columns, in one
    pass (Triton; the same bits as `ep_moe.fp8.quantize_groups`, which runs where Triton does
    not, and under torch.compile). The FP8 experts' rows before a GEMM that gathers them by
    the hundred per expert (`experts.FP8_QUANTIZE_IN_GEMM_MAX_ROWS`), and one expert's rows
    before its cuBLAS product (`ep_moe.fp8.blockwise_mm`).

    Args:
        x: (R, D) rows, D a multiple of 128, elements contiguous.
        rows: optional (n,) int rows of x to take, in order (a gather in the same pass; an
            index outside x gives a zero row).
        num_out: output rows (default: n, or R); rows past n are zeros (padding).
        column_major_scales: the scales' storage is (D/128, rows) (strides (1, rows) of the
            returned (rows, D/128) view), the layout cuBLAS's 1 x 128 block scaling reads.

    Raises TypeError / ValueError naming the argument: x not a 2-D float tensor with D a
    multiple of 128 and contiguous rows, rows not 1-D integer on x's device, num_out < n."""
    _check("x", x, 2, GEMM_DTYPES)
    R, D = x.shape
    if D % FP8_BLOCK or x.stride(1) != 1:
        raise ValueError(f"x must have D a multiple of {FP8_BLOCK} and contiguous rows, got "
                         f"shape {tuple(x.shape)} strides {x.stride()}")
    if rows is not None:
        _check("rows", rows, 1, (torch.int32, torch.int64))
        if rows.device != x.device:
            raise ValueError(f"rows must be on x's device {x.device}, got {rows.device}")
    n = R if rows is None else rows.shape[0]
    num_out = n if num_out is None else num_out
    if num_out < n:
        raise ValueError(f"num_out must be at least the {n} rows taken, got {num_out}")
    if not use_triton(x) or torch.compiler.is_compiling():
        taken = x if rows is None else take_rows(x, rows)
        q, groups_scale = quantize_groups(F.pad(taken, (0, 0, 0, num_out - n)))
        scale = empty_scales(num_out, D // FP8_BLOCK, column_major_scales, x.device)
        return q, scale.copy_(groups_scale)
    groups = D // FP8_BLOCK
    q = torch.empty(num_out, D, dtype=torch.float8_e4m3fn, device=x.device)
    scale = empty_scales(num_out, groups, column_major_scales, x.device)
    if num_out:
        block_r = 16
        _quantize_rows_kernel[(triton.cdiv(num_out, block_r), groups)](
            x, x if rows is None else rows.contiguous(), q, scale, num_out, n, R, x.stride(0),
            q.stride(0), scale.stride(0), scale.stride(1), GATHER=rows is not None,
            BLOCK_R=block_r, num_warps=4)
    return q, scale


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] for a 2-D x of any dtype (e4m3 too), an index outside x giving a zero row (the
    rule of the kernels' gathers)."""
    ok = (rows >= 0) & (rows < x.shape[0])
    if x.shape[0] == 0:
        return x.new_zeros(rows.shape[0], x.shape[1])
    raw = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x
    taken = torch.where(ok[:, None], raw[rows.clamp(0, x.shape[0] - 1)], 0)
    return taken.view(x.dtype)


def check_fp8_device(device: torch.device) -> None:
    """RuntimeError unless `device` multiplies e4m3 tiles: CUDA of compute capability >= 8.9
    (Ada, Hopper and newer), or the CPU interpreter."""
    if device.type == "cuda" and not _e4m3_tensor_cores(device):
        raise RuntimeError(f"FP8 experts need e4m3 tensor cores (compute capability >= 8.9), "
                           f"got {torch.cuda.get_device_name(device)} with "
                           f"{torch.cuda.get_device_capability(device)}")


@per_device
def _e4m3_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


def tma_ok(a: torch.Tensor, w: torch.Tensor, gathered: bool = False) -> bool:
    """Whether `grouped_gemm` (and `grouped_gemm_fp8`) can load through tensor descriptors:
    16-bit or e4m3 operands (fp32 takes the IEEE products, and its descriptor loads were
    never measured), w contiguous with rows of a multiple of 16 bytes, and a too unless its
    rows are gathered (then a gets no descriptor), 16-byte aligned bases, on Hopper or newer
    (or the interpreter, which emulates them)."""
    if TensorDescriptor is None or a.element_size() > 2 or w.element_size() > 2 \
            or not w.is_contiguous():
        return False
    if (w.shape[2] * w.element_size()) % 16 or w.data_ptr() % 16:
        return False
    if not gathered and ((a.stride(0) * a.element_size()) % 16 or a.data_ptr() % 16):
        return False
    if a.device.type == "cuda":
        return capability_major(a.device) >= 9
    return INTERPRET
