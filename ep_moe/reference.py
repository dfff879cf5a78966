"""The slow, obviously-right oracle: a loop over experts in float64. Tests compare against it."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .config import MoEConfig
from .fp8 import E4M3_MAX, dequantize_blocks, quantize_groups

_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def reference_router(x, params: dict, config: MoEConfig,
                     topk_ids: Optional[torch.Tensor] = None):
    """float64 routing: returns (topk_ids (T, K), topk_weights (T, K) float64)."""
    c = config
    logits = x.double() @ params["router.weight"].double().t()
    scores = logits.softmax(-1) if c.score_func == "softmax" else logits.sigmoid()
    if topk_ids is None:
        select = scores.clone()
        if c.use_correction_bias:
            select = select + params["router.e_score_correction_bias"].double()
        if c.num_expert_groups > 1:
            # explicit sizes, not -1: a view of T = 0 rows cannot infer a dimension
            g = select.view(x.shape[0], c.num_expert_groups, c.num_experts // c.num_expert_groups)
            group_score = g.topk(min(2, g.shape[-1]), -1).values.sum(-1)
            kept = group_score.topk(c.topk_groups, -1).indices
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
            select = g.masked_fill(~mask[..., None], float("-inf")).view(x.shape[0], c.num_experts)
        topk_ids = select.topk(c.top_k, -1).indices
    w = scores.gather(-1, topk_ids)
    if c.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return topk_ids, w * c.routed_scaling_factor


def _mlp(x, w13, w2, config):
    h = x @ w13.t()
    act = _ACTS[config.activation]
    if config.gated:
        gate, up = h.chunk(2, -1)
        h = act(gate) * up
    else:
        h = act(h)
    return h @ w2.t()


def reference_moe(x, params: dict, config: MoEConfig,
                  topk_ids: Optional[torch.Tensor] = None):
    """float64 MoE forward from a full (single-process) state dict.

    Args:
        x: (T, D) tokens. params: `MoE.state_dict()`-style names (tensors may require grad).
        topk_ids: optional (T, K) to pin the expert choice (near-ties can flip in fp32).

    Returns:
        (y (T, D) float64, topk_ids, topk_weights float64).
    """
    x = x.double()
    ids, w = reference_router(x, params, config, topk_ids)
    y = torch.zeros_like(x)
    w13, w2 = params["experts.gate_up_proj"].double(), params["experts.down_proj"].double()
    for e in range(config.num_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            out = _mlp(x[tok], w13[e], w2[e], config) * w[tok, slot, None]
            y = y.index_add(0, tok, out)
    if config.num_shared_experts:
        s = _mlp(x, params["shared_experts.gate_up_proj"].double(),
                 params["shared_experts.down_proj"].double(), config)
        if config.shared_expert_gate:
            s = torch.sigmoid(x @ params["shared_experts.gate"].double().t()) * s
        y = y + s
    return y, ids, w


# -- FP8 experts ------------------------------------------------------------------------------

class Fp8Reference(NamedTuple):
    """`reference_moe_fp8`'s result: y (T, D) float64, and what a correct fp32 implementation
    may differ from it by, per element:
    partial_abs: sum_k |w_k| |expert output_k| (each partial and the combine round to the
        output dtype: multiply by its rounding);
    accum: sum_k |w_k| sum_i |h_i| |w2_i| plus the first GEMM's share (multiply by the fp32
        accumulation's relative bound);
    slack: where an intermediate h lies within that accumulation bound of an e4m3 rounding
        midpoint, fp32 may round it the other way: one e4m3 step of h through |w2| (zero
        almost everywhere)."""

    y: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    partial_abs: torch.Tensor
    accum: torch.Tensor
    slack: torch.Tensor


def _e4m3_step(v):
    """The spacing of the e4m3 grid at |v| (v in units of the scale, |v| <= 448)."""
    exp = torch.floor(torch.log2(v.abs().clamp(min=2.0**-6)))
    return torch.exp2(exp - 3)


def _fp8_mlp(x, w13, s13, w2, s2, config: MoEConfig, accum_rtol: float,
             stored_dtype: Optional[torch.dtype]):
    """One expert on rows x (float64 values of the layer's dtype) as the FP8 path computes it:
    (y, |y| terms, accumulation bound, ambiguity slack), all (n, D) float64."""
    act = _ACTS[config.activation]
    xq, xs = quantize_groups(x)  # x holds the layer's values: exact in fp32, as the kernels see
    a = (xq.double().unflatten(-1, (-1, 128)) * xs.double()[..., None]).flatten(-2)
    w13, w2 = dequantize_blocks(w13, s13, torch.float64), dequantize_blocks(w2, s2, torch.float64)
    h, h_err = a @ w13.t(), accum_rtol * (a.abs() @ w13.abs().t())  # the fp32 sums' error
    if stored_dtype is not None:
        # the path stores the first product in stored_dtype, rounding its fp32 sums: as this
        # rounds the float64 ones, but for a sum within h_err of a rounding midpoint, which
        # may land on the other neighbour (rounding is monotonic: between those of h -+ h_err)
        lo, hi = (h - h_err).to(stored_dtype).double(), (h + h_err).to(stored_dtype).double()
        h, h_err = h.to(stored_dtype).double(), hi - lo
    if config.gated:
        (gate, up), (gate_err, up_err) = h.chunk(2, -1), h_err.chunk(2, -1)
        g = act(gate)
        # |d(act(g) u)| <= max|act'| |dg| |u| + |act(g)| |du|, max|act'| <= 1.13 (gelu)
        h, h_err = g * up, 1.13 * gate_err * up.abs() + g.abs() * up_err
    else:
        h, h_err = act(h), 1.13 * h_err
    # h is quantized from its fp32 value, within err of this float64 h: the error carried from
    # the first product and the activation's fp32 roundings
    err = h_err + 4 * 2.0**-24 * h.abs()
    hq, hs = quantize_groups(h)
    groups = (-1, h.shape[-1] // 128, 128)
    amax = h.abs().view(groups).amax(-1, keepdim=True).clamp(min=1e-30)
    v = (h.view(groups) * (E4M3_MAX / amax)).flatten(-2)
    step = _e4m3_step(v)
    to_midpoint = ((v / step) - (v / step).floor() - 0.5).abs() * step
    ambiguous = to_midpoint <= err * (E4M3_MAX / amax).expand(groups).flatten(-2) + 1e-12
    a2 = (hq.double().view(groups) * hs.double()[..., None]).flatten(-2)
    # per h element: an e4m3 step if it may round the other way, and the scale's own fp32
    # error (its amax is an fp32 h too) on every element of the group
    scale_rel = (err.view(groups).amax(-1, keepdim=True) / amax).expand(groups).flatten(-2)
    dh = torch.where(ambiguous, step * hs.double().repeat_interleave(128, -1), 0.0) \
        + scale_rel * a2.abs()
    y = a2 @ w2.t()
    accum = a2.abs() @ w2.abs().t()
    return y, y.abs(), accum, dh @ w2.abs().t()


def reference_moe_fp8(x, params: dict, config: MoEConfig,
                      topk_ids: Optional[torch.Tensor] = None,
                      accum_rtol: float = 1e-5,
                      stored_dtype: Optional[torch.dtype] = None) -> Fp8Reference:
    """float64 forward of a layer with FP8 experts (`MoEConfig.expert_quant="fp8"`), applying
    the same quantization: the weights dequantized from their blocks, each expert's input rows
    and its intermediate h quantized per row and 128 columns as the kernels do
    (`ep_moe.fp8`). Router and shared experts as in `reference_moe`.

    Args:
        x: (T, D) tokens (the layer's dtype: their values are quantized from fp32).
        params: a state dict of the FP8 layer (`experts.*_scale_inv` included).
        topk_ids: optional (T, K) to pin the expert choice.
        accum_rtol: relative bound of the implementation's fp32 sums (of |terms|), which sets
            where h's rounding to e4m3 is ambiguous (`Fp8Reference.slack`).
        stored_dtype: the dtype the path stores the first GEMM's output (gate and up) in
            before the activation (the per-expert path: bf16); None where the epilogue
            quantizes h from its fp32 sums.
    """
    x64 = x.double()
    ids, w = reference_router(x64, params, config, topk_ids)
    y = torch.zeros_like(x64)
    partial_abs, accum, slack = (torch.zeros_like(x64) for _ in range(3))
    w13, s13 = params["experts.gate_up_proj"], params["experts.gate_up_proj_scale_inv"]
    w2, s2 = params["experts.down_proj"], params["experts.down_proj_scale_inv"]
    for e in range(config.num_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel():
            out, out_abs, out_accum, out_slack = _fp8_mlp(x[tok], w13[e], s13[e], w2[e], s2[e],
                                                          config, accum_rtol, stored_dtype)
            weight = w[tok, slot, None]
            y = y.index_add(0, tok, out * weight)
            partial_abs = partial_abs.index_add(0, tok, out_abs * weight.abs())
            accum = accum.index_add(0, tok, out_accum * weight.abs())
            slack = slack.index_add(0, tok, out_slack * weight.abs())
    if config.num_shared_experts:
        s = _mlp(x64, params["shared_experts.gate_up_proj"].double(),
                 params["shared_experts.down_proj"].double(), config)
        if config.shared_expert_gate:
            s = torch.sigmoid(x64 @ params["shared_experts.gate"].double().t()) * s
        y = y + s
        partial_abs = partial_abs + s.abs()
    return Fp8Reference(y, ids, w, partial_abs, accum, slack)
