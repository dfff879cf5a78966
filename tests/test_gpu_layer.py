"""The layer on a GPU: bf16 against the float64 reference, and CUDA-graph capture of the
single-process forward (no host syncs on that path). Skipped without a GPU."""

import pytest
import torch

from ep_moe import MoE, MoEConfig
from ep_moe.reference import reference_moe

from conftest import capture_no_grad

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("cfg", [
    MoEConfig.tiny(hidden_size=128, intermediate_size=64),                     # grouped GEMM
    MoEConfig.tiny(hidden_size=128, intermediate_size=64, expert_impl="dense"),  # asked for
    MoEConfig.tiny(hidden_size=128, intermediate_size=64, num_experts=16, top_k=4,
                   score_func="sigmoid", num_expert_groups=4, topk_groups=2,
                   use_correction_bias=True, num_shared_experts=1),           # DeepSeek-style
], ids=["grouped", "dense", "deepseek"])
def test_bf16_layer_matches_float64(cfg):
    torch.manual_seed(0)
    layer = MoE(cfg, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(48, cfg.hidden_size, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    y, route = layer(x, return_router_output=True)
    params = {k: v.detach() for k, v in layer.state_dict().items()}
    y_ref, _, _ = reference_moe(x.detach(), params, cfg, topk_ids=route.topk_ids)
    assert rel(y, y_ref) < 2e-2  # bf16 operands: a few 2^-8 roundings
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_forward_captures_in_a_cuda_graph():
    torch.manual_seed(0)
    cfg = MoEConfig.tiny(hidden_size=128, intermediate_size=64)
    layer = MoE(cfg, device="cuda", dtype=torch.bfloat16).eval()
    static_x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    graph, static_y = capture_no_grad(layer, static_x)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        expected = layer(fresh)
    assert torch.equal(static_y, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_logits_one_gemm_into_fp32(dtype):
    """The 16-bit GEMM with fp32 output against the fp32 GEMM of the upcast operands: the
    products are exact either way, so only the order of fp32 sums differs; the gradients are
    the fp32 GEMMs autograd runs through the upcast, cast to each operand's dtype."""
    from ep_moe.router import router_logits
    torch.manual_seed(0)
    x = torch.randn(333, 512, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.05 * torch.randn(64, 512, device="cuda", dtype=dtype)).requires_grad_()
    g = torch.randn(333, 64, device="cuda")
    logits = router_logits(x, w)
    assert logits.dtype == torch.float32
    assert type(logits.grad_fn).__name__ == "_LogitsFp32Backward"  # the one-GEMM path ran
    gx, gw = torch.autograd.grad(logits, (x, w), g)
    x_ref, w_ref = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x_ref @ w_ref.t()
    gx_ref, gw_ref = torch.autograd.grad(ref, (x_ref, w_ref), g.double())
    assert (logits.double() - ref).abs().max() < 1e-5 * ref.abs().max()  # fp32 sums of 512
    assert gx.dtype == dtype and gw.dtype == dtype
    assert rel(gx, gx_ref) < 1e-2 and rel(gw, gw_ref) < 1e-2  # one 16-bit rounding each
    with torch.no_grad():  # no autograd: the plain op, the same numbers
        assert torch.equal(router_logits(x, w), logits.detach())


def test_router_logits_fp16_accumulation_falls_back():
    # cuBLAS refuses fp16 inputs into an fp32 output while fp16 accumulation is allowed
    from ep_moe.router import router_logits
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "allow_fp16_accumulation"):
        pytest.skip("this torch has no fp16-accumulation switch")
    x = torch.randn(40, 256, device="cuda", dtype=torch.float16)
    w = 0.05 * torch.randn(16, 256, device="cuda", dtype=torch.float16)
    before = matmul.allow_fp16_accumulation
    try:
        matmul.allow_fp16_accumulation = True
        logits = router_logits(x, w)
    finally:
        matmul.allow_fp16_accumulation = before
    assert logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(x.float(), w.float()))
