"""FP8 experts' per-expert path (the plan's "per_expert_fp8"): per expert, its rows quantized as
they are gathered (`quantize_rows` with rows), cuBLAS's block-scaled product
(`ep_moe.fp8.blockwise_mm`), `act(gate) * up` quantized in one pass (`activate_fp8`), the
second product.

cuBLAS's block-scaled GEMM runs on Hopper only. On the CPU the layer runs with it replaced by
a float64 product that first checks the operand layouts `blockwise_mm` documents (what cuBLAS
would misread); the kernels around it run under the interpreter. Marked gpu: the real product
against float64, and the layer on it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ep_moe.kernels.grouped_gemm as grouped_gemm_module
from ep_moe import MoE, MoEConfig
from ep_moe.fp8 import (E4M3, blockwise_mm, blockwise_mm_available, dequantize_blocks,
                        padded_block_scales, quantize_blocks, quantize_groups)
from ep_moe.kernels.activation import activate_fp8
from ep_moe.kernels.grouped_gemm import quantize_rows
from ep_moe.plan import PER_EXPERT_FP8_MIN_ROWS_PER_EXPERT, plan_forward
from ep_moe.reference import reference_moe_fp8

from conftest import DEVICE, ROUNDING, emulate_blockwise_mm, needs_triton
from test_fp8 import ACCUM_RTOL, _fp8_layer, _step, allowed_error, check_layer, fp8_config

# The per-expert path stores the first product in bf16 before `act(gate) * up` is quantized;
# the reference rounds it so too (`reference_moe_fp8(stored_dtype=...)`).
STORED = torch.bfloat16

on_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and blockwise_mm_available(torch.device("cuda"))),
    reason="needs cuBLAS's block-scaled FP8 GEMM (Hopper, torch >= 2.10, CUDA >= 12.9)")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# --------------------------------------------------------------------------------------------
# The kernels around the products
# --------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_quantize_rows_gathers_and_pads(dtype):
    """Rows taken in the given order (an index outside x gives a zero row), zero rows past
    them, scales column-major: the bits of `quantize_groups` of the gathered, padded rows,
    on the kernel and on the torch fallback alike."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(20, 384, generator=g) * torch.exp2(
        torch.randint(-8, 8, (20, 1), generator=g).float())).to(DEVICE, dtype)
    rows = torch.tensor([3, 19, 0, 3, -1, 25, 7], device=DEVICE)
    strided = torch.stack([rows, -rows], 1)[:, 0]  # a gather index with a stride of 2
    q, scale = quantize_rows(x, strided, num_out=12, column_major_scales=True)
    taken = torch.where(((rows >= 0) & (rows < 20))[:, None], x[rows.clamp(0, 19)], 0.0)
    q_ref, scale_ref = quantize_groups(F.pad(taken, (0, 0, 0, 5)))
    assert q.shape == (12, 384) and scale.shape == (12, 3) and scale.stride() == (1, 12)
    assert _same_bits(q, q_ref) and torch.equal(scale, scale_ref)
    row_major = quantize_rows(x, rows, num_out=12)
    assert _same_bits(row_major[0], q) and torch.equal(row_major[1], scale)
    assert row_major[1].stride() == (3, 1)
    # no gather: x's own rows, then zero rows (nothing read past x)
    q, scale = quantize_rows(x[:5], num_out=8, column_major_scales=True)
    q_ref, scale_ref = quantize_groups(F.pad(x[:5], (0, 0, 0, 3)))
    assert _same_bits(q, q_ref) and torch.equal(scale, scale_ref)


@pytest.mark.parametrize("D", [128, 256])
@pytest.mark.parametrize("column_major", [False, True])
def test_quantize_rows_torch_fallback_gathers_and_pads(column_major, D, monkeypatch):
    """Where Triton does not run: the same rule (gather, zero rows outside x and past the
    rows, the layout asked for, one group too), from torch ops."""
    monkeypatch.setattr(grouped_gemm_module, "use_triton", lambda t: False)
    x = torch.randn(6, D)
    rows = torch.tensor([5, -2, 0])
    q, scale = quantize_rows(x, rows, num_out=4, column_major_scales=column_major)
    zero = torch.zeros(D)
    q_ref, scale_ref = quantize_groups(torch.stack([x[5], zero, x[0], zero]))
    assert _same_bits(q, q_ref) and torch.equal(scale, scale_ref)
    assert scale.stride() == ((1, 4) if column_major else (D // 128, 1))


@pytest.mark.parametrize("rows, num_out, error, match", [
    (torch.zeros(2, 2, dtype=torch.int64), None, ValueError, r"rows must be 1-D, got shape"),
    (torch.zeros(3), None, TypeError, "rows must have dtype"),
    (torch.zeros(5, dtype=torch.int64), 4, ValueError, "num_out must be at least the 5 rows"),
], ids=["2d", "float", "short"])
def test_quantize_rows_gather_validation(rows, num_out, error, match):
    with pytest.raises(error, match=match):
        quantize_rows(torch.zeros(8, 128, device=DEVICE), rows.to(DEVICE), num_out)


@needs_triton
@pytest.mark.parametrize("activation, gated, column_major", [
    ("silu", True, True), ("gelu", True, False), ("relu", True, True), ("silu", False, False),
    ("gelu", False, True)])
def test_activate_fp8_matches_float64(activation, gated, column_major):
    """`act(gate) * up` quantized per row and 128 columns: each value within half an e4m3
    step of the float64 activation (a hair more where fp32 lands on the other side of a
    midpoint), each scale its group's float64 amax / 448 within fp32 rounding; 37 rows cross
    a 16-row block."""
    g = torch.Generator().manual_seed(2)
    I = 256
    h = (torch.randn(37, 2 * I if gated else I, generator=g) * 3).to(DEVICE, torch.bfloat16)
    h[4] = 0.0  # an all-zero row keeps finite scales
    q, scale = activate_fp8(h, activation, gated, column_major_scales=column_major)
    assert q.shape == (37, I) and q.dtype == E4M3
    assert scale.stride() == ((1, 37) if column_major else (2, 1))
    h64 = h.cpu().double()
    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation]
    ref = act(h64[:, :I]) * h64[:, I:] if gated else act(h64)
    amax = ref.view(37, -1, 128).abs().amax(-1).clamp(min=1e-30)
    scale = scale.cpu().double()
    nonzero = amax > 1e-12
    assert torch.allclose(scale[nonzero], (amax / 448)[nonzero], rtol=2.0**-20, atol=0)
    values = ref.view(37, -1, 128) / scale[..., None]
    got = q.cpu().double().view(37, -1, 128)
    assert ((got - values).abs() <= 0.5 * _step(values) * (1 + 2.0**-10) + 2.0**-12).all()


@pytest.mark.parametrize("h, activation, gated, error, match", [
    (torch.zeros(4, 200), "silu", True, ValueError,
     r"h must be \(M, 2I\) with I a multiple of 128"),
    (torch.zeros(4, 256), "tanh", True, ValueError, "activation must be one of"),
    (torch.zeros(256, 4).t(), "silu", False, ValueError, r"contiguous rows.*strides \(1, 4\)"),
    (torch.zeros(4, 256, dtype=torch.int32), "silu", True, TypeError,
     "h must be float32, float16 or bfloat16, got torch.int32"),
], ids=["width", "activation", "strided", "int"])
def test_activate_fp8_validation(h, activation, gated, error, match):
    with pytest.raises(error, match=match):
        activate_fp8(h.to(DEVICE), activation, gated)


# --------------------------------------------------------------------------------------------
# The products' operands
# --------------------------------------------------------------------------------------------

def test_padded_block_scales():
    """K/128 = 6 scale columns padded with ones to 8 (cuBLAS's leading dimension); 8 stay."""
    s = torch.rand(3, 5, 6) + 0.5
    padded = padded_block_scales(s)
    assert padded.shape == (3, 5, 8) and torch.equal(padded[..., :6], s)
    assert (padded[..., 6:] == 1).all()
    same = torch.rand(5, 8)
    assert padded_block_scales(same) is same


def _operands(M=8, column_major=True, L4=4, w_dtype=E4M3, K=256):
    a = torch.zeros(M, K, dtype=E4M3)
    a_scale = torch.ones(K // 128, M).t() if column_major else torch.ones(M, K // 128)
    return a, a_scale, torch.zeros(256, 256, dtype=w_dtype), torch.ones(2, L4)


@pytest.mark.parametrize("changes, error, match", [
    (dict(M=6), ValueError, r"a must have a multiple of 4 rows.*\(6, 256\)"),
    (dict(column_major=False), ValueError,
     r"a_scale must be \(8, 2\) column-major, strides \(1, 8\), got shape \(8, 2\) strides "
     r"\(2, 1\)"),
    (dict(L4=2), ValueError, r"w_scale must be \(2, 4\) and contiguous.*got shape \(2, 2\)"),
    (dict(w_dtype=torch.bfloat16), TypeError, r"w must be a 2-D torch.float8_e4m3fn tensor"),
    (dict(K=384), ValueError, r"w \(N, K\).*got a \(8, 384\), w \(256, 256\)"),
], ids=["rows", "row_major_scales", "unpadded", "bf16_w", "k_mismatch"])
def test_blockwise_mm_checks_operands(changes, error, match):
    """The layouts cuBLAS would misread, and operands of other dtypes or shapes, are refused
    before the call, on any device."""
    with pytest.raises(error, match=match):
        blockwise_mm(*_operands(**changes))


@pytest.fixture
def emulated_cublas(monkeypatch):
    """The layer's per-expert path on any device: the product emulated, the plan told it
    runs."""
    calls = []
    emulate_blockwise_mm(monkeypatch.setattr, calls)
    return calls


# --------------------------------------------------------------------------------------------
# The plan and the layer
# --------------------------------------------------------------------------------------------

def test_plan_picks_per_expert_fp8():
    """Where cuBLAS's block-scaled GEMM runs: large experts with many rows each take it,
    decode and small experts the Triton FP8 GEMMs, and so do graph captures, torch.compile,
    fp32 rows and a fixed-size exchange (their counts never reach the host)."""
    mixtral = MoEConfig.mixtral_8x7b(expert_quant="fp8")
    kw = dict(world_size=1, num_local_experts=8, device_type="cuda", dtype=torch.bfloat16,
              triton=True, grad=False, blockwise_fp8=True)
    from_T = PER_EXPERT_FP8_MIN_ROWS_PER_EXPERT * 8 // 2  # top-2 of 8: T / 4 rows an expert
    assert plan_forward(mixtral, num_tokens=from_T - 1, **kw).experts == "triton_fp8"
    assert plan_forward(mixtral, num_tokens=from_T, **kw).experts == "per_expert_fp8"
    for changes in (dict(capturing=True), dict(compiling=True), dict(dtype=torch.float32),
                    dict(blockwise_fp8=False)):
        assert plan_forward(mixtral, num_tokens=16384, **{**kw, **changes}).experts == \
            "triton_fp8", changes
    qwen3 = MoEConfig.qwen3_30b_a3b(expert_quant="fp8")  # I = 768: many small experts
    assert plan_forward(qwen3, num_tokens=65536, **{**kw, "num_local_experts": 128}).experts \
        == "triton_fp8"
    ep = dict(kw, world_size=4, num_local_experts=2)
    p = plan_forward(mixtral, num_tokens=4096, **ep)  # exact exchange: the counts on the host
    assert (p.exchange, p.experts, p.fp8_dispatch) == ("exact", "per_expert_fp8", True)
    p = plan_forward(mixtral.replace(max_tokens_per_rank=4096), num_tokens=4096, **ep)
    assert (p.exchange, p.experts) == ("fixed", "triton_fp8")
    forced = mixtral.replace(expert_impl="per_expert")
    assert plan_forward(forced, num_tokens=1, **kw).experts == "per_expert_fp8"
    assert plan_forward(mixtral.replace(expert_impl="triton"), num_tokens=16384,
                        **kw).experts == "triton_fp8"


@pytest.mark.parametrize("changes, match", [
    (dict(blockwise_fp8=False), r"block-scaled FP8 GEMM \(Hopper.*here: False\)"),
    (dict(dtype=torch.float16), r"bf16 rows \(got torch.float16\)"),
    (dict(capturing=True), r"no CUDA-graph capture or torch.compile \(got True\)"),
], ids=["no_cublas", "fp16", "capturing"])
def test_plan_refuses_forced_per_expert_fp8(changes, match):
    cfg = MoEConfig.mixtral_8x7b(expert_quant="fp8", expert_impl="per_expert")
    kw = dict(world_size=1, num_local_experts=8, num_tokens=4096, device_type="cuda",
              dtype=torch.bfloat16, triton=True, grad=False, blockwise_fp8=True)
    with pytest.raises(ValueError, match=r"expert_impl='per_expert' with FP8 experts.*" + match):
        plan_forward(cfg, **{**kw, **changes})


@needs_triton
@pytest.mark.parametrize("T", [1, 13, 33])
@pytest.mark.parametrize("name", ["silu", "relu_plain", "deepseek"])
def test_layer_matches_reference(name, T, emulated_cublas):
    """The layer on the per-expert path against the float64 reference of the same
    quantization: experts with no rows skipped, row counts not a multiple of 4 padded, a loud
    token with its own scales, a shared expert beside them."""
    config = {"silu": fp8_config(), "relu_plain": fp8_config(activation="relu", gated=False),
              "deepseek": fp8_config(num_experts=8, top_k=3, score_func="sigmoid",
                                     num_expert_groups=4, topk_groups=2,
                                     use_correction_bias=True, routed_scaling_factor=2.5,
                                     num_shared_experts=1, shared_intermediate_size=128)}[name]
    layer = _fp8_layer(config.replace(expert_impl="per_expert"))
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(T))
    x[T // 2] *= 100
    x = x.to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        assert layer.plan(x).experts == "per_expert_fp8"
    _, route = check_layer(layer, x, f"{name} T={T}", stored_dtype=STORED)
    hit = torch.bincount(route.topk_ids.flatten().cpu(), minlength=config.num_experts)
    # two products for each expert with rows, on its rows rounded up to a multiple of 4
    expected = [(-(-int(n) // 4) * 4, w) for n in hit if n for w in (128, config.intermediate_size)]
    assert sorted(emulated_cublas) == sorted(expected)


@needs_triton
def test_per_expert_fp8_takes_quantized_rows(emulated_cublas):
    """Rows that travelled as e4m3 with their scales (an FP8 dispatch) give the bits the
    layer's own rows give."""
    layer = _fp8_layer(fp8_config(expert_impl="per_expert"))
    x = torch.randn(11, 128, device=DEVICE, dtype=torch.bfloat16)
    q, scale = quantize_groups(x)
    source_rows = torch.tensor([0, 3, 4, 10, 2, 7, 7, 1, 5], device=DEVICE)
    counts = (3, 0, 5, 1)
    own = layer.experts.per_expert_fp8(x, source_rows, counts)
    travelled = layer.experts.per_expert_fp8(q, source_rows, counts, x_scale=scale)
    assert own.shape == (9, 128) and own.dtype == torch.bfloat16
    assert torch.equal(own, travelled)


def test_per_expert_fp8_needs_fp8_experts():
    layer = MoE(fp8_config(expert_quant="none"), device=DEVICE)
    with pytest.raises(RuntimeError, match="per_expert_fp8 runs FP8 experts.*'none'"):
        layer.experts.per_expert_fp8(torch.zeros(2, 128), torch.zeros(2, dtype=torch.int64),
                                     (2, 0, 0, 0))


# --------------------------------------------------------------------------------------------
# On Hopper: cuBLAS's product
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("M, K, N", [(4, 768, 256), (64, 512, 384), (1024, 4096, 1024)])
def test_gpu_blockwise_mm_matches_float64(M, K, N):
    """The real product against float64 on the same e4m3 values and scales: fp32 sums
    (2^-12 of the |terms| per 128-wide step on the tensor cores) and one bf16 rounding; K/128
    = 6 checks the padded weight scales."""
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda") * torch.exp2(torch.randint(-4, 4, (M, 1),
                                                                    device="cuda").float())
    a, a_scale = quantize_rows(x, column_major_scales=True)
    w, w_scale = quantize_blocks(torch.randn(N, K, device="cuda") * 0.05)
    out = blockwise_mm(a, a_scale, w, padded_block_scales(w_scale).contiguous())
    a64 = (a.double().view(M, -1, 128) * a_scale.double()[..., None]).view(M, K)
    w64 = dequantize_blocks(w, w_scale, torch.float64)
    ref, terms = a64 @ w64.t(), a64.abs() @ w64.abs().t()
    err = (out.double() - ref).abs()
    assert (err <= ROUNDING[torch.bfloat16] * ref.abs() + 2.0**-12 * terms).all()


@pytest.mark.gpu
@on_hopper
def test_gpu_layer_per_expert_fp8():
    """A layer of 8 experts (D 1024, I 4096) at 2048 tokens on the per-expert path: within the
    float64 reference's bound on 16 tokens, and within 2% of the Triton FP8 path on all of them
    (the same quantization; only h's bf16 rounding and the sums differ)."""
    cfg = MoEConfig(hidden_size=1024, intermediate_size=4096, num_experts=8, top_k=2,
                    init_std=0.03, expert_quant="fp8", expert_impl="per_expert")
    torch.manual_seed(0)
    layer = MoE(cfg, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer.plan(x).experts == "per_expert_fp8"
        y, route = layer(x, return_router_output=True)
    ref = reference_moe_fp8(x[:16].cpu(), {k: v.cpu() for k, v in layer.state_dict().items()},
                            cfg, topk_ids=route.topk_ids[:16].cpu(), accum_rtol=ACCUM_RTOL,
                            stored_dtype=STORED)
    err = (y[:16].cpu().double() - ref.y).abs()
    allowed = allowed_error(ref, torch.bfloat16, cfg)
    assert (err <= allowed).all(), f"worst ratio {(err / allowed).max()}"
    triton_layer = MoE(cfg.replace(expert_impl="triton"), device="cuda", dtype=torch.bfloat16)
    triton_layer.load_state_dict(layer.state_dict())
    with torch.no_grad():
        y_triton = triton_layer.eval()(x)
    rel = ((y.double() - y_triton.double()).norm() / y_triton.double().norm()).item()
    assert rel < 0.02, rel
