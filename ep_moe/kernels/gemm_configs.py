"""Tile configs of the grouped expert GEMM (`grouped_gemm.py`): the named tuple, the choice by
rows per expert and expert count (from sweeps of the layer's shapes on H200 and H100; figures
in docs/performance.md), the FP8 GEMM's, the launch shape, and the fitting of the pipelined
tiles into a GPU's shared memory."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .common import per_device


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    # an expert's last row block with at most this many rows runs as a (tail_m, block_n)
    # tile (not in a flattened persistent loop: see `flatten_wins`); 0: every tile block_m rows
    tail_m: int = 0


# up to this many experts, groups of 16 row blocks of at most 128 rows an expert span them all
FEW_EXPERTS = 8


def gemm_config(rows_per_expert: float, gated: bool, element_size: int = 2,
                shared_budget: Optional[int] = None,
                num_experts: Optional[int] = None) -> GemmConfig:
    """Tile sizes by the mean rows per expert (bf16 sweeps of the Mixtral and Qwen3 shapes: H200
    for the brackets; H100 for the 4-stage pipelines of the 128-row tiles, faster than 3 stages
    in 9 of the 11 shapes from 128 rows per expert by 3-11%).

    Few rows per expert: the weights' bytes bound the time, so short row tiles keep every weight
    tile read about once; many rows: the FLOPs do, so 128-row tiles for the tensor cores.
    Few experts (`num_experts` <= FEW_EXPERTS) with 33-128 rows each (Mixtral, 256-512
    tokens): 128-row tiles in groups of 16 row blocks, which cover every expert's rows, so each
    column tile of all the experts' weights is read at once (H100, TMA loads: Mixtral at 64
    rows per expert 836 -> 680 us and 386 -> 330 us, at 128 rows 806 -> 725 and 415 -> 382;
    Qwen3's 128 experts were slower in such groups).
    Where the buffers exceed `shared_budget` bytes (default: a Hopper block's; see
    `shared_budget`), the config gets fewer pipeline stages, then shorter K tiles, until they
    fit: 4-byte dtypes, and GPUs with less shared memory.
    """
    budget = _SHARED_BUDGET if shared_budget is None else shared_budget
    few_experts = num_experts is not None and num_experts <= FEW_EXPERTS
    if rows_per_expert <= 8:
        cfg = GemmConfig(16, 128, 128, 1, 4, 3)
    elif few_experts and 32 < rows_per_expert <= 128:
        # the down projection's second row block (half the experts at 128 rows an expert) as
        # a 64-row tile where it fits (H100, Mixtral at 512 tokens: 382 -> 374 us)
        cfg = GemmConfig(128, 128, 64, 16, 8, 4) if gated else \
            GemmConfig(128, 128, 128, 16, 8, 3, 64)
    elif rows_per_expert <= 64:
        cfg = GemmConfig(64, 128, 64, 4, 4, 4)
    elif gated or rows_per_expert <= 128:
        # gated, 129-384 rows an expert: the last of an expert's 2-3 row blocks is often mostly
        # empty, so it runs as a 64-row tile where its rows fit (H100, at 256 rows per expert:
        # Qwen3 449 -> 427 us, Mixtral 980 -> 941-966; not at 128 rows, DeepSeek-V3 6.56 ->
        # 6.94 ms, nor 512-1024, where the branch costs the full tiles' loop more than the tail
        # saves)
        tail = 64 if gated and 128 < rows_per_expert <= 384 else 0
        # few experts' gated tiles in groups of 16 row blocks, as at <= 128 rows (H100, Mixtral
        # at 1024 / 1032 tokens: 932 -> 911 / 1036 -> 999 us)
        group = 16 if few_experts and tail else 8
        cfg = GemmConfig(128, 128, 64, group, 8, 4, tail)
    else:
        cfg = GemmConfig(128, 256, 64, 8, 8, 4)
    while shared_bytes(cfg, gated, element_size) > budget and \
            (cfg.num_stages > 2 or cfg.block_k > 16):
        if cfg.num_stages > 2:
            cfg = cfg._replace(num_stages=cfg.num_stages - 1)
        else:
            cfg = cfg._replace(block_k=cfg.block_k // 2)
    return cfg


# FP8 tiles by regime (rows an expert: decode <= 16 < mid <= 64 < large) and GEMM (the first,
# gate/up with its e4m3 output, or the down projection), from a sweep of Mixtral's and
# Qwen3-30B-A3B's shapes on an H100 (docs/performance.md)
FP8_TILES = {
    ("decode", True): GemmConfig(16, 128, 128, 1, 4, 3),
    ("decode", False): GemmConfig(16, 128, 128, 1, 4, 4),
    ("mid", True): GemmConfig(64, 128, 128, 4, 8, 4),
    ("mid", False): GemmConfig(64, 128, 128, 4, 4, 4),
    ("large", True): GemmConfig(64, 128, 128, 8, 8, 4),
    ("large", False): GemmConfig(64, 128, 128, 8, 4, 4),
}


def fp8_gemm_config(rows_per_expert: float, quantized_out: bool, a_bytes: int = 1,
                    shared_budget: Optional[int] = None) -> GemmConfig:
    """Tile sizes of the FP8 grouped GEMM (`grouped_gemm_fp8`) by the mean rows per expert
    (`FP8_TILES`).

    BLOCK_K is 128, the side of the weight scale blocks (one scale per K step); BLOCK_N is 128
    (where the epilogue quantizes its output, `quantized_out`, a tile's columns are one
    128-column group of each row; and the scale a K step applies is then one per tile).
    `a_bytes`: 1 for e4m3 rows, 2 (or 4) for 16-bit (fp32) rows quantized as they load,
    which the pipeline buffers unquantized.
    Few rows (decode): the weights' bytes bound the time; 16-row tiles. More: 64-row tiles,
    with 8 warps for the gated GEMM (two fp32 accumulators; 4 warps were 1.1-1.25x slower),
    as 128-row tiles were 2.5-5x slower for it and 1.15x for the down GEMM (Mixtral and Qwen3
    at 1024-16384 tokens).
    Where the buffers exceed `shared_budget`, fewer stages, then shorter row tiles.
    """
    regime = "decode" if rows_per_expert <= 16 else "mid" if rows_per_expert <= 64 else "large"
    cfg = FP8_TILES[regime, quantized_out]
    budget = _SHARED_BUDGET if shared_budget is None else shared_budget
    # the first GEMM (quantized output) counted with gate and up tiles: plain experts load
    # one, and fit with room to spare
    gated = quantized_out
    while shared_bytes(cfg, gated, a_bytes, 1) > budget and \
            (cfg.num_stages > 2 or cfg.block_m > 16):
        if cfg.num_stages > 2:
            cfg = cfg._replace(num_stages=cfg.num_stages - 1)
        else:
            cfg = cfg._replace(block_m=cfg.block_m // 2, num_warps=4)
    return cfg


def flatten_wins(cfg: GemmConfig, rows_by_descriptor: bool, num_experts: int,
                 shared_budget: Optional[int] = None) -> bool:
    """Whether a persistent launch whose tile and K loops are flattened into one pipelined
    loop beats the grid (H100): for rows read through a tensor
    descriptor (the down projection) in 128 x 256 tiles over more than FEW_EXPERTS experts.
    There a program's next tile loads while this tile's last products run, where the grid's
    programs each fill and drain their pipeline alone (Qwen3, K = 768: 12 steps of the K
    loop): its down projection 253 -> 238 us at 4096 tokens, 790 -> 696 at 16384. Not for
    Mixtral's 8 experts (0-1.5% slower), nor for gathered rows (pointer loads; 1.2-2x slower
    flattened). The flattened loop takes 32 KiB more shared memory (224 KiB for this tile):
    only where a block may have Hopper's."""
    budget = _SHARED_BUDGET if shared_budget is None else shared_budget
    return (rows_by_descriptor and cfg.block_m == 128 and cfg.block_n == 256
            and num_experts > FEW_EXPERTS and budget >= _SHARED_BUDGET)


def persistent_launch(cfg: GemmConfig, num_rows: int, expected_rows: float,
                      overlapped: bool) -> Optional[bool]:
    """`grouped_gemm`'s `persistent` for `num_rows` output rows of which about `expected_rows`
    are real. False beside other work (`overlapped`: a pipeline's exchanges), where a
    persistent program would hold its SM for the whole GEMM and an exchange that starts finds
    none free (4x H200, Qwen3 in 3 chunks, CUDA graph: persistent 2.12-2.14 ms, grid
    1.87-1.90). True for 128-row tiles over buffers sized by a loose bound (more than twice
    the expected rows: a fixed-size exchange), where a grid sized by the bound is mostly
    programs with nothing to do, each holding an SM's shared memory while it starts and exits
    (H100, Qwen3 at W = 4, 8192 tokens: both GEMMs 1324 -> 1234 us). Else None: the launcher
    decides (`flatten_wins`)."""
    if overlapped:
        return False
    if num_rows > 2 * expected_rows and cfg.block_m >= 128:
        return True
    return None


# shared memory the pipelined A and W tiles may take: a block's opt-in maximum (Hopper: 227
# KiB) less a little room for what Triton adds
_SHARED_MARGIN = 7 * 1024
_SHARED_BUDGET = 227 * 1024 - _SHARED_MARGIN


@per_device
def shared_budget(device: torch.device) -> int:
    """Bytes of shared memory `gemm_config` may give the pipelined tiles on `device`: its
    per-block opt-in maximum (Hopper 227 KiB, A100 163, many others ~99) less Triton's own;
    the Hopper figure where the device does not say (the CPU interpreter, older torch)."""
    if device.type != "cuda":
        return _SHARED_BUDGET
    optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return optin - _SHARED_MARGIN if optin else _SHARED_BUDGET


def shared_bytes(cfg: GemmConfig, gated: bool, element_size: int,
                 w_element_size: Optional[int] = None) -> int:
    """Shared memory of the pipelined A and W tiles: A's elements of `element_size` bytes,
    W's of `w_element_size` (default the same; 1 for FP8 weights)."""
    w_tiles = 2 if gated else 1
    w_size = element_size if w_element_size is None else w_element_size
    # a tail tile's loop reuses the same buffers (triton 3.6 for sm_90 gives the kernel the
    # same shared memory with or without one)
    per_stage = (cfg.block_m * element_size + w_tiles * cfg.block_n * w_size) * cfg.block_k
    return (cfg.num_stages - 1) * per_stage  # Triton buffers num_stages - 1 tiles ahead


def check_config(cfg) -> None:
    if not isinstance(cfg, GemmConfig):
        raise TypeError(f"config must be a GemmConfig, got {type(cfg).__name__}")
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of two >= 16, got {v!r}")
    for name in ("group_m", "num_warps", "num_stages"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config.{name} must be an int >= 1, got {v!r}")
    t = cfg.tail_m
    if not isinstance(t, int) or (t and (t < 16 or t & (t - 1) or t >= cfg.block_m)):
        allowed = "0" if cfg.block_m <= 16 else \
            f"0 or a power of two from 16 below block_m={cfg.block_m}"
        raise ValueError(f"config.tail_m must be {allowed}, got {t!r}")
