"""The layer's Triton experts' path: `Experts.fused_forward` (the plan's experts "triton"),
which the layer takes when nothing needs a gradient (under `torch.no_grad()`, or with frozen
weights and an input that needs none): its two `grouped_gemm` calls (gate_up with the
activation, then down), their configs and launches, and the layer's output against the float64
reference and against torch's grouped GEMM. The kernel itself is tested in
`test_grouped_gemm.py`.
"""

from __future__ import annotations

import pytest
import torch

from ep_moe import MoE, MoEConfig
from ep_moe import experts as experts_module
from ep_moe.kernels import grouped_gemm as gg
from ep_moe.kernels.grouped_gemm import gemm_config, grouped_gemm
from ep_moe.reference import reference_moe

from conftest import DEVICE, needs_triton
from gemm_cases import make_inputs

# Allowed error = LAYER_TOL[dtype] * max(max|reference|, 0.1), as in test_layer.py: the chain
# gate_up GEMM + activation, down GEMM, combine rounds the output a few times
LAYER_TOL = {
    torch.float32: 5e-6,  # ~30 fp32 ulps of O(1) values through a few roundings and sums
    # a bf16 rounding after each of the fused GEMM + activation, down GEMM and combine, with
    # slack: 8 * 2^-8
    torch.bfloat16: 2.0**-5,
}
LAYER_CONFIGS = {
    "silu_gated": dict(),                              # SwiGLU: the gated epilogue
    "gelu_plain": dict(activation="gelu", gated=False),  # plain act(h): gate_up holds I rows
}


def layer_config(**changes) -> MoEConfig:
    # tiny: D=16, I=24, E=8, K=2; init_std 1/sqrt(D) gives O(1) pre-activations; dense_max_rows
    # 0 keeps the sorted path, the only one through grouped_gemm
    return MoEConfig.preset("tiny").replace(init_std=0.25, dense_max_rows=0, **changes)


def make_layer(config: MoEConfig, dtype=torch.float32, T=13, seed=0):
    torch.manual_seed(seed)
    moe = MoE(config, device=DEVICE, dtype=dtype)
    x = torch.randn(T, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    return moe, x.to(DEVICE, dtype)


@pytest.fixture
def gemm_calls(monkeypatch):
    """Counts the calls of `grouped_gemm` made by the experts module."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("activation"))
        return grouped_gemm(*args, **kwargs)

    monkeypatch.setattr(experts_module, "grouped_gemm", counting)
    return calls


def layer_reference(moe, x, topk_ids):
    params = {n: p.detach() for n, p in moe.named_parameters()}
    params.update(dict(moe.named_buffers()))
    y, _, _ = reference_moe(x.double(), params, moe.config, topk_ids=topk_ids)
    return y


def assert_layer_close(actual, expected, dtype, scale_tol=1.0):
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).abs().max().item()
    bound = scale_tol * LAYER_TOL[dtype] * max(expected.abs().max().item(), 0.1)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} ({dtype})"


@needs_triton
@pytest.mark.parametrize("grad_enabled,params_grad,x_grad,expected", [
    (False, True, False, 2),   # no_grad: inference, the fused path (gate_up, then down)
    (True, True, False, 0),    # training: torch's grouped GEMM, which has a backward
    (True, False, True, 0),    # frozen experts but a gradient wanted for x
    (True, False, False, 2),   # grad mode on but nothing requires grad: fused
], ids=["no_grad", "train", "x_grad", "frozen"])
def test_layer_takes_fused_path(gemm_calls, grad_enabled, params_grad, x_grad, expected):
    moe, x = make_layer(layer_config())
    moe.requires_grad_(params_grad)
    x.requires_grad_(x_grad)
    with torch.set_grad_enabled(grad_enabled):
        for forward in (1, 2):
            y = moe(x)
            assert len(gemm_calls) == expected * forward, gemm_calls
    assert y.requires_grad == (grad_enabled and (params_grad or x_grad))
    if expected:
        assert gemm_calls[:2] == ["silu", None]  # gate_up with the activation, then down


@needs_triton
@pytest.mark.parametrize("impl", ["grouped_mm", "per_expert", "dense"])
def test_layer_other_impls_skip_fused_path(gemm_calls, impl):
    moe, x = make_layer(layer_config(expert_impl=impl))
    with torch.no_grad():
        moe(x)
    assert gemm_calls == []


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_layer_fused_matches_reference(gemm_calls, name, dtype):
    moe, x = make_layer(layer_config(**LAYER_CONFIGS[name]), dtype)
    with torch.no_grad():
        y, route = moe(x, return_router_output=True)
    assert len(gemm_calls) == 2 and y.dtype == dtype
    assert_layer_close(y, layer_reference(moe, x, route.topk_ids), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYER_CONFIGS))
def test_layer_fused_matches_grouped_mm(gemm_calls, name, dtype):
    outputs = []
    for impl in ("auto", "grouped_mm"):  # same seed: the same weights and tokens
        moe, x = make_layer(layer_config(expert_impl=impl, **LAYER_CONFIGS[name]), dtype)
        with torch.no_grad():
            outputs.append(moe(x, return_router_output=True))
    (y_fused, route_fused), (y_torch, route_torch) = outputs
    assert len(gemm_calls) == 2  # the auto layer only
    assert torch.equal(route_fused.topk_ids, route_torch.topk_ids)
    # each is within LAYER_TOL of float64, so within twice that of each other
    assert_layer_close(y_fused, y_torch, dtype, scale_tol=2.0)


@needs_triton
def test_layer_fused_no_tokens(gemm_calls):
    moe, x = make_layer(layer_config(), T=0)  # T=0: P=0 rows through both GEMMs
    with torch.no_grad():
        y = moe(x)
    assert y.shape == (0, 16) and len(gemm_calls) == 2


@needs_triton
def test_default_config_gets_num_experts(monkeypatch):
    """The launcher's default config and the layer's fused path both pass the expert count."""
    seen = []
    real = gg.gemm_config

    def recording(*args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs.get("num_experts"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gg, "gemm_config", recording)
    monkeypatch.setattr(experts_module, "gemm_config", recording)
    case = make_inputs([3, 9, 5], 24, 32, torch.float32)
    grouped_gemm(case.a, case.w, case.counts)
    assert seen == [3]
    moe, x = make_layer(layer_config())
    seen.clear()
    with torch.no_grad():
        moe.experts.fused_forward(x, torch.arange(x.shape[0], device=DEVICE),
                                  torch.tensor([x.shape[0]] + [0] * 7, device=DEVICE), 4.0)
    assert seen == [8, 8]


@needs_triton
@pytest.mark.parametrize("loose,overlapped,expected", [
    (True, False, [True, True]),    # a buffer 4x the expected rows: one program per SM
    (True, True, [False, False]),   # beside a pipeline's exchanges: the grid leaves SMs free
    (False, False, [None, None]),  # exact buffers: the grid, but where `flatten_wins`
])
def test_persistent_only_over_a_loose_bound(monkeypatch, loose, overlapped, expected):
    """Which launch the fused path asks for (the rows are the same either way:
    test_grouped_gemm.py::test_persistent_over_a_bound); that the layer passes `overlapped`
    only when it pipelines is checked in the gloo tests (dist_utils._check_fixed_exchange)."""
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["persistent"])
        return grouped_gemm(*args, **kwargs)

    monkeypatch.setattr(experts_module, "grouped_gemm", recording)
    moe, x = make_layer(layer_config())
    rows = 200.0  # mean rows per expert the tiles are chosen for: 128-row tiles
    P = int(4 * rows * 8) if loose else int(rows * 8)
    counts = torch.tensor([3, 0, 5, 0, 0, 0, 0, 2], device=DEVICE)
    source = torch.arange(P, device=DEVICE) % x.shape[0]
    assert gemm_config(rows, True, 4, num_experts=8).block_m == 128
    with torch.no_grad():
        moe.experts.fused_forward(x, source, counts, rows, overlapped=overlapped)
    assert seen == expected


def test_layer_fused_path_with_transposed_input():
    # x whose last dim is strided: the fused path makes it contiguous (grad mode never cared)
    moe = MoE(MoEConfig.preset("tiny").replace(dense_max_rows=0), device=DEVICE)
    x = torch.randn(moe.config.hidden_size, 10, device=DEVICE).t()
    assert x.stride(-1) != 1
    with torch.no_grad():
        y = moe(x)
    torch.testing.assert_close(y, moe(x.contiguous()).detach(), rtol=1e-5, atol=1e-6)
