"""The tile-config rules of the grouped GEMM (`ep_moe/kernels/gemm_configs.py`): the config
by rows per expert and expert count, its fitting into a block's shared memory, the launch
shape. No kernel runs here.

Each test checks one property over a grid of (rows per expert, gated, element size, number of
experts, shared-memory budget), not pinned configs: a property comes from a rule's docstring
and says why beside it. A value is pinned only where the docstring gives a measured choice that
no property can express; the test says so.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch

from ep_moe.kernels.gemm_configs import (FEW_EXPERTS, GemmConfig, check_config, flatten_wins,
                                         gemm_config, persistent_launch, shared_budget,
                                         shared_bytes)

ROWS = [  # mean rows per expert (P / e: a float)
    0,       # no rows at all (a rank that receives nothing)
    1,       # decode: about one row an expert
    8,       # the last mean of the shortest row tiles
    8.5,     # just past it (the means are fractional)
    32,      # the last mean before few experts' 128-row groups
    33,      # the first of them
    64,      # the last of many experts' 64-row tiles
    65,
    128,     # the last mean without tails; Mixtral at 512 tokens (8 experts, top-2)
    129,     # the first gated mean with tails
    256,     # Qwen3 at 4096 tokens (128 experts, top-8), Mixtral at 1024
    384,     # the last gated mean with tails
    385,
    1024,    # Qwen3 at 16384 tokens
    8192,    # Mixtral at 32768 tokens: a long prefill
]
EXPERTS = [
    None,             # the caller does not say: many experts' rules
    1,                # one local expert (Mixtral's 8 over 8 ranks)
    FEW_EXPERTS,      # the most experts that count as few (Mixtral's 8 on one GPU)
    FEW_EXPERTS + 1,  # the fewest that count as many
    128,              # Qwen3
]
HOPPER = shared_budget(torch.device("cpu"))  # the default: a Hopper block's (227 KiB) less Triton's
_MARGIN = 227 * 1024 - HOPPER                # what `shared_budget` keeps back for Triton
BUDGETS = [  # a block's opt-in shared memory less that margin, as `shared_budget` gives it
    HOPPER,                    # H100 / H200
    163 * 1024 - _MARGIN,      # A100: fp32 tiles lose stages
    99 * 1024 - _MARGIN,       # sm_86 / sm_89 (~99 KiB): 16-bit tiles lose stages, fp32 K tiles
    64 * 1024 - _MARGIN,       # Turing: every config trimmed, fp32 K tiles down to 32
]
UNLIMITED = 1 << 40  # a budget nothing exceeds: the config as chosen, before any fitting


class Point(NamedTuple):
    rows: float
    gated: bool
    element_size: int  # 2: bf16 / fp16, 4: fp32
    num_experts: Optional[int]
    budget: int


def config(p: Point, **changes) -> GemmConfig:
    p = p._replace(**changes)
    return gemm_config(p.rows, p.gated, p.element_size, p.budget, p.num_experts)


def swept(p: Point) -> GemmConfig:
    """The config before fitting: the tile sizes the sweeps chose."""
    return config(p, budget=UNLIMITED)


GRID = [Point(*p) for p in itertools.product(ROWS, (True, False), (2, 4), EXPERTS, BUDGETS)]
CONFIGS = [(p, config(p)) for p in GRID]  # 1200 points, a few ms


def assert_none(bad, what):
    """`bad`: (point, what was wrong) pairs that break a property described by `what`."""
    shown = "\n".join(f"  {p} -> {found}" for p, found in bad[:8])
    assert not bad, f"{len(bad)} of {len(GRID)} grid points {what}, e.g.\n{shown}"


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# --------------------------------------------------------------------------------------------
# Every config: valid, and within its budget
# --------------------------------------------------------------------------------------------

def test_every_config_is_valid():
    """What `check_config` demands of a caller's config (the launcher takes nothing else), and
    what Triton needs: tile dims powers of two >= 16 (tl.dot's smallest), a power-of-two warp
    count, >= 2 stages (the least the fitting leaves: a pipeline), tail_m 0 or a power of two
    from 16 below block_m (a shorter tile than the full one)."""
    bad = []
    for p, cfg in CONFIGS:
        try:
            check_config(cfg)
        except (TypeError, ValueError) as e:
            bad.append((p, f"{cfg}: {e}"))
            continue
        dims = (cfg.block_m, cfg.block_n, cfg.block_k)
        if not (all(is_pow2(d) and d >= 16 for d in dims) and is_pow2(cfg.num_warps)
                and cfg.num_stages >= 2 and cfg.group_m >= 1
                and (cfg.tail_m == 0 or (is_pow2(cfg.tail_m) and 16 <= cfg.tail_m < cfg.block_m))):
            bad.append((p, cfg))
    assert_none(bad, "give an invalid config")


def test_every_config_fits_its_budget():
    """The pipelined tiles' buffers within the block's shared memory: Triton refuses a kernel
    that needs more (fp32 tiles at the bf16 stage counts needed 240-272 KiB: refused on an
    H200). Every budget of the grid holds the smallest fitting (2 stages, 16-wide K tiles)."""
    bad = [(p, cfg) for p, cfg in CONFIGS if shared_bytes(cfg, p.gated, p.element_size) > p.budget]
    assert_none(bad, "exceed their budget")


def test_fitting_trims_stages_then_k_tiles_only_as_needed():
    """Over budget, a config gets fewer pipeline stages, then (at 2 stages) shorter K tiles,
    until it fits: nothing else changes (the tile shape, groups and tails stay the swept
    ones), K tiles shrink only once no stage is left to drop, and one step less trimming
    would not fit."""
    bad, trimmed = [], {"stages": 0, "k": 0}
    for p, cfg in CONFIGS:
        base = swept(p)
        if cfg == base:
            continue
        if cfg.block_k < base.block_k:
            trimmed["k"] += 1
            looser = cfg._replace(block_k=2 * cfg.block_k)
        else:
            trimmed["stages"] += 1
            looser = cfg._replace(num_stages=cfg.num_stages + 1)
        if (cfg._replace(num_stages=base.num_stages, block_k=base.block_k) != base
                or cfg.num_stages > base.num_stages or cfg.block_k > base.block_k
                or (cfg.block_k < base.block_k and cfg.num_stages != 2)
                or shared_bytes(looser, p.gated, p.element_size) <= p.budget):
            bad.append((p, f"{cfg} from {base}"))
    assert_none(bad, "fit otherwise")
    # the grid reaches both steps: each check above can fail
    assert trimmed["stages"] and trimmed["k"], trimmed


def test_16bit_configs_keep_their_swept_pipelines_on_hopper():
    """bf16 / fp16 on a Hopper budget: the configs the sweeps measured (bf16, H100 / H200),
    untouched by the fitting, so at least 3 stages; and the default budget is Hopper's."""
    hopper_16bit = [(p, cfg) for p, cfg in CONFIGS if p.element_size == 2 and p.budget == HOPPER]
    bad = [(p, cfg) for p, cfg in hopper_16bit
           if cfg != swept(p) or cfg.num_stages < 3
           or gemm_config(p.rows, p.gated, 2, num_experts=p.num_experts) != cfg]
    assert_none(bad, "lose their swept pipeline")
    # Pinned, a measured choice: past 128 rows per expert, 4-stage pipelines (H100: faster
    # than 3 stages in 9 of the 11 shapes from 128 rows by 3-11%); a property cannot say which
    # stage count wins.
    bad = [(p, cfg) for p, cfg in hopper_16bit if p.rows > 128 and cfg.num_stages != 4]
    assert_none(bad, "lack the measured 4 stages")


# --------------------------------------------------------------------------------------------
# Row tiles by rows per expert
# --------------------------------------------------------------------------------------------

def test_row_tiles_grow_with_rows():
    """Few rows per expert: the weights' bytes bound the time, so short row tiles; many: the
    FLOPs do, so the tallest tiles for the tensor cores. block_m never shrinks as the rows
    grow, and past 128 rows (no bracket of short tiles reaches there) it is the tallest any
    rule gives."""
    tallest = max(cfg.block_m for _, cfg in CONFIGS)
    bad = []
    for gated, size, e, budget in itertools.product((True, False), (2, 4), EXPERTS, BUDGETS):
        points = [Point(r, gated, size, e, budget) for r in ROWS]  # ROWS ascending
        tiles = [config(p).block_m for p in points]
        bad += [(p, f"block_m {m} after {prev}")
                for p, prev, m in zip(points[1:], tiles, tiles[1:]) if m < prev]
        bad += [(p, f"block_m {m}") for p, m in zip(points, tiles) if p.rows > 128 and m < tallest]
    assert_none(bad, "shrink the row tiles as rows grow")


def test_few_rows_get_short_row_tiles():
    """Up to 128 rows per expert (the weights' bytes bound the time) an expert's mean rows fit
    one row tile, so each weight tile is read about once per expert; up to 8 rows, the
    shortest tile tl.dot takes (16 rows), the least padding through the tensor cores."""
    bad = [(p, cfg) for p, cfg in CONFIGS
           if (p.rows <= 128 and cfg.block_m < p.rows) or (p.rows <= 8 and cfg.block_m != 16)]
    assert_none(bad, "spread a few rows over several tiles, or pad them")


# --------------------------------------------------------------------------------------------
# Groups of row blocks, tails, and the expert count
# --------------------------------------------------------------------------------------------

def blocks(p: Point, cfg: GemmConfig) -> int:
    """Row blocks of all the experts at their mean rows (laid end to end by the kernel)."""
    return p.num_experts * math.ceil(p.rows / cfg.block_m)


def test_few_experts_one_group_spans_their_row_blocks():
    """Few experts (<= FEW_EXPERTS) with 33-128 rows each: one group of row blocks covers
    every expert's rows, so each column tile of all the experts' weights is read at once
    (H100, Mixtral at 256-512 tokens: 836 -> 680 us and 806 -> 725 at 64 and 128 rows).
    More experts never get a group that spans them all (Qwen3's 128 experts were slower in
    such groups)."""
    bad = []
    for p, cfg in CONFIGS:
        if p.num_experts is None or p.rows == 0:
            continue
        if p.num_experts <= FEW_EXPERTS and 32 < p.rows <= 128:
            if cfg.group_m < blocks(p, cfg):
                bad.append((p, f"{cfg}: groups of {cfg.group_m} of {blocks(p, cfg)} blocks"))
        elif p.num_experts > FEW_EXPERTS and cfg.group_m >= blocks(p, cfg):
            bad.append((p, f"{cfg}: one group spans all {blocks(p, cfg)} blocks"))
    assert_none(bad, "group their row blocks against the rule")


def measured_for_few_experts(p: Point) -> bool:
    """The brackets where few experts were measured to want their own tiles: 33-128 rows an
    expert (both GEMMs), and the gated GEMM's 129-384 rows (its tails in groups of 16)."""
    return 32 < p.rows <= 128 or (p.gated and 128 < p.rows <= 384)


def test_expert_count_matters_only_where_measured():
    """More than FEW_EXPERTS experts: the rows alone decide (as with no count given). Few
    experts differ from many only in the brackets measured for them (32 rows and fewer, and
    past them, nothing was gained), and there their groups span more rows, so a column tile
    of the weights serves more of their row blocks while it is in L2 (H100, Mixtral at 1024
    / 1032 tokens: 932 -> 911 / 1036 -> 999 us)."""
    bad = []
    for p, cfg in CONFIGS:
        if p.num_experts is None:
            continue
        many = config(p, num_experts=None)
        if p.num_experts > FEW_EXPERTS or not measured_for_few_experts(p):
            if cfg != many:
                bad.append((p, f"{cfg} != {many} (many experts')"))
        elif cfg.group_m * cfg.block_m <= many.group_m * many.block_m:
            bad.append((p, f"{cfg}: groups no wider than many experts' {many}"))
    assert_none(bad, "depend on the expert count outside the rule")


def test_tails_only_where_the_rule_says():
    """An expert's last row block runs as a shorter tile where it is often mostly empty:
    gated GEMMs at 129-384 rows (the last of 2-3 row blocks; H100 at 256 rows: Qwen3 449 ->
    427 us), and few experts' down projection at 33-128 rows (its second row block; Mixtral
    at 512 tokens: 382 -> 374 us). Nowhere else: not gated at 128 rows (DeepSeek-V3 6.56 ->
    6.94 ms), nor from 385 (the branch costs the full tiles' loop more than the tail saves). A
    tail holds at most half a full tile: the block it replaces is mostly empty."""
    def wants_tail(p):
        few = p.num_experts is not None and p.num_experts <= FEW_EXPERTS
        return (p.gated and 128 < p.rows <= 384) or (few and not p.gated and 32 < p.rows <= 128)

    bad = [(p, cfg) for p, cfg in CONFIGS
           if bool(cfg.tail_m) != wants_tail(p) or cfg.tail_m > cfg.block_m // 2]
    assert_none(bad, "have tails against the rule")


# --------------------------------------------------------------------------------------------
# Launch shape
# --------------------------------------------------------------------------------------------

def test_flatten_wins_only_where_measured():
    """The flattened persistent loop: only for rows read through a tensor descriptor
    (gathered rows, pointer loads: 1.2-2x slower flattened), over more than FEW_EXPERTS
    experts (Mixtral's 8: 0-1.5% slower), in the down projection's 128 x 256 tiles, where a
    block may have Hopper's shared memory (the loop takes 32 KiB more)."""
    bad = []
    for (p, cfg), by_descriptor in itertools.product(CONFIGS, (True, False)):
        if p.num_experts is None:
            continue
        if flatten_wins(cfg, by_descriptor, p.num_experts, p.budget) and not (
                by_descriptor and p.num_experts > FEW_EXPERTS and p.budget >= HOPPER
                and not p.gated and (cfg.block_m, cfg.block_n) == (128, 256)):
            bad.append((p, f"{cfg}, by descriptor: {by_descriptor}"))
    assert_none(bad, "flatten where it was not measured to win")
    # Pinned, measured: where it wins at all is a measurement (H100, Qwen3's down projection,
    # K = 768: 253 -> 238 us at 4096 tokens, 790 -> 696 at 16384), no property
    for rows in (256, 1024):
        qwen3_down = gemm_config(rows, False, 2, num_experts=128)
        assert flatten_wins(qwen3_down, True, 128), qwen3_down


def test_persistent_launch():
    """Beside a pipeline's exchanges never persistent (a program holding its SM for the whole
    GEMM leaves an exchange none). Over a buffer sized by a loose bound (more than twice the
    expected rows), persistent for 128-row tiles, where the grid would be mostly programs
    with nothing to do. Else None: the launcher decides (`flatten_wins`)."""
    bad = []
    for cfg in {cfg for _, cfg in CONFIGS}:
        expected = 8 * 200.0
        for num_rows, overlapped in itertools.product(
                (0, int(expected), int(2 * expected), int(2 * expected) + 1, int(4 * expected)),
                (False, True)):
            loose = num_rows > 2 * expected
            want = False if overlapped else (True if loose and cfg.block_m >= 128 else None)
            got = persistent_launch(cfg, num_rows, expected, overlapped)
            if got is not want:
                bad.append((f"{num_rows} rows, overlapped {overlapped}", f"{cfg}: {got}"))
    assert_none(bad, "launch against the rule")


def test_shared_budget(monkeypatch):
    """A CUDA device's per-block opt-in maximum less the same margin for Triton's own; the
    Hopper figure where the device does not say, and on the CPU (the interpreter)."""
    optin = {90: 227 * 1024, 91: 163 * 1024, 92: 99 * 1024, 93: 0}  # 93: not reported

    def properties(device):
        return SimpleNamespace(shared_memory_per_block_optin=optin[torch.device(device).index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    # device indices no test machine has: `shared_budget` caches per device
    budgets = {i: shared_budget(torch.device("cuda", i)) for i in optin}
    assert budgets[90] == budgets[93] == HOPPER
    assert 0 < 227 * 1024 - HOPPER <= 16 * 1024  # room for Triton's own, not a tile's worth
    for i in (91, 92):
        assert budgets[i] == optin[i] - (227 * 1024 - HOPPER)
