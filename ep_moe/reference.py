"""The slow, obviously-right oracle: a loop over experts in float64. Tests compare against it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .config import MoEConfig

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
