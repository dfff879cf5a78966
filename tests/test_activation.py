"""Fused gated activation (`act(gate) * up`) against float64 torch, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

import ep_moe.kernels.activation as activation_module
from ep_moe.kernels.activation import gated_activation

from conftest import DEVICE, needs_triton

ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# fp32: a few ulps of transcendental error; bf16/fp16: one rounding of the output (2^-8 / 2^-11
# relative) on values of magnitude up to ~4, so an absolute bound of 4 ulps of that
TOL = {torch.float32: 1e-5, torch.float16: 4 * 4 * 2.0**-11, torch.bfloat16: 4 * 4 * 2.0**-8}

pytestmark = needs_triton




def make_inputs(P, I, dtype, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(P, 2 * I, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(P, I, generator=gen).to(device=device, dtype=dtype)
    return h.requires_grad_(), g


def reference(h, g, act):
    h64 = h.detach().double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    y = ACTS[act](gate) * up
    y.backward(g.double())
    return y.detach(), h64.grad


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P,I", [
    (1, 1),      # one element per half
    (5, 37),     # odd I: masked tail
    (3, 2500),   # I above one block: several column programs
    (0, 16),     # no rows routed here
])
def test_matches_float64(act, dtype, P, I):
    h, g = make_inputs(P, I, dtype)
    y = gated_activation(h, act)
    y.backward(g)
    y_ref, gh_ref = reference(h, g, act)
    assert y.dtype == dtype and y.shape == (P, I)
    torch.testing.assert_close(y.double(), y_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(h.grad.double(), gh_ref, atol=4 * TOL[dtype], rtol=TOL[dtype])


def test_deterministic():
    h, g = make_inputs(9, 129, torch.bfloat16)
    a = gated_activation(h, "silu")
    b = gated_activation(h, "silu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(4, 7), "h must be"),        # odd last dim: no gate/up halves
    (torch.randn(2, 4, 8), "h must be"),     # 3-D
])
def test_bad_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        gated_activation(bad, "silu")


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        gated_activation(torch.randn(2, 8), "tanh")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_num_rows_leaves_the_tail_untouched(dtype, monkeypatch):
    # a bound on the rows (fixed-size exchange): rows from num_rows on hold garbage (NaN here)
    # and must be neither read into the first rows nor written, forward and backward
    P, I, n = 7, 37, 4
    h, g = make_inputs(P, I, torch.float32)
    with torch.no_grad():
        h[n:] = float("nan")
    sentinel = 12345.0
    empty = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty(t, **kw).fill_(sentinel))
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda t, *size, **kw: new_empty(t, *size, **kw).fill_(sentinel))
    y = gated_activation(h, "silu", torch.tensor([n], dtype=dtype, device=DEVICE))
    y.backward(g)
    monkeypatch.undo()
    y_ref, gh_ref = reference(h[:n], g[:n], "silu")
    torch.testing.assert_close(y[:n].double(), y_ref, atol=TOL[torch.float32], rtol=1e-5)
    torch.testing.assert_close(h.grad[:n].double(), gh_ref, atol=4e-5, rtol=1e-5)
    assert (y[n:] == sentinel).all() and (h.grad[n:] == sentinel).all()


@pytest.mark.parametrize("bad", [
    torch.tensor([1, 2]),              # two elements
    torch.tensor([1.0]),               # float
    3,                                 # a host int
    torch.tensor([1], device="meta"),  # on another device than h
])
def test_bad_num_rows(bad):
    with pytest.raises(ValueError, match="num_rows"):
        gated_activation(torch.randn(2, 8, device=DEVICE), "silu", bad)


def test_needs_triton(monkeypatch):
    # without CUDA or the interpreter: a message, not a Triton launch on a CPU tensor
    monkeypatch.setattr(activation_module, "use_triton", lambda t: False)
    with pytest.raises(ValueError, match="CUDA"):
        gated_activation(torch.randn(2, 8), "silu")


def test_relu_gradient_at_zero():
    # torch's relu has derivative 0 at a gate of exactly 0 (zero-padded rows, underflow): the
    # gate's gradient is 0 there, not g * up
    h = torch.tensor([[-1.0, 0.0, 0.0, 2.0, 3.0, 3.0, 3.0, 3.0]], device=DEVICE,
                     requires_grad=True)  # gate [-1, 0, 0, 2], up 3
    g = torch.ones(1, 4, device=DEVICE)
    y = gated_activation(h, "relu")
    y.backward(g)
    y_ref, gh_ref = reference(h, g, "relu")
    assert gh_ref[0, :4].tolist() == [0.0, 0.0, 0.0, 3.0]
    assert torch.equal(y.double(), y_ref) and torch.equal(h.grad.double(), gh_ref)


@pytest.mark.parametrize("layout", [
    "h a column slice",  # [gate | up] the first 2I columns of a wider buffer
    "grad transposed",   # the gradient arriving column-major
])
def test_strided_inputs(layout):
    P, I = 5, 37
    h, g = make_inputs(P, I, torch.float32)
    y_ref, gh_ref = reference(h, g, "silu")
    leaf = h
    if layout == "h a column slice":
        leaf = torch.cat([h.detach(), torch.randn(P, 3, device=DEVICE)], 1).requires_grad_()
        h = leaf[:, :2 * I]
    else:
        g = g.t().contiguous().t()
    y = gated_activation(h, "silu")
    y.backward(g)
    torch.testing.assert_close(y.double(), y_ref, atol=TOL[torch.float32], rtol=1e-5)
    torch.testing.assert_close(leaf.grad[:, :2 * I].double(), gh_ref, atol=4e-5, rtol=1e-5)


def test_bf16_output_rounds_to_nearest_even():
    """relu(gate) * up is one exact fp32 product of bf16 values: the stored bf16 must equal
    torch's round-to-nearest-even cast of it bit for bit (a truncating cast would not)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(32, 2 * 48, generator=g).to(DEVICE, torch.bfloat16)
    gate, up = h.float().chunk(2, dim=-1)
    want = (torch.relu(gate) * up).to(torch.bfloat16)
    got = gated_activation(h, "relu")
    assert torch.equal(got, want), (got != want).sum().item()
