"""The experts' gated MLP over expert-sorted rows, forward and backward in Triton (training).

    h13 = x @ w13[i].T          (P, 2I)   grouped GEMM
    act = act(gate) * up        (P, I)    fused gated activation
    y   = act @ w2[i].T         (P, D)    grouped GEMM

Backward, from dy (P, D):

    d_act = dy @ w2[i]          (P, I)    grouped GEMM, w2 read as (e, D, I) = (e, K, N)
    dw2   = dy_i.T @ act_i      (e, D, I) grouped weight gradient
    d_h13 = act'(h13) * d_act   (P, 2I)   fused activation backward
    dx    = d_h13 @ w13[i]      (P, D)    grouped GEMM, w13 read as (e, 2I, D) = (e, K, N)
    dw13  = d_h13_i.T @ x_i     (e, 2I, D) grouped weight gradient

Every product accumulates in fp32 in a fixed order: gradients are bitwise reproducible. The
row counts stay on the device (no host sync), and rows past their sum (P a bound, behind a
fixed-size exchange) are neither read nor written: their outputs and input gradients are
left as garbage the caller never reads, as on torch's path.
"""

from __future__ import annotations

import torch
import triton

from .activation import ACTIVATIONS, _gated_act_bwd_kernel, _gated_act_fwd, _launch_config
from .gemm_configs import gemm_config, shared_budget
from .grouped_gemm import grouped_gemm
from .grouped_wgrad import grouped_wgrad


def _configs(x: torch.Tensor, num_experts: int):
    rows = x.shape[0] / max(num_experts, 1)
    budget = shared_budget(x.device)
    return gemm_config(rows, False, x.element_size(), budget, num_experts)


def _activation_backward(h13, d_act, activation, num_rows):
    P, I = h13.shape[0], h13.shape[1] // 2
    d_h13 = torch.empty_like(h13)
    block, warps = _launch_config(I)
    _gated_act_bwd_kernel[(P, triton.cdiv(I, block))](
        h13, d_act, d_h13, num_rows, I, ACT=ACTIVATIONS[activation], HAS_ROWS=True,
        BLOCK=block, num_warps=warps)
    return d_h13


class _GatedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w13, w2, num_tokens_per_expert, num_rows, activation):
        cfg = _configs(x, w13.shape[0])
        h13 = grouped_gemm(x, w13, num_tokens_per_expert, config=cfg)  # (P, 2I)
        act = _gated_act_fwd(h13, activation, num_rows)  # (P, I)
        y = grouped_gemm(act, w2, num_tokens_per_expert, config=cfg)  # (P, D)
        ctx.save_for_backward(x, w13, w2, num_tokens_per_expert, num_rows, h13, act)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w13, w2, counts, num_rows, h13, act = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        cfg = _configs(x, w13.shape[0])
        dx = dw13 = dw2 = None
        if need_w2:
            dw2 = grouped_wgrad(dy, act, counts)  # (e, D, I)
        if need_x or need_w13:
            d_act = grouped_gemm(dy, w2, counts, config=cfg, w_layout="kn")  # (P, I)
            d_h13 = _activation_backward(h13, d_act, ctx.activation, num_rows)  # (P, 2I)
            if need_x:
                dx = grouped_gemm(d_h13, w13, counts, config=cfg, w_layout="kn")  # (P, D)
            if need_w13:
                dw13 = grouped_wgrad(d_h13, x, counts)  # (e, 2I, D)
        return dx, dw13, dw2, None, None, None


def gated_expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     num_tokens_per_expert: torch.Tensor, num_rows: torch.Tensor,
                     activation: str = "silu") -> torch.Tensor:
    """`act(x @ w1[i].T) * (x @ w3[i].T) @ w2[i].T` per expert, differentiable in x, w13, w2.

    Args:
        x: (P, D) rows sorted by expert, contiguous, float32 / float16 / bfloat16.
        w13: (e, 2I, D) gate rows [0, I), up rows [I, 2I); x's dtype, contiguous.
        w2: (e, D, I), x's dtype, contiguous.
        num_tokens_per_expert: (e,) int32/int64 rows per expert on x's device.
        num_rows: one-element int32/int64 tensor on x's device, the counts' sum (<= P): rows
            from it on are neither read nor written.
        activation: "silu", "gelu" or "relu".

    Returns:
        (P, D) in x's dtype; rows past `num_rows` unwritten.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if w13.ndim != 3 or w2.ndim != 3 or w13.shape[1] != 2 * w2.shape[2] or \
            w13.shape[0] != w2.shape[0] or x.ndim != 2 or x.shape[1] != w13.shape[2] or \
            w2.shape[1] != x.shape[1]:
        raise ValueError(f"x (P, D), w13 (e, 2I, D) and w2 (e, D, I) disagree: got shapes "
                         f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    return _GatedExpertMLP.apply(x, w13, w2, num_tokens_per_expert, num_rows, activation)
