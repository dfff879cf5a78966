"""Forward combine kernel variants, each forced through `_fwd_config`, against float64.

`_fwd_config` picks the variant in production; here a monkeypatch pins one config per test so
every variant is checked whatever the heuristic says. Inputs, reference and tolerances are the
ones of test_fused_mul_sum.py, with NaN in every input row and weight that must not be read and
in the output before the call. Shapes are trailing-commented: T tokens, K top-k,
D hidden; on the CPU `_num_sms` is 4, so programs_per_sm=1 means 4 programs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ep_moe.kernels import fused_mul_sum as fms
from ep_moe.kernels import fused_mul_sum_rows, moe_fused_mul_sum
from test_fused_mul_sum import (DEVICE, TRITON_RUNS, Case, assert_close_to, combine_reference,
                                make_inputs)

pytestmark = pytest.mark.skipif(
    not TRITON_RUNS, reason="the Triton path needs CUDA or TRITON_INTERPRET=1")

PIPELINED = [
    fms.PipelinedFwdConfig(2, 64, 1, 1),    # 2 slots a round: K = 8 tokens take several
    #                                         rounds; 64-wide column blocks; 4 programs, so
    #                                         each streams many tokens through the pipeline
    fms.PipelinedFwdConfig(8, 256, 2, 100),  # every slot in one round (capped at K); one
    #                                         token per program: the pipeline only fills
    fms.PipelinedFwdConfig(4, 128, 1, 2),   # 4 slots a round, 8 programs
]
SHAPES = [
    (0, 2, 37),     # T=0: nothing launched
    (1, 1, 1),      # T=1, K=1, D=1: smallest everything
    (7, 3, 129),    # odd T, K=3 (BLOCK_K pads to 4), D one past a power of two
    (5, 8, 96),     # K=8: more counting slots than 2 or 4, so several rounds
    (130, 2, 64),   # many tokens per program, T not a multiple of the programs
    (3, 8, 2500),   # D above every block_d: several column blocks, the last one partial
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=PIPELINED, ids=str)
def config(request, monkeypatch):
    """Pin the variant: every forward in the test uses this config."""
    monkeypatch.setattr(fms, "_fwd_config", lambda K, D, has_map: request.param)
    return request.param


def poisoned(case: Case) -> Case:
    """NaN in the weight of every slot that does not count: it must never be read (make_inputs
    poisons the input rows only)."""
    return dataclasses.replace(
        case, topk_weights=case.topk_weights.masked_fill(~case.keep, float("nan")))


def forward(case: Case) -> torch.Tensor:
    """Public forward into a NaN-poisoned output (dense) or the gathered-rows entry point."""
    T, K = case.topk_weights.shape
    D = case.inputs.shape[-1]
    with torch.no_grad():
        if case.row_index is None:
            out = torch.full((T, D), float("nan"), dtype=case.inputs.dtype, device=DEVICE)
            assert moe_fused_mul_sum(case.inputs, case.topk_weights, out, case.topk_ids,
                                     case.expert_map) is out
            return out
        return fused_mul_sum_rows(case.inputs, case.topk_weights, case.row_index,
                                  case.topk_ids, case.expert_map)


def check_forward(case: Case):
    case = poisoned(case)
    out = forward(case)
    T, D = out.shape
    ref, _, _, ref_abs, _ = combine_reference(case, torch.zeros(T, D, device=DEVICE))
    assert_close_to("output", out, ref, ref_abs, case.inputs.dtype)
    assert (out[~case.keep.any(1)] == 0).all()  # tokens with no counting slot: exact zeros
    return out


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,D", SHAPES)
def test_matches_reference(config, T, K, D, dtype, gathered):
    """Expert map with ids below 0 and at or above E, half the experts local, the last token
    all remote; gathered: 20% of slots without a row and 3 rows nobody references."""
    check_forward(make_inputs(T, K, D, dtype, gathered=gathered))


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
@pytest.mark.parametrize("routing", ["none", "ids", "skip_all"])
def test_routing(config, routing, gathered):
    """Every stage combination: no routing (every slot counts; gathered: the layer's call,
    row index only), ids without a map, no local expert at all."""
    out = check_forward(make_inputs(9, 4, 40, torch.bfloat16, routing=routing,  # (T, K, D)
                                    gathered=gathered))
    if routing == "skip_all":
        assert (out == 0).all()


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
@pytest.mark.parametrize("ids_dtype,map_dtype", [(torch.int32, torch.int32),
                                                 (torch.int64, torch.int64),
                                                 (torch.int32, torch.int64),
                                                 (torch.int64, torch.int32)], ids=str)
def test_index_dtypes(config, ids_dtype, map_dtype, gathered):
    """The pipeline carries ids, map values and row indices in their own dtypes."""
    check_forward(make_inputs(11, 3, 33, ids_dtype=ids_dtype, map_dtype=map_dtype,  # (T, K, D)
                              gathered=gathered))


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_weights(config, weight_dtype):
    """Weights are carried in their dtype and upcast where they are used."""
    check_forward(make_inputs(7, 3, 129, torch.bfloat16, weight_dtype=weight_dtype))


@pytest.mark.parametrize("slots", [4, 32])
def test_k32_every_slot_counts(monkeypatch, slots):
    """K=32: slot 31 is the sign bit of the int32 mask; 4 slots a round take 8 rounds."""
    monkeypatch.setattr(fms, "_fwd_config",
                        lambda K, D, has_map: fms.PipelinedFwdConfig(slots, 64, 1, 1))
    check_forward(make_inputs(6, 32, 70, routing="none"))  # (T, K, D)
    check_forward(make_inputs(6, 32, 70, gathered=True))


def test_k_above_32_rejected(monkeypatch):
    """The mask of a token's counting slots is an int32: the variant refuses K > 32."""
    monkeypatch.setattr(fms, "_fwd_config",
                        lambda K, D, has_map: fms.PipelinedFwdConfig(4, 64, 1, 1))
    case = make_inputs(2, 33, 8)  # (T, K, D)
    with pytest.raises(ValueError, match="K <= 32"):
        forward(case)


def test_deterministic(config):
    case = poisoned(make_inputs(13, 8, 300, torch.bfloat16, gathered=True))  # (T, K, D)
    assert torch.equal(forward(case), forward(case))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offsets_beyond_int32(monkeypatch):
    """T * K * D and T * D above 2^31 elements (bf16 inputs 8.6 GB): the pipelined variant's
    pointer offsets must be int64. A few tokens at both ends are checked."""
    monkeypatch.setattr(fms, "_fwd_config",
                        lambda K, D, has_map: fms.PipelinedFwdConfig(2, 2048, 4, 4))
    T, K, D = 2**18 + 5, 2, 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.rand(T, K, device="cuda", generator=g) + 0.1
    ids = torch.randint(0, 4, (T, K), device="cuda", generator=g)
    emap = torch.tensor([0, -1, 1, 2], device="cuda")
    out = moe_fused_mul_sum(x, w, topk_ids=ids, expert_map=emap)  # (T, D)
    rows = torch.tensor([0, 1, T - 3, T - 2, T - 1], device="cuda")
    case = Case(x[rows], w[rows], ids[rows], emap, None, ids[rows] != 1)
    ref, _, _, ref_abs, _ = combine_reference(case, torch.zeros(5, D, device="cuda"))
    assert_close_to("output", out[rows], ref, ref_abs, torch.bfloat16)
