"""Router features against the float64 `reference_router` and against properties derived by
hand: score functions, renormalisation, scaling, group-limited top-k, the correction bias,
training losses, per-expert counts and the bias update.

Shapes are trailing-commented: T tokens, D hidden, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ep_moe import MoE, MoEConfig, Router
from ep_moe.reference import reference_router

from conftest import DEVICE

# fp32 router math against float64: logits sum D=16 fp32 products, then one softmax / sigmoid
# and a division, each ~2^-24 relative; 1e-6 leaves an order of magnitude.
RTOL, ATOL = 1e-6, 1e-7


def tiny(**changes) -> MoEConfig:
    # init_std 1/sqrt(D): logits O(1), so the scores are far from uniform and ties are rare
    return MoEConfig.tiny(init_std=0.25, **changes)


def make_inputs(config: MoEConfig, T=32, seed=0):
    """(router, x (T, D)): router weights from `manual_seed(seed)`, x unit-variance."""
    torch.manual_seed(seed)
    router = Router(config).to(DEVICE)
    router.reset_parameters()
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(T, config.hidden_size, generator=g).to(DEVICE)
    return router, x


def with_config(router, **changes):
    """A router with the same weights and `changes` to its config."""
    other = Router(router.config.replace(**changes)).to(DEVICE)
    other.load_state_dict(router.state_dict())
    return other


def logits64(router, x):
    # on the CPU: the expectations below are built there, against `.cpu()` of the outputs
    return (x.double() @ router.weight.detach().double().t()).cpu()  # (T, E)


def params_of(router):
    params = {"router.weight": router.weight.detach()}
    if router.e_score_correction_bias is not None:
        params["router.e_score_correction_bias"] = router.e_score_correction_bias
    return params


# --------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    dict(),  # Mixtral: softmax, renormalised
    dict(norm_topk_prob=False),  # Qwen3 without renormalisation
    dict(routed_scaling_factor=2.5),  # softmax, renormalised, then scaled: the fast path
    dict(score_func="sigmoid", routed_scaling_factor=2.5),
    # DeepSeek-V3 at toy size: 16 experts in 4 groups, best 2 groups kept, K=4, bias
    dict(num_experts=16, top_k=4, score_func="sigmoid", num_expert_groups=4, topk_groups=2,
         use_correction_bias=True, routed_scaling_factor=2.5),
    # groups of one expert: a group scores its only expert
    dict(score_func="sigmoid", num_expert_groups=8, topk_groups=4),
])
def test_matches_reference(changes):
    config = tiny(**changes)
    router, x = make_inputs(config)
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, config.num_experts))
    out = router(x)
    ids, weights = reference_router(x, params_of(router), config)
    assert torch.equal(out.topk_ids, ids)
    assert out.topk_weights.dtype == torch.float32
    torch.testing.assert_close(out.topk_weights.double(), weights, rtol=RTOL, atol=ATOL)


def test_softmax_and_sigmoid():
    """Both are monotone in the logits, so without groups or bias they pick the same experts
    (the K largest logits, in order); the weights are the function at those logits."""
    router, x = make_inputs(tiny(top_k=3, norm_topk_prob=False))
    logits = logits64(router, x)
    top = logits.topk(3, dim=-1)
    expected = {"softmax": logits.softmax(-1).gather(-1, top.indices),
                "sigmoid": top.values.sigmoid()}
    for score_func, weights in expected.items():
        out = with_config(router, score_func=score_func)(x)
        assert torch.equal(out.topk_ids.cpu(), top.indices), score_func
        torch.testing.assert_close(out.topk_weights.double().cpu(), weights, rtol=RTOL,
                                   atol=ATOL)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_norm_topk_prob(score_func):
    router, x = make_inputs(tiny(top_k=3, score_func=score_func, norm_topk_prob=False))
    raw = router(x).topk_weights
    normed = with_config(router, norm_topk_prob=True)(x).topk_weights
    torch.testing.assert_close(normed.sum(-1), torch.ones(x.shape[0], device=DEVICE))
    torch.testing.assert_close(normed, raw / raw.sum(-1, keepdim=True))
    if score_func == "softmax":  # 3 of 8 probabilities: strictly less than all the mass
        assert (raw.sum(-1) < 1 - 1e-3).all()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_routed_scaling_factor(score_func):
    router, x = make_inputs(tiny(score_func=score_func))
    plain = router(x)
    scaled = with_config(router, routed_scaling_factor=2.5)(x)
    assert torch.equal(scaled.topk_ids, plain.topk_ids)  # selection unchanged
    torch.testing.assert_close(scaled.topk_weights, 2.5 * plain.topk_weights)
    torch.testing.assert_close(scaled.topk_weights.sum(-1),
                               torch.full((x.shape[0],), 2.5, device=DEVICE))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_topk(score_func):
    E, G, kept, K = 16, 4, 2, 4
    config = tiny(num_experts=E, top_k=K, score_func=score_func, num_expert_groups=G,
                  topk_groups=kept)
    router, x = make_inputs(config, T=64)
    out = router(x)
    logits = logits64(router, x)
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    unlimited = scores.topk(K, -1).indices
    for t in range(x.shape[0]):
        # a group scores the sum of its two best experts (DeepSeek-V3), groups are contiguous
        group_score = [sorted(scores[t, g * E // G:(g + 1) * E // G].tolist())[-2:]
                       for g in range(G)]
        ranked = sorted(range(G), key=lambda g: -sum(group_score[g]))
        best = set(ranked[:kept])
        chosen = out.topk_ids[t].tolist()
        assert {e // (E // G) for e in chosen} <= best, (t, chosen, best)
        # within the kept groups, still the K best scores
        allowed = [e for e in range(E) if e // (E // G) in best]
        expected = sorted(allowed, key=lambda e: -scores[t, e].item())[:K]
        assert chosen == expected, t
    # the limit matters at this seed: some token's unrestricted top-K leaves the kept groups
    assert not torch.equal(out.topk_ids, unlimited.to(out.topk_ids.device))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_correction_bias_selects_but_does_not_weigh(norm_topk_prob):
    config = tiny(score_func="sigmoid", use_correction_bias=True, norm_topk_prob=norm_topk_prob)
    router, x = make_inputs(config)
    assert "e_score_correction_bias" in dict(router.named_buffers())
    assert all(p is router.weight for p in router.parameters())  # never trained by gradients
    plain = router(x)
    favoured = 5
    router.e_score_correction_bias[favoured] = 100.0
    out = router(x)
    assert (out.topk_ids[:, 0] == favoured).all()  # always chosen, and first
    assert not torch.equal(out.topk_ids, plain.topk_ids)  # the bias did change selections
    scores = logits64(router, x).sigmoid()
    weights = scores.gather(-1, out.topk_ids.cpu())  # unbiased scores of the chosen experts
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out.topk_weights.double().cpu(), weights, rtol=RTOL, atol=ATOL)
    assert (out.topk_weights[:, 0] < 1.0).all()  # a weight of 100 + score would show here


@pytest.mark.parametrize("changes, counted", [
    (dict(), False),                   # training without losses: counted when read
    (dict(z_loss_coef=1e-3), False),   # the z-loss does not use the counts
    (dict(aux_loss_coef=0.01), True),  # the load-balancing loss does: counted in the forward
])
def test_num_tokens_per_expert(changes, counted):
    router, x = make_inputs(tiny(top_k=3, **changes), T=40)
    out = router(x)
    assert (out.counts is not None) == counted
    counts = [0] * 8
    for e in out.topk_ids.flatten().tolist():
        counts[e] += 1
    assert out.num_tokens_per_expert.tolist() == counts
    assert out.num_tokens_per_expert.dtype == torch.int64


def test_logits_stay_fp32_under_autocast():
    # autocast would run the gate GEMM in bf16: top-k over bf16 logits flips near-ties
    router, x = make_inputs(tiny(), T=64)
    expected = router(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = router(x)
    assert torch.equal(out.topk_ids, expected.topk_ids)
    assert out.topk_weights.dtype == torch.float32
    torch.testing.assert_close(out.topk_weights, expected.topk_weights, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------------
# Training losses
# --------------------------------------------------------------------------------------------

def switch_loss(logits, topk_ids, score_func):
    """E * sum_e f_e * P_e: f_e share of the T*K slots that chose e, P_e the mean probability
    of e (sigmoid scores normalised per token)."""
    T, K = topk_ids.shape
    E = logits.shape[-1]
    f = F.one_hot(topk_ids, E).sum((0, 1)).double() / (T * K)
    probs = logits.softmax(-1) if score_func == "softmax" else \
        logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
    return E * (f * probs.mean(0)).sum()


def z_loss(logits):
    return (torch.logsumexp(logits, -1) ** 2).mean()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("aux_coef, z_coef", [(0.01, 0.0), (0.0, 1e-3), (0.01, 1e-3)])
def test_aux_loss_value(score_func, aux_coef, z_coef):
    config = tiny(score_func=score_func, aux_loss_coef=aux_coef, z_loss_coef=z_coef)
    router, x = make_inputs(config)
    out = router(x)
    logits = logits64(router, x)
    expected = aux_coef * switch_loss(logits, out.topk_ids.cpu(), score_func) \
        + z_coef * z_loss(logits)
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.ndim == 0
    torch.testing.assert_close(out.aux_loss.double().cpu(), expected, rtol=1e-5, atol=0.0)


def test_switch_loss_is_one_with_uniform_probabilities():
    """P_e = 1/E for all e: E * sum_e f_e / E = sum_e f_e = 1, whatever top-K picks from ties."""
    router, x = make_inputs(tiny(aux_loss_coef=0.3), T=8)
    with torch.no_grad():
        router.weight.zero_()
    torch.testing.assert_close(router(x).aux_loss.cpu(), torch.tensor(0.3), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("changes, train", [
    (dict(aux_loss_coef=0.01, z_loss_coef=1e-3), False),  # eval mode: no training losses
    (dict(), True),  # both coefficients 0
])
def test_aux_loss_none(changes, train):
    router, x = make_inputs(tiny(**changes))
    router.train(train)
    assert router(x).aux_loss is None


@pytest.mark.parametrize("groups", [1, 4])  # T=0 through the plain and the group-limited path
def test_no_tokens(groups):
    config = tiny(aux_loss_coef=0.01, num_expert_groups=groups, topk_groups=min(groups, 2))
    router, x = make_inputs(config, T=0)
    out = router(x)
    assert out.aux_loss is None
    assert out.topk_ids.shape == out.topk_weights.shape == (0, 2)
    assert torch.equal(out.num_tokens_per_expert, torch.zeros(8, dtype=torch.int64, device=DEVICE))


def test_moe_aux_loss_gradient_reaches_router():
    """Training with aux_loss_coef > 0 adds d(coef * loss)/d(router.weight) to the router's
    gradient, through y's backward; nothing else changes."""
    coef = 2.0  # large, so the difference is far above fp32 noise
    base = tiny(top_k=2)
    runs = {}
    for c in (0.0, coef):
        torch.manual_seed(0)
        moe = MoE(base.replace(aux_loss_coef=c), device=DEVICE)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 4, 16, generator=g).to(DEVICE)  # (B, S, D)
        grad_y = torch.randn(3, 4, 16, generator=g).to(DEVICE)
        y, route = moe(x, return_router_output=True)
        assert (route.aux_loss is None) == (c == 0.0)
        y.backward(grad_y)
        runs[c] = (moe, y.detach(), route)
    (plain, y0, _), (aux, y1, route) = runs[0.0], runs[coef]
    assert torch.equal(y0, y1)
    for (name, p0), p1 in zip(plain.named_parameters(), aux.parameters()):
        if name != "router.weight":
            assert torch.equal(p0.grad, p1.grad), name

    w = aux.router.weight.detach().double().requires_grad_()
    logits = x.reshape(-1, 16).double() @ w.t()
    expected = torch.autograd.grad(coef * switch_loss(logits, route.topk_ids, "softmax"), w)[0]
    diff = aux.router.weight.grad.double() - plain.router.weight.grad.double()
    # the difference of two fp32 gradients carries their roundoff: ~2^-24 of their size
    noise = 1e-5 * plain.router.weight.grad.abs().max().item()
    assert expected.abs().max() > 100 * noise  # the signal is far above that
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=noise)


@pytest.mark.parametrize("score_func, aux_coef, z_coef", [
    ("softmax", 0.1, 0.0),   # Switch loss through the softmax
    ("sigmoid", 0.1, 0.0),   # ... through the per-token normalisation of the sigmoid scores
    ("softmax", 0.0, 0.01),  # z-loss alone: its gradient pulls every logit towards 0
])
def test_aux_loss_gradient(score_func, aux_coef, z_coef):
    """d aux_loss / d router.weight equals float64 autograd of the same losses (the slot
    shares f_e are counts: constant)."""
    router, x = make_inputs(tiny(score_func=score_func, aux_loss_coef=aux_coef,
                                 z_loss_coef=z_coef))
    out = router(x)
    out.aux_loss.backward()
    w = router.weight.detach().double().cpu().requires_grad_()
    logits = x.double().cpu() @ w.t()
    expected = aux_coef * switch_loss(logits, out.topk_ids.cpu(), score_func) \
        + z_coef * z_loss(logits)
    (grad,) = torch.autograd.grad(expected, w)
    # fp32 against float64 through T=32 rows of D=16: ~2^-24 relative to the largest entries
    torch.testing.assert_close(router.weight.grad.double().cpu(), grad, rtol=1e-5,
                               atol=1e-6 * grad.abs().max().item())


# --------------------------------------------------------------------------------------------
# Correction-bias update
# --------------------------------------------------------------------------------------------

def test_update_correction_bias_direction():
    router, _ = make_inputs(tiny(score_func="sigmoid", use_correction_bias=True))
    counts = torch.tensor([0, 1, 2, 2, 2, 3, 4, 2], device=DEVICE)  # mean 2
    router.update_correction_bias(counts, rate=0.1)
    bias = router.e_score_correction_bias
    assert bias.dtype == torch.float32
    torch.testing.assert_close(
        bias.cpu(), torch.tensor([0.1, 0.1, 0.0, 0.0, 0.0, -0.1, -0.1, 0.0]))


def test_update_correction_bias_default_rate():
    # the default step is DeepSeek-V3's bias update speed, 1e-3 per call
    router, _ = make_inputs(tiny(score_func="sigmoid", use_correction_bias=True))
    router.update_correction_bias(torch.tensor([0, 1, 2, 2, 2, 3, 4, 2], device=DEVICE))
    torch.testing.assert_close(
        router.e_score_correction_bias.cpu(),
        torch.tensor([1e-3, 1e-3, 0.0, 0.0, 0.0, -1e-3, -1e-3, 0.0]))


def test_reset_parameters():
    """A trained correction bias goes back to 0; the gate weight is drawn from N(0, init_std)."""
    config = MoEConfig.tiny(hidden_size=256, num_experts=64, top_k=2, init_std=0.1,
                            score_func="sigmoid", use_correction_bias=True)
    router = Router(config).to(DEVICE)
    router.e_score_correction_bias.fill_(0.3)
    torch.manual_seed(0)
    router.reset_parameters()
    assert torch.equal(router.e_score_correction_bias, torch.zeros(64, device=DEVICE))
    # 64 * 256 draws: the sample std has a relative spread of 1/sqrt(2n) ~ 0.6%, the sample
    # mean a spread of 0.1/128 ~ 8e-4; the bounds are ~8 and ~6 of those
    assert abs(router.weight.std().item() - 0.1) < 0.005
    assert abs(router.weight.mean().item()) < 0.005


def test_update_correction_bias_balances_load():
    """Repeated updates move tokens from an over-loaded expert to the others."""
    config = tiny(score_func="sigmoid", use_correction_bias=True)
    router, x = make_inputs(config, T=64)
    with torch.no_grad():
        router.weight[3] += 0.5  # expert 3 scores higher on most tokens
    first = router(x).num_tokens_per_expert
    for _ in range(50):
        router.update_correction_bias(router(x).num_tokens_per_expert, rate=0.02)
    last = router(x).num_tokens_per_expert
    assert first.max() == first[3]
    assert last[3] < first[3]
    assert last.max() - last.min() < first.max() - first.min()


def test_update_correction_bias_needs_bias():
    router, _ = make_inputs(tiny())
    with pytest.raises(ValueError, match="use_correction_bias"):
        router.update_correction_bias(torch.ones(8, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# MoEConfig: the router's switches
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    (dict(norm_topk_prob="no"), r"MoEConfig\.norm_topk_prob must be a bool"),  # truthy str
    (dict(use_correction_bias=1), r"MoEConfig\.use_correction_bias must be a bool"),  # an int
    # inf and nan pass the ">= 0" check: only the finiteness check stops them
    (dict(aux_loss_coef=float("inf")), r"MoEConfig\.aux_loss_coef must be a finite number"),
    (dict(z_loss_coef=float("nan")), r"MoEConfig\.z_loss_coef must be a finite number"),
    # 0 kept groups: named as such, not as a top_k that "exceeds the experts in the kept groups"
    (dict(num_expert_groups=2, topk_groups=0), r"MoEConfig\.topk_groups must be a positive int"),
])
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


def test_deepseek_v3_preset_routes_like_deepseek_v3():
    # DeepSeek-V3's config.json: sigmoid scores, 8 groups of which 4 are kept, top-8,
    # renormalised, scaled by 2.5, noaux_tc selection (the correction bias)
    config = MoEConfig.deepseek_v3()
    assert (config.score_func, config.num_expert_groups, config.topk_groups, config.top_k,
            config.norm_topk_prob, config.routed_scaling_factor) == ("sigmoid", 8, 4, 8, True, 2.5)
    router = Router(config)
    assert router.e_score_correction_bias is not None
    assert router.e_score_correction_bias.shape == (256,)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("training", [False, True])
def test_router_output_keeps_the_fp32_logits(score_func, training):
    # transformers' output_router_logits reads these: the gate's fp32 logits, before scores
    router, x = make_inputs(tiny(score_func=score_func, aux_loss_coef=0.01))
    router.train(training)
    route = router(x)
    assert route.logits.dtype == torch.float32 and route.logits.shape == (32, 8)
    torch.testing.assert_close(route.logits.double().cpu(), logits64(router, x),
                               rtol=RTOL, atol=ATOL)
