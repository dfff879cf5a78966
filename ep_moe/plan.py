"""One place decides which code runs for a forward: `plan_forward` -> `ForwardPlan`.

From the config, the group size W, the device, whether gradients are needed and the number of
tokens, it picks the router's top-k, the dispatcher and its exchange, the pipeline chunks and
the experts' path. The layer, the dispatchers and the experts execute the plan and decide
nothing themselves; `MoE.plan(x)` shows it for a batch. The thresholds below carry the figure
each rests on (docs/performance.md has the measurements).

    experts   what runs the local experts
    -------   ----------------------------------------------------------------------------------
    triton    inference: Triton grouped GEMMs that gather the rows and apply the gated
              activation in their epilogue (no (P, D) copy, no (P, 2I) pre-activation)
    dense     every local expert on every row through batched GEMMs: a handful of rows
    grouped_mm torch's grouped GEMM over expert-sorted rows (training: its backward)
    per_expert one cuBLAS GEMM per expert, the row counts on the host
    triton_fp8 FP8 experts (`MoEConfig.expert_quant="fp8"`, inference): the Triton grouped GEMMs
              on e4m3 tensor cores, 128 x 128 weight scales applied in the K loop, the rows
              quantized per token and 128 columns as the first GEMM gathers them (decode),
              once before it (more rows an expert: `experts.FP8_QUANTIZE_IN_GEMM_MAX_ROWS`)
              or by the dispatch (`fp8_dispatch`), h written in e4m3 by its epilogue. Decode
              runs 1.7-1.9x faster than bf16, prefill 0.83-0.98x (one H100). torch's FP8
              grouped GEMM (`torch._scaled_grouped_mm`) takes tensor-wise or row-wise scales on
              Hopper (torch 2.11-2.13), not 128 x 128 weight blocks
    per_expert_fp8 FP8 experts, few large ones at prefill: per expert, its rows quantized as
              they are gathered, two cuBLAS block-scaled FP8 products (`ep_moe.fp8.
              blockwise_mm`: 1 x 128 row and 128 x 128 weight scales, Hopper, torch >= 2.10)
              and `act(gate) * up` quantized between them; the row counts on the host

    exchange  how rows travel (W > 1)
    --------  ----------------------------------------------------------------------------------
    none      one rank: no exchange
    exact     split sizes exchanged first (one host sync a forward), then only real rows
    fixed     every rank sends every other `max_tokens_per_rank` rows: no host sync, CUDA graphs
    nvlink    fixed, inference on CUDA peers: rows and partials stored straight into the peers'
              symmetric memory (no NCCL kernels beside the experts)
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from .config import ExpertImpl, MoEConfig
from .experts import GROUPED_MM

# -- experts -------------------------------------------------------------------------------
# Triton path, inference: up to this many rows per local expert (mean) it beats torch's
# grouped GEMM (H200, Mixtral's I = 14336: 0.57-0.84x its time at <= 128 rows an expert, equal
# at 256, 1.2x at 1024).
TRITON_MAX_ROWS_PER_EXPERT = 256
# ... and for small experts (I <= SMALL_I) up to 1024: the expand and activation passes it
# skips weigh more against a small I (H100, Qwen3's I = 768: 0.94x at 1024 rows, 0.96x at 2048).
TRITON_MAX_ROWS_PER_EXPERT_SMALL_I = 1024
SMALL_I = 1024
# Behind a fixed-size exchange the buffers are sized by a bound, which torch's grouped GEMM
# pays in full: small experts take the Triton path at any row count there (4x H100, Qwen3,
# 8192 tokens per GPU: experts 2.1 ms on torch's path against 1.5 on the Triton path).

# Dense path, inference: every local expert on every row when the batch has at most this many
# rows; the weights' bytes dominate, and batched GEMMs read each once with no sort (H200,
# Mixtral and Qwen3 shapes: faster than the grouped GEMM at 16 and 64 tokens, slower at 512).
# Not in training, where its backward writes every expert's weight gradient: one H100, a
# training step at 1-64 tokens takes 6.6-7.2 ms dense against 1.7-3.3 on the grouped GEMM
# (Mixtral), 3.0-3.3 against 1.5-1.6 (Qwen3).
DENSE_MAX_ROWS = 64

# Per-expert GEMMs where the exchange brought the row counts to the host: one cuBLAS product
# per expert beats torch's grouped GEMM on large experts (Mixtral's I = 14336 at 1024-8192 rows
# an expert: 1-9% faster on H100 and H200); 2-4x slower for Qwen3's 128 small experts.
PER_EXPERT_MIN_I = 8192
PER_EXPERT_MIN_ROWS_PER_EXPERT = 1024

# FP8 experts, cuBLAS's block-scaled GEMM per expert, where the row counts reach the host
# without a graph capture. One H100, Mixtral: 1.41-1.70x the bf16 layer's speed from 512 rows
# an expert (2048-16384 tokens, two runs; the Triton FP8 GEMMs 0.87-0.98x there). Below, the ~130 us of
# host time each expert costs (five launches) catches up with its GPU time: at 256 rows 0.73x
# in one run, 1.15x in another; at 128, 0.83x (Triton 1.26x). Many small experts lose
# outright: Qwen3 (128 experts, I = 768) 16.7 ms against 0.84 at 4096 tokens, DeepSeek-V3
# (256, I = 2048) 37 ms against 26 at 16384.
PER_EXPERT_FP8_MIN_ROWS_PER_EXPERT = 512
PER_EXPERT_FP8_MIN_I = 8192

# -- exchange ------------------------------------------------------------------------------
# Pipeline chunks chosen automatically: a fixed-size exchange over NCCL, in a CUDA-graph
# capture (eager, each chunk's ~20 host calls cost more than the overlap gains: Qwen3 4.7-5.6
# ms in 3 chunks against 3.0-3.2 in one), of prefill-sized batches: 3 tapered chunks bring
# Qwen3 at W = 4 from 0.64 to 0.71 of a single GPU's per-GPU speed (Mixtral: no change).
AUTO_CHUNKS = 3
AUTO_CHUNKS_MIN_TOKENS = 4096

# the experts' paths: MoEConfig.expert_impl's choices but "auto"
EXPERT_PATHS = tuple(p for p in typing.get_args(ExpertImpl) if p != "auto")


@dataclass(frozen=True)
class ForwardPlan:
    """What one forward runs (see the module docstring for the choices).

    router_topk: "triton" (one kernel for softmax + top-k) or "torch".
    dispatcher, exchange, chunks: how rows reach the experts and come back (chunks > 1: a
        pipeline of that many chunks; in training, the chunks in turn).
    experts: the experts' path.
    rows: R, rows this rank's experts see (a bound where the exchange is not local).
    pairs: expected (row, slot) pairs routed to local experts (balanced routing).
    grad: whether the forward records autograd (training).
    fp8_dispatch: the all-to-all sends each row as e4m3 with its scales (FP8 experts, W > 1):
        about half a bf16 row's bytes; the partials come back in the layer's dtype.
    """

    router_topk: str
    dispatcher: str
    exchange: str
    chunks: int
    experts: str
    rows: int
    pairs: int
    grad: bool
    fp8_dispatch: bool = False

    @property
    def overlapped(self) -> bool:
        """Exchanges run beside the experts (a pipeline): kernels must not hold every SM."""
        return self.chunks > 1 and not self.grad


def plan_forward(config: MoEConfig, *, world_size: int, num_local_experts: int,
                 num_tokens: int, device_type: str, dtype: torch.dtype, triton: bool,
                 grad: bool, peer_exchange: bool = False, capturing: bool = False,
                 compiling: bool = False, blockwise_fp8: bool = False) -> ForwardPlan:
    """The plan of a forward of `num_tokens` tokens on this rank.

    Args:
        config: the layer's config.
        world_size: W, ranks in the expert-parallel group.
        num_local_experts: e, this rank's experts.
        num_tokens: T, this rank's tokens.
        device_type, dtype: where and in what the layer computes.
        triton: whether the Triton kernels run there (CUDA, or the CPU interpreter).
        grad: whether the forward records autograd.
        peer_exchange: whether the group's ranks can map each other's memory (CUDA peers of
            one host with torch symmetric memory): what `exchange="auto"` needs for "nvlink".
        capturing: inside a CUDA-graph capture (automatic pipeline chunks only pay there).
        compiling: under torch.compile (torch's grouped GEMM traces in bf16 only).
        blockwise_fp8: cuBLAS's block-scaled FP8 GEMM runs here
            (`ep_moe.fp8.blockwise_mm_available`).

    Raises:
        ValueError naming the setting where a forced choice cannot run here.
    """
    cfg, W, e, T = config, world_size, num_local_experts, num_tokens
    K, C = cfg.top_k, cfg.max_tokens_per_rank

    if W == 1:
        dispatcher, exchange, chunks = "local", "none", 1
        rows, pairs = T, T * K
    else:
        dispatcher = cfg.dispatcher
        exchange = "exact" if C is None else "fixed"
        if dispatcher == "all_to_all" and C is not None:
            exchange = _fixed_exchange(cfg, device_type, grad, peer_exchange)
        chunks = _chunks(cfg, exchange, grad, capturing)
        # a bound on the rows received; pairs: what a balanced routing brings, T * K (the
        # fixed exchange's C * K: its buffers are sized by C)
        rows = W * (T if C is None else C)
        pairs = (T if C is None else C) * K
    bounded = exchange in ("fixed", "nvlink")
    if cfg.expert_quant == "fp8":
        experts = _fp8_experts(cfg, e, pairs, exchange, dtype, device_type, triton, grad,
                               capturing or compiling, blockwise_fp8)
    else:
        experts = _experts(cfg, e, rows, pairs, bounded, exchange == "exact", dtype,
                           device_type, triton, grad, compiling)
    fp8_dispatch = experts.endswith("_fp8") and dispatcher == "all_to_all" and W > 1
    return ForwardPlan(router_topk(cfg, triton), dispatcher, exchange, chunks, experts, rows,
                       pairs, grad, fp8_dispatch)


def router_topk(config: MoEConfig, triton: bool) -> str:
    """The router's top-k: "triton" (softmax and top-k in one kernel, where Triton runs) for a
    plain softmax over all E experts (Mixtral, Qwen), "torch" otherwise (groups, a correction
    bias, sigmoid scores)."""
    plain_softmax = (config.score_func == "softmax" and config.num_expert_groups == 1
                     and not config.use_correction_bias)
    return "triton" if plain_softmax and triton else "torch"


def _fixed_exchange(cfg: MoEConfig, device_type: str, grad: bool, peer_exchange: bool) -> str:
    """"fixed" (collectives) or "nvlink" for an all-to-all with a fixed size. Training always
    takes the collectives (the exchange over NVLink has no backward)."""
    if cfg.exchange == "nvlink" and device_type != "cuda":
        raise ValueError(f"MoEConfig.exchange='nvlink' needs CUDA tensors (symmetric memory "
                         f"over NVLink), got x on {device_type}; use exchange='auto' or "
                         f"'collective'")
    if grad or cfg.exchange == "collective":
        return "fixed"
    if cfg.exchange == "nvlink":
        return "nvlink"
    return "nvlink" if device_type == "cuda" and peer_exchange else "fixed"


def _chunks(cfg: MoEConfig, exchange: str, grad: bool, capturing: bool) -> int:
    if cfg.dispatch_chunks is not None:
        return cfg.dispatch_chunks
    if (exchange == "fixed" and cfg.dispatcher == "all_to_all" and not grad and capturing
            and cfg.max_tokens_per_rank >= AUTO_CHUNKS_MIN_TOKENS):
        return AUTO_CHUNKS
    return 1  # over NVLink one chunk is fastest (2 or 3 chunks: 1.97-2.64 ms against 1.78)


def _experts(cfg, e, rows, pairs, bounded, host_counts, dtype, device_type, triton, grad,
             compiling) -> str:
    grouped_ok = _grouped_mm_takes(cfg, dtype, device_type, compiling)
    forced = cfg.expert_impl
    if forced == "triton" and (grad or not triton):
        raise ValueError("MoEConfig.expert_impl='triton' runs inference (no gradients) where "
                         f"Triton runs (CUDA, or the CPU under TRITON_INTERPRET=1); got a "
                         f"forward with grad={grad} on {device_type}")
    if forced == "grouped_mm" and not grouped_ok:
        raise ValueError(f"MoEConfig.expert_impl='grouped_mm' needs torch's grouped GEMM for "
                         f"{dtype} on {device_type} with D and I multiples of 16 bytes"
                         f"{' (bf16 only under torch.compile)' if compiling else ''}; got "
                         f"D={cfg.hidden_size}, I={cfg.intermediate_size}")
    if forced != "auto":
        return forced
    small_i = cfg.intermediate_size <= SMALL_I
    max_rows = TRITON_MAX_ROWS_PER_EXPERT_SMALL_I if small_i else TRITON_MAX_ROWS_PER_EXPERT
    few_rows = pairs <= max_rows * max(e, 1)
    if triton and not grad and (few_rows or (bounded and small_i)):
        return "triton"
    if 0 < rows <= dense_max_rows(cfg) and not grad:
        return "dense"
    if host_counts and cfg.intermediate_size >= PER_EXPERT_MIN_I and \
            pairs >= PER_EXPERT_MIN_ROWS_PER_EXPERT * e and not compiling:
        return "per_expert"
    return "grouped_mm" if grouped_ok else "per_expert"


def _fp8_experts(cfg: MoEConfig, e: int, pairs: int, exchange: str, dtype: torch.dtype,
                 device_type: str, triton: bool, grad: bool, traced: bool,
                 blockwise: bool) -> str:
    """FP8 experts: "triton_fp8" or "per_expert_fp8" (`MoEConfig.expert_impl` "auto",
    "triton" or "per_expert": the config refuses the others). The per-expert path needs the
    row counts on the host (one rank, or an exchange that counted them), no graph capture or
    torch.compile, cuBLAS's block-scaled GEMM and bf16 rows."""
    if grad:
        raise ValueError("MoEConfig.expert_quant='fp8' is inference only: run the forward "
                         "under torch.no_grad() or torch.inference_mode() (or with neither x "
                         "nor a parameter requiring grad); got a forward that records autograd")
    if not triton:
        raise ValueError(f"MoEConfig.expert_quant='fp8' runs Triton FP8 kernels: it needs x on "
                         f"CUDA (compute capability >= 8.9), or on the CPU with "
                         f"TRITON_INTERPRET=1; got x on {device_type}")
    per_expert_ok = (blockwise and not traced and exchange in ("none", "exact")
                     and dtype == torch.bfloat16)
    if cfg.expert_impl == "per_expert":
        if not per_expert_ok:
            raise ValueError(
                f"MoEConfig.expert_impl='per_expert' with FP8 experts needs cuBLAS's "
                f"block-scaled FP8 GEMM (Hopper, torch >= 2.10 on CUDA >= 12.9; here: "
                f"{blockwise}), bf16 rows (got {dtype}), the row counts on the host (exchange "
                f"none or exact, got {exchange!r}) and no CUDA-graph capture or torch.compile "
                f"(got {traced})")
        return "per_expert_fp8"
    if cfg.expert_impl == "auto" and per_expert_ok and \
            cfg.intermediate_size >= PER_EXPERT_FP8_MIN_I and \
            pairs >= PER_EXPERT_FP8_MIN_ROWS_PER_EXPERT * max(e, 1):
        return "per_expert_fp8"
    return "triton_fp8"


def dense_max_rows(cfg: MoEConfig) -> int:
    """`MoEConfig.dense_max_rows`, or DENSE_MAX_ROWS where it is None (automatic)."""
    return DENSE_MAX_ROWS if cfg.dense_max_rows is None else cfg.dense_max_rows


def _grouped_mm_takes(cfg: MoEConfig, dtype: torch.dtype, device_type: str,
                      compiling: bool) -> bool:
    """Whether torch's grouped GEMM takes the experts' operands: a floating dtype on CPU or
    CUDA (torch 2.11 and 2.13), bf16 only under torch.compile (its fake kernel), and rows of
    D and I 16-byte aligned."""
    if GROUPED_MM is None or device_type not in ("cpu", "cuda"):
        return False
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if compiling and dtype != torch.bfloat16:
        return False
    align = 16 // dtype.itemsize
    up = 2 * cfg.intermediate_size if cfg.gated else cfg.intermediate_size
    return all(n % align == 0 for n in (cfg.hidden_size, cfg.intermediate_size, up))
