"""Per-expert weight gradients in Triton: `dw[i] = a[rows_i].T @ b[rows_i]`.

The backward of a grouped expert GEMM `y = x @ w[i].T` over expert-sorted rows needs, for
each expert, the product of its rows of the output gradient and of the input summed over
those rows: a GEMM whose inner dimension is the expert's row count, which differs per expert
and lives on the device. Each program owns one (BLOCK_M, BLOCK_N) tile of one expert's
gradient and walks that expert's rows BLOCK_R at a time, so the sum runs in a fixed order (no
atomics: bitwise reproducible), an expert with no rows gets zeros, and nothing is read outside
the experts' rows. The expert's tiles run next to each other, so its rows, read by every
tile, stay in L2.

At the few rows per expert of small batches (Qwen3's 128 experts at 512 tokens: 32 rows
each) the time is writing the gradients, one pass over the weights' bytes.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .fused_mul_sum import _INTERPRET, _use_triton
from .gemm_configs import GemmConfig, _check_config, fit_shared, shared_budget
from .grouped_gemm import GEMM_DTYPES, _check, _dot


# --------------------------------------------------------------------------------------------
# 1. Triton kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _grouped_wgrad_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, counts_ptr,
    # sizes
    M, N, num_experts, num_rows,
    # strides (the last dim of a, b and out is contiguous)
    stride_am, stride_bm, stride_oe, stride_om,
    # meta-parameters
    IEEE: tl.constexpr, UPCAST: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # which expert, and which tile of its (M, N) gradient: an expert's tiles are consecutive,
    # grouped by GROUP_M row tiles (each group sweeps the column tiles while its a rows sit
    # in L2)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (num_pid_m * num_pid_n)
    tile = pid % (num_pid_m * num_pid_n)
    first_m = (tile // (GROUP_M * num_pid_n)) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_m
    pid_n = (tile % (GROUP_M * num_pid_n)) // group_m

    # the expert's rows [row_begin, row_end): the counts summed here, cut at the P rows
    e = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0).to(tl.int32)
    counts = tl.maximum(counts, 0)  # a negative count must not move other experts' rows
    mine = e == expert
    row_end = tl.sum(tl.where(mine, tl.cumsum(counts, 0), 0))
    row_begin = tl.minimum(row_end - tl.sum(tl.where(mine, counts, 0)), num_rows)
    row_end = tl.minimum(row_end, num_rows)

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        r = r0 + rs
        r_ok = r < row_end
        r = r.to(tl.int64)  # 64-bit offsets: P * M may pass 2^31
        a = tl.load(a_ptr + r[:, None] * stride_am + ms[None, :],
                    mask=r_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_M)
        b = tl.load(b_ptr + r[:, None] * stride_bm + ns[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_N)
        acc = _dot(tl.trans(a), b, acc, IEEE, UPCAST)
    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe
                + ms[:, None].to(tl.int64) * stride_om + ns[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# 2. Config and launcher
# --------------------------------------------------------------------------------------------

def wgrad_config(rows_per_expert: float, element_size: int = 2,
                 budget: Optional[int] = None) -> GemmConfig:
    """Tiles of `grouped_wgrad`, as a GemmConfig whose block_k is the rows summed a step:
    128 x 128 gradient tiles, and steps no longer than the rows an expert has on average
    (tl.dot takes >= 16), fitted into the shared memory `budget`."""
    block_r = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64
    return fit_shared(GemmConfig(128, 128, block_r, 8, 8, 3), False, element_size, budget)


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                  config: Optional[GemmConfig] = None) -> torch.Tensor:
    """Per-expert `a[rows_i].T @ b[rows_i]`: the weight gradient of a grouped GEMM.

    Args:
        a: (P, M) expert-sorted rows (the output gradient of `y = x @ w[i].T`: M = N of w),
            contiguous last dim, float32 / float16 / bfloat16.
        b: (P, N) the same rows of the GEMM's input (N = K of w), a's dtype and device.
        num_tokens_per_expert: (e,) int32/int64 on a's device: rows of each expert, in order
            (device data, not checked here: a check would cost a host sync). Rows past their
            sum are never read; counts past P are cut at P; negative counts count 0.
        config: tiles (block_k: rows a step); default `wgrad_config(P / e, ...)`.

    Returns:
        (e, M, N) in a's dtype, fp32 accumulation in a fixed order (fp32 inputs multiply in
        full fp32, not tf32); zeros for an expert with no rows.
    """
    _check("a", a, 2, GEMM_DTYPES)
    _check("b", b, 2, GEMM_DTYPES)
    _check("num_tokens_per_expert", num_tokens_per_expert, 1, (torch.int32, torch.int64))
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}, got {b.dtype}")
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"b must have a's {a.shape[0]} rows, got shape {tuple(b.shape)}")
    for name, t in (("b", b), ("num_tokens_per_expert", num_tokens_per_expert)):
        if t.device != a.device:
            raise ValueError(f"{name} must be on a's device {a.device}, got {t.device}")
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("a and b must have a contiguous last dim, got strides "
                         f"{a.stride()} and {b.stride()}")
    if config is not None:
        _check_config(config)
    num_experts, (P, M), N = num_tokens_per_expert.shape[0], a.shape, b.shape[1]
    out = a.new_empty(num_experts, M, N)
    if out.numel() == 0:
        return out
    if P == 0:
        return out.zero_()  # every expert has no rows: an empty sum
    if not _use_triton(a):
        raise RuntimeError("grouped_wgrad runs through Triton: needs a CUDA tensor, or a CPU "
                           "tensor with TRITON_INTERPRET=1")
    cfg = config or wgrad_config(P / num_experts, a.element_size(), shared_budget(a.device))
    grid = (num_experts * triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _grouped_wgrad_kernel[grid](
        a, b, out, num_tokens_per_expert.contiguous(),
        M, N, num_experts, P,
        a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        IEEE=a.dtype == torch.float32, UPCAST=_INTERPRET and a.dtype == torch.bfloat16,
        E_POW2=triton.next_power_of_2(num_experts),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
