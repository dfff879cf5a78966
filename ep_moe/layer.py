"""`MoE`: router -> dispatch -> grouped expert GEMMs -> fused combine, on one rank or many."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .config import MoEConfig
from .dispatch import Dispatched, check_capacity, make_dispatcher
from .distributed import all_gather_rows, check_same_config, group_rank_and_size
from .experts import Experts, SharedExperts
from .fp8 import E4M3, blockwise_mm_available
from .kernels import fused_mul_sum_rows
from .kernels.common import FLOAT_DTYPES, use_triton
from .kernels.expert_sort import sort_by_expert
from .kernels.fused_mul_sum import SplitOutputs, fused_mul_sum_rows_split
from .permute import expand_rows
from .placement import ExpertPlacement
from .plan import ForwardPlan, plan_forward
from .router import Router

# plans are pure functions of hashable inputs: computed once per shape of forward
_cached_plan = functools.lru_cache(maxsize=1024)(plan_forward)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the output whose backward also seeds d(aux_loss) = scale, so the router's
    training losses reach the gradients through `loss.backward()` with nothing to wire up.
    The seed cannot see how the main loss was scaled: that is `MoE.aux_loss_grad_scale`."""

    @staticmethod
    def forward(ctx, y, aux_loss, scale):
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


class MoE(nn.Module):
    """Mixture-of-Experts layer: (..., D) -> (..., D).

    With a `process_group` of W ranks the E routed experts are sharded (see
    `MoEConfig.placement`); every rank passes its own tokens (any count, 0 too) and gets their
    outputs. Router and shared-expert weights are replicated.

    Attributes:
        expert_map: (E,) int32 buffer, local id of each global expert, -1 where another rank
            owns it.
        local_expert_ids: global ids of this rank's experts, in local order.
    """

    def __init__(self, config: MoEConfig, process_group: Optional[ProcessGroup] = None,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.process_group = process_group
        self.rank, self.world_size = group_rank_and_size(process_group)
        if self.world_size > 1:
            check_same_config(config, process_group)
        self.placement = ExpertPlacement(config.num_experts, self.world_size, config.placement)
        self.local_expert_ids = list(self.placement.local_experts[self.rank])
        self.register_buffer("expert_map", self.placement.expert_map(self.rank), persistent=False)

        self.router = Router(config)
        self.experts = Experts(config, len(self.local_expert_ids))
        self.shared_experts = SharedExperts(config) if config.num_shared_experts else None
        self.dispatcher = make_dispatcher(config, self.placement, process_group, self.rank)
        # multiplies the aux-loss gradient attached to the output: set it to whatever scales the
        # main loss (AMP loss scale, 1 / gradient-accumulation steps), and do not also add
        # `route.aux_loss` to the loss, or it counts twice
        self.aux_loss_grad_scale = 1.0
        self.to(device=device, dtype=dtype)
        self.reset_parameters()

    @classmethod
    def from_hf(cls, block: nn.Module, dtype=None, device=None) -> "MoE":
        """Single-process `MoE` with the weights of a transformers v5 `MixtralSparseMoeBlock`,
        `Qwen3MoeSparseMoeBlock`, `Qwen2MoeSparseMoeBlock` or `DeepseekV3MoE` (see
        `ep_moe.interop`); TypeError for other blocks. Experts that transformers loaded as
        `FP8Experts` give an FP8 layer (`MoEConfig.expert_quant="fp8"`)."""
        from .interop import moe_from_hf  # lazy: interop imports this module

        return moe_from_hf(block, dtype=dtype, device=device)

    @torch.no_grad()
    def quantize_experts(self, fmt: str = "fp8") -> "MoE":
        """Quantize the routed experts' weights in place (inference): "fp8" gives e4m3 weights
        with one fp32 scale per 128 x 128 block (`MoEConfig.expert_quant="fp8"`, which the
        layer's config then says); router and shared experts keep their dtype. Each rank
        quantizes its own experts (no collective). Returns the layer.

        Raises ValueError for another format, a layer already quantized, or D or I not a
        multiple of 128."""
        if fmt != "fp8":
            raise ValueError(f"fmt must be 'fp8', got {fmt!r}")
        if self.config.expert_quant != "none":
            raise ValueError(f"the experts are already quantized (MoEConfig.expert_quant="
                             f"{self.config.expert_quant!r})")
        config = self.config.replace(expert_quant="fp8")  # checks D and I
        old = self.experts
        experts = Experts(config, old.num_local_experts).to(device=old.gate_up_proj.device,
                                                            dtype=old.gate_up_proj.dtype)
        for i in range(old.num_local_experts):
            experts.quantize_expert_(i, old.gate_up_proj[i], old.down_proj[i])
        self.experts = experts.train(old.training)
        before = self.config
        for module in self.modules():  # one config for the layer and its parts
            if getattr(module, "config", None) is before:
                module.config = config
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reproducible from the torch seed and independent of W: expert g is drawn from its
        own generator seeded by (one draw from the global RNG) + g, so a sharded layer holds
        exactly the slices of the single-process layer built after the same `manual_seed`."""
        base_seed = int(torch.randint(0, 2**62, (1,)).item())
        self.router.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()
        std = self.config.init_std
        device = self.experts.gate_up_proj.device
        if device.type == "meta":  # deferred init: to_empty(), then reset_parameters() again
            return
        # a buffer, but derived: to_empty() left it uninitialised
        self.expert_map.copy_(self.placement.expert_map(self.rank))
        for local, g in enumerate(self.local_expert_ids):
            gen = torch.Generator(device=device).manual_seed(base_seed + g)
            if not self.experts.fp8:
                self.experts.gate_up_proj[local].normal_(0.0, std, generator=gen)
                self.experts.down_proj[local].normal_(0.0, std, generator=gen)
                continue
            w13, w2 = (torch.empty(getattr(self.experts, name).shape[1:], device=device)
                       .normal_(0.0, std, generator=gen) for name in ("gate_up_proj",
                                                                      "down_proj"))
            self.experts.quantize_expert_(local, w13, w2)  # drawn in fp32, then quantized

    def plan(self, x: torch.Tensor) -> ForwardPlan:
        """What a forward of `x` (..., D) runs here and now (`ep_moe.plan`): the router's top-k,
        the dispatcher and exchange, pipeline chunks and the experts' path. It depends on the
        token count, on whether gradients are recorded (`torch.no_grad()`, `requires_grad`)
        and, for automatic pipeline chunks, on a CUDA-graph capture in progress."""
        compiling = torch.compiler.is_compiling()
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        grad = torch.is_grad_enabled() and (x.requires_grad or w13.requires_grad or
                                            w2.requires_grad or self.router.weight.requires_grad)
        capturing = x.is_cuda and not compiling and torch.cuda.is_current_stream_capturing()
        plan = plan_forward if compiling else _cached_plan
        return plan(self.config, world_size=self.world_size,
                    num_local_experts=len(self.local_expert_ids),
                    num_tokens=x.numel() // self.config.hidden_size, device_type=x.device.type,
                    dtype=x.dtype, triton=use_triton(x), grad=grad,
                    peer_exchange=self.dispatcher.peer_exchange, capturing=capturing,
                    compiling=compiling,
                    blockwise_fp8=self.experts.fp8 and blockwise_mm_available(x.device))

    def forward(self, x: torch.Tensor, return_router_output: bool = False):
        """x: (..., D) float32 / float16 / bfloat16 -> (..., D) of the same dtype (the layer's;
        FP8 experts: inference only, their rows quantized on the fly).

        With `return_router_output=True` returns `(y, RouterOutput)` (ids, weights, per-expert
        token counts, logits, aux loss). In training, the aux loss's gradient is attached to
        `y`.
        """
        D = self.config.hidden_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != D:
            raise ValueError(f"x must have last dim hidden_size={D}, got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            # before any collective, on every rank alike: a rank must never raise alone
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        dtype, device = self.experts.activation_dtype, self.experts.gate_up_proj.device
        if x.dtype != dtype or x.device != device:
            raise ValueError(f"x must match the layer's parameters ({dtype} on {device}), got "
                             f"{x.dtype} on {x.device}")
        x_TD = x.reshape(-1, D)
        if self.config.max_tokens_per_rank is not None:  # on one rank too, as on many
            check_capacity(x_TD.shape[0], self.config.max_tokens_per_rank)
        plan = self.plan(x_TD)
        route = self.router(x_TD, topk=plan.router_topk)

        def compute(sent: Dispatched, outputs: Optional[SplitOutputs] = None):
            return self.compute_experts(sent, plan, outputs)

        y_TD = self.dispatcher.run(x_TD, route.topk_ids, route.topk_weights, compute, plan)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if route.aux_loss is not None and torch.is_grad_enabled():
            y_TD = _AttachAuxLoss.apply(y_TD, route.aux_loss, self.aux_loss_grad_scale)
        y = y_TD.view(x.shape)
        return (y, route) if return_router_output else y

    def compute_experts(self, sent: Dispatched, plan: ForwardPlan,
                        outputs: Optional[SplitOutputs] = None) -> Optional[torch.Tensor]:
        """Received rows -> (R, D) partial outputs: each row's weighted sum over its slots
        whose expert is local, through the plan's experts path (the harness times this phase
        on its own).

        outputs: None, or a `SplitOutputs` of W tensors (R / W, D) (views of the home ranks'
        memory, for the exchange over NVLink): rows [w R / W, (w + 1) R / W) are written
        into view w (rows with no local slot left unwritten) and None is returned."""
        ids = sent.topk_ids  # (R, K) global ids, -1 on padding rows
        # one rank: the router's own ids, all valid, and local ids = global ones
        expert_map = self.expert_map if self.world_size > 1 else None
        e = len(self.local_expert_ids)
        R, num_pairs = sent.x.shape[0], sent.handle.num_local_pairs  # a bound if not exact
        if plan.experts == "dense":
            local_ids = ids if expert_map is None else \
                torch.where(ids >= 0, expert_map[ids.clamp(min=0)], -1)
            out_rows = self.experts.dense(sent.x)  # (e, R, D): row (i, r) is expert i on row r
            rows_of_slot = local_ids * R + torch.arange(R, device=ids.device)[:, None]
            row_index = torch.where(local_ids >= 0, rows_of_slot, -1).to(torch.int32)
            return _reduce_slots(out_rows.view(-1, sent.x.shape[1]), sent.topk_weights,
                                 row_index, outputs)
        if plan.experts in ("triton", "triton_fp8"):  # inference: gather and activation
            # inside the GEMMs (FP8: the rows quantized there too, unless they travelled so);
            # tiles for the real pairs where the exchange counted them, else for the plan's
            rows_per_expert = (num_pairs if sent.pairs_exact else plan.pairs) / max(e, 1)
            if outputs is None:  # sort, GEMMs and slot reduction: one op under torch.compile
                return self.experts.triton_partials(sent.x, ids, sent.topk_weights, expert_map,
                                                    num_pairs, rows_per_expert,
                                                    plan.overlapped, x_scale=sent.x_scale)
            order = sort_by_expert(ids, e, num_pairs, expert_map)
            out_rows = self.experts.fused_forward(sent.x, order.source_rows,
                                                  order.num_tokens_per_expert, rows_per_expert,
                                                  overlapped=plan.overlapped,
                                                  x_scale=sent.x_scale)  # (P, D)
            return _reduce_slots(out_rows, sent.topk_weights, order.row_index, outputs)
        order = sort_by_expert(ids, e, num_pairs, expert_map)
        if plan.experts == "per_expert_fp8":
            # host sync (one rank): one cuBLAS product per expert needs the row counts on the
            # CPU; the exact exchange brought them
            counts = sent.pairs_per_expert or tuple(order.num_tokens_per_expert.tolist())
            out_rows = self.experts.per_expert_fp8(sent.x, order.source_rows, counts,
                                                   x_scale=sent.x_scale)  # (P, D)
            return _reduce_slots(out_rows, sent.topk_weights, order.row_index, outputs)
        # P a bound: gather only the sort's real pairs (its total, on the device)
        count = None if sent.pairs_exact else order.offsets[-1:]
        rows = expand_rows(sent.x, order.source_rows, order.row_index, count)  # (P, D)
        out_rows = self.experts(rows, order.num_tokens_per_expert, order.offsets,
                                sent.pairs_per_expert, path=plan.experts)  # (P, D)
        # the combine doubles as the un-permute: reads each row once, writes (R, D)
        return _reduce_slots(out_rows, sent.topk_weights, order.row_index, outputs)

    # checkpoints ----------------------------------------------------------------------------

    def _expert_state_names(self) -> list[str]:
        """The state dict's per-expert entries (FP8: the block scales too), leading dim e."""
        return [f"experts.{name}" for name in self.experts.state_dict()]

    def load_full_state_dict(self, state_dict: dict, strict: bool = True):
        """Load the state dict of a single-process `MoE` with the same config, keeping this
        rank's experts (and, FP8, their block scales, which are checked: see
        `Experts.set_fp8_weights`)."""
        local = dict(state_dict)
        for name in self._expert_state_names():
            if name in local:
                full = local[name]
                if full.shape[0] != self.config.num_experts:
                    raise ValueError(f"state_dict[{name!r}] must hold all "
                                     f"{self.config.num_experts} experts, got shape "
                                     f"{tuple(full.shape)}")
                local[name] = full[self.local_expert_ids]
        return self.load_state_dict(local, strict=strict)

    def full_state_dict(self) -> dict:
        """The single-process state dict: expert weights gathered from every rank (a
        collective: call it on all ranks)."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.world_size == 1:
            return sd
        per_rank = [len(e) for e in self.placement.local_experts]
        for name in self._expert_state_names():
            local = sd[name]
            # e4m3 travels as bytes: gloo's collectives take no float8 dtype
            raw = local.view(torch.uint8) if local.dtype == E4M3 else local
            parts = all_gather_rows(raw, per_rank, self.process_group)
            full = raw.new_empty(self.config.num_experts, *raw.shape[1:])
            for experts, part in zip(self.placement.local_experts, parts):
                full[list(experts)] = part
            sd[name] = full.view(local.dtype)
        return sd

    def extra_repr(self) -> str:
        c = self.config
        quant = f", experts={c.expert_quant}" if c.expert_quant != "none" else ""
        return (f"D={c.hidden_size}, I={c.intermediate_size}, E={c.num_experts}, K={c.top_k}, "
                f"rank={self.rank}/{self.world_size}, local_experts={len(self.local_expert_ids)}"
                f"{quant}")


def _reduce_slots(out_rows, topk_weights, row_index, outputs):
    """The slot reduction into one (R, D) result, or into `outputs` (`SplitOutputs`) in W
    slices of rows."""
    if outputs is None:
        return fused_mul_sum_rows(out_rows, topk_weights, row_index)
    fused_mul_sum_rows_split(out_rows, topk_weights, row_index, *outputs)
    return None
