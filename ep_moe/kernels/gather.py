"""Row gather up to a count on the device: `out[p] = x[index[p]]` for p < count.

Behind a fixed-size exchange the expert-sorted buffers are sized by a bound on the pairs, and
only the first `count` rows (the sort's total, on the device) are real. torch's `x[index]`
would copy every row of the bound; this copies the real ones and leaves the rest unwritten,
with no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FLOAT_DTYPES, use_triton


@triton.jit
def _gather_rows_kernel(
    # pointers
    x_ptr, index_ptr, count_ptr, out_ptr,
    # sizes
    D, num_src,
    # strides
    stride_x, stride_out,
    # meta-parameters
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    if p < tl.load(count_ptr):
        # the row's index in every lane (a block mask, as the loads want)
        src = tl.zeros((BLOCK_D,), dtype=tl.int64) + tl.load(index_ptr + p).to(tl.int64)
        ok = (src >= 0) & (src < num_src)  # a bad index reads nothing: the row gets zeros
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            row = tl.load(x_ptr + src * stride_x + d, mask=(d < D) & ok, other=0.0)
            tl.store(out_ptr + p * stride_out + d, row, mask=d < D)


def gather_rows(x: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(N, D) rows, (P,) int index, one-element int count on the device -> (P, D): row p is
    x[index[p]] for p < count (an index outside [0, N) gives zeros); rows from count on are
    left uninitialised. Triton (CUDA, or CPU under TRITON_INTERPRET=1); torch's `x[index]`
    elsewhere, which writes every row."""
    if x.ndim != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be (N, D) float32/float16/bfloat16, got {tuple(x.shape)} "
                         f"{x.dtype}")
    if index.ndim != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be (P,) int32/int64, got {tuple(index.shape)} "
                         f"{index.dtype}")
    if count.numel() != 1 or count.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"count must be a one-element int32/int64 tensor, got "
                         f"{tuple(count.shape)} {count.dtype}")
    if len({x.device, index.device, count.device}) != 1:
        raise ValueError(f"x, index and count must share a device, got {x.device}, "
                         f"{index.device}, {count.device}")
    if not use_triton(x):
        if not x.shape[0]:
            return x.new_zeros(index.shape[0], x.shape[1])
        ok = (index >= 0) & (index < x.shape[0])  # a bad index gives zeros, as in the kernel
        rows = x[index.clamp(0, x.shape[0] - 1)]
        return torch.where(ok[:, None], rows, rows.new_zeros(()))
    P, D = index.shape[0], x.shape[1]
    out = x.new_empty(P, D)
    if P == 0 or D == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    _gather_rows_kernel[(P,)](x, index.contiguous(), count, out, D, x.shape[0], x.stride(0),
                              out.stride(0), BLOCK_D=min(triton.next_power_of_2(D), 2048),
                              num_warps=4)
    return out
