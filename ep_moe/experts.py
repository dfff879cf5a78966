"""Routed experts as stacked weights, and the paths that run them (`ep_moe.plan` picks one).

Weights follow the Hugging Face transformers v5 layout:
    gate_up_proj (e, 2I, D): rows [0, I) the gate projection w1, rows [I, 2I) the up
        projection w3 (just (e, I, D) when not gated);
    down_proj (e, D, I): w2.

Paths: `fused_forward` ("triton": inference), `dense`, and `forward` with path "grouped_mm" or
"per_expert" (both differentiable).

FP8 experts (`MoEConfig.expert_quant = "fp8"`, inference only) hold those two weights in e4m3
with their 128 x 128 block scales, `gate_up_proj_scale_inv` (e, 2I/128, D/128) and
`down_proj_scale_inv` (e, D/128, I/128) fp32 (transformers' `FP8Experts` names and layout), and
run `fused_forward` (the plan's "triton_fp8") or `per_expert_fp8` (its "per_expert_fp8": few
large experts at prefill, two cuBLAS block-scaled products an expert).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .fp8 import (E4M3, blockwise_mm, check_weight_and_scales, padded_block_scales,
                  quantize_blocks)
from .kernels.activation import activate_fp8, fused_activation_available, gated_activation
from .kernels.expert_sort import sort_by_expert
from .kernels.fused_mul_sum import fused_mul_sum_rows
from .kernels.gemm_configs import (fp8_gemm_config, gemm_config, persistent_launch,
                                   shared_budget)
from .kernels.common import empty_scales
from .kernels.grouped_gemm import grouped_gemm, grouped_gemm_fp8, quantize_rows, take_rows

# torch's grouped GEMM: `F.grouped_mm`, or `torch._grouped_mm` on older torch (None: neither)
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}

# FP8 experts: up to this many rows an expert, the first GEMM quantizes its rows as it gathers
# them; above, the tokens are quantized once first (R x D, K times fewer than the P gathered
# rows; `quantize_rows`) and the GEMM gathers e4m3 rows. Quantizing in the GEMM repeats the
# work for each of its 2I / 128 column tiles: free while the weights' bytes bound the time
# (decode), 1.65x the GEMM's time at Mixtral's 4096 tokens on an H100 (docs/performance.md).
FP8_QUANTIZE_IN_GEMM_MAX_ROWS = 16


def activate(h: torch.Tensor, activation: str, gated: bool,
             num_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., 2I) -> (..., I) for gated `act(gate) * up`; (..., I) -> (..., I) otherwise.
    num_rows: optional device count of the rows that matter (the fused kernel skips the rest;
    the torch ops compute them anyway)."""
    act = _ACTIVATIONS[activation]
    if gated and h.ndim == 2 and fused_activation_available(h):
        return gated_activation(h, activation, num_rows)
    if not gated:
        return act(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def _products(a: torch.Tensor, b: torch.Tensor, counts: Sequence[int], out: torch.Tensor,
              transpose_b: bool) -> None:
    """out[rows of e] = a[rows of e] @ (b[e].T if transpose_b else b[e]), rows in blocks of
    counts[e]; out's rows past sum(counts) are zeroed."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            w = b[e].t() if transpose_b else b[e]
            torch.mm(a[start:start + n], w, out=out[start:start + n])
        start += n
    out[start:].zero_()


class _PerExpertLinear(torch.autograd.Function):
    """y = x @ w[e].T on each expert e's block of rows: one dense product per expert, the
    counts on the host. Backward writes each expert's weight gradient into its slice of one
    (e, N, K) buffer (a `w[e]` select in autograd would send back a full-size zero gradient
    per expert instead)."""

    @staticmethod
    def forward(ctx, x, w, counts):
        ctx.save_for_backward(x, w)
        ctx.counts = tuple(counts)
        out = x.new_empty(x.shape[0], w.shape[1])
        _products(x, w, counts, out, transpose_b=True)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # products written with out=
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _products(grad, w, ctx.counts, grad_x, transpose_b=False)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w) if 0 in ctx.counts else torch.empty_like(w)
            start = 0
            for e, n in enumerate(ctx.counts):
                if n:
                    torch.mm(grad[start:start + n].t(), x[start:start + n], out=grad_w[e])
                start += n
        return grad_x, grad_w, None


class Experts(nn.Module):
    """`num_local_experts` SwiGLU (or GELU-gated, or plain) MLPs applied to sorted rows."""

    def __init__(self, config: MoEConfig, num_local_experts: int):
        super().__init__()
        self.config = config
        self.num_local_experts = num_local_experts
        up_rows = 2 * config.intermediate_size if config.gated else config.intermediate_size
        D, I = config.hidden_size, config.intermediate_size
        self.fp8 = config.expert_quant == "fp8"
        if not self.fp8:
            self.gate_up_proj = nn.Parameter(torch.empty(num_local_experts, up_rows, D))
            self.down_proj = nn.Parameter(torch.empty(num_local_experts, D, I))
            return
        # frozen (inference only), Parameters as in transformers' FP8Experts
        def frozen(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.gate_up_proj = frozen(num_local_experts, up_rows, D, dtype=E4M3)
        self.gate_up_proj_scale_inv = frozen(num_local_experts, up_rows // 128, D // 128,
                                             dtype=torch.float32)
        self.down_proj = frozen(num_local_experts, D, I, dtype=E4M3)
        self.down_proj_scale_inv = frozen(num_local_experts, D // 128, I // 128,
                                          dtype=torch.float32)
        # the dtype of the rows the experts take and give (the layer's): follows .to(dtype)
        self._activation_dtype = torch.get_default_dtype()
        self.register_load_state_dict_pre_hook(Experts._check_fp8_state)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of the rows the experts take and return: the weights' own, or for FP8
        experts the layer's (bf16, fp16 or fp32)."""
        return self._activation_dtype if self.fp8 else self.gate_up_proj.dtype

    def _apply(self, fn, recurse=True):
        if not self.fp8:
            return super()._apply(fn, recurse)
        # e4m3 weights and fp32 scales keep their dtypes through .to(dtype), .half() and the
        # like: `fn` sees them as integers of their width (only their device moves), and the
        # rows' dtype follows the cast
        raw = {E4M3: torch.uint8, torch.float32: torch.int32}

        def keep_dtype(t):
            return fn(t.view(raw[t.dtype])).view(t.dtype) if t.dtype in raw else fn(t)

        super()._apply(keep_dtype, recurse)
        self._activation_dtype = fn(torch.empty(0, dtype=self._activation_dtype)).dtype
        return self

    @staticmethod
    def _check_fp8_state(module, state_dict, prefix, *args) -> None:
        """load_state_dict: FP8 weights and scales checked before they are copied in."""
        for name in ("gate_up_proj", "down_proj"):
            key = prefix + name
            if key in state_dict and key + "_scale_inv" in state_dict:
                check_weight_and_scales(key, state_dict[key], state_dict[key + "_scale_inv"],
                                        tuple(getattr(module, name).shape))

    @torch.no_grad()
    def set_fp8_weights(self, gate_up_proj: torch.Tensor, gate_up_proj_scale_inv: torch.Tensor,
                        down_proj: torch.Tensor, down_proj_scale_inv: torch.Tensor) -> None:
        """Copy in the local experts' e4m3 weights and fp32 block scales (the layout of the
        module docstring; e8m0 scales, powers of two, are converted to fp32 exactly).

        Raises TypeError / ValueError naming the argument: a weight not e4m3 or of another
        shape, a scale tensor of another shape, or a scale not positive and finite."""
        if not self.fp8:
            raise RuntimeError("set_fp8_weights needs FP8 experts (MoEConfig.expert_quant="
                               f"'fp8'), got expert_quant={self.config.expert_quant!r}")
        for name, q, scale in (("gate_up_proj", gate_up_proj, gate_up_proj_scale_inv),
                               ("down_proj", down_proj, down_proj_scale_inv)):
            check_weight_and_scales(name, q, scale, tuple(getattr(self, name).shape))
            getattr(self, name).copy_(q)
            getattr(self, name + "_scale_inv").copy_(scale.float())

    @torch.no_grad()
    def quantize_expert_(self, local: int, gate_up_proj: torch.Tensor,
                         down_proj: torch.Tensor) -> None:
        """Store local expert `local`'s weights, given in any float dtype ((2I, D) and (D,
        I)), as e4m3 blocks and their scales (`ep_moe.fp8.quantize_blocks`). One expert at a
        time keeps the fp32 temporaries to one expert's size (DeepSeek-V3's 256 experts in
        fp32 would take 45 GB)."""
        for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            q, scale = quantize_blocks(w)
            getattr(self, name)[local] = q
            getattr(self, name + "_scale_inv")[local] = scale

    def reset_parameters(self) -> None:
        if not self.fp8:
            nn.init.normal_(self.gate_up_proj, std=self.config.init_std)
            nn.init.normal_(self.down_proj, std=self.config.init_std)
            return
        std, device = self.config.init_std, self.gate_up_proj.device
        for i in range(self.num_local_experts):
            self.quantize_expert_(i, torch.randn(self.gate_up_proj.shape[1:], device=device) * std,
                                  torch.randn(self.down_proj.shape[1:], device=device) * std)

    def _check_not_fp8(self, what: str) -> None:
        if self.fp8:
            raise RuntimeError(f"Experts.{what} runs bf16/fp16/fp32 weights; FP8 experts "
                               f"(MoEConfig.expert_quant='fp8') run `fused_forward` only")

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                offsets: Optional[torch.Tensor] = None,
                counts: Optional[Sequence[int]] = None,
                path: str = "grouped_mm") -> torch.Tensor:
        """Run each local expert on its rows, differentiably: the plan's "grouped_mm" or
        "per_expert" path.

        Args:
            x: (P, D) rows sorted by local expert.
            num_tokens_per_expert: (e,) int rows per local expert, summing to P (or to less:
                the rows past the sum are computed by nobody, and their outputs are garbage).
            offsets: optional (e,) int32 running sum of num_tokens_per_expert (the expert sort
                writes it; one op fewer here).
            counts: optional host copy of num_tokens_per_expert (e ints), where the caller has
                it without a sync (trusted: not compared with the device counts). Without it
                the per-expert path reads the device counts back (a host sync); it leaves the
                rows past sum(counts) zero.
            path: "grouped_mm" (torch's grouped GEMM) or "per_expert" (one GEMM per expert).

        Returns:
            (P, D) expert outputs, same order and dtype as x.
        """
        cfg = self.config
        self._check_not_fp8("forward")
        if path not in ("grouped_mm", "per_expert"):
            raise ValueError(f"path must be 'grouped_mm' or 'per_expert', got {path!r}")
        if counts is not None and (
                len(counts) != self.num_local_experts or
                not all(isinstance(n, int) and n >= 0 for n in counts) or
                sum(counts) > x.shape[0]):
            raise ValueError(f"counts must hold {self.num_local_experts} ints >= 0 (one per "
                             f"local expert) summing to at most x's {x.shape[0]} rows, got "
                             f"{tuple(counts)}")
        if x.shape[0] == 0:
            # nothing routed here: an empty product still gives the weights a (zero) gradient
            h = activate(F.linear(x, self.gate_up_proj[0]), cfg.activation, cfg.gated)
            return F.linear(h, self.down_proj[0])
        w13, w2 = self.gate_up_proj, self.down_proj
        if path == "grouped_mm":
            offs = offsets if offsets is not None else \
                torch.cumsum(num_tokens_per_expert, 0, dtype=torch.int32)
            h = GROUPED_MM(x, w13.transpose(-2, -1), offs=offs)  # (P, 2I)
            # rows past offs[-1] (P a bound: a fixed-size exchange) hold no group's output
            h = activate(h, cfg.activation, cfg.gated, offs[-1:])
            return GROUPED_MM(h, w2.transpose(-2, -1), offs=offs)  # (P, D)
        if counts is None:
            # host sync: the per-expert products need the row counts on the CPU
            counts = tuple(num_tokens_per_expert.tolist())
        h = activate(_PerExpertLinear.apply(x, w13, counts), cfg.activation, cfg.gated)
        return _PerExpertLinear.apply(h, w2, counts)  # rows past sum(counts): zeros

    def fused_forward(self, x: torch.Tensor, source_rows: torch.Tensor,
                      num_tokens_per_expert: torch.Tensor, rows_per_expert: float,
                      overlapped: bool = False,
                      x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The plan's "triton" path's GEMMs (and "triton_fp8"'s, for FP8 experts): inference
        straight from the token rows, no autograd.

        Args:
            x: (R, D) token rows, in any order: the layer's dtype, or e4m3 with `x_scale` (FP8
                experts, rows that travelled quantized).
            source_rows: (P,) int row of x for each expert-sorted pair.
            num_tokens_per_expert: (e,) int pairs per local expert, summing to at most P (rows
                past their sum are left unwritten: P may be a bound).
            rows_per_expert: the mean rows per expert the tiles are chosen for.
            overlapped: other work (a pipeline's exchanges) runs beside these GEMMs
                (`gemm_configs.persistent_launch`).
            x_scale: (R, D/128) fp32 scales of an e4m3 x (any row stride), else None.

        Returns:
            (P, D) expert outputs in sorted order, in `activation_dtype`; the (P, D) sorted
            copy of x and the (P, 2I) pre-activation are never materialised.
        """
        return _fused_gemms(x, source_rows, num_tokens_per_expert, self.gate_up_proj,
                            self.down_proj, rows_per_expert, overlapped, self.config.activation,
                            self.config.gated, *self._fp8_args(x_scale))

    def per_expert_fp8(self, x: torch.Tensor, source_rows: torch.Tensor,
                       counts: Sequence[int], x_scale: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """The plan's "per_expert_fp8" path (FP8 experts, inference): per local expert, its
        rows quantized as they are gathered, cuBLAS's block-scaled product with gate_up_proj,
        `act(gate) * up` quantized in one pass, the product with down_proj.

        Args:
            x: (R, D) token rows in the layer's dtype, or e4m3 with `x_scale` (rows that
                travelled quantized).
            source_rows: (P,) int row of x for each expert-sorted pair.
            counts: the pairs of each local expert on the host (e ints, summing to at most P).
            x_scale: (R, D/128) fp32 scales of an e4m3 x, else None.

        Returns:
            (P, D) bf16 expert outputs in sorted order; rows past sum(counts) unwritten.
        """
        if not self.fp8:
            raise RuntimeError("Experts.per_expert_fp8 runs FP8 experts (MoEConfig.expert_quant="
                               f"'fp8'), got expert_quant={self.config.expert_quant!r}")
        cfg = self.config
        D = x.shape[1]
        w13_scale = padded_block_scales(self.gate_up_proj_scale_inv)
        w2_scale = padded_block_scales(self.down_proj_scale_inv)
        out = torch.empty(source_rows.shape[0], D, dtype=torch.bfloat16, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = source_rows[start:start + n]
            padded = -(-n // 4) * 4  # cuBLAS reads the scales of 4 rows at a time
            if x_scale is None:
                a, a_scale = quantize_rows(x, rows, padded, column_major_scales=True)
            else:
                a, a_scale = _take_quantized(x, x_scale, rows, padded)
            h = blockwise_mm(a, a_scale, self.gate_up_proj[e], w13_scale[e])  # (padded, 2I)
            h, h_scale = activate_fp8(h, cfg.activation, cfg.gated, column_major_scales=True)
            out[start:start + n] = blockwise_mm(h, h_scale, self.down_proj[e], w2_scale[e])[:n]
            start += n
        return out

    def triton_partials(self, x: torch.Tensor, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor, expert_map: Optional[torch.Tensor],
                        num_pairs: int, rows_per_expert: float, overlapped: bool = False,
                        x_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The plan's "triton" (or "triton_fp8") path end to end: sort the (row, slot) pairs by
        local expert, run `fused_forward`, reduce each row's slots: (R, D) rows -> (R, D)
        partial outputs in `activation_dtype`.

        Under torch.compile one custom op, so a compiled forward calls into Python once for
        the three steps, as eager does (each custom-op call costs tens of microseconds of host
        time, which decode-sized forwards feel). Args as `sort_by_expert` and
        `fused_forward`; inference only."""
        cfg = self.config
        args = (x, topk_ids, topk_weights, expert_map, self.gate_up_proj, self.down_proj,
                num_pairs, float(rows_per_expert), overlapped, cfg.activation, cfg.gated,
                *self._fp8_args(x_scale))
        if torch.compiler.is_compiling():
            return _triton_partials_op(*args)
        return _triton_partials(*args)

    def _fp8_args(self, x_scale):
        """(x_scale, w13 scales, w2 scales, output dtype) for `_fused_gemms`: the block scales of
        FP8 experts, Nones (and x's dtype) for the others."""
        if not self.fp8:
            return None, None, None, None
        return (x_scale, self.gate_up_proj_scale_inv, self.down_proj_scale_inv,
                self.activation_dtype)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every local expert on every row: (R, D) -> (e, R, D).

        For a handful of rows (decode) this reads each weight once through batched GEMMs, with
        no sort, where a grouped GEMM of a few rows per expert runs far below bandwidth. Costs
        e/K times the FLOPs the routed rows need, which is free while the weights' bytes
        dominate.
        """
        cfg = self.config
        self._check_not_fp8("dense")
        h = torch.matmul(x, self.gate_up_proj.transpose(-2, -1))  # (e, R, 2I)
        h = activate(h, cfg.activation, cfg.gated)
        return torch.matmul(h, self.down_proj.transpose(-2, -1))  # (e, R, D)


def _fused_gemms(x, source_rows, num_tokens_per_expert, w13, w2, rows_per_expert: float,
                 overlapped: bool, activation: str, gated: bool, x_scale=None, w13_scale=None,
                 w2_scale=None, out_dtype=None) -> torch.Tensor:
    """Both grouped GEMMs; FP8 where the weights' block scales are given (x e4m3 where x_scale
    is), the output then of out_dtype."""
    if x.stride(-1) != 1:  # the kernel reads rows with a stride, elements contiguously
        x = x.contiguous()
    e, P = w13.shape[0], source_rows.shape[0]
    budget = shared_budget(x.device)
    if w13_scale is not None:
        # the first GEMM's epilogue writes h in e4m3 with a scale per row and 128 columns:
        # each h element is quantized once (quantized as the down GEMM loads it, it would be
        # again for each of that GEMM's D / 128 or D / 256 column tiles) and h's bytes,
        # written and read, halve against bf16
        if x_scale is None and rows_per_expert > FP8_QUANTIZE_IN_GEMM_MAX_ROWS:
            x, x_scale = quantize_rows(x)
        tiles = [fp8_gemm_config(rows_per_expert, True, x.element_size(), budget),
                 fp8_gemm_config(rows_per_expert, False, 1, budget)]
        persistent = [persistent_launch(t, P, rows_per_expert * e, overlapped) for t in tiles]
        h, h_scale = grouped_gemm_fp8(x, w13, w13_scale, num_tokens_per_expert,
                                      a_rows=source_rows, a_scale=x_scale, activation=activation,
                                      gated=gated, out_dtype=E4M3, config=tiles[0],
                                      persistent=persistent[0])  # (P, I) e4m3, (P, I/128)
        return grouped_gemm_fp8(h, w2, w2_scale, num_tokens_per_expert, a_scale=h_scale,
                                out_dtype=out_dtype, config=tiles[1],
                                persistent=persistent[1])  # (P, D)
    tiles = [gemm_config(rows_per_expert, g, x.element_size(), budget, e)
             for g in (gated, False)]
    persistent = [persistent_launch(t, P, rows_per_expert * e, overlapped) for t in tiles]
    h = grouped_gemm(x, w13, num_tokens_per_expert, a_rows=source_rows, activation=activation,
                     gated=gated, config=tiles[0], persistent=persistent[0])  # (P, I)
    return grouped_gemm(h, w2, num_tokens_per_expert, config=tiles[1],
                        persistent=persistent[1])  # (P, D)


def _take_quantized(x: torch.Tensor, x_scale: torch.Tensor, rows: torch.Tensor,
                    num_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of an e4m3 x and their scales (`take_rows`: an index outside x gives a zero row),
    padded with zero rows to num_out, the scales column-major (`ep_moe.fp8.blockwise_mm`'s
    layout)."""
    pad = num_out - rows.shape[0]
    q = F.pad(take_rows(x, rows).view(torch.uint8), (0, 0, 0, pad)).view(E4M3)
    scale = empty_scales(num_out, x_scale.shape[1], True, x.device)
    scale[:rows.shape[0]] = take_rows(x_scale, rows)
    scale[rows.shape[0]:] = 1.0
    return q, scale


def _triton_partials(x, topk_ids, topk_weights, expert_map, w13, w2, num_pairs: int,
                     rows_per_expert: float, overlapped: bool, activation: str, gated: bool,
                     x_scale=None, w13_scale=None, w2_scale=None, out_dtype=None) -> torch.Tensor:
    order = sort_by_expert(topk_ids, w13.shape[0], num_pairs, expert_map)
    out_rows = _fused_gemms(x, order.source_rows, order.num_tokens_per_expert, w13, w2,
                            rows_per_expert, overlapped, activation, gated, x_scale, w13_scale,
                            w2_scale, out_dtype)  # (P, D)
    # the slot reduction doubles as the un-permute: reads each row once, writes (R, D)
    return fused_mul_sum_rows(out_rows, topk_weights, order.row_index)


@torch.library.custom_op("ep_moe::triton_partials", mutates_args=())
def _triton_partials_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        expert_map: Optional[torch.Tensor], w13: torch.Tensor, w2: torch.Tensor,
                        num_pairs: int, rows_per_expert: float, overlapped: bool,
                        activation: str, gated: bool, x_scale: Optional[torch.Tensor],
                        w13_scale: Optional[torch.Tensor], w2_scale: Optional[torch.Tensor],
                        out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return _triton_partials(x, topk_ids, topk_weights, expert_map, w13, w2, num_pairs,
                            rows_per_expert, overlapped, activation, gated, x_scale, w13_scale,
                            w2_scale, out_dtype)


@_triton_partials_op.register_fake
def _(x, topk_ids, topk_weights, expert_map, w13, w2, num_pairs, rows_per_expert, overlapped,
      activation, gated, x_scale, w13_scale, w2_scale, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


class SharedExperts(nn.Module):
    """The always-on MLP of DeepSeek-V3 / Qwen2-MoE, optionally scaled by sigmoid(x w_g)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        size = config.shared_size
        up_rows = 2 * size if config.gated else size
        self.gate_up_proj = nn.Parameter(torch.empty(up_rows, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.hidden_size, size))
        self.gate = nn.Parameter(torch.empty(1, config.hidden_size)) \
            if config.shared_expert_gate else None

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=self.config.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, D) -> (T, D)."""
        cfg = self.config
        y = F.linear(activate(F.linear(x, self.gate_up_proj), cfg.activation, cfg.gated),
                     self.down_proj)
        if self.gate is not None:
            y = torch.sigmoid(F.linear(x, self.gate)) * y
        return y
