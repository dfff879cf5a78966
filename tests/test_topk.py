"""`softmax_topk`, the router's inference top-k kernel, against float64 softmax and top-k.

Runs wherever Triton does: CUDA, or the CPU under TRITON_INTERPRET=1 (CI)."""

from __future__ import annotations

import pytest
import torch

from ep_moe import MoE, MoEConfig
from ep_moe.kernels.topk import softmax_topk, topk_config

from conftest import DEVICE, needs_triton

pytestmark = needs_triton
ATOL = 1e-6  # fp32 exp and division against float64: a few ulps of weights <= 1


def make_inputs(T, E, seed=0, scale=2.0):
    """Distinct fp32 logits (ties are tested on their own), spread like a trained router's."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * scale).to(DEVICE)


def reference(logits, k, renormalize):
    """float64 ids (largest first) and weights."""
    x = logits.double().cpu()
    top = x.topk(k, dim=-1, sorted=True)
    probs = top.values.softmax(-1) if renormalize else x.softmax(-1).gather(-1, top.indices)
    return top.indices, probs


@pytest.mark.parametrize("T, E, K", [
    (1, 8, 2),  # one token, Mixtral's router
    (37, 128, 8),  # Qwen3's: one token a program
    (300, 256, 8),  # DeepSeek-V3's width: one token over two warps
    (5, 6, 6),  # K = E, E not a power of two
    (9, 60, 1),  # K = 1, two tokens a program and a partial last one
    (0, 8, 2),  # no tokens
])
@pytest.mark.parametrize("renormalize", [True, False])
def test_against_float64(T, E, K, renormalize):
    logits = make_inputs(T, E)
    ids, weights = softmax_topk(logits, K, renormalize)
    ref_ids, ref_weights = reference(logits, K, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (T, K)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu().double(), ref_weights, rtol=0, atol=ATOL)
    if renormalize and T:
        torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(T), rtol=0, atol=1e-6)


@pytest.mark.parametrize("E", [8, 60, 128, 256])  # a config per width: several tokens or one
def test_configs_agree(E):
    # the launch config changes how tokens are spread over programs, never the result
    logits = make_inputs(70, E, seed=E)
    ids, weights = softmax_topk(logits, 4, True)
    for config in [(1, 1), (2, 1), (16, 4), topk_config(E)]:
        c_ids, c_weights = softmax_topk(logits, 4, True, config)
        assert torch.equal(c_ids, ids), config
        torch.testing.assert_close(c_weights, weights, rtol=0, atol=ATOL)


def test_strided_logits_and_determinism():
    logits = make_inputs(50, 2 * 40)[:, ::2]  # a view with stride 2 along E
    ids, weights = softmax_topk(logits, 4, True)
    ref_ids, ref_weights = reference(logits, 4, True)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu().double(), ref_weights, rtol=0, atol=ATOL)
    again = softmax_topk(logits, 4, True)
    assert torch.equal(again[0], ids) and torch.equal(again[1], weights)  # bitwise


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: inf - inf
def test_ties_nan_and_inf():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [1.0, 1.0, 1.0, 0.0, 1.0],  # a four-way tie: the lower ids first
        [-inf, -inf, -inf, -inf, -inf],  # nothing to choose from: still 3 distinct ids
        [nan, 0.0, 2.0, 1.0, -1.0],  # NaN ranks first, as in torch.topk; weights NaN
        [0.0, inf, 1.0, 2.0, 3.0],  # +inf first; its softmax is NaN, as torch's
        [inf, nan, 1.0, 0.0, 2.0],  # NaN above +inf, as in torch.topk
    ], device=DEVICE)
    ids, weights = softmax_topk(logits, 3, True)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2], [0, 2, 3], [1, 4, 3], [1, 0, 4]]
    assert torch.equal(ids[2:].cpu(), logits[2:].cpu().topk(3).indices)  # torch's order
    torch.testing.assert_close(weights[0].cpu(), torch.full((3,), 1 / 3))
    assert weights[1:].isnan().all()
    for row in ids.tolist():
        assert len(set(row)) == 3 and all(0 <= i < 5 for i in row)


@pytest.mark.parametrize("logits, k, match", [
    (torch.zeros(4, 8, dtype=torch.float16), 2, "float32"),
    (torch.zeros(4, 8, 1), 2, r"\(T, E\)"),
    (torch.zeros(4, 8), 9, r"k must be an int in \[1, E=8\], got 9"),
    (torch.zeros(4, 8), 0, "got 0"),
    (torch.zeros(4, 8), True, "got True"),
])
def test_validation(logits, k, match):
    with pytest.raises(ValueError, match=match):
        softmax_topk(logits.to(DEVICE), k, True)


@pytest.mark.parametrize("config", [(3, 1), (0, 4), (4, 0), (4,)])
def test_config_validation(config):
    with pytest.raises(ValueError, match="config must be"):
        softmax_topk(make_inputs(4, 8), 2, True, config)


@pytest.mark.parametrize("T, E, K", [(37, 128, 8), (9, 60, 1), (20, 6, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradient_against_float64(T, E, K, renormalize):
    logits = make_inputs(T, E, seed=T).requires_grad_()
    grad_w = torch.randn(T, K, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ids, weights = softmax_topk(logits, K, renormalize)
    assert not ids.requires_grad and weights.requires_grad
    weights.backward(grad_w)
    x64 = logits.detach().double().cpu().requires_grad_()
    _, ref = reference(x64, K, renormalize)  # float64 and CPU already: the same graph
    ref.backward(grad_w.double().cpu())
    torch.testing.assert_close(logits.grad.cpu().double(), x64.grad, rtol=0, atol=ATOL)
    if renormalize:  # only the picked logits move the weights
        unpicked = torch.ones(T, E, dtype=torch.bool).scatter_(1, ids.cpu(), False)
        assert (logits.grad.cpu()[unpicked] == 0).all()


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_same_with_and_without_grad(norm_topk_prob):
    # one kernel either way: a recompute (activation checkpointing) picks what the first pass
    # picked, bit for bit
    torch.manual_seed(0)
    moe = MoE(MoEConfig.tiny(num_experts=12, top_k=3, norm_topk_prob=norm_topk_prob,
                             init_std=0.5), device=DEVICE)
    x = torch.randn(40, moe.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        inference = moe.router(x)
    training = moe.router(x.requires_grad_())
    assert torch.equal(inference.topk_ids, training.topk_ids)
    assert torch.equal(inference.topk_weights, training.topk_weights.detach())
    assert training.topk_weights.requires_grad
