"""Routed experts as stacked weights, run as grouped GEMMs over expert-sorted rows.

Weights follow the Hugging Face transformers v5 layout:
    gate_up_proj (e, 2I, D): rows [0, I) the gate projection w1, rows [I, 2I) the up
        projection w3 (just (e, I, D) when not gated);
    down_proj (e, D, I): w2.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .kernels.activation import fused_activation_available, gated_activation
from .kernels.fused_mul_sum import _use_triton
from .kernels.gemm_configs import gemm_config, shared_budget
from .kernels.grouped_gemm import grouped_gemm

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

# dtypes each backend's grouped GEMM takes (launch/gpu_probe.py: torch 2.11 on H200 takes all
# three; torch 2.13 on CPU too)
_GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}

# Up to this many rows per local expert (mean) the Triton path is faster; above it torch's
# grouped GEMM is (launch/sweep_gemm.py; H200: 0.57-0.84x torch's time at <= 128 rows per
# expert, equal at 256, 1.2x at 1024 on the Mixtral shape, I = 14336).
FUSED_MAX_ROWS_PER_EXPERT = 256
# The expand and activation passes the Triton path skips cost per row in proportion to D + I,
# the GEMMs to D * I: against a small I they weigh more. Measured on the Qwen3 shape (I = 768,
# H100): 0.94x torch's time at 1024 rows per expert, 0.96x at 2048 (within noise); so up to
# 1024 rows for I up to SMALL_I. SMALL_I is the round bound above the one shape measured;
# DeepSeek-V3's I = 2048 (not measured) keeps 256.
FUSED_MAX_ROWS_PER_EXPERT_SMALL_I = 1024
SMALL_I = 1024

# Where the row counts are on the host anyway (the exact exchanges read them with their split
# sizes), one cuBLAS product per expert beats torch's grouped GEMM on large experts. The loop's
# time against torch's, Mixtral's shape (I = 14336), gate/up / down (launch/probe_loop.py):
# H100 1024 rows an expert -1% / -16%, 4096 rows -8% / +3.5%; H200 2048 rows -4% / -9%, 8192
# rows (a rank's at W = 4) -6% / -4%. For Qwen3's 128 small experts the loop is 2-4x slower.
# Chosen where I >= LOOP_MIN_I (a round bound under the one shape measured) and the mean rows
# per expert >= LOOP_MIN_ROWS_PER_EXPERT.
LOOP_MIN_I = 8192
LOOP_MIN_ROWS_PER_EXPERT = 1024

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


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


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands (dtype, 16-byte aligned strides)."""
    if _grouped_mm is None or x.dtype not in _GROUPED_MM_DTYPES.get(x.device.type, ()):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # its fake (tracing) kernel takes bf16 only, on torch 2.11 and 2.13
    align = 16 // x.element_size()
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


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
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_local_experts, up_rows, config.hidden_size))
        self.down_proj = nn.Parameter(
            torch.empty(num_local_experts, config.hidden_size, config.intermediate_size))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.config.init_std)
        nn.init.normal_(self.down_proj, std=self.config.init_std)

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                offsets: Optional[torch.Tensor] = None,
                counts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run each local expert on its rows.

        Args:
            x: (P, D) rows sorted by local expert.
            num_tokens_per_expert: (e,) int rows per local expert, summing to P (or to less:
                the rows past the sum are computed by nobody, and their outputs are garbage).
            offsets: optional (e,) int32 running sum of num_tokens_per_expert (the expert sort
                writes it; one op fewer here).
            counts: optional host copy of num_tokens_per_expert (e ints), where the caller has
                it without a sync (trusted: not compared with the device counts). Large experts
                (`loop_wins`) then run one dense product each, and expert_impl="loop" takes no
                sync; on the per-expert path the rows past sum(counts) come out zero.

        Returns:
            (P, D) expert outputs, same order and dtype as x.
        """
        cfg = self.config
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
        # not under torch.compile: it would guard on every count (a recompile per batch)
        loop = cfg.expert_impl == "loop" or (
            cfg.expert_impl == "auto" and counts is not None and self.loop_wins(sum(counts))
            and not torch.compiler.is_compiling())
        if not loop and grouped_mm_supported(x, w13, w2):
            offs = offsets if offsets is not None else \
                torch.cumsum(num_tokens_per_expert, 0, dtype=torch.int32)
            h = _grouped_mm(x, w13.transpose(-2, -1), offs=offs)  # (P, 2I)
            # rows past offs[-1] (P a bound: a fixed-size exchange) hold no group's output
            h = activate(h, cfg.activation, cfg.gated, offs[-1:])
            return _grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # (P, D)
        if counts is None:
            # host sync: the per-expert products need the row counts on the CPU
            counts = tuple(num_tokens_per_expert.tolist())
        h = activate(_PerExpertLinear.apply(x, w13, counts), cfg.activation, cfg.gated)
        return _PerExpertLinear.apply(h, w2, counts)  # rows past sum(counts): zeros

    def loop_wins(self, num_pairs: int) -> bool:
        """Whether one dense product per expert beats torch's grouped GEMM for `num_pairs`
        routed rows, the counts being on the host (see LOOP_MIN_I)."""
        return self.config.intermediate_size >= LOOP_MIN_I and \
            num_pairs >= LOOP_MIN_ROWS_PER_EXPERT * self.num_local_experts

    def fused_forward_supported(self, x: torch.Tensor, num_pairs: int,
                                exact: bool = True) -> bool:
        """Whether `fused_forward` runs for `num_pairs` routed rows: nothing needs a gradient
        (inference), Triton is there, not inside torch.compile (which traces torch's grouped
        GEMM instead), and few enough rows per expert that it beats torch's grouped GEMM.
        exact False: num_pairs is an estimate and the buffers are sized by a bound (a
        fixed-size exchange); torch's path then costs more than its real rows (4x H100, Qwen3,
        8192 tokens per GPU: experts 2.1 ms against 1.5 on the Triton path), so for I <= SMALL_I
        the Triton path runs whatever the rows; for larger I the rows decide as usual (Mixtral:
        11 ms on torch's path against 20 on the Triton path)."""
        if self.config.expert_impl != "auto" or not _use_triton(x):
            return False
        small_i = self.config.intermediate_size <= SMALL_I
        max_rows = FUSED_MAX_ROWS_PER_EXPERT_SMALL_I if small_i else FUSED_MAX_ROWS_PER_EXPERT
        if (exact or not small_i) and num_pairs > max_rows * max(self.num_local_experts, 1):
            return False
        if torch.compiler.is_compiling():
            return False
        needs_grad = x.requires_grad or self.gate_up_proj.requires_grad or \
            self.down_proj.requires_grad
        return not (torch.is_grad_enabled() and needs_grad)

    def fused_forward(self, x: torch.Tensor, source_rows: torch.Tensor,
                      num_tokens_per_expert: torch.Tensor,
                      rows_per_expert: Optional[float] = None,
                      overlapped: bool = False) -> torch.Tensor:
        """Inference forward straight from the token rows, no autograd.

        Args:
            x: (R, D) token rows, in any order.
            source_rows: (P,) int row of x for each expert-sorted pair.
            num_tokens_per_expert: (e,) int pairs per local expert, summing to at most P (rows
                past their sum are left unwritten: P may be a bound).
            rows_per_expert: the mean the tile sizes are chosen for; default P / e.
            overlapped: other work (a pipeline's exchanges) runs beside these GEMMs: no
                persistent launch, whose programs hold every SM for the whole GEMM.

        Returns:
            (P, D) expert outputs in sorted order; the (P, D) sorted copy of x and the (P, 2I)
            pre-activation are never materialised.
        """
        cfg = self.config
        if x.stride(-1) != 1:  # the kernel reads rows with a stride, elements contiguously
            x = x.contiguous()
        tiles = [None, None]
        # the grid beside a pipeline's exchanges; else a persistent launch where it wins on
        # exact buffers (`flatten_wins`: the down projection of many experts)
        persistent = [False, False] if overlapped else [None, None]
        if rows_per_expert is not None:
            budget = shared_budget(x.device)
            tiles = [gemm_config(rows_per_expert, gated, x.element_size(), budget,
                                 self.num_local_experts) for gated in (cfg.gated, False)]
            # P a loose bound (a fixed-size exchange: W times the expected pairs): a grid sized
            # by P is mostly programs with nothing to do, and with 128-row tiles each holds an
            # SM's shared memory alone while it starts and exits (H100, Qwen3 at W = 4, 8192
            # tokens: both GEMMs 1324 -> 1234 us; on exact buffers the grid is faster, but
            # for `flatten_wins`' down projection). Not beside a pipeline's exchanges: a
            # persistent program holds its SM for the whole GEMM, so an exchange that starts
            # meanwhile finds none free, while the grid's short programs free theirs as they
            # finish (4x H200, Qwen3 in 3 chunks, CUDA graph: persistent 2.12-2.14 ms, grid
            # 1.87-1.90; launch/NOTES.md, stop 13)
            loose = source_rows.shape[0] > 2 * rows_per_expert * self.num_local_experts
            if loose and not overlapped:
                persistent = [t.block_m >= 128 or None for t in tiles]
        h = grouped_gemm(x, self.gate_up_proj, num_tokens_per_expert, a_rows=source_rows,
                         activation=cfg.activation, gated=cfg.gated, config=tiles[0],
                         persistent=persistent[0])  # (P, I)
        return grouped_gemm(h, self.down_proj, num_tokens_per_expert, config=tiles[1],
                            persistent=persistent[1])  # (P, D)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every local expert on every row: (R, D) -> (e, R, D).

        For a handful of rows (decode) this reads each weight once through batched GEMMs, with
        no sort, where a grouped GEMM of a few rows per expert runs far below bandwidth. Costs
        e/K times the FLOPs the routed rows need, which is free while the weights' bytes
        dominate.
        """
        cfg = self.config
        h = torch.matmul(x, self.gate_up_proj.transpose(-2, -1))  # (e, R, 2I)
        h = activate(h, cfg.activation, cfg.gated)
        return torch.matmul(h, self.down_proj.transpose(-2, -1))  # (e, R, D)


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
