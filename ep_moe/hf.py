"""`replace_moe_blocks`: every sparse-MoE block of a transformers v5 model swapped for an
`ep_moe.MoE`, in place, its experts optionally sharded over a process group.

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # on the CPU
    replaced = ep_moe.replace_moe_blocks(model, process_group=group)  # group: None, or W ranks
    model.to(device).generate(input_ids, synced_gpus=group is not None)

What stands where a block stood is an `HFMoEBlock`: (B, S, D) -> (B, S, D) as the block, the
`MoE` in `.moe`. The model computes what it computed before (the blocks `MoE.from_hf` supports,
see `ep_moe.interop`), Mixtral's `router_jitter_noise` in training included.

Router logits. transformers collects them with forward hooks: a model class lists
`"router_logits": OutputRecorder(<its router class>, index=0)` in `_can_record_outputs`, and
with `output_router_logits=True` the hook on each router module appends output[0], the (T, E)
logits, to `outputs.router_logits`, which the causal-LM head feeds to its
`load_balancing_loss_func` (softmax over E, top-K, Switch loss) to give `aux_loss`. The router
module is gone after the swap, so each `HFMoEBlock` passes the logits its `MoE` computed
(`RouterOutput.logits`) through a `RouterLogits` identity module carrying that same
transformers hook: the same tensor (raw logits, (T, E), in the dtype transformers' router gives:
the activations' for Mixtral and Qwen, fp32 for DeepSeek-V3) in the same place, and its
gradient reaches the router weight and the activations as transformers' would. Where a model
class records no router logits (DeepSeek-V3 in transformers 5.17), none are recorded.

Expert parallelism. With a process group of W ranks every rank builds the same model (same
weights) and calls `replace_moe_blocks` with the same arguments (building a layer is a
collective: the ranks compare configs). Each rank then keeps only its share of each layer's
experts (`MoEConfig.placement`); router, shared experts and the rest of the model stay
replicated. The forward of every MoE layer is a collective too: all ranks run the same number
of forwards, so pass `synced_gpus=True` to `generate` (transformers then runs a finished rank's
forwards on until every rank is done) and give every rank a batch in training.

Memory. A layer is built on the meta device and takes the block's own tensors (no copy with
one rank; with W ranks a copy of this rank's e experts, e / E of them), and the block leaves the
model at once: the experts are never held twice, beyond one layer's local share while it is
being built. Loading on the CPU, replacing, then moving the model (as above) puts only this
rank's experts on its GPU.

Checkpoints. The replaced model's state dict names the layers' tensors as `MoE` does
(`...mlp.moe.experts.gate_up_proj`) and, sharded, holds this rank's experts only
(`MoE.full_state_dict()` gathers them): keep the transformers checkpoint for
`from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .config import MoEConfig
from .interop import (block_family, config_from_hf, layer_dtype_from_hf, state_dict_from_hf,
                      supported_blocks)
from .layer import MoE

# MoEConfig fields read from the block: they define what it computes, so they cannot change
_BLOCK_FIELDS = frozenset({
    "hidden_size", "intermediate_size", "num_experts", "top_k", "score_func", "norm_topk_prob",
    "num_expert_groups", "topk_groups", "use_correction_bias", "router_fp32",
    "routed_scaling_factor", "activation", "gated", "num_shared_experts",
    "shared_intermediate_size", "shared_expert_gate"})


@dataclass(frozen=True)
class ReplacedBlock:
    """One replaced block.

    name: its path in the model (`model.get_submodule(name)` is now the `HFMoEBlock`).
    block_type: the transformers class that stood there, e.g. "Qwen3MoeSparseMoeBlock".
    config: the `MoEConfig` of the layer that replaced it.
    local_expert_ids: global ids of the experts this rank holds, in local order.
    """

    name: str
    block_type: str
    config: MoEConfig
    local_expert_ids: tuple[int, ...]


class RouterLogits(nn.Module):
    """Identity on a layer's (T, E) router logits: the module transformers' output-capture hook
    sits on (see the module docstring)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class HFMoEBlock(nn.Module):
    """A transformers sparse-MoE block's replacement: (B, S, D) -> (B, S, D) through `moe`.

    Attributes:
        moe: the `ep_moe.MoE`.
        router_logits: `RouterLogits`, called with the logits transformers' router would return.
        jitter_noise: Mixtral's `router_jitter_noise`: in training the input is multiplied by
            U(1 - j, 1 + j) noise before the router and the experts (0: off).
        logits_fp32: whether transformers' router gives fp32 logits (DeepSeek-V3) rather than
            logits in the activations' dtype.
    """

    def __init__(self, moe: MoE, jitter_noise: float = 0.0, logits_fp32: bool = False):
        super().__init__()
        self.moe = moe
        self.router_logits = RouterLogits()
        self.jitter_noise = float(jitter_noise)
        self.logits_fp32 = logits_fp32

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            # the draw transformers' Mixtral block makes (same shape, same generator call)
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        y, route = self.moe(x, return_router_output=True)
        logits = route.logits  # (T, E) fp32
        self.router_logits(logits if self.logits_fp32 else logits.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return f"jitter_noise={self.jitter_noise}" if self.jitter_noise else ""


def replace_moe_blocks(model: nn.Module, process_group: Optional[ProcessGroup] = None,
                       **config_changes) -> list[ReplacedBlock]:
    """Replace, in place, every sparse-MoE block of `model` that `MoE.from_hf` supports
    (Mixtral, Qwen3-MoE, Qwen2-MoE, DeepSeek-V3) by an `HFMoEBlock` computing the same.

    Args:
        model: a transformers v5 model (or any module holding such blocks).
        process_group: None for one process; else the expert-parallel group: every rank keeps
            only its experts, and every rank of the group must make this call alike.
        config_changes: `MoEConfig` fields of how the layers run (e.g. `expert_impl`,
            `dispatcher`, `placement`, `max_tokens_per_rank`, `aux_loss_coef`). The fields the
            block defines (shapes, routing, activation, shared experts) cannot change. An
            `aux_loss_coef` > 0 adds ep_moe's load-balancing loss to the gradients on top of
            the one transformers adds with `output_router_logits=True`.

    Returns:
        One `ReplacedBlock` per replaced block, in `model.named_modules()` order.

    Raises:
        TypeError: `model` is not an `nn.Module`, `process_group` not a ProcessGroup, or a
            config change names no MoEConfig field.
        ValueError: `model` holds no supported block, or is one; a change to a field the
            block defines;
            what `MoE` rejects (e.g. more ranks than experts).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if process_group is not None and not isinstance(process_group, ProcessGroup):
        raise TypeError(f"process_group must be None or a torch.distributed ProcessGroup, got "
                        f"{type(process_group).__name__}")
    _check_changes(config_changes)
    supported = tuple(supported_blocks())
    names = [name for name, module in model.named_modules()
             if supported and isinstance(module, supported)]
    if not names:
        kinds = [cls.__name__ for cls in supported] or ["(transformers is not installed)"]
        already = any(isinstance(m, HFMoEBlock) for m in model.modules())
        raise ValueError(f"model ({type(model).__name__}) holds no sparse-MoE block to replace"
                         f"{' (its blocks were replaced already)' if already else ''}; "
                         f"supported: {kinds}")
    if names[0] == "":
        raise ValueError(f"model is itself a {type(model).__name__}, which cannot be replaced "
                         f"in place: pass the model that holds it, or use MoE.from_hf(block)")
    replaced = []
    for name in names:
        block = model.get_submodule(name)
        new, record = _replacement(block, name, process_group, config_changes)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
        replaced.append(record)
        del block  # the model held the last reference: its experts are freed now
    return replaced


def _check_changes(changes: dict) -> None:
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise TypeError(f"config_changes: {unknown} are not MoEConfig fields")
    fixed = sorted(set(changes) & _BLOCK_FIELDS)
    if fixed:
        raise ValueError(f"config_changes: {fixed} are read from the block (it would compute "
                         f"something else); changeable: {sorted(fields - _BLOCK_FIELDS)}")


@torch.no_grad()
def _replacement(block: nn.Module, name: str, group: Optional[ProcessGroup],
                 changes: dict) -> tuple[HFMoEBlock, ReplacedBlock]:
    family = block_family(block)
    config = config_from_hf(block, **changes)
    source = block.experts.gate_up_proj  # (E, 2I, D)
    device = source.device
    # on the meta device nothing is allocated or initialised (the build draws one seed from
    # the CPU generator: fork it, so the caller's random stream stays as it was)
    with torch.random.fork_rng(devices=[]):
        moe = MoE(config, process_group=group, device="meta",
                  dtype=layer_dtype_from_hf(block, config))
    state = state_dict_from_hf(block)
    if len(moe.local_expert_ids) < config.num_experts:
        # this rank's experts: a copy of e / E of them (a view would keep all E alive); FP8
        # experts' block scales too
        index = torch.tensor(moe.local_expert_ids, device=device)
        for key in [k for k in state if k.startswith("experts.")]:
            state[key] = state[key].index_select(0, index)
    moe.load_state_dict(state, assign=True)  # the tensors themselves: no copy
    # not in the state dict: the (E,) local id of each expert, from the placement
    moe.expert_map = moe.placement.expert_map(moe.rank, device)
    left = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"building {name}: {left} hold no values (not in the state dict)")
    new = HFMoEBlock(moe, jitter_noise=getattr(block, "jitter_noise", 0.0) or 0.0,
                     logits_fp32=family == "deepseek_v3")
    _record_router_logits(new.router_logits)
    new.train(block.training)
    record = ReplacedBlock(name, type(block).__name__, config, tuple(moe.local_expert_ids))
    return new, record


def _record_router_logits(module: RouterLogits) -> None:
    """Put transformers' output-capture hook for "router_logits" on `module`: it records the
    output whenever a forward asks for router logits (and the model class records them)."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:
        warnings.warn("this transformers has no transformers.utils.output_capturing: the "
                      "replaced blocks' router logits are not recorded", stacklevel=3)
        return
    install_output_capuring_hook(module, "router_logits", 0)
