"""`MoEConfig`: every switch of the layer in one validated dataclass, plus named presets."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal, Optional

from .fp8 import check_fp8_shapes

ScoreFunc = Literal["softmax", "sigmoid"]
Activation = Literal["silu", "gelu", "relu"]
# auto: `ep_moe.plan` picks per forward; any other value forces that path of the experts
ExpertImpl = Literal["auto", "triton", "dense", "grouped_mm", "per_expert"]
Placement = Literal["linear", "round_robin"]
Dispatcher = Literal["all_to_all", "allgather"]
Exchange = Literal["auto", "collective", "nvlink"]
# none: the routed experts hold weights of the layer's dtype; fp8: e4m3 with 128 x 128 scales
ExpertQuant = Literal["none", "fp8"]


def _choice(name: str, value: object) -> None:
    allowed = _CHOICES[name]
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name} must be one of {allowed}, got {value!r}")


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")


def _count(name: str, value: object) -> None:
    """An int >= 0 (a bool is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"MoEConfig.{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    # shapes
    hidden_size: int  # D
    intermediate_size: int  # I, per routed expert
    num_experts: int  # E, global routed experts
    top_k: int  # K

    # router
    score_func: ScoreFunc = "softmax"  # softmax: Mixtral, Qwen3-MoE; sigmoid: DeepSeek-V3
    norm_topk_prob: bool = True  # renormalise the K selected weights to sum to 1
    num_expert_groups: int = 1  # group-limited top-k: experts split into this many groups ...
    topk_groups: int = 1  # ... and only the best this many groups are eligible
    use_correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias: selection only
    # keep the router's weight in fp32 whatever the layer's dtype, as transformers keeps
    # DeepSeek-V3's gate; the logits are fp32 either way, this keeps the weight's own bits
    router_fp32: bool = False
    routed_scaling_factor: float = 1.0  # multiplies the final topk_weights
    aux_loss_coef: float = 0.0  # Switch-style load-balancing loss, training only
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE), training only

    # experts
    activation: Activation = "silu"
    gated: bool = True  # act(x w1) * (x w3) when True, act(x w1) when False
    # the experts' path (`ep_moe.plan`): auto picks per forward; triton (inference only): Triton
    # grouped GEMMs with the gather and activation fused; dense: every local expert on every
    # row; grouped_mm: torch's grouped GEMM; per_expert: one GEMM per expert (a host sync where
    # no exchange brought the row counts)
    expert_impl: ExpertImpl = "auto"
    # auto picks the dense path (every local expert on every row through batched GEMMs: each
    # weight read once, nothing sorted) for at most this many rows in inference where the
    # Triton path does not run (the CPU); never in training, where its backward would write
    # every expert's weight gradient. None: `ep_moe.plan.DENSE_MAX_ROWS`; 0 turns it off.
    dense_max_rows: Optional[int] = None
    # fp8 (inference only): the routed experts hold e4m3 weights with one fp32 scale per 128 x
    # 128 block (DeepSeek-V3's and transformers' FP8Experts layout: `gate_up_proj` (e, 2I, D) and
    # `gate_up_proj_scale_inv` (e, 2I/128, D/128), `down_proj` and `down_proj_scale_inv`), and
    # the activations are quantized per token and 128 columns on the fly (`ep_moe.fp8`); an
    # all-to-all sends the rows as e4m3 with their scales. Router, shared experts and the
    # combine keep the layer's dtype. D and I must be multiples of 128; the experts run the
    # Triton FP8 GEMMs (`expert_impl` "triton") or, few large experts at prefill on Hopper,
    # cuBLAS's block-scaled GEMM per expert ("per_expert"); "auto" picks.
    # `MoE.quantize_experts("fp8")` turns a layer's weights into this format.
    expert_quant: ExpertQuant = "none"

    # shared experts (always-on MLP added to the routed output)
    num_shared_experts: int = 0  # DeepSeek-V3: 1, Qwen2-MoE: 1
    shared_intermediate_size: Optional[int] = None  # total I of the shared MLP; default I * n
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x w_g) scales the shared output

    # expert parallelism
    placement: Placement = "linear"  # linear: contiguous blocks of experts per rank
    dispatcher: Dispatcher = "all_to_all"  # allgather: every rank sees every token
    # a fixed-size exchange: every rank sends every other rank this many rows (padding
    # included) whatever the routing, so no split size is read back to the host and the
    # expert-parallel forward can be captured in a CUDA graph. Every rank must then pass at
    # most this many tokens per forward. None: exact split sizes, one host sync per forward.
    max_tokens_per_rank: Optional[int] = None
    # with max_tokens_per_rank, inference: the tokens in this many chunks, every chunk's rows
    # sent before the first chunk's experts run, so chunk i + 1's rows travel while chunk i's
    # experts run and chunk i's partials travel home while chunk i + 1's do. From 3 chunks on
    # the first and last are half-size (their exchanges are the ones left exposed); each
    # chunk's exchange takes its share of max_tokens_per_rank rows per rank
    # (`ep_moe.dispatch.chunk_bounds`). Training runs the chunks in turn. None: automatic
    # (`ep_moe.plan`: 3 for prefill-sized NCCL exchanges captured in a CUDA graph, else 1).
    dispatch_chunks: Optional[int] = None
    # how a fixed-size exchange moves its rows in inference. collective: NCCL's (or gloo's)
    # all-to-all. nvlink (CUDA): the send kernel stores each row straight into the receiving
    # rank's buffer and the slot reduction stores each partial straight into its home rank's
    # (torch symmetric memory; barriers where the rows must have landed). No send buffer, no
    # padding row's token sent, and no SMs of NCCL's beside the experts. auto: nvlink where
    # the ranks are CUDA peers of one host with symmetric memory, else collective. Training
    # runs the collectives either way.
    exchange: Exchange = "auto"

    # init
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k",
                     "num_expert_groups", "topk_groups"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        for name in _CHOICES:
            _choice(name, getattr(self, name))
        if self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"MoEConfig.num_expert_groups must divide num_experts ({self.num_experts}), "
                f"got {self.num_expert_groups}")
        if self.topk_groups > self.num_expert_groups:
            raise ValueError(
                f"MoEConfig.topk_groups must be <= num_expert_groups "
                f"({self.num_expert_groups}), got {self.topk_groups}")
        eligible = self.topk_groups * (self.num_experts // self.num_expert_groups)
        if self.top_k > eligible:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) exceeds the experts in the kept groups "
                f"({eligible} = topk_groups * num_experts / num_expert_groups)")
        if self.dense_max_rows is not None:
            _count("dense_max_rows", self.dense_max_rows)
        _count("num_shared_experts", self.num_shared_experts)
        for name in ("norm_topk_prob", "use_correction_bias", "router_fp32", "gated",
                     "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "init_std", "routed_scaling_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                    not math.isfinite(value):
                raise ValueError(f"MoEConfig.{name} must be a finite number, got {value!r}")
        if self.shared_intermediate_size is not None:
            _positive_int("shared_intermediate_size", self.shared_intermediate_size)
        if self.max_tokens_per_rank is not None:
            _positive_int("max_tokens_per_rank", self.max_tokens_per_rank)
        if self.dispatch_chunks is not None:
            _positive_int("dispatch_chunks", self.dispatch_chunks)
        if (self.dispatch_chunks or 1) > 1 and (self.max_tokens_per_rank is None
                                         or self.dispatcher != "all_to_all"):
            raise ValueError(
                f"MoEConfig.dispatch_chunks > 1 needs the all_to_all dispatcher with a fixed-size "
                f"exchange (max_tokens_per_rank set; each chunk would cost a host sync "
                f"otherwise), got dispatch_chunks={self.dispatch_chunks}, dispatcher="
                f"{self.dispatcher!r}, max_tokens_per_rank={self.max_tokens_per_rank}")
        if self.exchange == "nvlink" and (self.max_tokens_per_rank is None
                                          or self.dispatcher != "all_to_all"):
            raise ValueError(
                f"MoEConfig.exchange='nvlink' needs the all_to_all dispatcher with a fixed-size "
                f"exchange (max_tokens_per_rank set), got dispatcher={self.dispatcher!r}, "
                f"max_tokens_per_rank={self.max_tokens_per_rank}")
        if self.expert_quant == "fp8":
            check_fp8_shapes(self.hidden_size, self.intermediate_size)
            if self.expert_impl not in ("auto", "triton", "per_expert"):
                raise ValueError(
                    f"MoEConfig.expert_quant='fp8' runs the experts through the Triton FP8 "
                    f"GEMMs or cuBLAS's per expert: expert_impl must be 'auto', 'triton' or "
                    f"'per_expert', got {self.expert_impl!r}")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("MoEConfig.shared_expert_gate needs num_shared_experts > 0")
        if self.shared_intermediate_size is not None and self.num_shared_experts == 0:
            raise ValueError(
                f"MoEConfig.shared_intermediate_size={self.shared_intermediate_size} needs "
                f"num_shared_experts > 0 (there is no shared MLP to size)")
        for name in ("aux_loss_coef", "z_loss_coef", "init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(
                f"MoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")

    @property
    def shared_size(self) -> int:
        """Intermediate size of the shared-expert MLP (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_intermediate_size or self.intermediate_size * self.num_shared_experts

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    # presets -----------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **changes) -> "MoEConfig":
        """A few hundred parameters per expert: for tests."""
        return cls(hidden_size=16, intermediate_size=24, num_experts=8, top_k=2).replace(**changes)

    @classmethod
    def mixtral_8x7b(cls, **changes) -> "MoEConfig":
        return cls(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2).replace(**changes)

    @classmethod
    def qwen3_30b_a3b(cls, **changes) -> "MoEConfig":
        return cls(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8).replace(**changes)

    @classmethod
    def deepseek_v3(cls, **changes) -> "MoEConfig":
        return cls(hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8,
                   score_func="sigmoid", num_expert_groups=8, topk_groups=4,
                   use_correction_bias=True, routed_scaling_factor=2.5,
                   num_shared_experts=1).replace(**changes)

    @classmethod
    def preset(cls, name: str, **changes) -> "MoEConfig":
        presets = {"tiny": cls.tiny, "mixtral": cls.mixtral_8x7b, "mixtral_8x7b": cls.mixtral_8x7b,
                   "qwen3": cls.qwen3_30b_a3b, "qwen3_30b_a3b": cls.qwen3_30b_a3b,
                   "deepseek_v3": cls.deepseek_v3}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**changes)


# every Literal field's choices, spelled once in the annotation
_CHOICES = {name: typing.get_args(hint) for name, hint in typing.get_type_hints(MoEConfig).items()
            if typing.get_origin(hint) is Literal}
