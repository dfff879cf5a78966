"""The tile-config rules of the grouped GEMM (`ep_moe/kernels/gemm_configs.py`): the config
by rows per expert and expert count, its fitting into a block's shared memory, and where a
flattened persistent launch wins. No kernel runs here."""

from __future__ import annotations

import pytest

from ep_moe.kernels import gemm_configs as gg_configs
from ep_moe.kernels.gemm_configs import GemmConfig, gemm_config, shared_bytes


@pytest.mark.parametrize("rows_per_expert,num_experts,gated,expected", [
    (64, 8, True, GemmConfig(128, 128, 64, 16, 8, 4)),    # few experts: every row block in
    (128, 2, False, GemmConfig(128, 128, 128, 16, 8, 3, 64)),  # one group of 16; the down
    #                                                        projection's second block a tail
    (64, 9, True, GemmConfig(64, 128, 64, 4, 4, 4)),      # more experts: the rows decide
    (64, None, False, GemmConfig(64, 128, 64, 4, 4, 4)),
    (32, 8, True, GemmConfig(64, 128, 64, 4, 4, 4)),      # 32 rows and fewer: not measured
    (200, 8, False, GemmConfig(128, 256, 64, 8, 8, 4)),   # past 128 rows: no gain measured
    (8, None, True, GemmConfig(16, 128, 128, 1, 4, 3)),   # edge of rows <= 8: short row tiles
])
def test_gemm_config_few_experts(rows_per_expert, num_experts, gated, expected):
    assert gemm_config(rows_per_expert, gated, num_experts=num_experts) == expected


@pytest.mark.parametrize("rows_per_expert,gated,tail_m", [
    (128, True, 0),    # two full blocks or one and a sliver: measured slower with a tail
    (129, True, 64),   # 129-384 rows gated: the last block in a 64-row tile where it fits
    (256, True, 64),   # Qwen3 at 4096 tokens, Mixtral at 1024 (probe_tail, stop 16)
    (384, True, 64),
    (385, True, 0),    # 512 and more: the branch cost the full tiles more than it saved
    (256, False, 0),   # the down projection: 128 x 256 tiles, no tail (flattened where many
    #                    experts; for few the tail's gain was within noise)
])
def test_gemm_config_tail_tiles(rows_per_expert, gated, tail_m):
    for num_experts in (8, 128):
        assert gemm_config(rows_per_expert, gated, num_experts=num_experts).tail_m == tail_m


@pytest.mark.parametrize("rows_per_expert,gated,num_experts,tail_m,group_m", [
    (128, False, 8, 64, 16),   # few experts' down projection: a sliver's block as a tail
    (64, False, 8, 64, 16),    # (probe_waves, stop 17: Mixtral at 512 tokens)
    (128, False, 128, 0, 8),   # many experts: the rows decide, no tail measured there
    (256, True, 8, 64, 16),    # few experts' gated tiles with tails: groups of 16
    (256, True, 128, 64, 8),   # many: groups of 8 (Qwen3 at 4096 tokens, stop 16)
    (512, True, 8, 0, 8),      # past the tails' range: not measured
])
def test_gemm_config_few_experts_tails_and_groups(rows_per_expert, gated, num_experts, tail_m,
                                                 group_m):
    cfg = gemm_config(rows_per_expert, gated, num_experts=num_experts)
    assert (cfg.tail_m, cfg.group_m) == (tail_m, group_m)


@pytest.mark.parametrize("num_experts", [None, 8, 128])
@pytest.mark.parametrize("rows_per_expert", [1, 8, 40, 100, 500])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("element_size", [2, 4])
def test_default_config_fits_shared_memory(rows_per_expert, gated, element_size, num_experts):
    # fp32 tiles at the bf16 stage counts needed 240-272 KiB: Triton refused them on an H200
    cfg = gemm_config(rows_per_expert, gated, element_size, num_experts=num_experts)
    assert shared_bytes(cfg, gated, element_size) <= 227 * 1024
    if element_size == 2:  # the bf16 configs are the swept ones, untouched by the fitting
        assert cfg.num_stages >= 3
    # a GPU with ~99 KiB a block (the 4-stage gated tile alone needs 144 KiB): fewer stages,
    # then shorter K tiles, never below what Triton can pipeline
    small = gemm_config(rows_per_expert, gated, element_size, shared_budget=92 * 1024,
                        num_experts=num_experts)
    assert shared_bytes(small, gated, element_size) <= 92 * 1024
    assert small.num_stages >= 2 and small.block_k >= 16
    assert small._replace(num_stages=cfg.num_stages, block_k=cfg.block_k) == cfg


def test_gemm_config_fitting_order():
    """Stages go first, K tiles only once at 2 stages. 100 rows gated: (128, 128, 64, 8, 8, 4),
    (128 + 2 * 128) * 64 * 2 bytes = 48 KiB a stage, buffered num_stages - 1 times: 4 stages
    need 144 KiB and 3 stages 96 KiB, both over 92 KiB; 2 stages need 48 KiB and fit. (Halving
    BLOCK_K first would give (128, 128, 32, 8, 8, 4) at 72 KiB.)"""
    cfg = gemm_config(100, True, 2, shared_budget=92 * 1024)
    assert cfg == GemmConfig(128, 128, 64, 8, 8, 2)


@pytest.mark.parametrize("tile,by_descriptor,experts,budget,wins", [
    (GemmConfig(128, 256, 64, 8, 8, 4), True, 128, None, True),    # Qwen3's down projection
    (GemmConfig(128, 256, 64, 8, 8, 4), True, 8, None, False),     # Mixtral's: no gain
    (GemmConfig(128, 256, 64, 8, 8, 4), False, 128, None, False),  # gathered rows: slower
    (GemmConfig(128, 128, 64, 8, 8, 4), True, 128, None, False),   # another tile: slower
    (GemmConfig(128, 256, 64, 8, 8, 4), True, 128, 92 * 1024, False),  # 224 KiB will not fit
])
def test_flatten_wins(tile, by_descriptor, experts, budget, wins):
    assert gg_configs.flatten_wins(tile, by_descriptor, experts, budget) is wins
