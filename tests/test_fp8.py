"""FP8 experts (`MoEConfig.expert_quant="fp8"`): the e4m3 group quantizer, the FP8 grouped GEMM
(`grouped_gemm_fp8`) and its tile configs, the layer against a float64 reference that applies
the same quantization (`reference_moe_fp8`), the three ways to build an FP8 layer (the config,
`quantize_experts`, `MoE.from_hf` on transformers' `FP8Experts`), FP8 send rows, the argument
checks, and (marked gpu) real shapes and CUDA graphs.

GEMM shapes are (counts, K, N) as in test_grouped_gemm.py; K and N (N/2 per half when gated)
are multiples of 128, the side of a scale block. The expert-parallel cases on gloo are in
test_distributed.py (kind "fp8"); the NCCL ones at the end here.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import triton
import triton.language as tl

from ep_moe import MoE, MoEConfig
from ep_moe.fp8 import (E4M3, E4M3_MAX, dequantize_blocks, expert_weight_bytes,
                        quantize_blocks, quantize_groups)
from ep_moe.kernels.common import quantize_fp8
from ep_moe.kernels.dispatch_layout import (FP8_ROWS, dispatch_layout, gather_send_rows,
                                            packed_row, packed_scales, push_send_rows,
                                            split_packed)
from ep_moe.kernels.gemm_configs import (GemmConfig, check_config, fp8_gemm_config,
                                         shared_bytes)
from ep_moe.kernels.grouped_gemm import grouped_gemm_fp8, quantize_rows
from ep_moe.plan import plan_forward
from ep_moe.reference import reference_moe, reference_moe_fp8

from conftest import DEVICE, ROUNDING, TRITON_RUNS, capture_no_grad, needs_triton
from gemm_cases import expert_products

# Allowed errors. The e4m3 products are exact in fp32 and the scales are applied once per
# 128-wide K step, so against a float64 reference on the same quantized values the kernels
# differ only by the order of their fp32 sums (ACCUM_RTOL of the sum of |terms|: K * 2^-24
# covers K <= 168 outright; random-sign roundings grow as sqrt(K) * 2^-24, far below it at the
# K = 256 here) and by the rounding of what they store (ROUNDING of the output dtype). On a GPU
# the FP8 tensor cores keep ~14 bits over a K step of 128 products (DeepSeek-V3 report 3.3.2):
# 2^-12 of the |terms| there.
ACCUM_RTOL = 1e-5 if DEVICE.type == "cpu" else 2.0**-12


def _step(v: torch.Tensor) -> torch.Tensor:
    """The e4m3 grid's spacing at v (in units of the scale)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0**-6))) - 3)


# --------------------------------------------------------------------------------------------
# The quantizer: kernel against torch, bit for bit
# --------------------------------------------------------------------------------------------

@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, M, BLOCK_M: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, 128)
    ok = (m < M)[:, None]
    q, s = quantize_fp8(tl.load(x_ptr + m[:, None] * 128 + c[None, :], mask=ok, other=0.0))
    tl.store(q_ptr + m[:, None] * 128 + c[None, :], q, mask=ok)
    tl.store(s_ptr + m, s, mask=m < M)


def _quantize_in_kernel(x):
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    s = torch.full((x.shape[0],), float("nan"), device=x.device)
    _quantize_kernel[(triton.cdiv(x.shape[0], 16),)](x, q, s, x.shape[0], BLOCK_M=16)
    return q, s


def _hard_rows():
    """Rows that probe the rounding: each e4m3 grid value, each midpoint between neighbours
    (ties: to even) and one fp32 ulp either side, subnormals, a zero row, a row far below
    FP8_EPS, a NaN; every row holds 448 so its scale is exactly 1 and values land as written."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)),
                        mids.nextafter(torch.tensor(1e9)), -mids])
    pad = (-values.numel()) % 127
    rows = torch.cat([values, values.new_zeros(pad)]).view(-1, 127)
    rows = torch.cat([rows, rows.new_full((rows.shape[0], 1), E4M3_MAX)], 1)
    extra = torch.zeros(3, 128)
    extra[1] = 1e-30  # below FP8_EPS: scaled by it, no overflow
    extra[2, 5] = float("nan")  # stays NaN; its group's other values keep finite scales
    return torch.cat([rows, extra])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_rows_matches_torch_bit_for_bit(dtype):
    """The one-pass row quantizer: rows past a 16-row block, a strided view, three groups;
    the same bits as `quantize_groups` (NaN stays NaN in its group)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(37, 512, generator=g) * torch.exp2(
        torch.randint(-12, 12, (37, 1), generator=g).float())
    wide[5, 130] = float("nan")
    wide[6] = 0.0
    x = wide.to(DEVICE, dtype)[:, :384]  # row stride 512
    q, scale = quantize_rows(x)
    q_ref, scale_ref = quantize_groups(x)
    assert q.dtype == E4M3 and q.shape == (37, 384) and scale.shape == (37, 3)
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)) | (q.isnan() & q_ref.isnan())
    assert same.all(), f"{int((~same).sum())} e4m3 values differ"
    assert torch.equal(scale, scale_ref)
    assert q[5].isnan().sum() == 1 and torch.isfinite(scale).all()
    empty_q, empty_s = quantize_rows(x[:0])
    assert empty_q.shape == (0, 384) and empty_s.shape == (0, 3)


@pytest.mark.parametrize("x, error, match", [
    (torch.zeros(4, 100), ValueError, r"x must have D a multiple of 128.*\(4, 100\)"),
    (torch.zeros(128, 4).t(), ValueError, r"x must have D.*strides \(1, 4\)"),
    (torch.zeros(4, 128, dtype=torch.int32), TypeError, "x must have dtype"),
    (torch.zeros(128), ValueError, "x must be 2-D"),
], ids=["d100", "columns_strided", "int", "1d"])
def test_quantize_rows_validation(x, error, match):
    with pytest.raises(error, match=match):
        quantize_rows(x.to(DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantizer_matches_torch_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.exp2(torch.randint(-12, 12, (64, 1),
                                                                     generator=g).float())
    if dtype == torch.float32:
        x = torch.cat([x, _hard_rows()])
    x = x.to(DEVICE, dtype)
    q, s = _quantize_in_kernel(x)
    q_ref, s_ref = quantize_groups(x)
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)) | (q.isnan() & q_ref.isnan())
    assert same.all(), f"{int((~same).sum())} e4m3 values differ, first at " \
                       f"{tuple((~same).nonzero()[0].tolist())}"
    assert torch.equal(s, s_ref[:, 0])
    if dtype == torch.float32:  # the hard rows: scale 1, so q is x rounded to nearest even
        hard = _hard_rows().shape[0] - 3
        rows = slice(64, 64 + hard)
        assert (s[rows] == 1).all()
        xs = x[rows].double()
        err = (q[rows].double() - xs).abs()
        assert (err <= _step(xs) / 2).all()
        assert q[-1].isnan().sum() == 1 and torch.isfinite(s[-3:]).all()


def test_quantize_blocks_roundtrip():
    """One scale per 128 x 128 block (amax / 448); each value within half an e4m3 step."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 256, 384, generator=g)
    w[0, :128, :128] *= 1e3  # one loud block must not change its neighbours' scales
    w[1, 128:, 256:] = 0.0  # an all-zero block: finite scale, zeros
    q, s = quantize_blocks(w)
    assert q.dtype == E4M3 and s.shape == (2, 2, 3) and s.dtype == torch.float32
    amax = w.abs().unflatten(-1, (3, 128)).unflatten(1, (2, 128)).amax((2, 4))
    assert torch.allclose(s, (amax / 448).clamp(min=1e-10 / 448), rtol=1e-6)
    back = dequantize_blocks(q, s, torch.float64)
    s_full = s.double().repeat_interleave(128, 1).repeat_interleave(128, 2)
    v = w.double() / s_full
    assert ((back - w.double()).abs() <= _step(v) / 2 * s_full * (1 + 1e-6)).all()
    assert (back[1, 128:, 256:] == 0).all()


# --------------------------------------------------------------------------------------------
# The FP8 grouped GEMM against a float64 reference on the same quantized values
# --------------------------------------------------------------------------------------------

def make_gemm_inputs(counts, K, N, a_dtype, gather, seed=0):
    """(a, a_scale, w, w_scale, counts, a_rows): w quantized from random blocks of magnitudes
    2^-3..2^3 (so a scale read from the wrong block shows), rows of magnitudes 2^-4..2^4 and
    one zero row; gather: a has about P/2 rows, NaN in the one never picked."""
    g = torch.Generator().manual_seed(seed)
    e, P = len(counts), sum(counts)
    M = P // 2 + 2 if gather else P
    a = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-4, 5, (M, 1), generator=g)
                                                   .float())
    if M > 1:
        a[1] = 0.0
    block = torch.exp2(torch.randint(-3, 4, (e, N // 128, 1, K // 128, 1), generator=g).float())
    w = (torch.randn(e, N // 128, 128, K // 128, 128, generator=g) * block).view(e, N, K)
    w_q, w_scale = quantize_blocks(w / K ** 0.5)
    a_rows = None
    if gather:
        perm = torch.randperm(M, generator=g)
        a_rows = perm[:M - 1][torch.randint(0, M - 1, (P,), generator=g)]
        a[perm[M - 1]] = float("nan")  # never read
        a_rows = a_rows.to(DEVICE)
    a_scale = None
    if a_dtype == E4M3:
        a, a_scale = quantize_groups(a)
        a_scale = a_scale.to(DEVICE)
    return (a.to(DEVICE, a_dtype), a_scale, w_q.to(DEVICE), w_scale.to(DEVICE),
            torch.tensor(counts, device=DEVICE), a_rows)


def gemm_reference(a, a_scale, w, w_scale, counts, a_rows, activation, gated):
    """float64 per expert `act(rows @ dequant(w).T)` on the rows as the kernel quantizes them,
    and the sum of |terms| carried through the epilogue (the fp32 sums' error bound)."""
    q, s = (a, a_scale) if a_scale is not None else quantize_groups(a)
    rows = (q.double().unflatten(-1, (-1, 128)) * s.double()[..., None]).flatten(-2)
    if a_rows is not None:
        rows = rows[a_rows.long()]
    return expert_products(rows, dequantize_blocks(w, w_scale, torch.float64), counts,
                           activation, gated)


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill what `grouped_gemm_fp8` allocates (e4m3 outputs and fp32 scales too)."""
    new_empty = torch.Tensor.new_empty

    def nan_empty(self, *size, **kwargs):
        out = new_empty(self, *size, **kwargs)
        if out.dtype == E4M3:
            out.view(torch.uint8).fill_(0x7F)  # e4m3's NaN
        elif out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_empty)


def assert_16bit_close(out, ref, bound, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite"
    err = (out.double() - ref).abs()
    bad = err > ROUNDING[dtype] * ref.abs() + ACCUM_RTOL * bound
    assert not bad.any(), f"{int(bad.sum())}/{bad.numel()} off, worst {float(err.max()):.3g}"


def assert_e4m3_close(q, scale, ref, bound):
    """An e4m3 output with a scale per row and 128 columns: the scale is amax / 448 of the
    row's group, and each value within half an e4m3 step (plus the fp32 sums' error)."""
    assert q.dtype == E4M3 and scale.shape == (ref.shape[0], ref.shape[1] // 128)
    assert torch.isfinite(scale).all() and torch.isfinite(q.float()).all()
    groups = (ref.shape[0], ref.shape[1] // 128, 128)
    amax = ref.abs().view(groups).amax(-1).clamp(min=1e-10)  # FP8_EPS: a zero group's
    err_amax = (ACCUM_RTOL * bound).view(groups).amax(-1)
    assert ((scale.double() * E4M3_MAX - amax).abs() <= err_amax + 1e-6 * amax + 1e-30).all()
    s = scale.double().repeat_interleave(128, 1)
    got = q.double() * s
    v = ref / s
    bad = (got - ref).abs() > _step(v) / 2 * s + ACCUM_RTOL * bound + 1e-6 * ref.abs()
    assert not bad.any(), f"{int(bad.sum())}/{bad.numel()} e4m3 values off"


GEMM_CASES = [
    # (counts, K, N, activation, gated)
    ([5, 0, 19, 0], 256, 256, "silu", True),  # empty experts; 19 rows: two 16-row blocks;
    #                                            gate | up halves of 128 columns each
    ([0, 7, 9], 128, 384, None, True),  # leading empty expert; one K step; no epilogue, 3
    #                                      column blocks (one scale row each)
    ([3], 384, 256, "gelu", True),  # e = 1, three K steps
    ([4, 6], 256, 128, "relu", False),  # a plain activation: N = 128, one group
    ([0, 0], 128, 256, "silu", True),  # P = 0: nothing launched
]
GEMM_IDS = ["silu_empty_experts", "none_k128", "gelu_e1_k384", "relu_plain", "p0"]


@needs_triton
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float32, E4M3], ids=str)
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
@pytest.mark.parametrize("counts,K,N,activation,gated", GEMM_CASES, ids=GEMM_IDS)
def test_gemm_matches_reference(poisoned, counts, K, N, activation, gated, a_dtype, gather):
    """16-bit output: the rows quantized as they load (bf16 / fp32 a) or taken quantized (e4m3
    a with its scales), block scales per K step, the epilogue's activation."""
    a, a_scale, w, w_scale, cnt, a_rows = make_gemm_inputs(counts, K, N, a_dtype, gather)
    out = grouped_gemm_fp8(a, w, w_scale, cnt, a_rows=a_rows, a_scale=a_scale,
                           activation=activation, gated=gated, out_dtype=torch.bfloat16)
    ref, bound = gemm_reference(a, a_scale, w, w_scale, cnt, a_rows, activation, gated)
    assert_16bit_close(out, ref, bound, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
@pytest.mark.parametrize("counts,K,N,activation,gated", GEMM_CASES[:1] + GEMM_CASES[3:],
                         ids=[GEMM_IDS[0], *GEMM_IDS[3:]])
def test_gemm_quantized_output(poisoned, counts, K, N, activation, gated, gather):
    """e4m3 output: the epilogue quantizes each row's 128 columns (the down GEMM's input)."""
    a, a_scale, w, w_scale, cnt, a_rows = make_gemm_inputs(counts, K, N, torch.bfloat16,
                                                           gather, seed=1)
    q, scale = grouped_gemm_fp8(a, w, w_scale, cnt, a_rows=a_rows, activation=activation,
                                gated=gated, out_dtype=E4M3)
    ref, bound = gemm_reference(a, a_scale, w, w_scale, cnt, a_rows, activation, gated)
    assert_e4m3_close(q, scale, ref, bound)


@needs_triton
@pytest.mark.parametrize("config,persistent,tma", [
    (GemmConfig(16, 128, 128, 1, 4, 4), False, False),  # the decode tile
    (GemmConfig(64, 128, 128, 4, 4, 3), True, False),  # persistent: 4 programs loop on CPU
    (GemmConfig(128, 128, 128, 8, 8, 3), False, True),  # descriptor loads (interpreter)
    (GemmConfig(128, 128, 128, 2, 8, 3, 64), True, True),  # tail tiles, persistent, TMA
], ids=["decode", "persistent", "tma", "tail_persistent_tma"])
def test_gemm_pinned_configs(poisoned, config, persistent, tma):
    """Both GEMMs of the FP8 path (gathered bf16 rows -> e4m3 h, then e4m3 h -> bf16) through
    each loop shape: the rows not gathered read through descriptors where `tma`."""
    counts = [70, 0, 45]  # a 128-row tile with a 64-row tail for each expert
    a, _, w, w_scale, cnt, a_rows = make_gemm_inputs(counts, 256, 256, torch.bfloat16, True,
                                                     seed=2)
    h, h_scale = grouped_gemm_fp8(a, w, w_scale, cnt, a_rows=a_rows, activation="silu",
                                  out_dtype=E4M3, config=config, persistent=persistent)
    ref, bound = gemm_reference(a, None, w, w_scale, cnt, a_rows, "silu", True)
    assert_e4m3_close(h, h_scale, ref, bound)
    _, _, w2, w2_scale, _, _ = make_gemm_inputs(counts, 128, 256, torch.bfloat16, False, seed=3)
    out = grouped_gemm_fp8(h, w2, w2_scale, cnt, a_scale=h_scale, out_dtype=torch.bfloat16,
                           config=config, persistent=persistent, tma=tma)
    ref2, bound2 = gemm_reference(h, h_scale, w2, w2_scale, cnt, None, None, True)
    assert_16bit_close(out, ref2, bound2, torch.bfloat16)


@needs_triton
def test_gemm_rows_past_the_counts_unwritten(poisoned):
    """P a bound (a fixed-size exchange): rows past the counts' sum are left as they were."""
    a, _, w, w_scale, cnt, _ = make_gemm_inputs([6, 3], 128, 256, torch.bfloat16, False)
    a = torch.cat([a, a[:5]])  # 5 more rows than the counts cover
    q, scale = grouped_gemm_fp8(a, w, w_scale, cnt, activation="silu", out_dtype=E4M3)
    assert q[9:].float().isnan().all() and scale[9:].isnan().all()
    assert not q[:9].float().isnan().any() and not scale[:9].isnan().any()


def _gemm_args(**changes):
    a, a_scale, w, w_scale, cnt, _ = make_gemm_inputs([2, 3], 128, 256, torch.bfloat16, False)
    args = dict(a=a, w=w, w_scale=w_scale, num_tokens_per_expert=cnt, activation="silu")
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    return {**args, **changes}


@pytest.mark.parametrize("changes,error,match", [
    (dict(w=torch.zeros(2, 256, 128)), TypeError, r"^w must have dtype"),
    (dict(w_scale=torch.ones(2, 2, 2)), ValueError, r"^w_scale must be \(2, 2, 1\)"),
    (dict(w_scale=torch.ones(2, 2, 1, dtype=torch.float64)), TypeError,
     r"^w_scale must have dtype"),
    (dict(a=torch.zeros(5, 100), w=torch.zeros(2, 256, 100, dtype=E4M3)), ValueError,
     r"^w must be \(e, N, K\) with K > 0 and N / 2 multiples of 128"),
    (dict(w=torch.zeros(2, 128, 128, dtype=E4M3)), ValueError, r"N / 2 multiples of 128"),
    (dict(a=torch.zeros(5, 128, dtype=E4M3)), ValueError, r"^a_scale must be given exactly"),
    (dict(a_scale=torch.ones(5, 1)), ValueError, r"^a_scale must be given exactly"),
    (dict(a=torch.zeros(5, 128, dtype=E4M3), a_scale=torch.ones(5, 2)), ValueError,
     r"^a_scale must be \(5, 1\)"),
    (dict(out_dtype=torch.int8), TypeError, r"^out_dtype must be"),
    (dict(config=GemmConfig(16, 128, 64, 1, 4, 2)), ValueError, r"^config must have block_k"),
    (dict(config=GemmConfig(16, 256, 128, 1, 4, 2), out_dtype=E4M3), ValueError,
     r"block_n = 128"),
], ids=["w_bf16", "w_scale_shape", "w_scale_f64", "K_100", "half_N_64", "a_e4m3_no_scale",
        "scale_for_bf16_a", "a_scale_shape", "out_int8", "block_k_64", "block_n_256_e4m3"])
def test_gemm_validation(changes, error, match):
    with pytest.raises(error, match=match):
        grouped_gemm_fp8(**_gemm_args(**changes))


@pytest.mark.parametrize("rows_per_expert", [0.5, 1, 8, 16, 17, 40, 64, 65, 200, 1000, 4096])
@pytest.mark.parametrize("quantized_out", [True, False])
@pytest.mark.parametrize("a_bytes", [1, 2, 4])
@pytest.mark.parametrize("budget_kib", [220, 156, 92])  # Hopper, A100, ~99 KiB GPUs
def test_fp8_configs(rows_per_expert, quantized_out, a_bytes, budget_kib):
    """Valid tiles that fit the shared memory: block_k 128 (a scale block a K step), block_n
    128 where the epilogue quantizes (a group a tile), at least 2 stages, tl.dot's 16 rows."""
    cfg = fp8_gemm_config(rows_per_expert, quantized_out, a_bytes, budget_kib * 1024)
    check_config(cfg)
    assert cfg.block_k == 128 and cfg.block_m >= 16 and cfg.num_stages >= 2
    if quantized_out:
        assert cfg.block_n == 128
    assert shared_bytes(cfg, quantized_out, a_bytes, 1) <= budget_kib * 1024
    if budget_kib == 220 and a_bytes <= 2:  # Hopper: the configs as written, not fitted
        assert cfg == fp8_gemm_config(rows_per_expert, quantized_out, a_bytes, 1 << 30)


@pytest.mark.parametrize("rows_per_expert", [1, 16, 17, 64, 65, 4096])
def test_fp8_configs_by_rows(rows_per_expert):
    """16-row tiles up to 16 rows an expert (decode: the weights' bytes bound it), 64-row
    tiles above (128 rows spill the accumulators); the gated GEMM with 8 warps past decode."""
    for first in (True, False):
        cfg = fp8_gemm_config(rows_per_expert, first, 1)
        assert cfg.block_m == (16 if rows_per_expert <= 16 else 64)
        if first and rows_per_expert > 16:
            assert cfg.num_warps == 8


# --------------------------------------------------------------------------------------------
# The layer against the float64 reference
# --------------------------------------------------------------------------------------------

def fp8_config(**changes) -> MoEConfig:
    # D = 128, I = 256 (two 128-column groups of h), E = 4, K = 2; init_std ~1/sqrt(D) puts
    # pre-activations at O(1)
    base = dict(hidden_size=128, intermediate_size=256, num_experts=4, top_k=2, init_std=0.08,
                expert_quant="fp8")
    return MoEConfig(**{**base, **changes})


LAYER_CONFIGS = {
    "silu": fp8_config(),
    "gelu_K4_of_4": fp8_config(activation="gelu", top_k=4),  # K = E: every expert every token
    "relu_plain": fp8_config(activation="relu", gated=False, intermediate_size=128),
    # DeepSeek-V3 routing and a shared expert (16-bit, beside the FP8 routed experts)
    "deepseek": fp8_config(num_experts=8, top_k=3, score_func="sigmoid", num_expert_groups=4,
                           topk_groups=2, use_correction_bias=True, routed_scaling_factor=2.5,
                           num_shared_experts=1, shared_intermediate_size=128),
}


def allowed_error(ref, dtype, config):
    """Each expert output and the combine round to the layer's dtype (ROUNDING of |y| and of
    each partial; a 16-bit shared MLP beside them, ~6 roundings of its terms), the fp32 sums
    (ACCUM_RTOL), and the rare intermediate that fp32 may round to the other e4m3 neighbour
    (the reference's slack)."""
    rounding = ROUNDING[dtype] * (6 if config.num_shared_experts else 1)
    return rounding * (ref.y.abs() + 2 * ref.partial_abs) + ACCUM_RTOL * ref.accum + ref.slack


def check_layer(layer, x, what="", stored_dtype=None):
    """The layer's no-grad output against `reference_moe_fp8` on its own weights, with its
    expert choice pinned, within `allowed_error`. stored_dtype: the dtype the path stores the
    first GEMM's output in before the activation (`reference_moe_fp8`)."""
    with torch.no_grad():
        y, route = layer(x, return_router_output=True)
    ref = reference_moe_fp8(x.reshape(-1, x.shape[-1]).cpu(),
                            {k: v.cpu() for k, v in layer.state_dict().items()}, layer.config,
                            topk_ids=route.topk_ids.cpu(), accum_rtol=ACCUM_RTOL,
                            stored_dtype=stored_dtype)
    assert y.shape == x.shape and y.dtype == x.dtype
    y = y.reshape(-1, x.shape[-1]).cpu().double()
    allowed = allowed_error(ref, x.dtype, layer.config)
    err = (y - ref.y).abs()
    bad = ~(err <= allowed)
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} off, worst ratio " \
                          f"{float((err / allowed).max()):.3g}"
    return y, route


def _fp8_layer(config, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    layer = MoE(config, device=DEVICE, dtype=dtype)
    if layer.router.e_score_correction_bias is not None:
        with torch.no_grad():
            layer.router.e_score_correction_bias.normal_(0.0, 0.05)
    return layer.eval()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_layer_matches_reference(name, dtype):
    layer = _fp8_layer(LAYER_CONFIGS[name], dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 128, generator=g)
    x[3] *= 100  # a loud token: its own scales, the others' unchanged
    check_layer(layer, x.to(DEVICE, dtype), name)


@needs_triton
@pytest.mark.parametrize("T", [32, 33])  # 16 rows an expert (quantized in the GEMM), then 16.5
def test_layer_quantizes_rows_first_past_decode(T, monkeypatch):
    """Past FP8_QUANTIZE_IN_GEMM_MAX_ROWS rows an expert the tokens are quantized once, then
    gathered as e4m3: the same output within the reference's bound either way."""
    import ep_moe.experts as experts_module

    calls = []
    monkeypatch.setattr(experts_module, "quantize_rows",
                        lambda x: calls.append(x.shape) or quantize_rows(x))
    layer = _fp8_layer(LAYER_CONFIGS["silu"])  # E = 4, K = 2: T / 2 rows an expert
    x = torch.randn(T, 128, device=DEVICE, dtype=torch.bfloat16)
    check_layer(layer, x, f"T={T}")
    assert calls == ([] if T * 2 / 4 <= experts_module.FP8_QUANTIZE_IN_GEMM_MAX_ROWS
                     else [(T, 128)])


@needs_triton
def test_layer_token_counts():
    layer = _fp8_layer(LAYER_CONFIGS["silu"])
    for T in (0, 1):
        x = torch.randn(T, 128, device=DEVICE, dtype=torch.bfloat16)
        check_layer(layer, x, f"T={T}")
    x = torch.randn(2, 3, 128, device=DEVICE, dtype=torch.bfloat16)  # (..., D)
    check_layer(layer, x, "(2, 3, D)")


@needs_triton
def test_layer_compiles():
    """torch.compile(fullgraph=True) traces the FP8 experts as the Triton path's one custom op
    (aot_eager: the graph Inductor would get), the same kernels as eager."""
    from test_compile import compile_recording_ops

    layer = _fp8_layer(LAYER_CONFIGS["silu"])
    x = torch.randn(11, 128, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        plan = layer.plan(x)
        eager = layer(x)
        compiled_layer, ops = compile_recording_ops(layer)
        compiled = compiled_layer(x)
    assert plan.experts == "triton_fp8" and "triton_partials" in ops, ops
    # the same kernels on the same inputs: within one bf16 rounding of each other
    assert ((compiled.double() - eager.double()).norm() / eager.double().norm()) < 2.0**-8


def test_plan_shows_fp8():
    """One more entry of the plan: experts "triton_fp8" at every token count where cuBLAS's
    block-scaled GEMM does not run, and FP8 rows in an all-to-all (not in an all-gather, nor on
    one rank)."""
    cfg = MoEConfig.qwen3_30b_a3b(expert_quant="fp8")
    kw = dict(num_local_experts=32, device_type="cuda", dtype=torch.bfloat16, triton=True,
              grad=False)
    for T in (1, 4096, 65536):
        p = plan_forward(cfg, world_size=1, num_tokens=T, **kw)
        assert p.experts == "triton_fp8" and not p.fp8_dispatch
    p = plan_forward(cfg, world_size=4, num_tokens=64, **kw)
    assert p.experts == "triton_fp8" and p.fp8_dispatch and "fp8_dispatch=True" in repr(p)
    p = plan_forward(cfg.replace(dispatcher="allgather"), world_size=4, num_tokens=64, **kw)
    assert p.experts == "triton_fp8" and not p.fp8_dispatch
    p = plan_forward(cfg.replace(expert_impl="triton", max_tokens_per_rank=64), world_size=4,
                     num_tokens=64, peer_exchange=True, **kw)
    assert (p.experts, p.exchange, p.fp8_dispatch) == ("triton_fp8", "nvlink", True)


def test_plan_refuses_training_and_missing_triton():
    cfg = MoEConfig.mixtral_8x7b(expert_quant="fp8")
    kw = dict(world_size=1, num_local_experts=8, num_tokens=16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"expert_quant='fp8' is inference only.*no_grad"):
        plan_forward(cfg, device_type="cuda", triton=True, grad=True, **kw)
    with pytest.raises(ValueError, match=r"expert_quant='fp8' runs Triton.*TRITON_INTERPRET=1"
                                         r".*got x on cpu"):
        plan_forward(cfg, device_type="cpu", triton=False, grad=False, **kw)


def test_forward_with_gradients_raises():
    layer = MoE(fp8_config(), device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(4, 128, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expert_quant='fp8' is inference only"):
        layer(x)  # the router's weight requires grad
    with pytest.raises(RuntimeError, match="FP8 experts .* run `fused_forward` only"):
        layer.experts.dense(x)


@pytest.mark.parametrize("changes,match", [
    (dict(hidden_size=96), r"needs hidden_size to be a multiple of 128.*got hidden_size=96"),
    (dict(intermediate_size=200), r"intermediate_size to be a multiple of 128.*=200"),
    (dict(expert_impl="grouped_mm"),
     r"expert_impl must be 'auto', 'triton' or 'per_expert', got 'grouped_mm'"),
    (dict(expert_quant="int8"), r"expert_quant must be one of \('none', 'fp8'\), got 'int8'"),
])
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        fp8_config(**changes)


# --------------------------------------------------------------------------------------------
# Building an FP8 layer: the config, quantize_experts, load_state_dict, .to()
# --------------------------------------------------------------------------------------------

def test_config_builds_fp8_experts():
    layer = MoE(fp8_config(), dtype=torch.bfloat16)
    sd = layer.state_dict()
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items() if k.startswith("experts.")}
    assert shapes == {
        "experts.gate_up_proj": ((4, 512, 128), E4M3),
        "experts.gate_up_proj_scale_inv": ((4, 4, 1), torch.float32),
        "experts.down_proj": ((4, 128, 256), E4M3),
        "experts.down_proj_scale_inv": ((4, 1, 2), torch.float32)}
    assert sd["router.weight"].dtype == torch.bfloat16
    assert (sd["experts.gate_up_proj_scale_inv"] > 0).all()
    assert not any(p.requires_grad for p in layer.experts.parameters())
    # drawn per expert from the seed, as bf16 layers are: W-independent, reproducible
    torch.manual_seed(3)
    a = MoE(fp8_config()).state_dict()
    torch.manual_seed(3)
    b = MoE(fp8_config()).state_dict()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == E4M3 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == E4M3 else b[k]) for k in a)
    assert "experts=fp8" in repr(layer)


@needs_triton
def test_quantize_experts():
    """A bf16 layer quantized in place: its experts' blocks quantized, router and shared
    experts untouched, the config says fp8; the output moves from the bf16 layer's by what
    e4m3 rounding of weights and activations gives (~2^-4 / sqrt(3) per operand, four of them)."""
    cfg = fp8_config(expert_quant="none", num_shared_experts=1, shared_intermediate_size=128)
    torch.manual_seed(0)
    layer = MoE(cfg, device=DEVICE, dtype=torch.bfloat16).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(16, 128, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        y_bf16 = layer(x)
    assert layer.quantize_experts("fp8") is layer
    assert layer.config.expert_quant == "fp8"
    assert layer.experts.config is layer.config and layer.router.config is layer.config
    sd = layer.state_dict()
    for name in ("gate_up_proj", "down_proj"):
        q, s = quantize_blocks(before[f"experts.{name}"])
        assert torch.equal(sd[f"experts.{name}"].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(sd[f"experts.{name}_scale_inv"], s)
    for k in before:
        if not k.startswith("experts."):
            assert torch.equal(sd[k], before[k]), k
    y, _ = check_layer(layer, x, "quantized")
    rel = ((y - y_bf16.cpu().double()).norm() / y_bf16.double().norm()).item()
    assert 1e-3 < rel < 0.1, rel
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize_experts("fp8")
    with pytest.raises(ValueError, match="fmt must be 'fp8', got 'int4'"):
        MoE(MoEConfig.tiny()).quantize_experts("int4")
    with pytest.raises(ValueError, match="hidden_size to be a multiple of 128.*got hidden_size=16"):
        MoE(MoEConfig.tiny()).quantize_experts("fp8")


def test_dtype_casts_keep_the_fp8_weights():
    layer = MoE(fp8_config(), dtype=torch.bfloat16)
    q = layer.experts.gate_up_proj.detach().clone()
    s = layer.experts.gate_up_proj_scale_inv.detach().clone()
    for cast, dtype in ((lambda m: m.to(torch.float32), torch.float32),
                        (lambda m: m.half(), torch.float16),
                        (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16)):
        cast(layer)
        assert layer.experts.gate_up_proj.dtype == E4M3
        assert torch.equal(layer.experts.gate_up_proj.view(torch.uint8), q.view(torch.uint8))
        assert layer.experts.gate_up_proj_scale_inv.dtype == torch.float32
        assert torch.equal(layer.experts.gate_up_proj_scale_inv, s)
        assert layer.experts.activation_dtype == dtype == layer.router.weight.dtype
    with pytest.raises(ValueError, match=r"x must match the layer's parameters \(torch.bfloat16"):
        layer(torch.randn(2, 128))


def _bad_scale(kind):
    s = torch.full((4, 4, 1), 0.01)
    if kind == "shape":
        return torch.ones(4, 4, 2)
    s[1, 2, 0] = {"zero": 0.0, "negative": -1.0, "nan": float("nan"), "inf": float("inf")}[kind]
    return s


@pytest.mark.parametrize("kind,error,match", [
    ("shape", ValueError, r"gate_up_proj_scale_inv must have shape \(4, 4, 1\) .*got \(4, 4, 2\)"),
    ("zero", ValueError, r"gate_up_proj_scale_inv must hold positive finite scales, got 0\.0 "
                         r"at \(1, 2, 0\)"),
    ("negative", ValueError, r"positive finite scales, got -1\.0 at \(1, 2, 0\)"),
    ("nan", ValueError, r"positive finite scales, got nan at \(1, 2, 0\)"),
    ("inf", ValueError, r"positive finite scales, got inf"),
])
def test_bad_scales(kind, error, match):
    """Through `set_fp8_weights`, `load_state_dict` and `load_full_state_dict`: the error names
    the argument (or state dict key) and what it got, and nothing is loaded."""
    layer = MoE(fp8_config())
    e = layer.experts
    args = [e.gate_up_proj, e.gate_up_proj_scale_inv, e.down_proj, e.down_proj_scale_inv]
    before = e.gate_up_proj_scale_inv.clone()
    with pytest.raises(error, match=match):
        e.set_fp8_weights(args[0], _bad_scale(kind), *args[2:])
    sd = dict(layer.state_dict())
    sd["experts.gate_up_proj_scale_inv"] = _bad_scale(kind)
    for load in (layer.load_state_dict, layer.load_full_state_dict):
        with pytest.raises(error, match=match) as info:
            load(sd)
        assert str(info.value).startswith("experts.gate_up_proj_scale_inv ")
    assert torch.equal(e.gate_up_proj_scale_inv, before)


def test_bad_weights():
    e = MoE(fp8_config()).experts
    s13, s2 = e.gate_up_proj_scale_inv, e.down_proj_scale_inv
    with pytest.raises(TypeError, match=r"^gate_up_proj must be a torch.float8_e4m3fn tensor, "
                                        r"got torch.bfloat16"):
        e.set_fp8_weights(e.gate_up_proj.to(torch.bfloat16), s13, e.down_proj, s2)
    with pytest.raises(ValueError, match=r"^down_proj must have shape \(4, 128, 256\), got "
                                         r"\(4, 128, 128\)"):
        e.set_fp8_weights(e.gate_up_proj, s13, e.down_proj[..., :128], s2)
    with pytest.raises(RuntimeError, match="set_fp8_weights needs FP8 experts"):
        MoE(MoEConfig.tiny()).experts.set_fp8_weights(*[None] * 4)


def test_weight_bytes():
    # Mixtral 8x7B: 3 * 4096 * 14336 values an expert; FP8 adds 224 x 32 + 32 x 112 fp32 scales
    values = 3 * 4096 * 14336
    assert expert_weight_bytes(4096, 14336) == 2 * values
    assert expert_weight_bytes(4096, 14336, fp8=True) == values + 4 * (224 * 32 + 32 * 112)
    assert expert_weight_bytes(128, 128, gated=False, fp8=True) == 2 * 128 * 128 + 4 * 2


# --------------------------------------------------------------------------------------------
# FP8 send rows: quantized as the send kernel gathers them
# --------------------------------------------------------------------------------------------

def test_packed_row_bytes():
    """e4m3 values, D / 128 fp32 scales, 2K fp32 routing words, 16-byte padding."""
    assert packed_row(7168, 8, FP8_ROWS) == (7456, 7392)  # DeepSeek-V3: 0.52x bf16's 14400
    assert packed_row(7168, 8, torch.bfloat16)[0] * 2 == 14400
    assert packed_row(4096, 2, FP8_ROWS) == (4240, 4224)  # Mixtral: 0.52x of 8208
    assert packed_row(128, 1, FP8_ROWS) == (144, 132)


@pytest.mark.parametrize("capacity", [0, 9], ids=["packed", "fixed"])
@pytest.mark.parametrize("T", [7, 0])
def test_send_rows_fp8(capacity, T):
    """Each row sent holds the token's e4m3 values and scales, bit for bit those of
    `quantize_groups`, then its routing; padding rows zeros with ids -1. On CPU without the
    interpreter (and at T = 0) the torch version writes the same."""
    g = torch.Generator().manual_seed(0)
    W, E, K, D = 3, 6, 2, 256
    x = (torch.randn(T, D, generator=g) * 4).to(DEVICE, torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.zeros(0, K, dtype=torch.int64)
    ids = ids.to(DEVICE)
    weights = torch.rand(T, K, generator=g).to(DEVICE)
    owner = torch.arange(E, device=DEVICE) // 2
    table = torch.arange(E, device=DEVICE).view(W, 2)
    layout = dispatch_layout(ids, owner, table, capacity=capacity)
    send = gather_send_rows(x, weights, ids, layout, fp8=True)
    assert send.dtype == FP8_ROWS and send.shape[1] == packed_row(D, K, FP8_ROWS)[0]
    tokens, routing = split_packed(send, D, K)
    scales = packed_scales(send, D)
    assert tokens.dtype == E4M3 and scales.shape == (send.shape[0], 2)
    q, s = quantize_groups(x)
    copies = layout.send_meta[:, 0].tolist()
    starts = [w * capacity for w in range(W)] if capacity else \
        [sum(copies[:w]) for w in range(W)]
    for w in range(W):
        for j in range(copies[w]):
            r, t = starts[w] + j, int(layout.send_tokens[starts[w] + j])
            assert torch.equal(tokens[r].view(torch.uint8), q[t].view(torch.uint8))
            assert torch.equal(scales[r], s[t])
            assert torch.equal(routing[r], torch.cat([weights[t], ids[t].float()]))
        if capacity:  # padding rows: zeros, no slot
            pad = slice(starts[w] + copies[w], (w + 1) * capacity)
            assert (send[pad, :D + 8] == 0).all() and (routing[pad, K:] == -1).all()
    if capacity and TRITON_RUNS:  # the NVLink form: every rank's rows stored by one launch
        outputs = [torch.full((capacity, send.shape[1]), 0xFF, dtype=FP8_ROWS, device=DEVICE)
                   for _ in range(W)]
        push_send_rows(x, weights, ids, layout, outputs, first=1, fp8=True)
        used = packed_row(D, K, FP8_ROWS)[1] + 8 * K  # a row's bytes before its padding
        for w in range(W):
            real = slice(0, copies[w])  # padding rows: routing only, no token bytes
            assert torch.equal(outputs[w][real, :used], send[w * capacity:][real, :used])
            assert torch.equal(split_packed(outputs[w], D, K)[1],
                               routing[w * capacity:(w + 1) * capacity])


def test_send_rows_fp8_needs_groups_of_128():
    x = torch.randn(2, 96)
    ids = torch.zeros(2, 1, dtype=torch.int64)
    layout = dispatch_layout(ids, torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1,
                                                                               dtype=torch.int64))
    with pytest.raises(ValueError, match=r"fp8 send rows need x's D to be a multiple of 128 "
                                         r".*got x of shape \(2, 96\)"):
        gather_send_rows(x, torch.ones(2, 1), ids, layout, fp8=True)


# --------------------------------------------------------------------------------------------
# MoE.from_hf on transformers' FP8Experts
# --------------------------------------------------------------------------------------------

def _fp8_qwen3_block(seed=0, E=4, D=256, I=128, K=2):
    """A transformers Qwen3-MoE block whose experts transformers itself made `FP8Experts`
    (`replace_with_fp8_linear`, as a fine-grained FP8 model loads) and filled with its own
    quantization of random bf16 weights (`Fp8Quantize`, what it saves checkpoints with).
    Returns (block, its bf16 weights)."""
    transformers = pytest.importorskip("transformers")
    from transformers import FineGrainedFP8Config, Qwen3MoeConfig
    from transformers.integrations.finegrained_fp8 import Fp8Quantize, replace_with_fp8_linear
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=True)
    torch.manual_seed(seed)
    holder = torch.nn.Module()
    holder.config = cfg
    holder.mlp = Qwen3MoeSparseMoeBlock(cfg)
    bf16 = {"gate_up_proj": torch.randn(E, 2 * I, D) / D ** 0.5,
            "down_proj": torch.randn(E, D, I) / I ** 0.5}
    with torch.no_grad():
        holder.mlp.gate.weight.normal_(0.0, 1.0 / D ** 0.5)
    quant_config = FineGrainedFP8Config(weight_block_size=[128, 128])
    replace_with_fp8_linear(holder, quantization_config=quant_config)  # FP8Experts on "meta"
    experts = holder.mlp.experts
    assert type(experts).__name__ == "FP8Experts", transformers.__version__
    experts.to_empty(device="cpu")
    quantize = Fp8Quantize(types.SimpleNamespace(quantization_config=quant_config))
    with torch.no_grad():
        for name, w in bf16.items():
            out = quantize.convert({name: w})
            getattr(experts, name).copy_(out[name])
            getattr(experts, name + "_scale_inv").copy_(out[name + "_scale_inv"])
    return holder.mlp.eval(), bf16


def _transformers_dequantized(block):
    """transformers' own dequantization of its FP8 experts' weights (`Fp8Dequantize`)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    dequantize = Fp8Dequantize(None)
    ex = block.experts
    return {name: dequantize._dequantize_one(getattr(ex, name), getattr(ex, name + "_scale_inv"),
                                             torch.float32)
            for name in ("gate_up_proj", "down_proj")}


@needs_triton
def test_from_hf_fp8_experts():
    """The layer from a block with `FP8Experts`: the same e4m3 bytes and scales, the scales
    read as transformers reads them (its dequantization equals ours), output within the
    float64 reference of the same quantization; and against transformers' own forward of
    that block (its FP8Experts loop, the dequantized weights: its FP8 kernels come from the
    Hub, which CI cannot reach) no further than the activations' e4m3 rounding puts it."""
    block, _ = _fp8_qwen3_block()
    layer = MoE.from_hf(block, device=DEVICE)
    assert layer.config.expert_quant == "fp8" and layer.experts.activation_dtype == torch.float32
    for name in ("gate_up_proj", "down_proj"):
        ours, theirs = getattr(layer.experts, name), getattr(block.experts, name)
        assert torch.equal(ours.cpu().view(torch.uint8), theirs.view(torch.uint8))
        assert torch.equal(getattr(layer.experts, name + "_scale_inv").cpu(),
                           getattr(block.experts, name + "_scale_inv"))
    deq = _transformers_dequantized(block)
    for name, w in deq.items():
        assert torch.equal(dequantize_blocks(getattr(block.experts, name),
                                             getattr(block.experts, name + "_scale_inv")), w)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 9, 256, generator=g)
    y, route = check_layer(layer, x.to(DEVICE), "from_hf")
    # transformers' forward of the same block, with its dequantized weights
    with torch.no_grad():
        for name, w in deq.items():
            setattr(block.experts, name, torch.nn.Parameter(w, requires_grad=False))
        out = block(x)
    y_hf = (out[0] if isinstance(out, tuple) else out).double().reshape(-1, 256)
    # the float64 reference without activation quantization: what transformers' loop computes
    ref_q = reference_moe_fp8(x[0], {k: v.cpu() for k, v in layer.state_dict().items()},
                              layer.config, route.topk_ids.cpu())
    params = {k: v.cpu() for k, v in layer.state_dict().items()}
    params["experts.gate_up_proj"], params["experts.down_proj"] = \
        deq["gate_up_proj"], deq["down_proj"]
    ref_plain, _, _ = reference_moe(x[0], params, layer.config, topk_ids=route.topk_ids.cpu())
    assert (y_hf - ref_plain).norm() / ref_plain.norm() < 1e-5  # fp32 loop = float64 loop
    quantization = ((ref_q.y - ref_plain).norm() / ref_plain.norm()).item()
    assert 0 < quantization < 0.1
    assert (y - y_hf).norm() / y_hf.norm() <= 1.05 * quantization + 1e-5


def test_from_hf_refuses_other_fp8_layouts():
    block, _ = _fp8_qwen3_block()
    experts = block.experts
    experts.block_size = [64, 64]
    with pytest.raises(ValueError, match=r"FP8Experts.block_size must be \(128, 128\).*\[64, 64\]"):
        MoE.from_hf(block)
    experts.block_size = [128, 128]
    experts.activation_scheme = "static"
    with pytest.raises(ValueError, match="activation_scheme must be 'dynamic'.*'static'"):
        MoE.from_hf(block)
    experts.activation_scheme = "dynamic"
    with torch.no_grad():
        experts.down_proj_scale_inv[0, 0, 0] = -2.0
    with pytest.raises(ValueError, match=r"down_proj_scale_inv must hold positive finite "
                                         r"scales, got -2\.0 at \(0, 0, 0\)"):
        MoE.from_hf(block)


@needs_triton
def test_from_hf_fp8_deepseek_shared_expert():
    """DeepSeek-V3's block made FP8 by transformers: routed experts FP8Experts, the shared
    expert FP8Linear layers, which the layer dequantizes into its own (bf16) shared MLP."""
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=128, moe_intermediate_size=128, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1)
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.config = cfg
    holder.mlp = DeepseekV3MoE(cfg)
    replace_with_fp8_linear(holder, quantization_config=FineGrainedFP8Config(
        weight_block_size=[128, 128]))
    block = holder.mlp
    block.to_empty(device="cpu")
    with torch.no_grad():
        for module in block.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.dtype == E4M3:
                    q, s = quantize_blocks(torch.randn(p.shape) / p.shape[-1] ** 0.5)
                    p.copy_(q)
                    scale = getattr(module, name + "_scale_inv", None)
                    (scale if scale is not None else module.weight_scale_inv).copy_(s)
                elif p.is_floating_point() and not name.endswith("scale_inv"):
                    p.normal_(0.0, 0.1)
        block.gate.e_score_correction_bias.zero_()
    assert type(block.shared_experts.gate_proj).__name__ == "FP8Linear"
    layer = MoE.from_hf(block, device=DEVICE)
    assert layer.config.expert_quant == "fp8" and layer.router.weight.dtype == torch.float32
    assert layer.shared_experts.gate_up_proj.dtype == torch.bfloat16
    shared = block.shared_experts
    want = dequantize_blocks(shared.down_proj.weight, shared.down_proj.weight_scale_inv,
                             torch.bfloat16)
    assert torch.equal(layer.shared_experts.down_proj.cpu(), want)
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    check_layer(layer, x.to(DEVICE), "deepseek from_hf")


@needs_triton
def test_replace_moe_blocks_fp8_model():
    """`ep_moe.replace_moe_blocks` on a tiny Qwen3-MoE causal LM whose experts transformers made
    FP8Experts: the layer is FP8, its logits against the unmodified model's (its FP8Experts
    loop on the dequantized weights: the Hub kernels are out of reach) apart by the e4m3
    rounding of the activations only (0.7% of the logits here, through the residual stream:
    the bound leaves ~3x), and greedy generation runs."""
    pytest.importorskip("transformers")
    import ep_moe
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Qwen3MoeConfig
    from transformers.integrations.finegrained_fp8 import Fp8Quantize, replace_with_fp8_linear

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=128, moe_intermediate_size=128,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    holder = torch.nn.Module()  # the experts alone made FP8 (FP8Linear attention needs the Hub)
    holder.config, holder.mlp = cfg, model.model.layers[0].mlp
    quant_config = FineGrainedFP8Config(weight_block_size=[128, 128])
    replace_with_fp8_linear(holder, quantization_config=quant_config)
    experts = holder.mlp.experts
    experts.to_empty(device="cpu")
    quantize = Fp8Quantize(types.SimpleNamespace(quantization_config=quant_config))
    with torch.no_grad():
        for name, shape in (("gate_up_proj", (4, 256, 128)), ("down_proj", (4, 128, 128))):
            out = quantize.convert({name: torch.randn(shape) / 128 ** 0.5})
            getattr(experts, name).copy_(out[name])
            getattr(experts, name + "_scale_inv").copy_(out[name + "_scale_inv"])
    reference = copy.deepcopy(model)
    ref_experts = reference.model.layers[0].mlp.experts
    with torch.no_grad():
        for name, w in _transformers_dequantized(reference.model.layers[0].mlp).items():
            setattr(ref_experts, name, torch.nn.Parameter(w, requires_grad=False))
    ref_experts.config._experts_implementation = "eager"  # its loop: F.linear on 32-bit weights
    replaced = ep_moe.replace_moe_blocks(model)
    assert len(replaced) == 1 and replaced[0].config.expert_quant == "fp8"
    model, reference = model.to(DEVICE), reference.to(DEVICE)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        logits = model(ids).logits.double()
        logits_ref = reference(ids).logits.double()
        tokens = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    rel = ((logits - logits_ref).norm() / logits_ref.norm()).item()
    assert 0 < rel < 0.02, rel
    assert tokens.shape == (1, 10)


# --------------------------------------------------------------------------------------------
# On a GPU: real shapes, CUDA graphs
# --------------------------------------------------------------------------------------------

GPU_SHAPES = {  # preset: tokens (checked against float64 on the first 16)
    "mixtral": [16, 512, 4096],
    "qwen3": [16, 512, 4096],
    "deepseek_v3": [16, 512],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", list(GPU_SHAPES))
def test_gpu_real_shapes(preset):
    """Mixtral (D 4096, I 14336, E 8, K 2), Qwen3-30B-A3B (2048, 768, 128, 8), DeepSeek-V3
    (7168, 2048, 256, 8): the FP8 layer (quantized from the bf16 one) against the float64
    reference of the same quantization on 16 tokens, and its relative error against the bf16
    layer, printed per shape (e4m3 rounding of four operands: ~7% for random weights, as the
    CPU tests' D = 128 layer measures)."""
    cfg = MoEConfig.preset(preset, init_std=0.02)
    torch.manual_seed(0)
    layer = MoE(cfg, device="cuda", dtype=torch.bfloat16).eval()
    xs = {T: torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
          for T in GPU_SHAPES[preset]}
    with torch.no_grad():
        y_bf16 = {T: layer(x) for T, x in xs.items()}
    layer.quantize_experts("fp8")
    params = {k: v.cpu() for k, v in layer.state_dict().items()}
    for T, x in xs.items():
        with torch.no_grad():
            y, route = layer(x, return_router_output=True)
            # the per-expert path stores the first product in bf16 before quantizing h
            per_expert = layer.plan(x).experts == "per_expert_fp8"
        assert torch.isfinite(y).all()
        n = min(T, 16)  # the float64 reference dequantizes each expert these tokens hit
        ref = reference_moe_fp8(x[:n].cpu(), params, layer.config,
                                topk_ids=route.topk_ids[:n].cpu(), accum_rtol=ACCUM_RTOL,
                                stored_dtype=torch.bfloat16 if per_expert else None)
        allowed = allowed_error(ref, torch.bfloat16, layer.config)
        err = (y[:n].cpu().double() - ref.y).abs()
        assert (err <= allowed).all(), f"{preset} T={T}: worst ratio {(err / allowed).max()}"
        rel = ((y.double() - y_bf16[T].double()).norm() / y_bf16[T].double().norm()).item()
        print(f"{preset} T={T}: fp8 vs bf16 relative error {rel:.4f}")
        assert rel < 0.12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_vs_transformers_fp8_experts():
    """transformers' FP8Experts forward, where its Hub kernels load (skipped where they
    cannot): ours no further from it than from the float64 reference, per token norms."""
    block, _ = _fp8_qwen3_block(E=8, D=512, I=256)
    block = block.cuda()
    block.experts.config._experts_implementation = "grouped_mm"
    x = torch.randn(1, 64, 512, device="cuda")
    try:
        with torch.no_grad():
            y_hf = block(x)
    except Exception as e:  # noqa: BLE001 - the Hub kernel's loader raises several kinds
        pytest.skip(f"transformers' FP8 kernels do not load here: {type(e).__name__}: {e}")
    y_hf = (y_hf[0] if isinstance(y_hf, tuple) else y_hf).reshape(64, 512).double()
    layer = MoE.from_hf(block)
    with torch.no_grad():
        y, route = layer(x[0], return_router_output=True)
    ref = reference_moe_fp8(x[0].cpu(), {k: v.cpu() for k, v in layer.state_dict().items()},
                            layer.config, topk_ids=route.topk_ids.cpu())
    ours = ((y.double() - ref.y.cuda()).norm() / ref.y.norm()).item()
    theirs = ((y_hf - ref.y.cuda()).norm() / ref.y.norm()).item()
    print(f"vs float64 of the same quantization: ours {ours:.2e}, transformers {theirs:.2e}")
    assert ours <= max(theirs, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 16, 128])
def test_gpu_fp8_forward_captures_in_a_cuda_graph(T):
    """Decode batches: the FP8 forward (no host sync) replays from a CUDA graph, equal to eager."""
    cfg = MoEConfig.qwen3_30b_a3b(expert_quant="fp8")
    torch.manual_seed(0)
    layer = MoE(cfg, device="cuda", dtype=torch.bfloat16).eval()
    static_x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    graph, static_y = capture_no_grad(layer, static_x)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        assert torch.equal(static_y, layer(fresh))


# -- expert parallelism over NCCL (2+ GPUs): fixed-size exchange in a CUDA graph, and NVLink --

def _nccl_fp8_case(exchange: str, chunks: int):
    """On every rank of an NCCL group: the sharded FP8 layer with a fixed-size exchange against
    the single-process FP8 layer (same weights) on all ranks' tokens, eager and replayed from a
    CUDA graph. Returns this rank's failures."""
    import torch.distributed as dist

    rank, W = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    C = 64
    cfg = MoEConfig.qwen3_30b_a3b(num_experts=16, top_k=4, expert_quant="fp8",
                                  max_tokens_per_rank=C, exchange=exchange,
                                  dispatch_chunks=chunks)
    torch.manual_seed(0)
    full = MoE(cfg.replace(max_tokens_per_rank=None, exchange="auto", dispatch_chunks=None),
               device="cuda", dtype=torch.bfloat16).eval()
    layer = MoE(cfg, process_group=dist.group.WORLD, device="cuda", dtype=torch.bfloat16).eval()
    layer.load_full_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(1)
    tokens = [C - 5 * w for w in range(W)]
    x_all = torch.randn(sum(tokens), cfg.hidden_size, generator=g).to("cuda", torch.bfloat16)
    start = sum(tokens[:rank])
    x = x_all[start:start + tokens[rank]].clone()
    fails = []
    with torch.no_grad():
        plan = layer.plan(x)
        if not plan.fp8_dispatch or plan.exchange != ("nvlink" if exchange == "nvlink"
                                                      else "fixed"):
            fails.append(f"plan {plan}")
        y = layer(x)
        want = full(x_all)[start:start + tokens[rank]]
    err = ((y.double() - want.double()).norm() / want.double().norm()).item()
    if not err < 2e-2:  # per-rank partials rounded to bf16 before the home sum
        fails.append(f"eager vs single process: {err:.3g}")
    static_x = x.clone()
    graph, static_y = capture_no_grad(layer, static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    if not torch.equal(static_y, y):
        fails.append("graph replay differs from eager")
    return fails


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("exchange,chunks", [("collective", 1), ("collective", 3),
                                             ("nvlink", 1)])
def test_gpu_expert_parallel_fp8(exchange, chunks):
    from dist_utils import spawn_group

    W = min(torch.cuda.device_count(), 4)
    results = spawn_group(_nccl_fp8_case, W, (exchange, chunks), timeout=300, backend="nccl")
    failures = [f"rank {r}: {f}" for r, fs in enumerate(results) for f in fs]
    assert not failures, "\n".join(failures)
