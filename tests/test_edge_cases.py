"""Edge cases found in review: loss scaling of the attached aux loss, the fp32 selection bias
under dtype casts, deferred (meta) init, input validation, K = 0."""

import pytest
import torch

from ep_moe import ExpertPlacement, MoE, MoEConfig, moe_fused_mul_sum


def _router_grad(layer, x, loss_scale):
    layer.zero_grad()
    (layer(x).sum() * loss_scale).backward()
    return layer.router.weight.grad.clone()


def test_aux_loss_gradient_follows_the_loss_scale():
    cfg = MoEConfig.tiny(aux_loss_coef=0.01, z_loss_coef=0.001)
    torch.manual_seed(0)
    with_aux = MoE(cfg)
    without = MoE(cfg.replace(aux_loss_coef=0.0, z_loss_coef=0.0))
    without.load_state_dict(with_aux.state_dict())
    x = torch.randn(32, 16)
    aux_1 = _router_grad(with_aux, x, 1.0) - _router_grad(without, x, 1.0)
    with_aux.aux_loss_grad_scale = 256.0  # e.g. an AMP loss scale applied to the main loss
    aux_256 = _router_grad(with_aux, x, 256.0) - _router_grad(without, x, 256.0)
    assert aux_1.norm() > 0
    torch.testing.assert_close(aux_256, 256.0 * aux_1, rtol=1e-4, atol=1e-7)


def test_correction_bias_stays_fp32_after_casts():
    layer = MoE(MoEConfig.tiny(score_func="sigmoid", use_correction_bias=True)).bfloat16()
    bias = layer.router.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert layer.router.weight.dtype == torch.bfloat16
    for _ in range(600):  # past 0.5, where bf16 steps (2^-8) would swallow 1e-3 updates
        layer.router.update_correction_bias(torch.arange(8.0), rate=1e-3)
    torch.testing.assert_close(layer.router.e_score_correction_bias[0], torch.tensor(0.6))


def test_update_correction_bias_checks_shape():
    layer = MoE(MoEConfig.tiny(use_correction_bias=True))
    with pytest.raises(ValueError, match="num_tokens_per_expert"):
        layer.router.update_correction_bias(torch.ones(3))


def test_meta_device_then_materialise():
    torch.manual_seed(3)
    reference = MoE(MoEConfig.tiny())
    torch.manual_seed(3)
    deferred = MoE(MoEConfig.tiny(), device="meta")
    assert deferred.experts.gate_up_proj.is_meta
    deferred.to_empty(device="cpu")
    torch.manual_seed(3)
    deferred.reset_parameters()
    for (name, a), (_, b) in zip(reference.state_dict().items(), deferred.state_dict().items()):
        assert torch.equal(a, b), name
    # not in the state dict (derived from the placement), but read by every sharded forward
    assert torch.equal(deferred.expert_map, reference.expert_map)


@pytest.mark.parametrize("x,exc,match", [
    ([[0.0] * 16], TypeError, "x must be a torch.Tensor"),
    (torch.tensor(1.0), ValueError, "x must have last dim"),
    (torch.randn(4, 15), ValueError, "x must have last dim"),
    (torch.randn(4, 16, dtype=torch.float16), ValueError, "x must match"),  # fp32 layer
    # no kernel takes float64: named before any collective, on every rank alike
    (torch.randn(4, 16, dtype=torch.float64), TypeError, "x must be float32, float16 or bf"),
])
def test_forward_rejects_bad_x(x, exc, match):
    with pytest.raises(exc, match=match):
        MoE(MoEConfig.tiny())(x)


@pytest.mark.parametrize("change,field", [
    (dict(init_std=None), "init_std"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    (dict(num_shared_experts=1.5), "num_shared_experts"),
    (dict(gated="no"), "gated"),
])
def test_config_rejects_bad_types(change, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig.tiny(**change)


@pytest.mark.parametrize("world_size", [0, -1])
def test_placement_rejects_empty_groups(world_size):
    with pytest.raises(ValueError, match="world_size"):
        ExpertPlacement(8, world_size)


def test_zero_slots_give_zeros():
    x = torch.randn(3, 0, 8, requires_grad=True)
    w = torch.randn(3, 0, requires_grad=True)
    out = moe_fused_mul_sum(x, w)
    assert out.shape == (3, 8) and (out == 0).all()
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
