"""Router: gate (D -> E), fp32 scores, (group-limited) top-k, training losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .kernels.common import needs_grad, use_triton
from .kernels.topk import softmax_topk
from .permute import count_ids
from .plan import router_topk


# torch.mm(..., out_dtype=): CUDA only, torch >= 2.8
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


class _LogitsFp32(torch.autograd.Function):
    """x @ w.T of 16-bit operands straight into fp32: one GEMM with fp32 accumulation and an
    fp32 output. The products of two 16-bit floats are exact in fp32, so this equals the GEMM
    of the upcast operands up to the order of the fp32 sums, without writing the fp32 copies
    or running the GEMM at fp32 speed (H100: 0.04 against 0.18 ms for Qwen3's router at 8192
    tokens). The backward is the fp32 GEMMs autograd would run
    through the upcast, each gradient cast to its operand's dtype."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.t() @ x.float()).to(w.dtype)
        return grad_x, grad_w


def router_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(T, D) x (E, D) -> (T, E) fp32 logits.

    fp32 scores: top-k over bf16 logits flips near-ties and softmax loses mass. On CUDA with
    16-bit operands one GEMM writes them in fp32 (`_LogitsFp32`); elsewhere (CPU, fp32 inputs,
    a torch without `torch.mm(..., out_dtype=)`, fp16 with cuBLAS's fp16 accumulation on) the
    operands are upcast first. Autocast is switched off here: it would run the GEMM in 16 bits.
    """
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return router_logits(x, w)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype \
            and _MM_OUT_DTYPE and x.shape[0] > 0 and not _fp16_accumulation(x.dtype):
        if needs_grad(x, w):
            return _LogitsFp32.apply(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return F.linear(x.float(), w.float())


def _fp16_accumulation(dtype: torch.dtype) -> bool:
    # cuBLAS refuses an fp32 output of fp16 inputs while fp16 accumulation is allowed
    return dtype == torch.float16 and \
        getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False)


@dataclass(frozen=True)
class RouterOutput:
    """What the router decided for T tokens.

    topk_ids: (T, K) int64 global expert ids.
    topk_weights: (T, K) float32 combine weights (after renormalisation and scaling).
    num_experts: E.
    aux_loss: scalar float32, coef-weighted load-balancing + z-loss; None when both coefs
        are 0 or the module is in eval mode.
    counts: (E,) int64 when the router counted already (training with the load-balancing
        loss), else None.
    logits: (T, E) float32 router logits (before softmax / sigmoid and any correction bias),
        the tensor transformers' `output_router_logits` collects; kept, not recomputed.
    num_tokens_per_expert (property): (E,) int64 (token, slot) pairs per expert, for
        monitoring and for updating the correction bias (aux-loss-free balancing). Without
        `counts` it is counted when read, so a forward launches nothing for it.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    num_experts: int
    aux_loss: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None

    @property
    def num_tokens_per_expert(self) -> torch.Tensor:
        # not a cached_property: its lock stops torch.compile on Python < 3.12
        if self.counts is not None:
            return self.counts
        return count_ids(self.topk_ids, self.num_experts)


class Router(nn.Module):
    """Scores in fp32 (softmax or sigmoid), top-k, optional group limit and correction bias.

    The correction bias shifts which experts are *selected*; the weights always come from the
    unbiased scores (DeepSeek-V3). It is a buffer, updated by `update_correction_bias`, not a
    parameter: gradients never reach it.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.use_correction_bias:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.register_load_state_dict_post_hook(Router._after_load)

    def _apply(self, fn, recurse=True):
        # what stays fp32 whatever the module's dtype keeps its own values: `fn` (a .to(dtype),
        # .bfloat16()) may have rounded them to 16 bits before they are cast back
        before = self._fp32_tensors()
        super()._apply(fn, recurse)
        self._back_to_fp32(before)
        return self

    def _fp32_tensors(self) -> dict:
        """The fp32 tensors that must stay fp32, as they are now."""
        kept = {}
        bias = self.e_score_correction_bias
        if bias is not None and bias.dtype == torch.float32:
            kept["bias"] = bias
        if self.config.router_fp32 and self.weight.dtype == torch.float32:
            kept["weight"] = self.weight.data
            if self.weight.grad is not None:
                kept["grad"] = self.weight.grad.data
        return kept

    def _back_to_fp32(self, before: dict) -> None:
        bias = self.e_score_correction_bias
        if bias is not None and bias.dtype != torch.float32:
            # the selection bias stays fp32: updates of 1e-3 vanish in bf16 once it passes 0.5
            self.e_score_correction_bias = before.get("bias", bias).to(bias.device, torch.float32)
        if self.config.router_fp32 and self.weight.dtype != torch.float32:
            # MoEConfig.router_fp32 (transformers keeps DeepSeek-V3's gate in fp32)
            w = self.weight
            w.data = before.get("weight", w.data).to(w.device, torch.float32)
            if w.grad is not None:
                w.grad.data = before.get("grad", w.grad.data).to(w.grad.device, torch.float32)

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        # load_state_dict(assign=True) puts the checkpoint's own tensors in place
        module._back_to_fp32({})

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.init_std)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def forward(self, x: torch.Tensor, topk: Optional[str] = None) -> RouterOutput:
        """x: (T, D) -> RouterOutput.

        topk: "triton" (one kernel for softmax and top-k; plain softmax routing only) or
        "torch"; None: as `ep_moe.plan.router_topk` picks (the layer passes its plan's)."""
        cfg = self.config
        logits = router_logits(x, self.weight)  # (T, E) fp32
        scores = None  # (T, E), computed where needed
        if topk is None:
            topk = router_topk(cfg, use_triton(logits))
        # softmax over all E, no groups, no correction bias (Mixtral, Qwen)
        plain_softmax = self.e_score_correction_bias is None and cfg.num_expert_groups == 1 \
            and cfg.score_func == "softmax"
        if topk not in ("triton", "torch"):
            raise ValueError(f"topk must be 'triton', 'torch' or None, got {topk!r}")
        if topk == "triton" and not plain_softmax:
            raise ValueError("topk='triton' takes a plain softmax over all experts (no groups, "
                             "no correction bias)")
        if topk == "triton":
            # one kernel for what torch runs as three (radix select, sort of the K picked,
            # softmax), with or without gradients, so a recompute (activation checkpointing)
            # picks what the first pass picked
            topk_ids, topk_weights = softmax_topk(logits, cfg.top_k, cfg.norm_topk_prob)
        elif plain_softmax and cfg.norm_topk_prob:
            # softmax is monotone and renormalising the K picked probabilities is a softmax
            # over their logits: two small ops instead of five (host time at small T)
            top = logits.topk(cfg.top_k, dim=-1, sorted=True)
            topk_ids, topk_weights = top.indices, top.values.softmax(-1)  # (T, K)
        else:
            scores = self._scores(logits)
            select = scores
            if self.e_score_correction_bias is not None:
                select = scores + self.e_score_correction_bias
            if cfg.num_expert_groups > 1:
                select = self._mask_groups(select)
            topk_ids = select.topk(cfg.top_k, dim=-1, sorted=True).indices  # (T, K)
            topk_weights = scores.gather(-1, topk_ids)
            if cfg.norm_topk_prob:
                topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            topk_weights = topk_weights * cfg.routed_scaling_factor
        if not self.training:
            return RouterOutput(topk_ids, topk_weights, cfg.num_experts, logits=logits)
        # only the load-balancing loss needs the counts; otherwise, if read, they are counted
        # then (no launch here)
        counts = count_ids(topk_ids, cfg.num_experts) if cfg.aux_loss_coef > 0 else None
        aux = self._aux_loss(logits, scores, counts, x.shape[0])
        return RouterOutput(topk_ids, topk_weights, cfg.num_experts, aux, counts, logits)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1) if self.config.score_func == "softmax" else logits.sigmoid()

    def _mask_groups(self, select: torch.Tensor) -> torch.Tensor:
        """Keep the `topk_groups` best groups; a group scores the sum of its two best experts."""
        cfg = self.config
        T = select.shape[0]
        # explicit sizes, not -1: a view of T = 0 rows cannot infer a dimension
        grouped = select.view(T, cfg.num_expert_groups, cfg.num_experts // cfg.num_expert_groups)
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (T, G)
        keep = best.topk(cfg.topk_groups, dim=-1).indices
        group_mask = torch.zeros_like(best, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask[..., None], float("-inf")).view(T, cfg.num_experts)

    def _aux_loss(self, logits, scores, counts, T) -> Optional[torch.Tensor]:
        cfg = self.config
        if (cfg.aux_loss_coef == 0 and cfg.z_loss_coef == 0) or T == 0:
            return None
        loss = logits.new_zeros(())
        if cfg.aux_loss_coef > 0:
            scores = self._scores(logits) if scores is None else scores
            # Switch Transformer: E * sum_e f_e * P_e, f_e = share of slots routed to e (no
            # gradient), P_e = mean router probability of e (probabilities sum to 1 per token)
            probs = scores if cfg.score_func == "softmax" else \
                scores / (scores.sum(-1, keepdim=True) + 1e-20)
            f = counts.float() / (T * cfg.top_k)
            loss = loss + cfg.aux_loss_coef * cfg.num_experts * (f * probs.mean(0)).sum()
        if cfg.z_loss_coef > 0:
            loss = loss + cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        return loss

    @torch.no_grad()
    def update_correction_bias(self, num_tokens_per_expert: torch.Tensor,
                               rate: float = 1e-3) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded.

        Pass counts summed over the data-parallel group if the layer runs there.
        """
        if self.e_score_correction_bias is None:
            raise ValueError("update_correction_bias needs MoEConfig.use_correction_bias=True")
        E = self.config.num_experts
        if not isinstance(num_tokens_per_expert, torch.Tensor) or \
                tuple(num_tokens_per_expert.shape) != (E,):
            raise ValueError(f"num_tokens_per_expert must be a tensor of shape ({E},), got "
                             f"{getattr(num_tokens_per_expert, 'shape', type(num_tokens_per_expert))}")
        load = num_tokens_per_expert.float().to(self.e_score_correction_bias.device)
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
