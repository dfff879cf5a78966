"""Fused gated activation: `act(h[:, :I]) * h[:, I:]` for the (P, 2I) gate/up GEMM output.

Eager torch reads the strided gate half, writes act(gate), reads it back with the up half and
writes the product: five passes over (P, I). This reads gate and up once and writes once, in
fp32 internally, and its backward writes (P, 2I) gradients in one pass from the saved input,
so the (P, I) act(gate) buffer is never kept for autograd.

Optionally only the first `num_rows` rows (a count on the device) are touched: behind a
fixed-size exchange P is a bound on the rows the grouped GEMM wrote, and the rest are neither
read nor written.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (FP8_BLOCK, empty_scales, needs_grad, quantize_fp8, to_output,
                     use_triton)

ACTIVATIONS = {"silu": 0, "gelu": 1, "relu": 2}


# --------------------------------------------------------------------------------------------
# 1. Triton kernels (`act_and_grad` is shared with the grouped GEMM's epilogue)
# --------------------------------------------------------------------------------------------

@triton.jit
def act_and_grad(gate, ACT: tl.constexpr):
    """fp32 act(gate) and d act / d gate."""
    if ACT == 0:  # silu
        s = tl.sigmoid(gate)
        return gate * s, s + gate * s * (1.0 - s)
    elif ACT == 1:  # gelu, exact (erf) form, as torch's default
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        return gate * cdf, cdf + gate * pdf
    else:  # relu
        pos = gate > 0.0
        return tl.where(pos, gate, 0.0), tl.where(pos, 1.0, 0.0)


@triton.jit
def _load_gate_up(h_ptr, rows_ptr, I, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's row and columns, and their fp32 gate and up values (masked off past
    the device count `rows_ptr`, when given)."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < I
    if HAS_ROWS:
        rows = tl.zeros_like(col).to(tl.int64) + row  # the row's index in every lane
        mask = mask & (rows < tl.load(rows_ptr))
    gate = tl.load(h_ptr + row * 2 * I + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * I + I + col, mask=mask, other=0.0).to(tl.float32)
    return row, col, mask, gate, up


@triton.jit
def _gated_act_fwd_kernel(
    # pointers
    h_ptr, out_ptr, rows_ptr,
    # sizes
    I,
    # meta-parameters
    ACT: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    row, col, mask, gate, up = _load_gate_up(h_ptr, rows_ptr, I, HAS_ROWS, BLOCK)
    act, _ = act_and_grad(gate, ACT)
    tl.store(out_ptr + row * I + col, to_output(act * up, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    # pointers
    h_ptr, grad_out_ptr, grad_h_ptr, rows_ptr,
    # sizes
    I,
    # meta-parameters
    ACT: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    row, col, mask, gate, up = _load_gate_up(h_ptr, rows_ptr, I, HAS_ROWS, BLOCK)
    g = tl.load(grad_out_ptr + row * I + col, mask=mask, other=0.0).to(tl.float32)
    act, dact = act_and_grad(gate, ACT)
    dtype = grad_h_ptr.dtype.element_ty
    tl.store(grad_h_ptr + row * 2 * I + col, to_output(g * up * dact, dtype), mask=mask)
    tl.store(grad_h_ptr + row * 2 * I + I + col, to_output(g * act, dtype), mask=mask)


@triton.jit
def _act_quantize_kernel(
    # pointers
    h_ptr, q_ptr, scale_ptr,
    # sizes and strides
    M, I, stride_h, stride_q, stride_sr, stride_sg,
    # meta-parameters
    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One (BLOCK_R, 128) group of `act(gate) * up` (or `act(h)`), quantized to e4m3 with a
    scale per row, as the FP8 grouped GEMM's epilogue does (the same operations in the same
    order, from h's stored values)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1).to(tl.int64)
    cols = group * 128 + tl.arange(0, 128)
    ok = rows < M
    ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :]
    out, _ = act_and_grad(tl.load(ptrs, mask=ok[:, None], other=0.0).to(tl.float32), ACT)
    if GATED:
        out = out * tl.load(ptrs + I, mask=ok[:, None], other=0.0).to(tl.float32)
    q, scale = quantize_fp8(out)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], q, mask=ok[:, None])
    tl.store(scale_ptr + rows.to(tl.int64) * stride_sr + group * stride_sg, scale, mask=ok)


# --------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------

def _launch_config(I: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(I, 1)), 2048)
    return block, max(1, min(8, block // 256))


def _gated_act_fwd(h: torch.Tensor, activation: str, num_rows) -> torch.Tensor:
    P, I = h.shape[0], h.shape[1] // 2
    out = h.new_empty(P, I)
    if P and I:
        block, warps = _launch_config(I)
        _gated_act_fwd_kernel[(P, triton.cdiv(I, block))](
            h, out, h if num_rows is None else num_rows, I, ACT=ACTIVATIONS[activation],
            HAS_ROWS=num_rows is not None, BLOCK=block, num_warps=warps)
    return out


def _gated_act_bwd(h: torch.Tensor, grad_out: torch.Tensor, activation: str,
                   num_rows) -> torch.Tensor:
    P, I = h.shape[0], h.shape[1] // 2
    grad_h = torch.empty_like(h)
    if P and I:
        block, warps = _launch_config(I)
        _gated_act_bwd_kernel[(P, triton.cdiv(I, block))](
            h, grad_out.contiguous(), grad_h, h if num_rows is None else num_rows, I,
            ACT=ACTIVATIONS[activation], HAS_ROWS=num_rows is not None, BLOCK=block,
            num_warps=warps)
    return grad_h


# --------------------------------------------------------------------------------------------
# 3. Autograd: custom ops for torch.compile (it calls the kernels, never traces them), and the
#    same wiring as an autograd.Function for eager calls (no custom-op dispatch cost)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ep_moe::gated_activation", mutates_args=())
def _gated_activation_op(h: torch.Tensor, activation: str,
                         num_rows: Optional[torch.Tensor]) -> torch.Tensor:
    return _gated_act_fwd(h, activation, num_rows)


@_gated_activation_op.register_fake
def _(h, activation, num_rows):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("ep_moe::gated_activation_backward", mutates_args=())
def _gated_activation_backward_op(h: torch.Tensor, grad_out: torch.Tensor, activation: str,
                                  num_rows: Optional[torch.Tensor]) -> torch.Tensor:
    return _gated_act_bwd(h, grad_out, activation, num_rows)


@_gated_activation_backward_op.register_fake
def _(h, grad_out, activation, num_rows):
    return torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    h, activation, num_rows = inputs
    ctx.save_for_backward(h, num_rows)
    ctx.activation = activation


def _backward(ctx, grad_out):
    h, num_rows = ctx.saved_tensors
    return _gated_activation_backward_op(h, grad_out, ctx.activation, num_rows), None, None


_gated_activation_op.register_autograd(_backward, setup_context=_setup_context)


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, activation, num_rows):
        ctx.save_for_backward(h, num_rows)
        ctx.activation = activation
        return _gated_act_fwd(h, activation, num_rows)

    @staticmethod
    def backward(ctx, grad_out):
        h, num_rows = ctx.saved_tensors
        return _gated_act_bwd(h, grad_out, ctx.activation, num_rows), None, None


# --------------------------------------------------------------------------------------------
# 4. Public function
# --------------------------------------------------------------------------------------------


def gated_activation(h: torch.Tensor, activation: str,
                     num_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(P, 2I) contiguous [gate | up] -> (P, I) `act(gate) * up` in h's dtype.

    num_rows: optional one-element int32/int64 tensor on h's device: rows from that count on
    are neither read nor written, in the output and in the backward's gradient (left
    uninitialised: the caller must not read them). Read on the device, so no host sync.

    Triton on CUDA (and on CPU under TRITON_INTERPRET=1; `fused_activation_available`);
    the caller falls back to torch ops elsewhere. Under torch.compile, a custom op.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if h.ndim != 2 or h.shape[1] % 2:
        raise ValueError(f"h must be (P, 2I), got shape {tuple(h.shape)}")
    if not use_triton(h):
        raise ValueError(f"h must be on a CUDA device (or on the CPU under TRITON_INTERPRET=1), "
                         f"got {h.device}")
    if num_rows is not None and (not isinstance(num_rows, torch.Tensor) or num_rows.numel() != 1
                                 or num_rows.dtype not in (torch.int32, torch.int64)
                                 or num_rows.device != h.device):
        raise ValueError(f"num_rows must be a one-element int32/int64 tensor on {h.device}, got "
                         f"{num_rows!r}")
    if torch.compiler.is_compiling():
        return _gated_activation_op(h.contiguous(), activation, num_rows)
    if needs_grad(h):
        return _GatedActivation.apply(h.contiguous(), activation, num_rows)
    return _gated_act_fwd(h.contiguous(), activation, num_rows)  # no autograd node


def fused_activation_available(h: torch.Tensor) -> bool:
    """Whether `gated_activation` runs for h: wherever Triton does."""
    return use_triton(h)


def activate_fp8(h: torch.Tensor, activation: str, gated: bool,
                 column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, 2I) [gate | up] (or (M, I) when not gated) -> `act(gate) * up` quantized per row
    and 128 columns: (q (M, I) e4m3, scale (M, I/128) fp32), in one pass. The intermediate of
    the FP8 experts' per-expert path, between its two cuBLAS products; the values and scales
    of `ep_moe.fp8.quantize_groups` of the fp32 activation.

    column_major_scales: the scales' storage is (I/128, M) (strides (1, M) of the returned
    view), the layout cuBLAS's 1 x 128 block scaling reads.

    Raises TypeError / ValueError naming the argument: h not float32 / float16 / bfloat16, an
    unknown activation, h not 2-D with rows of contiguous elements and I a multiple of 128,
    or h where Triton does not run."""
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"h must be float32, float16 or bfloat16, got {h.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    width = h.shape[-1] // 2 if gated else h.shape[-1]
    if h.ndim != 2 or h.stride(-1) != 1 or width % FP8_BLOCK or (gated and h.shape[1] % 2):
        raise ValueError(f"h must be (M, {'2I' if gated else 'I'}) with I a multiple of "
                         f"{FP8_BLOCK} and contiguous rows, got shape {tuple(h.shape)} strides "
                         f"{h.stride()}")
    if not use_triton(h):
        raise ValueError(f"h must be on a CUDA device (or on the CPU under TRITON_INTERPRET=1), "
                         f"got {h.device}")
    M, groups = h.shape[0], width // FP8_BLOCK
    q = torch.empty(M, width, dtype=torch.float8_e4m3fn, device=h.device)
    scale = empty_scales(M, groups, column_major_scales, h.device)
    if M and groups:
        block_r = 16
        _act_quantize_kernel[(triton.cdiv(M, block_r), groups)](
            h, q, scale, M, width, h.stride(0), q.stride(0), scale.stride(0), scale.stride(1),
            ACT=ACTIVATIONS[activation], GATED=gated, BLOCK_R=block_r, num_warps=4)
    return q, scale
