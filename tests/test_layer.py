"""`MoE` forward and backward against the float64 oracle `reference_moe`, plus edge cases,
determinism, initialisation, config validation and checkpoints (single process).

Shapes are trailing-commented: T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ep_moe import MoE, MoEConfig
from ep_moe.dispatch import chunk_bounds
from ep_moe.plan import plan_forward
from ep_moe.reference import reference_moe

from conftest import DEVICE, TRITON_RUNS


# Allowed error = TOL[dtype] * max(max|reference|, SCALE_FLOOR) over the tensor compared
# (outputs and every gradient). Measured worst case over seeds, tiny configs: fp32 4e-7 relative,
# bf16 1.3e-2, fp16 1.9e-3.
TOL = {
    # fp32 storage (2^-24 roundoff) through ~6 roundings and D/I-term sums: 5e-6 is ~80 ulps;
    # CUDA GEMMs split and re-add K differently (an expert gradient was 5.7e-6 off on an H200)
    torch.float32: 2e-5 if DEVICE.type == "cuda" else 5e-6,
    # a bf16 rounding (2^-8 relative) after
    # each of gate_up GEMM, activation, gate*up, down GEMM, combine, shared add: 8 * 2^-8
    torch.bfloat16: 2.0**-5,
    # the same chain with fp16's 10 mantissa bits: 8 * 2^-11
    torch.float16: 2.0**-8,
}
# Tensors here are O(1) (unit-variance x, init_std 1/sqrt(D)). A gradient that is zero in exact
# arithmetic (the router's at K=1 with renormalisation: the weight is 1 whatever the logits) comes
# out as the cancellation noise of O(1) terms, so the scale never drops below 0.1.
SCALE_FLOOR = 0.1
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tiny(**changes) -> MoEConfig:
    # D=16, I=24, E=8, K=2; init_std 1/sqrt(D) puts pre-activations at O(1), so the activation's
    # non-linearity and the router's choice (not a near-uniform softmax) are exercised. The
    # automatic dense path is off (a few tokens would always take it): "dense" tests it
    return MoEConfig.tiny(init_std=0.25, **{"dense_max_rows": 0, **changes})


def make_inputs(config: MoEConfig, shape=(13,), dtype=torch.float32, seed=0):
    """(layer, x, grad_y): a layer built after `manual_seed(seed)` (a random correction bias
    when it has one), x of shape (*shape, D) requiring grad, and an upstream gradient."""
    torch.manual_seed(seed)
    moe = MoE(config, device=DEVICE, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1000)
    if moe.router.e_score_correction_bias is not None:
        # comparable to the gaps between sigmoid scores, so it changes some selections
        moe.router.e_score_correction_bias.copy_(torch.rand(config.num_experts, generator=g) / 5)
    x = torch.randn(*shape, config.hidden_size, generator=g).to(DEVICE, dtype)
    grad_y = torch.randn(*shape, config.hidden_size, generator=g).to(DEVICE, dtype)
    return moe, x.requires_grad_(), grad_y


def run_layer(moe, x, grad_y):
    """Forward + backward through the layer: (y, route, x.grad, {param name: grad})."""
    y, route = moe(x, return_router_output=True)
    y.backward(grad_y)
    return y, route, x.grad, {n: p.grad for n, p in moe.named_parameters()}


def run_reference(moe, x, grad_y, topk_ids):
    """The same through `reference_moe` in float64 on the layer's own weights, with the
    layer's expert choice pinned (fp32 and float64 may order near-ties differently)."""
    D = moe.config.hidden_size
    params = {n: p.detach().double().requires_grad_() for n, p in moe.named_parameters()}
    buffers = {n: b.detach() for n, b in moe.named_buffers()}
    x64 = x.detach().double().requires_grad_()
    y, _, _ = reference_moe(x64.reshape(-1, D), {**params, **buffers}, moe.config,
                            topk_ids=topk_ids)
    y.backward(grad_y.double().reshape(-1, D))
    return y.view(x.shape), x64.grad, {n: p.grad for n, p in params.items()}


def assert_close(actual, expected, dtype, what):
    assert actual is not None, f"{what}: no value (gradient missing?)"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, SCALE_FLOOR)
    bound = TOL[dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({dtype})"


def check_against_reference(moe, x, grad_y, dtype):
    y, route, gx, grads = run_layer(moe, x, grad_y)
    assert y.dtype == dtype and y.shape == x.shape
    y_ref, gx_ref, grads_ref = run_reference(moe, x, grad_y, route.topk_ids)
    assert_close(y, y_ref, dtype, "output")
    assert_close(gx, gx_ref, dtype, "x.grad")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], dtype, f"{name}.grad")
    return route


# --------------------------------------------------------------------------------------------
# Forward and backward against the reference
# --------------------------------------------------------------------------------------------

CONFIGS = {
    "silu_gated": tiny(),  # the default: SwiGLU experts through the grouped GEMM
    "gelu_gated": tiny(activation="gelu"),  # GEGLU: the other gated activation
    "relu_plain": tiny(activation="relu", gated=False),  # gate_up_proj holds only I rows
    "per_expert": tiny(expert_impl="per_expert"),  # one GEMM per expert
    "dense": tiny(expert_impl="dense"),  # every local expert on every token
    "no_renorm": tiny(norm_topk_prob=False),  # raw softmax weights reach the combine
    # DeepSeek-style shared MLP of 2 experts (shared I defaults to 2 * I)
    "shared_deepseek": tiny(num_shared_experts=2),
    # Qwen2-MoE: one shared MLP of its own size, scaled by sigmoid(x w_g)
    "shared_qwen2": tiny(num_shared_experts=1, shared_intermediate_size=40,
                         shared_expert_gate=True),
    # DeepSeek-V3 routing at toy size: sigmoid scores, 4 groups of 2 with the best 2 kept,
    # correction bias on selection only, scaled weights, a shared expert
    "deepseek_v3_like": tiny(score_func="sigmoid", num_expert_groups=4, topk_groups=2,
                             top_k=3, use_correction_bias=True, routed_scaling_factor=2.5,
                             num_shared_experts=1),
    # the same with the router's weight kept in fp32 in a 16-bit layer (transformers' DeepSeek-V3)
    "deepseek_v3_router_fp32": tiny(score_func="sigmoid", num_expert_groups=4, topk_groups=2,
                                    top_k=3, use_correction_bias=True,
                                    routed_scaling_factor=2.5, num_shared_experts=1,
                                    router_fp32=True),
    "top1": tiny(top_k=1),  # K=1: one slot per token, the weight renormalises to 1
    "topE": tiny(top_k=8),  # K=E: every expert sees every token
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_fp32(name):
    config = CONFIGS[name]
    moe, x, grad_y = make_inputs(config)
    route = check_against_reference(moe, x, grad_y, torch.float32)
    # the selection itself, unpinned, agrees with float64 (no near-ties at this seed)
    with torch.no_grad():
        _, ids_ref, _ = reference_moe(x, {**dict(moe.named_parameters()),
                                          **dict(moe.named_buffers())}, config)
    assert torch.equal(route.topk_ids, ids_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu_gated", "deepseek_v3_like", "shared_qwen2",
                                  "deepseek_v3_router_fp32"])
def test_matches_reference_dtypes(name, dtype):
    moe, x, grad_y = make_inputs(CONFIGS[name], dtype=dtype)
    check_against_reference(moe, x, grad_y, dtype)


@pytest.mark.parametrize("router_fp32", [True, False])
def test_router_fp32_survives_dtype_moves(router_fp32):
    moe = MoE(tiny(router_fp32=router_fp32), device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(5, moe.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    moe(x).sum().backward()
    before = moe.router.weight.detach().clone(), moe.router.weight.grad.clone()
    moe.half()  # after a step: the weight and its gradient move together
    router_dtype = torch.float32 if router_fp32 else torch.float16
    assert moe.router.weight.dtype == moe.router.weight.grad.dtype == router_dtype
    if router_fp32:  # its own fp32 values, not values rounded through fp16 on the way
        assert before[0].dtype == torch.float32
        assert torch.equal(moe.router.weight.detach(), before[0])
        assert torch.equal(moe.router.weight.grad, before[1])
    assert moe.experts.gate_up_proj.dtype == torch.float16
    assert moe.state_dict()["router.weight"].dtype == router_dtype
    moe(x.half()).sum().backward()  # still runs, its gradient accumulating in its own dtype
    assert moe.router.weight.grad.dtype == router_dtype


@pytest.mark.parametrize("shape", [
    (1,),  # T=1: a single token, most experts idle
    (2, 3),  # (B, S) leading dims are flattened and restored
    (2, 1, 5),  # three leading dims
])
def test_leading_shapes(shape):
    moe, x, grad_y = make_inputs(tiny(), shape=shape)
    check_against_reference(moe, x, grad_y, torch.float32)


@pytest.mark.parametrize("shape", [(0,), (2, 0)])  # T=0: no tokens, as (0, D) and (2, 0, D)
@pytest.mark.parametrize("name", ["shared_qwen2", "deepseek_v3_like"])  # gated shared; groups
def test_empty_input(name, shape):
    moe, x, grad_y = make_inputs(CONFIGS[name], shape=shape)
    y, route, gx, grads = run_layer(moe, x, grad_y)
    assert y.shape == x.shape and gx.shape == x.shape
    y_ref, _, _ = run_reference(moe, x, grad_y, topk_ids=None)  # the oracle takes T=0 too
    assert y_ref.shape == x.shape
    assert route.topk_ids.shape == (0, moe.config.top_k)
    assert torch.equal(route.num_tokens_per_expert,
                       torch.zeros(moe.config.num_experts, dtype=torch.int64, device=DEVICE))
    for param, grad in grads.items():  # every parameter gets a (zero) gradient, not None
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), param


def test_per_expert_equals_grouped_mm():
    # grouped GEMM runs only for dtypes its backend takes: fp32 on CPU, bf16 on CUDA
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    outs = []
    for impl in ("grouped_mm", "per_expert"):
        moe, x, grad_y = make_inputs(tiny(expert_impl=impl), dtype=dtype)
        assert moe.plan(x).experts == impl  # else this would compare a path with itself
        outs.append(run_layer(moe, x, grad_y))
    (y_a, route_a, gx_a, grads_a), (y_b, route_b, gx_b, grads_b) = outs
    assert torch.equal(route_a.topk_ids, route_b.topk_ids)
    assert_close(y_a, y_b, dtype, "output")
    assert_close(gx_a, gx_b, dtype, "x.grad")
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], dtype, f"{name}.grad")


def _steer(moe, x, expert, sign):
    """Make feature 0 of every token positive and give router row `expert` weight +20*sign on
    it (all other rows -20*sign): its logit then beats (+) or trails (-) every other by >= 40."""
    with torch.no_grad():
        x[..., 0] = x[..., 0].abs() + 1.0
        moe.router.weight[:, 0] = -20.0 * sign
        moe.router.weight[expert, 0] = 20.0 * sign


def test_all_tokens_to_one_expert():
    moe, x, grad_y = make_inputs(tiny(top_k=1))
    _steer(moe, x, expert=5, sign=+1)
    route = check_against_reference(moe, x, grad_y, torch.float32)
    expected = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    expected[5] = x.shape[0]
    assert torch.equal(route.num_tokens_per_expert, expected)
    idle = [e for e in range(8) if e != 5]
    assert not moe.experts.gate_up_proj.grad[idle].any()
    assert moe.experts.gate_up_proj.grad[5].abs().sum() > 0


def test_expert_with_no_tokens():
    moe, x, grad_y = make_inputs(tiny())
    _steer(moe, x, expert=2, sign=-1)
    route = check_against_reference(moe, x, grad_y, torch.float32)
    assert route.num_tokens_per_expert[2] == 0
    assert route.num_tokens_per_expert.sum() == x.shape[0] * 2
    assert not moe.experts.gate_up_proj.grad[2].any()
    assert not moe.experts.down_proj.grad[2].any()


def test_finite_differences_fp32():
    """Analytic gradients through the Triton combine against central differences. (float64
    gradcheck cannot run: the kernel takes fp32 / bf16 / fp16 only.)"""
    moe, x, grad_y = make_inputs(CONFIGS["shared_qwen2"], shape=(5,))
    _, route, gx, grads = run_layer(moe, x, grad_y)
    eps = 1e-3

    def loss_and_ids():
        with torch.no_grad():
            y, r = moe(x, return_router_output=True)
        return (y.double() * grad_y.double()).sum().item(), r.topk_ids

    tensors = {"x": (x, gx), **{n: (p, grads[n]) for n, p in moe.named_parameters()}}
    for name, (tensor, grad) in tensors.items():
        i = grad.abs().argmax()  # the largest entry: fp32 noise / eps stays well below it
        with torch.no_grad():
            flat = tensor.view(-1)
            orig = flat[i].item()
            flat[i] = orig + eps
            up, ids_up = loss_and_ids()
            flat[i] = orig - eps
            down, ids_down = loss_and_ids()
            flat[i] = orig
        # a routing flip inside +-eps would make the difference meaningless
        assert torch.equal(ids_up, route.topk_ids) and torch.equal(ids_down, route.topk_ids)
        fd = (up - down) / (2 * eps)
        analytic = grad.view(-1)[i].item()
        assert abs(fd - analytic) <= 1e-2 * abs(analytic), f"{name}: {fd} vs {analytic}"


# --------------------------------------------------------------------------------------------
# Determinism and initialisation
# --------------------------------------------------------------------------------------------

def test_deterministic():
    moe, x, grad_y = make_inputs(CONFIGS["deepseek_v3_like"])
    first = run_layer(moe, x, grad_y)
    first = (first[0].detach().clone(), first[2].clone(),
             {n: g.clone() for n, g in first[3].items()})
    x.grad = None
    moe.zero_grad(set_to_none=True)
    y, _, gx, grads = run_layer(moe, x, grad_y)
    assert torch.equal(y, first[0]) and torch.equal(gx, first[1])
    for name, grad in grads.items():
        assert torch.equal(grad, first[2][name]), name


def test_reproducible_init():
    config = CONFIGS["shared_qwen2"]
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(MoE(config).state_dict())
    same, other = states[0], states[2]
    for name, value in same.items():
        assert torch.equal(value, states[1][name]), f"{name}: same seed, different init"
        assert not torch.equal(value, other[name]), f"{name}: different seeds, same init"
    w13 = same["experts.gate_up_proj"]
    assert not torch.equal(w13[0], w13[1])  # every expert draws its own weights
    assert abs(w13.std().item() - config.init_std) < 0.1 * config.init_std


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    (dict(score_func="relu"), "score_func"),
    (dict(activation="tanh"), "activation"),
    (dict(expert_impl="loop"), "expert_impl"),
    (dict(placement="random"), "placement"),
    (dict(dispatcher="nccl"), "dispatcher"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(intermediate_size=2.5), "intermediate_size"),
    (dict(top_k=True), "top_k"),  # a bool is not a count
    (dict(top_k=9), "top_k"),  # K > E
    (dict(num_expert_groups=3), "num_expert_groups"),  # does not divide E=8
    (dict(num_expert_groups=2, topk_groups=3), "topk_groups"),
    (dict(num_expert_groups=4, topk_groups=1, top_k=3), "top_k"),  # only 2 experts kept
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(num_shared_experts=True), "num_shared_experts"),
    (dict(shared_intermediate_size=40), "shared_intermediate_size"),  # no shared MLP to size
    (dict(dense_max_rows=-1), "dense_max_rows"),
    (dict(router_fp32=1), "router_fp32"),  # a flag, not a count
    (dict(dense_max_rows=True), "dense_max_rows"),  # a bool is not a row count
    (dict(dense_max_rows=64.0), "dense_max_rows"),
    (dict(num_shared_experts=1, shared_intermediate_size=0), "shared_intermediate_size"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),  # no shared expert to gate
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(z_loss_coef=-1e-3), "z_loss_coef"),
    (dict(init_std=-1.0), "init_std"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(max_tokens_per_rank=0), "max_tokens_per_rank"),
    (dict(max_tokens_per_rank=8.0), "max_tokens_per_rank"),
    (dict(dispatch_chunks=0), "dispatch_chunks"),
    (dict(dispatch_chunks=2), "dispatch_chunks"),  # chunks need a fixed-size exchange
    (dict(dispatch_chunks=2, max_tokens_per_rank=8, dispatcher="allgather"), "dispatch_chunks"),
    (dict(exchange="shm"), "exchange"),
    (dict(exchange="nvlink"), "exchange='nvlink' needs"),  # no fixed-size exchange
    (dict(exchange="nvlink", max_tokens_per_rank=8, dispatcher="allgather"), "exchange"),
])
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig.tiny(**changes)


def test_max_tokens_per_rank_holds_on_one_rank():
    # no exchange on one rank, but the same limit as on many: a model tested on one GPU
    # fails there, not at scale
    layer = MoE(MoEConfig.tiny(max_tokens_per_rank=4))
    x = torch.randn(5, layer.config.hidden_size)
    with pytest.raises(ValueError, match="max_tokens_per_rank=4"):
        layer(x)
    assert layer(x[:4]).shape == (4, layer.config.hidden_size)


@pytest.mark.parametrize("changes, size", [
    (dict(), 0),  # no shared experts
    (dict(num_shared_experts=1), 24),  # one expert of intermediate_size
    (dict(num_shared_experts=2), 48),  # n experts of intermediate_size each, as one MLP
    (dict(num_shared_experts=2, shared_intermediate_size=40), 40),  # given: taken as the total
])
def test_shared_size(changes, size):
    config = MoEConfig.tiny(**changes)
    assert config.shared_size == size
    shared = MoE(config).shared_experts
    if size == 0:
        assert shared is None
    else:  # gate | up rows, and the down projection's columns
        assert shared.gate_up_proj.shape == (2 * size, config.hidden_size)
        assert shared.down_proj.shape == (config.hidden_size, size)


@pytest.mark.parametrize("name, fields", [
    ("tiny", dict(hidden_size=16, num_experts=8, top_k=2)),
    ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2)),
    ("qwen3", dict(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8)),
    ("deepseek_v3", dict(num_experts=256, top_k=8, score_func="sigmoid", num_expert_groups=8,
                         topk_groups=4, routed_scaling_factor=2.5, num_shared_experts=1)),
])
def test_presets(name, fields):
    config = MoEConfig.preset(name, aux_loss_coef=0.01)  # configs only: the layers are big
    for field, value in fields.items():
        assert getattr(config, field) == value, field
    assert config.aux_loss_coef == 0.01
    # automatic settings are derived by the planner, not pinned per preset
    assert (config.dense_max_rows, config.dispatch_chunks, config.exchange) == (None, None, "auto")
    with pytest.raises(ValueError, match="unknown preset"):
        MoEConfig.preset(name + "_nope")


def test_layer_input_validation():
    with pytest.raises(TypeError, match="MoEConfig"):
        MoE(dataclasses.asdict(tiny()))
    moe = MoE(tiny())
    with pytest.raises(ValueError, match="hidden_size=16"):
        moe(torch.randn(3, 17))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def test_state_dict_keys():
    moe = MoE(CONFIGS["deepseek_v3_like"].replace(shared_expert_gate=True))
    assert set(moe.state_dict()) == {
        "router.weight", "router.e_score_correction_bias",
        "experts.gate_up_proj", "experts.down_proj",
        "shared_experts.gate_up_proj", "shared_experts.down_proj", "shared_experts.gate"}
    assert set(MoE(tiny()).state_dict()) == {
        "router.weight", "experts.gate_up_proj", "experts.down_proj"}


def test_load_full_state_dict_round_trip():
    config = CONFIGS["deepseek_v3_like"]
    source, x, _ = make_inputs(config, seed=0)
    target, _, _ = make_inputs(config, seed=1)
    target.load_full_state_dict(source.full_state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    bad = dict(source.state_dict())
    bad["experts.down_proj"] = bad["experts.down_proj"][:4]
    with pytest.raises(ValueError, match="experts.down_proj"):
        target.load_full_state_dict(bad)


@pytest.mark.parametrize("capacity,chunks", [
    (5, 1),      # one chunk: the whole capacity
    (7, 2),      # two equal-ish halves
    (7, 3),      # tapered: 2, 4, 1
    (8192, 4),   # tapered at a real size: ends half the middles
    (3, 5),      # more chunks than tokens: empty ranges dropped
])
def test_chunk_bounds_cover_the_capacity(capacity, chunks):
    bounds = chunk_bounds(capacity, chunks)
    sizes = [b - a for a, b in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == capacity
    assert all(b == a for (_, b), (a, _) in zip(bounds, bounds[1:]))  # contiguous
    assert min(sizes) > 0 and len(bounds) <= chunks
    if chunks >= 3 and capacity >= 8 * chunks:  # the exposed ends are half-size
        assert abs(2 * sizes[0] - sizes[1]) <= 2 and abs(2 * sizes[-1] - sizes[-2]) <= 2


@pytest.mark.parametrize("dispatcher,chunks", [
    ("all_to_all", 1),
    ("all_to_all", 2),  # the chunks cover the capacity: a 5th token would be dropped silently
    ("allgather", 1),
])
def test_dispatcher_checks_capacity_before_any_collective(dispatcher, chunks):
    """The dispatchers check `max_tokens_per_rank` themselves (the layer checks too, but a
    dispatcher driven directly must not reach a collective with more rows than its buffers):
    no process group exists here, so any collective would fail with another error."""
    from ep_moe.dispatch import make_dispatcher
    from ep_moe.placement import ExpertPlacement

    cfg = MoEConfig.tiny(max_tokens_per_rank=4, dispatcher=dispatcher, dispatch_chunks=chunks,
                         exchange="collective")
    placement = ExpertPlacement(cfg.num_experts, 2, cfg.placement)
    d = make_dispatcher(cfg, placement, group=None, rank=0)
    T, K = 5, cfg.top_k
    x = torch.randn(T, cfg.hidden_size)
    ids = torch.arange(T * K).reshape(T, K) % cfg.num_experts
    plan = plan_forward(cfg, world_size=2, num_local_experts=4, num_tokens=T, device_type="cpu",
                        dtype=x.dtype, triton=False, grad=False)
    with pytest.raises(ValueError, match="5 tokens on this rank.*max_tokens_per_rank=4"):
        d.run(x, ids, torch.full((T, K), 1.0 / K), lambda sent: sent.x, plan)


def test_nvlink_exchange_needs_cuda_tensors():
    """exchange='nvlink' stores into other GPUs' memory: on CPU tensors the planner raises a
    clear error (on every rank alike) before any collective or allocation."""
    cfg = MoEConfig.tiny(max_tokens_per_rank=4, exchange="nvlink")
    with pytest.raises(ValueError, match="needs CUDA tensors.*got x on cpu"):
        plan_forward(cfg, world_size=2, num_local_experts=4, num_tokens=4, device_type="cpu",
                     dtype=torch.float32, triton=True, grad=False)


@pytest.mark.parametrize("parts,first", [(1, 0), (2, 1), (4, 3)])
def test_compute_experts_into_split_outputs(parts, first):
    """The slot reduction written in W slices (views of the home ranks' memory under the
    NVLink exchange) holds, row for row, what the one-piece reduction returns; a row with
    no local slot (a padding row there) is left as it was."""
    from ep_moe.dispatch import LocalDispatcher
    from ep_moe.kernels.fused_mul_sum import SplitOutputs

    torch.manual_seed(0)
    layer = MoE(MoEConfig.tiny(), device=DEVICE)
    x = torch.randn(24, layer.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        route = layer.router(x)
        sent = LocalDispatcher().dispatch(x, route.topk_ids, route.topk_weights)
        padding = torch.arange(24, device=DEVICE) % 5 == 3  # rows with no slot at all
        sent = dataclasses.replace(sent, topk_ids=torch.where(padding[:, None], -1,
                                                              sent.topk_ids))
        plan = layer.plan(x)
        want = layer.compute_experts(sent, plan)
        outputs = [torch.full((24 // parts, x.shape[1]), float("nan"), device=DEVICE)
                   for _ in range(parts)]
        assert layer.compute_experts(sent, plan, SplitOutputs(outputs, first)) is None
    got = torch.cat(outputs)
    assert torch.equal(got[~padding], want[~padding])
    assert (want[padding] == 0).all()
    if _triton_runs():  # the kernel skips them; the torch fallback writes their zeros
        assert got[padding].isnan().all()


def _triton_runs() -> bool:
    return TRITON_RUNS


def test_fused_mul_sum_rows_split_validation():
    from ep_moe.kernels.fused_mul_sum import fused_mul_sum_rows_split

    inputs, w = torch.randn(6, 4), torch.rand(6, 2)
    rows = torch.arange(12, dtype=torch.int32).reshape(6, 2) % 6
    good = [torch.empty(3, 4), torch.empty(3, 4)]
    with pytest.raises(ValueError, match="W dividing T = 6, got 4"):
        fused_mul_sum_rows_split(inputs, w, rows, [torch.empty(1, 4)] * 4)
    with pytest.raises(ValueError, match=r"outputs\[1\] must be \(3, 4\) torch.float32"):
        fused_mul_sum_rows_split(inputs, w, rows, [good[0], torch.empty(3, 4).half()])
    with pytest.raises(ValueError, match="no backward"):
        fused_mul_sum_rows_split(inputs.requires_grad_(), w, rows, good)
