"""`Experts` on its differentiable paths: one dense product per expert with the row counts on
the host (`_PerExpertLinear`, path "per_expert") against a float64 loop over the rows, forward
and backward; torch's grouped GEMM (path "grouped_mm") against it; the checks on `counts`.
Which path runs when is `ep_moe.plan`'s (tests/test_plan.py).

Shapes: P sorted rows, D hidden, I per-expert intermediate size, e local experts.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ep_moe import MoEConfig
from ep_moe.experts import Experts, _PerExpertLinear
from ep_moe.kernels.activation import fused_activation_available

from conftest import DEVICE

D, I = 12, 20
# float64 products throughout; where Triton runs (CUDA, or the CPU under TRITON_INTERPRET) the
# gated activation is its kernel, which computes in fp32 (an H100: 9e-11 absolute, 3e-6
# relative at a value near zero; the interpreter 4e-11 and 1.2e-5), so there the bound is
# fp32's: 1e-5 relative, and 1e-6 of the tensor's largest value for entries near zero
FP32_ACTIVATION = fused_activation_available(torch.empty(1, device=DEVICE))


def assert_close(actual, expected):
    if FP32_ACTIVATION:
        atol = 1e-6 * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def make_experts(num_local=4, dtype=torch.float64, **changes) -> Experts:
    cfg = MoEConfig.tiny(hidden_size=D, intermediate_size=I, num_experts=8, **changes)
    torch.manual_seed(0)
    experts = Experts(cfg, num_local).to(DEVICE, dtype)
    experts.reset_parameters()
    return experts


def reference(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, counts) -> torch.Tensor:
    """Row by row in float64: row r of expert e's block is SwiGLU(x_r) through expert e's
    weights; rows past sum(counts) are zeros."""
    out = torch.zeros(x.shape[0], D, dtype=torch.float64, device=x.device)
    expert_of_row = [e for e, n in enumerate(counts) for _ in range(n)]
    for r, e in enumerate(expert_of_row):
        gate, up = (w13[e] @ x[r]).chunk(2)
        out[r] = w2[e] @ (F.silu(gate) * up)
    return out


def weights(experts: Experts):
    return experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()


# counts chosen for: an empty expert in the middle and at both ends; rows past the sum (a
# buffer sized by a bound); every row on one expert; one row each
COUNTS = [(3, 0, 5, 2), (0, 4, 4, 0), (2, 1, 0, 3), (0, 0, 9, 0), (1, 1, 1, 1)]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("extra_rows", [0, 3])
def test_products_match_reference(counts, extra_rows):
    experts = make_experts()
    P = sum(counts) + extra_rows
    g = torch.Generator().manual_seed(1)
    x = torch.randn(P, D, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    grad_y = torch.randn(P, D, generator=g, dtype=torch.float64).to(DEVICE)
    device_counts = torch.tensor(counts, device=DEVICE)
    y = experts(x, device_counts, counts=counts, path="per_expert")
    y.backward(grad_y)

    x_ref = x.detach().clone().requires_grad_()
    params = [w.clone().requires_grad_() for w in weights(experts)]
    y_ref = reference(*params, x_ref, counts)
    y_ref.backward(grad_y)
    assert_close(y, y_ref)
    assert_close(x.grad, x_ref.grad)
    for p, ref in zip(experts.parameters(), params):
        assert_close(p.grad, ref.grad)
    assert not y[sum(counts):].any() and not x.grad[sum(counts):].any()
    for e, n in enumerate(counts):  # an expert with no rows gets an exact zero gradient
        if n == 0:
            assert not experts.gate_up_proj.grad[e].any() and not experts.down_proj.grad[e].any()


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    for counts in [(2, 0, 4), (0, 7, 0)]:  # the last: no row past the sum; the first: one
        assert torch.autograd.gradcheck(lambda a, b: _PerExpertLinear.apply(a, b, counts),
                                        (x, w))


def _no_host_reads(monkeypatch):
    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    for name in ("tolist", "item", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, host_read)


def test_host_counts_take_no_sync(monkeypatch):
    """With counts given, the per-expert path reads nothing back and does not use the device
    counts: here they are wrong on purpose, and the output follows the host counts."""
    experts = make_experts()
    counts = (2, 3, 0, 4)
    x = torch.randn(9, D, dtype=torch.float64, device=DEVICE)
    wrong = torch.tensor([9, 0, 0, 0], device=DEVICE)
    with monkeypatch.context() as m:
        _no_host_reads(m)
        y = experts(x, wrong, counts=counts, path="per_expert")
    assert_close(y, reference(*weights(experts), x, counts))


def test_grouped_mm_and_per_expert_agree_on_the_layer_dtype():
    """torch's grouped GEMM (fp32 on CPU, bf16 on CUDA) reads the device counts; the
    per-expert products on the same rows give the same result."""
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    D16, I16 = 16, 32  # grouped_mm wants 16-byte aligned rows
    cfg = MoEConfig.tiny(hidden_size=D16, intermediate_size=I16, num_experts=8)
    torch.manual_seed(0)
    experts = Experts(cfg, 4).to(DEVICE, dtype)
    experts.reset_parameters()
    counts = (5, 0, 3, 6)
    x = torch.randn(16, D16, device=DEVICE).to(dtype)
    # host counts that disagree with the device's: the grouped path reads the device's
    wrong = (14, 0, 0, 0)
    grouped = experts(x, torch.tensor(counts, device=DEVICE), counts=wrong, path="grouped_mm")
    per_expert = experts(x, torch.tensor(counts, device=DEVICE), counts=counts,
                         path="per_expert")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(per_expert[:14], grouped[:14], rtol=tol, atol=tol)
    assert not per_expert[14:].any()
    with pytest.raises(ValueError, match="path must be"):
        experts(x, torch.tensor(counts, device=DEVICE), path="loop")


@pytest.mark.parametrize("counts", [(1, 2, 3), (1, 2, 3, 4, 0), (3, -1, 2, 0), (5, 5, 5, 5),
                                    (2.0, 2, 2, 2)])
@pytest.mark.parametrize("rows", [12, 0])  # no rows: checked all the same
def test_bad_counts(counts, rows):
    experts = make_experts()
    with pytest.raises(ValueError, match="counts must hold 4 ints"):
        experts(torch.randn(rows, D, dtype=torch.float64, device=DEVICE),
                torch.zeros(4, dtype=torch.int64, device=DEVICE), counts=counts)


def test_create_graph_first_order():
    """A gradient taken with create_graph=True (as gradient penalties do) still works; a
    second order through the per-expert products raises."""
    experts = make_experts()
    x = torch.randn(6, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = experts(x, torch.tensor([2, 0, 3, 1], device=DEVICE), counts=(2, 0, 3, 1),
                path="per_expert")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(*weights(experts), x_ref, (2, 0, 3, 1))
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    assert_close(gx, gx_ref)
    # the products' backward is once-differentiable (and so is the Triton activation's)
    with pytest.raises(RuntimeError, match="differentiate|does not require grad"):
        gx.sum().backward()
