"""Build an `MoE` from a Hugging Face transformers (v5) sparse-MoE block, weights copied.

Supported blocks, and what each one's router does:
- `MixtralSparseMoeBlock`: softmax over E, top-K, always renormalised to sum to 1.
- `Qwen3MoeSparseMoeBlock`: softmax over E, top-K, renormalised when `norm_topk_prob`.

Both store their weights the way `ep_moe.experts` does (transformers v5 layout):
    gate.weight (E, D); experts.gate_up_proj (E, 2I, D), gate rows first then up;
    experts.down_proj (E, D, I).
so the copy is a plain one, no transpose or split.

Differences that remain: Mixtral's `router_jitter_noise` (training-time input noise) has no
counterpart here; Qwen3 casts the top-K weights to the activation dtype before the experts,
while `MoE` keeps them in fp32 (identical in fp32, closer to fp32 math in bf16).
transformers is imported lazily: the rest of ep_moe does not need it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import MoEConfig
from .layer import MoE

# transformers' `hidden_act` names whose function equals one of ep_moe's activations
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu",
                "relu": "relu"}


def _supported_blocks() -> dict:
    """{block class: whether its router always renormalises}; empty without transformers."""
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return {}
    return {MixtralSparseMoeBlock: True, Qwen3MoeSparseMoeBlock: False}


def _activation(experts: nn.Module) -> str:
    """ep_moe activation of the HF experts, from the config they were built with."""
    hf_config = getattr(experts, "config", None)
    name = getattr(hf_config, "hidden_act", None)
    if name is None:
        raise ValueError(f"cannot tell the activation of {type(experts).__name__}: it has no "
                         f"`config.hidden_act`")
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} has no ep_moe equivalent; supported: "
                         f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _check_layout(experts: nn.Module) -> None:
    # flags set by transformers' `use_experts_implementation`; absent means the default layout
    layout = {"is_concatenated": True, "is_transposed": False, "has_bias": False,
              "has_gate": True}
    for flag, expected in layout.items():
        value = getattr(experts, flag, expected)
        if value != expected:
            raise ValueError(f"{type(experts).__name__}.{flag} is {value!r}; ep_moe reads only "
                             f"the layout with {flag}={expected!r}")


def config_from_hf(block: nn.Module, **changes) -> MoEConfig:
    """The `MoEConfig` matching a Mixtral or Qwen3-MoE sparse block; `changes` override fields
    (e.g. `aux_loss_coef`, `expert_impl`)."""
    blocks = _supported_blocks()
    renormalises = next((v for cls, v in blocks.items() if isinstance(block, cls)), None)
    if renormalises is None:
        names = [cls.__name__ for cls in blocks] or \
            ["MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock (transformers is not installed)"]
        raise TypeError(f"block must be one of {names}, got {type(block).__name__}")
    experts = block.experts
    _check_layout(experts)
    E, two_I, D = experts.gate_up_proj.shape
    return MoEConfig(
        hidden_size=D, intermediate_size=two_I // 2, num_experts=E,
        top_k=block.gate.top_k, score_func="softmax",
        norm_topk_prob=renormalises or bool(block.gate.norm_topk_prob),
        activation=_activation(experts), gated=True,
    ).replace(**changes)


@torch.no_grad()
def moe_from_hf(block: nn.Module, dtype: Optional[torch.dtype] = None,
                device=None) -> MoE:
    """A single-process `MoE` computing what `block` computes, with copies of its weights.

    Args:
        block: a transformers v5 `MixtralSparseMoeBlock` or `Qwen3MoeSparseMoeBlock`.
        dtype, device: of the new layer; default those of `block.gate.weight`.

    Returns:
        `MoE` in the block's train/eval mode. Its forward takes (..., D) like the block's
        (B, S, D).

    Raises:
        TypeError: for any other block type. ValueError: an activation or weight layout
        ep_moe does not implement.
    """
    config = config_from_hf(block)
    source = block.gate.weight
    moe = MoE(config, dtype=dtype or source.dtype, device=device or source.device)
    moe.router.weight.copy_(block.gate.weight)
    moe.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
    moe.experts.down_proj.copy_(block.experts.down_proj)
    return moe.train(block.training)
