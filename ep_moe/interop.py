"""Build an `MoE` from a Hugging Face transformers (v5) sparse-MoE block, weights copied.

Supported blocks, and what each one's router does:
- `MixtralSparseMoeBlock`: softmax over E, top-K, always renormalised to sum to 1.
- `Qwen3MoeSparseMoeBlock`: softmax over E, top-K, renormalised when `norm_topk_prob`.
- `Qwen2MoeSparseMoeBlock`: as Qwen3, plus one shared expert scaled by sigmoid(x w_g).
- `DeepseekV3MoE`: sigmoid scores; a correction bias that shifts the selection only; top-K
  within the `topk_group` best of `n_group` groups (a group scores its two best experts);
  renormalised when `norm_topk_prob`, then times `routed_scaling_factor`; plus the shared
  experts as one MLP of `n_shared_experts * moe_intermediate_size`.

All store the routed experts the way `ep_moe.experts` does (transformers v5 layout):
    gate.weight (E, D); experts.gate_up_proj (E, 2I, D), gate rows first then up;
    experts.down_proj (E, D, I).
so that copy is a plain one, no transpose or split; a shared MLP's separate gate_proj and
up_proj are stacked into the shared experts' gate_up_proj.

Differences that remain: Mixtral's `router_jitter_noise` (training-time input noise) has no
counterpart here; the Qwen blocks cast the top-K weights to the activation dtype before the
experts, while `MoE` keeps them in fp32 (identical in fp32, closer to fp32 math in bf16).
DeepSeek-V3 keeps its router weight and correction bias in fp32 whatever the model's dtype
(transformers' `_keep_in_fp32_modules_strict`); so does the layer built from it
(`MoEConfig.router_fp32`, which its config carries to an expert-parallel layer too).
transformers is imported lazily: the rest of ep_moe does not need it.

FP8 blocks: where the routed experts are transformers' `FP8Experts` (a model loaded with its
fine-grained FP8 quantization config: e4m3 `gate_up_proj` / `down_proj` with their
`*_scale_inv` 128 x 128 block scales, dynamic activation scales) the layer gets
`MoEConfig.expert_quant="fp8"` and the same e4m3 weights and scales, bit for bit; shared
experts stored as `FP8Linear` are dequantized into the layer's dtype (they stay 16-bit in
ep_moe).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import MoEConfig
from .fp8 import E4M3, check_weight_and_scales, dequantize_blocks
from .layer import MoE

# transformers' `hidden_act` names whose function equals one of ep_moe's activations
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu",
                "relu": "relu"}


def supported_blocks() -> dict:
    """{block class: its family}; empty without transformers."""
    try:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return {}
    return {MixtralSparseMoeBlock: "mixtral", Qwen3MoeSparseMoeBlock: "qwen3",
            Qwen2MoeSparseMoeBlock: "qwen2", DeepseekV3MoE: "deepseek_v3"}


def _router_fields(family: str, gate: nn.Module) -> dict:
    """The MoEConfig router fields of a block's gate."""
    if family == "mixtral":
        return dict(score_func="softmax", norm_topk_prob=True)
    if family in ("qwen2", "qwen3"):
        return dict(score_func="softmax", norm_topk_prob=bool(gate.norm_topk_prob))
    return dict(score_func="sigmoid", norm_topk_prob=bool(gate.norm_topk_prob),
                num_expert_groups=gate.num_group, topk_groups=gate.topk_group,
                use_correction_bias=True, router_fp32=True,
                routed_scaling_factor=float(gate.routed_scaling_factor))


def _shared_mlp(family: str, block: nn.Module):
    """(shared MLP with gate_proj / up_proj / down_proj, its sigmoid gate or None), or None."""
    if family == "qwen2":
        return block.shared_expert, block.shared_expert_gate
    if family == "deepseek_v3" and block.shared_experts.gate_proj.out_features > 0:
        return block.shared_experts, None  # (n_shared_experts = 0 leaves an empty MLP)
    return None


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
    """The `MoEConfig` matching a supported sparse block (see the module docstring);
    `changes` override fields (e.g. `aux_loss_coef`, `expert_impl`)."""
    family = block_family(block)
    if family is None:
        names = [cls.__name__ for cls in supported_blocks()] or \
            ["MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock",
             "DeepseekV3MoE (transformers is not installed)"]
        raise TypeError(f"block must be one of {names}, got {type(block).__name__}")
    experts = block.experts
    _check_layout(experts)
    E, two_I, D = experts.gate_up_proj.shape
    fields = dict(hidden_size=D, intermediate_size=two_I // 2, num_experts=E,
                  top_k=block.gate.top_k, activation=_activation(experts), gated=True,
                  **_router_fields(family, block.gate), **_fp8_fields(experts))
    shared = _shared_mlp(family, block)
    if shared is not None:
        mlp, gate = shared
        for name in ("gate_proj", "up_proj", "down_proj"):
            if getattr(mlp, name).bias is not None:
                raise ValueError(f"{type(mlp).__name__}.{name} has a bias; ep_moe's shared "
                                 f"experts have none")
        # one MLP whatever the expert count: its size is what the weights say
        fields.update(num_shared_experts=1, shared_intermediate_size=mlp.gate_proj.out_features,
                      shared_expert_gate=gate is not None)
    return MoEConfig(**fields).replace(**changes)


@torch.no_grad()
def moe_from_hf(block: nn.Module, dtype: Optional[torch.dtype] = None,
                device=None) -> MoE:
    """A single-process `MoE` computing what `block` computes, with copies of its weights.

    Args:
        block: a transformers v5 `MixtralSparseMoeBlock`, `Qwen3MoeSparseMoeBlock`,
            `Qwen2MoeSparseMoeBlock` or `DeepseekV3MoE`.
        dtype, device: of the new layer; default those of the block's routed experts (FP8
            experts: the router's dtype, bf16 for DeepSeek-V3). A DeepSeek-V3 router stays
            fp32 (as transformers keeps it).

    Returns:
        `MoE` in the block's train/eval mode. Its forward takes (..., D) like the block's
        (B, S, D).

    Raises:
        TypeError: for any other block type. ValueError: an activation or weight layout
        ep_moe does not implement.
    """
    config = config_from_hf(block)
    source = block.experts.gate_up_proj
    moe = MoE(config, dtype=dtype or layer_dtype_from_hf(block, config),
              device=device or source.device)
    moe.load_state_dict(state_dict_from_hf(block))  # copies, cast to the layer's dtype
    return moe.train(block.training)


def state_dict_from_hf(block: nn.Module) -> dict:
    """The state dict of the single-process `MoE` that `config_from_hf(block)` describes, made
    of `block`'s own tensors (detached, storage shared: nothing copied) except a shared MLP's
    `gate_up_proj`, stacked from its gate_proj and up_proj (one expert's size), and shared
    `FP8Linear` weights, dequantized. FP8 experts bring their block scales along."""
    family = block_family(block)
    if family is None:
        config_from_hf(block)  # raises the TypeError that names the supported blocks
    experts = block.experts
    state = {"router.weight": block.gate.weight,
             "experts.gate_up_proj": experts.gate_up_proj,
             "experts.down_proj": experts.down_proj}
    if experts.gate_up_proj.dtype == E4M3:  # FP8Experts: the scales are checked as they load
        state["experts.gate_up_proj_scale_inv"] = experts.gate_up_proj_scale_inv
        state["experts.down_proj_scale_inv"] = experts.down_proj_scale_inv
    if family == "deepseek_v3":
        state["router.e_score_correction_bias"] = block.gate.e_score_correction_bias
    shared = _shared_mlp(family, block)
    if shared is not None:
        mlp, gate = shared
        state["shared_experts.gate_up_proj"] = torch.cat([_linear_weight(mlp.gate_proj),
                                                          _linear_weight(mlp.up_proj)], 0)
        state["shared_experts.down_proj"] = _linear_weight(mlp.down_proj)
        if gate is not None:
            state["shared_experts.gate"] = gate.weight
    return {name: t.detach() for name, t in state.items()}


# -- FP8 blocks ------------------------------------------------------------------------------

def _fp8_fields(experts: nn.Module) -> dict:
    """`expert_quant="fp8"` for experts holding e4m3 weights (transformers' `FP8Experts`), after
    checking that they are what ep_moe computes: 128 x 128 block scales, activations scaled
    dynamically, a plain gated activation. {} for other experts."""
    if experts.gate_up_proj.dtype != E4M3:
        return {}
    name = type(experts).__name__
    block_size = getattr(experts, "block_size", None)
    if block_size is None or tuple(block_size) != (128, 128):
        raise ValueError(f"{name}.block_size must be (128, 128) (the 128 x 128 weight scale "
                         f"blocks ep_moe reads), got {block_size!r}")
    scheme = getattr(experts, "activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"{name}.activation_scheme must be 'dynamic' (ep_moe scales the "
                         f"activations per token and 128 columns), got {scheme!r}")
    for attr in ("swiglu_alpha", "limit", "swiglu_limit", "gate_softcap", "up_softcap"):
        if getattr(experts, attr, None) is not None:
            raise ValueError(f"{name}.{attr} is {getattr(experts, attr)!r}: ep_moe's gated "
                             f"activation has no clamp or softcap")
    for attr in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):
        if not isinstance(getattr(experts, attr, None), torch.Tensor):
            raise ValueError(f"{name} has e4m3 weights but no {attr}")
    return dict(expert_quant="fp8")


def layer_dtype_from_hf(block: nn.Module, config: MoEConfig) -> torch.dtype:
    """The layer's dtype for `block`: its routed experts' weights', or for FP8 experts its
    router's, except where the router is kept in fp32 (DeepSeek-V3): bf16, the activations'
    dtype of FP8 checkpoints."""
    if config.expert_quant != "fp8":
        return block.experts.gate_up_proj.dtype
    return torch.bfloat16 if config.router_fp32 else block.gate.weight.dtype


def _linear_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's (out, in) weight; transformers' `FP8Linear` (e4m3 weight, 128 x 128
    `weight_scale_inv` blocks) dequantized in fp32."""
    w = linear.weight
    if w.dtype != E4M3:
        return w
    block_size = getattr(linear, "block_size", None)
    if block_size is None or tuple(block_size) != (128, 128):
        raise ValueError(f"{type(linear).__name__}.block_size must be (128, 128) to dequantize "
                         f"its weight, got {block_size!r}")
    check_weight_and_scales(f"{type(linear).__name__}.weight", w, linear.weight_scale_inv,
                            tuple(w.shape))
    return dequantize_blocks(w, linear.weight_scale_inv.float())


def block_family(block: nn.Module) -> Optional[str]:
    """"mixtral", "qwen3", "qwen2" or "deepseek_v3" for a supported block, else None."""
    return next((f for cls, f in supported_blocks().items() if isinstance(block, cls)), None)
