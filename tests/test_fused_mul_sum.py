"""Fused weighted top-k combine against a float64 reference, forward and backward.

Both implementations are covered: the Triton kernels (through the public functions, so the
custom ops and their autograd registration are exercised too) and the torch fallback
(`_fwd_torch` / `_bwd_torch`, called directly because the public functions only reach it
when Triton cannot run). Shapes are trailing-commented: T tokens, K top-k, D hidden, E experts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from ep_moe.kernels import fused_mul_sum as fms
from ep_moe.kernels import fused_mul_sum_rows, moe_fused_mul_sum

from conftest import DEVICE, FP16_SUBNORMAL, ROUNDING, needs_cuda, needs_triton

IMPLS = [pytest.param("triton", marks=needs_triton), "torch"]

# Allowed error = rtol * |ref| + atol + ACCUM_RTOL * sum(|terms|), the terms being the products
# summed (w * x over K for the output, x * grad_out over D for the weights' gradient).
TOL = {  # dtype of the stored result: (rtol, atol)
    torch.float32: (1e-5, 0.0),  # fp32 result stored as is: ~1e-5 leaves room for fp32 products
    torch.float16: (ROUNDING[torch.float16], FP16_SUBNORMAL),  # one rounding to 10 mantissa bits
    torch.bfloat16: (ROUNDING[torch.bfloat16], 0.0),  # one rounding to 7 stored mantissa bits
}
ACCUM_RTOL = 1e-5  # fp32 accumulation in another order than float64: ~sqrt(n) * 2^-24, n <= 2500

E = 16  # experts in the expert-map cases


# --------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    inputs: torch.Tensor                  # (T, K, D) dense, or (P, D) gathered
    topk_weights: torch.Tensor            # (T, K)
    topk_ids: Optional[torch.Tensor]      # (T, K) or None
    expert_map: Optional[torch.Tensor]    # (E,) or None
    row_index: Optional[torch.Tensor]     # (T, K) gathered layout only, -1 for no row
    keep: torch.Tensor                    # (T, K) bool: the slots that count, derived here


def make_inputs(T, K, D, dtype=torch.float32, *, weight_dtype=torch.float32, routing="map",
                ids_dtype=torch.int64, map_dtype=torch.int64, gathered=False, seed=0):
    """Random routing, NaN in every input row that must not be read.

    routing: "none" (every slot counts), "ids" (ids already local, -1 = empty slot), "map"
    (E experts, half local; ids also negative and >= E; the last token, when T > 1, has no
    counting slot), "skip_all" (no expert is local).
    """
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(T, K, generator=g) + 0.1  # (T, K), away from zero
    ids = emap = None
    keep = torch.ones(T, K, dtype=torch.bool)
    if routing == "ids":
        ids = torch.randint(-1, E, (T, K), generator=g)
        keep = ids >= 0
    elif routing in ("map", "skip_all"):
        local = torch.randperm(E, generator=g)[: E // 2 if routing == "map" else 0]
        emap = torch.full((E,), -1, dtype=torch.int64)
        emap[local] = torch.arange(local.numel())
        ids = torch.randint(-3, E + 3, (T, K), generator=g)  # negative and >= E occur
        if routing == "map" and T > 1:  # last token: only experts of other ranks
            remote = torch.tensor(sorted(set(range(E)) - set(local.tolist())))
            ids[-1] = remote[torch.randint(0, remote.numel(), (K,), generator=g)]
        local_set = set(local.tolist())  # obviously-right membership, independent of the kernel
        keep = torch.tensor([[i in local_set for i in row] for row in ids.tolist()],
                            dtype=torch.bool).reshape(T, K)
    elif routing != "none":
        raise ValueError(f"unknown routing {routing!r}")

    row_index = None
    if gathered:  # some slots have no row; rows land in random order; 3 rows nobody references
        has_row = torch.rand(T, K, generator=g) < 0.8
        P = int(has_row.sum()) + 3
        row_index = torch.full((T, K), -1, dtype=torch.int64)
        row_index[has_row] = torch.randperm(P, generator=g)[: int(has_row.sum())]
        keep = keep & has_row
        inputs = torch.randn(P, D, generator=g)
        counted = torch.zeros(P, dtype=torch.bool)
        counted[row_index[keep]] = True
        inputs[~counted] = float("nan")
        row_index = row_index.to(ids_dtype).to(DEVICE)
    else:
        inputs = torch.randn(T, K, D, generator=g)
        inputs[~keep] = float("nan")
    return Case(inputs.to(dtype).to(DEVICE), weights.to(weight_dtype).to(DEVICE),
                None if ids is None else ids.to(ids_dtype).to(DEVICE),
                None if emap is None else emap.to(map_dtype).to(DEVICE),
                row_index, keep.to(DEVICE))


def combine_reference(case: Case, grad_out: torch.Tensor):
    """float64 `out[t] = sum over counting k of w[t, k] * x[t, k]` and its gradients by autograd.

    Returns (out, grad_inputs, grad_weights, out_abs, grad_weights_abs); the *_abs are the sums
    of |terms| that bound the accumulation error.
    """
    with torch.enable_grad():  # callers may sit under no_grad (CUDA-graph capture)
        x = case.inputs.double().requires_grad_()
        w = case.topk_weights.double().requires_grad_()
        keep = case.keep
        slots = x if case.row_index is None else x[case.row_index.long().clamp(min=0)]
        slots = torch.where(keep[..., None], slots, 0.0)  # (T, K, D); NaN never selected
        terms = torch.where(keep, w, 0.0)[..., None] * slots  # (T, K, D)
        out = terms.sum(1)  # (T, D)
        out.backward(grad_out.double())
    gw_abs = (slots.detach() * grad_out.double()[:, None, :]).abs().sum(-1)  # (T, K)
    return out.detach(), x.grad, w.grad, terms.detach().abs().sum(1), gw_abs


def assert_close_to(name, got, ref, ref_abs, dtype):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite"
    err = (got.double() - ref).abs()
    rtol, atol = TOL[dtype]
    tol = rtol * ref.abs() + atol + ACCUM_RTOL * ref_abs
    bad = err > tol
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{bad.numel()} elements off, "
                           f"worst error {float((err - tol).max()):.3g} over tolerance")


def check(case: Case, grad_out, out, grad_inputs, grad_weights):
    ref_out, ref_gx, ref_gw, out_abs, gw_abs = combine_reference(case, grad_out)
    assert_close_to("output", out, ref_out, out_abs, case.inputs.dtype)
    assert_close_to("grad_inputs", grad_inputs, ref_gx, ref_gx.abs(), case.inputs.dtype)
    assert_close_to("grad_weights", grad_weights, ref_gw, gw_abs, case.topk_weights.dtype)
    # exact zeros, whatever the tolerance: tokens with no counting slot, skipped slots' grads
    assert (out[~case.keep.any(1)] == 0).all()
    assert (grad_weights[~case.keep] == 0).all()
    if case.row_index is None:
        assert (grad_inputs[~case.keep] == 0).all()


# --------------------------------------------------------------------------------------------
# The two implementations, same contract
# --------------------------------------------------------------------------------------------

def run_public(case: Case, grad_out):
    """Public function + autograd: the Triton kernels wherever `use_triton` says so."""
    x = case.inputs.clone().requires_grad_()
    w = case.topk_weights.clone().requires_grad_()
    if case.row_index is None:
        out = moe_fused_mul_sum(x, w, topk_ids=case.topk_ids, expert_map=case.expert_map)
    else:
        out = fused_mul_sum_rows(x, w, case.row_index, case.topk_ids, case.expert_map)
    out.backward(grad_out)
    return out.detach(), x.grad, w.grad


def run_torch_path(case: Case, grad_out):
    """`_fwd_torch` / `_bwd_torch` with preallocated, NaN-poisoned results."""
    T, D = grad_out.shape
    out = torch.full((T, D), float("nan"), dtype=case.inputs.dtype, device=DEVICE)
    fms._fwd_torch(case.inputs, case.topk_weights, case.topk_ids, case.expert_map,
                   case.row_index, out)
    # the gathered layout only writes referenced rows: the op hands in zeros, as here
    gx = (torch.zeros_like(case.inputs) if case.row_index is not None
          else torch.full_like(case.inputs, float("nan")))
    gw = torch.full_like(case.topk_weights, float("nan"))
    fms._bwd_torch(grad_out, case.inputs, case.topk_weights, case.topk_ids, case.expert_map,
                   case.row_index, gx, gw)
    return out, gx, gw


RUN = {"triton": run_public, "torch": run_torch_path}


def grad_out_for(case: Case, T, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(case.inputs.dtype).to(DEVICE)


SHAPES = [
    (0, 2, 37),      # T=0: empty batch, nothing launched, empty gradients
    (1, 1, 1),       # T=1, K=1, D=1: smallest everything (Triton specialises size-1 ints)
    (7, 3, 129),     # odd T, K=3 not a power of two (BLOCK_K pads to 4), D one past 128
    (5, 2, 37),      # K=2 (Mixtral), odd D below one block
    (6, 8, 96),      # K=8 (DeepSeek-V3, Qwen3-MoE): BLOCK_D shrinks as BLOCK_K grows
    (130, 2, 64),    # many programs along T
    (3, 8, 2500),    # D > BLOCK_D: 3 forward D blocks, backward D loop runs 5 times
    (2, 1, 2500),    # K=1 has the largest BLOCK_D (2048): still 2 blocks / 2 loop trips
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------
# Forward and backward against the reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,D", SHAPES)
def test_matches_reference(impl, T, K, D, dtype):
    case = make_inputs(T, K, D, dtype)
    g = grad_out_for(case, T, D)
    check(case, g, *RUN[impl](case, g))


@needs_triton
@pytest.mark.parametrize("config", [
    fms.FwdConfig(64, 1, 0),  # one token per program: no prefetch, D split in 64-wide blocks
    fms.FwdConfig(64, 1, 1),  # several tokens per program with routing prefetch; the last
    #                           program gets fewer tokens than the others
    fms.FwdConfig(256, 2, 2),
], ids=str)
@pytest.mark.parametrize("routing", ["none", "map"])
@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
def test_pinned_forward_configs(monkeypatch, config, routing, gathered):
    monkeypatch.setattr(fms, "_fwd_config", lambda K, D, has_map: config)
    T, K, D = 13, 3, 150
    case = make_inputs(T, K, D, torch.float32, routing=routing, gathered=gathered)
    g = grad_out_for(case, T, D)
    check(case, g, *run_public(case, g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("routing", ["none", "ids", "map", "skip_all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routing(impl, routing, dtype):
    case = make_inputs(9, 4, 40, dtype, routing=routing)  # (T, K, D)
    g = grad_out_for(case, 9, 40)
    out, gx, gw = RUN[impl](case, g)
    check(case, g, out, gx, gw)
    if routing == "skip_all":
        assert (out == 0).all() and (gx == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ids_dtype,map_dtype", [(torch.int32, torch.int32),
                                                 (torch.int64, torch.int64),
                                                 (torch.int32, torch.int64),
                                                 (torch.int64, torch.int32)], ids=str)
def test_index_dtypes(impl, ids_dtype, map_dtype):
    case = make_inputs(8, 3, 33, ids_dtype=ids_dtype, map_dtype=map_dtype)  # (T, K, D)
    g = grad_out_for(case, 8, 33)
    check(case, g, *RUN[impl](case, g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_precision_weights(impl, dtype, weight_dtype):
    case = make_inputs(7, 3, 129, dtype, weight_dtype=weight_dtype)  # (T, K, D)
    g = grad_out_for(case, 7, 129)
    check(case, g, *RUN[impl](case, g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("routing", ["none", "map"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,D", [(11, 3, 37),    # odd T, K=3, odd D
                                   (4, 8, 2500),   # backward D loop, K=8
                                   (0, 2, 8)])     # no tokens: P = 3 unreferenced rows
def test_gathered_rows(impl, T, K, D, dtype, routing):
    case = make_inputs(T, K, D, dtype, routing=routing, gathered=True, ids_dtype=torch.int32)
    g = grad_out_for(case, T, D)
    out, gx, gw = RUN[impl](case, g)
    check(case, g, out, gx, gw)
    counted = torch.zeros(case.inputs.shape[0], dtype=torch.bool, device=DEVICE)
    counted[case.row_index[case.keep].long()] = True
    assert (gx[~counted] == 0).all()  # rows nobody (counting) references: zero gradient


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("routing", ["map", "skip_all"])
def test_outputs_poisoned_and_overwritten(grad, routing):
    """Two code paths: the in-place op without autograd, compute-then-copy with it."""
    case = make_inputs(6, 4, 129, torch.bfloat16, routing=routing)  # (T, K, D)
    outputs = torch.full((6, 129), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    x = case.inputs.clone().requires_grad_(grad)
    result = moe_fused_mul_sum(x, case.topk_weights, outputs, case.topk_ids, case.expert_map)
    assert result is outputs
    ref, _, _, out_abs, _ = combine_reference(case, grad_out_for(case, 6, 129))
    assert_close_to("outputs", outputs.detach(), ref, out_abs, torch.bfloat16)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_gathered_rows_into_poisoned_slice(grad):
    """The pipelined exchange sums each chunk into a row slice of one output."""
    case = make_inputs(6, 4, 129, torch.bfloat16, routing="map", gathered=True,
                       ids_dtype=torch.int32)  # (T, K, D)
    full = torch.full((9, 129), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    x = case.inputs.clone().requires_grad_(grad)
    result = fused_mul_sum_rows(x, case.topk_weights, case.row_index, case.topk_ids,
                                case.expert_map, outputs=full[2:8])
    assert result.data_ptr() == full[2:8].data_ptr()
    ref, _, _, out_abs, _ = combine_reference(case, grad_out_for(case, 6, 129))
    assert_close_to("outputs", full[2:8].detach(), ref, out_abs, torch.bfloat16)
    assert full[:2].isnan().all() and full[8:].isnan().all()  # nothing outside the slice


def test_weights_grad_matches_finite_differences():
    """fp32, tiny: the combine is linear in the weights, so a large step is exact up to the
    rounding of the output; skipped slots (NaN inputs) must have exactly zero difference."""
    T, K, D, h = 3, 3, 5, 0.25
    case = make_inputs(T, K, D, routing="map")
    g = grad_out_for(case, T, D)
    w = case.topk_weights.clone().requires_grad_()
    moe_fused_mul_sum(case.inputs, w, topk_ids=case.topk_ids,
                      expert_map=case.expert_map).backward(g)

    def loss(weights):
        out = moe_fused_mul_sum(case.inputs, weights, topk_ids=case.topk_ids,
                                expert_map=case.expert_map)
        return (out.double() * g.double()).sum()

    fd = torch.zeros(T, K, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            step = torch.zeros_like(case.topk_weights)
            step[t, k] = h
            fd[t, k] = (loss(case.topk_weights + step) - loss(case.topk_weights - step)) / (2 * h)
    assert (fd[~case.keep.cpu()] == 0).all()
    torch.testing.assert_close(w.grad.double().cpu(), fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_width_rows(impl, monkeypatch):
    """D = 0: nothing to sum, so the weights' gradient is exactly zero, and it must be written
    (the Triton backward launches no program then; the buffer it would fill comes from
    `empty_like`, NaN-filled here so an unset gradient shows)."""
    real_empty_like = torch.empty_like

    def poisoned_empty_like(t, *args, **kwargs):
        out = real_empty_like(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    case = make_inputs(3, 2, 0)  # (T, K, D)
    g = grad_out_for(case, 3, 0)
    out, gx, gw = RUN[impl](case, g)
    assert out.shape == (3, 0)
    assert gx.shape == (3, 2, 0)
    assert gw.shape == (3, 2) and gw.dtype == torch.float32
    assert torch.equal(gw, torch.zeros(3, 2, device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    case = make_inputs(5, 8, 2500, torch.bfloat16)  # (T, K, D): several D blocks, K=8
    g = grad_out_for(case, 5, 2500)
    first, second = RUN[impl](case, g), RUN[impl](case, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_contiguous_routing_tensors():
    """Only `inputs` must be contiguous; weights and ids views are accepted and read right."""
    case = make_inputs(6, 4, 37, routing="map")  # (T, K, D)
    w = case.topk_weights.t().contiguous().t()  # (T, K), column-major
    ids = case.topk_ids.t().contiguous().t()
    assert not w.is_contiguous() and not ids.is_contiguous()
    out = moe_fused_mul_sum(case.inputs, w, topk_ids=ids, expert_map=case.expert_map)
    ref, _, _, out_abs, _ = combine_reference(case, grad_out_for(case, 6, 37))
    assert_close_to("output", out, ref, out_abs, torch.float32)


# --------------------------------------------------------------------------------------------
# Validation: the exception type and a message that starts with the offending argument
# --------------------------------------------------------------------------------------------

def _valid(T=4, K=2, D=8):
    case = make_inputs(T, K, D, routing="map")
    return dict(inputs=case.inputs, topk_weights=case.topk_weights, outputs=None,
                topk_ids=case.topk_ids, expert_map=case.expert_map)


META = torch.device("meta")
BAD_ARGS = [  # (name, change to the valid kwargs, exception, argument named)
    ("inputs_not_tensor", lambda a: {"inputs": a["inputs"].tolist()}, TypeError, "inputs"),
    ("inputs_2d", lambda a: {"inputs": a["inputs"][:, 0]}, ValueError, "inputs"),
    ("inputs_float64", lambda a: {"inputs": a["inputs"].double()}, TypeError, "inputs"),
    ("inputs_non_contiguous", lambda a: {"inputs": a["inputs"].transpose(0, 1).contiguous()
                                         .transpose(0, 1)}, ValueError, "inputs"),
    ("weights_3d", lambda a: {"topk_weights": a["topk_weights"][..., None]}, ValueError,
     "topk_weights"),
    ("weights_T_mismatch", lambda a: {"topk_weights": a["topk_weights"][:-1]}, ValueError,
     "topk_weights"),
    ("weights_K_mismatch", lambda a: {"topk_weights": a["topk_weights"][:, :1]}, ValueError,
     "topk_weights"),
    ("weights_float64", lambda a: {"topk_weights": a["topk_weights"].double()}, TypeError,
     "topk_weights"),
    ("weights_int", lambda a: {"topk_weights": a["topk_ids"]}, TypeError, "topk_weights"),
    ("weights_other_device", lambda a: {"topk_weights": a["topk_weights"].to(META)},
     ValueError, "topk_weights"),
    ("ids_float", lambda a: {"topk_ids": a["topk_ids"].float()}, TypeError, "topk_ids"),
    ("ids_1d", lambda a: {"topk_ids": a["topk_ids"][:, 0]}, ValueError, "topk_ids"),
    ("ids_T_mismatch", lambda a: {"topk_ids": a["topk_ids"][:-1]}, ValueError, "topk_ids"),
    ("ids_K_mismatch", lambda a: {"topk_ids": a["topk_ids"][:, :1]}, ValueError, "topk_ids"),
    ("ids_other_device", lambda a: {"topk_ids": a["topk_ids"].to(META)}, ValueError,
     "topk_ids"),
    ("map_without_ids", lambda a: {"topk_ids": None}, ValueError, "expert_map"),
    ("map_float", lambda a: {"expert_map": a["expert_map"].float()}, TypeError, "expert_map"),
    ("map_2d", lambda a: {"expert_map": a["expert_map"][None]}, ValueError, "expert_map"),
    ("map_other_device", lambda a: {"expert_map": a["expert_map"].to(META)}, ValueError,
     "expert_map"),
    ("outputs_shape", lambda a: {"outputs": a["inputs"].new_empty(4, 9)}, ValueError,
     "outputs"),
    ("outputs_T", lambda a: {"outputs": a["inputs"].new_empty(3, 8)}, ValueError, "outputs"),
    ("outputs_dtype", lambda a: {"outputs": a["inputs"].new_empty(4, 8).half()}, ValueError,
     "outputs"),
    ("outputs_float64", lambda a: {"outputs": a["inputs"].new_empty(4, 8).double()},
     TypeError, "outputs"),
    ("outputs_non_contiguous", lambda a: {"outputs": a["inputs"].new_empty(8, 4).t()},
     ValueError, "outputs"),
    ("outputs_other_device", lambda a: {"outputs": a["inputs"].new_empty(4, 8).to(META)},
     ValueError, "outputs"),
]


@pytest.mark.parametrize("change,exc,arg", [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS])
def test_validation(change, exc, arg):
    args = _valid()
    args.update(change(args))
    with pytest.raises(exc, match=rf"^{arg}\b"):
        moe_fused_mul_sum(**args)


def _valid_rows():
    case = make_inputs(4, 2, 8, routing="map", gathered=True)
    return dict(inputs=case.inputs, topk_weights=case.topk_weights, row_index=case.row_index,
                topk_ids=case.topk_ids, expert_map=case.expert_map)


BAD_ROWS_ARGS = [
    ("inputs_3d", lambda a: {"inputs": a["inputs"][None]}, ValueError, "inputs"),
    ("inputs_non_contiguous", lambda a: {"inputs": a["inputs"].t().contiguous().t()},
     ValueError, "inputs"),
    ("rows_float", lambda a: {"row_index": a["row_index"].float()}, TypeError, "row_index"),
    ("rows_other_device", lambda a: {"row_index": a["row_index"].to(META)}, ValueError,
     "row_index"),
    ("weights_T_mismatch", lambda a: {"topk_weights": a["topk_weights"][:-1]}, ValueError,
     "topk_weights"),
    ("map_without_ids", lambda a: {"topk_ids": None}, ValueError, "expert_map"),
    ("rows_outputs_shape", lambda a: {"outputs": a["inputs"].new_empty(1, 1)}, ValueError,
     "outputs"),
    ("rows_outputs_non_contiguous",
     lambda a: {"outputs": a["inputs"].new_empty(a["inputs"].shape[1],
                                                 a["row_index"].shape[0]).t()},
     ValueError, "outputs"),
]


@pytest.mark.parametrize("change,exc,arg", [b[1:] for b in BAD_ROWS_ARGS],
                         ids=[b[0] for b in BAD_ROWS_ARGS])
def test_rows_validation(change, exc, arg):
    args = _valid_rows()
    args.update(change(args))
    with pytest.raises(exc, match=rf"^{arg}\b"):
        fused_mul_sum_rows(**args)


# --------------------------------------------------------------------------------------------
# torch.compile and torch.library registrations
# --------------------------------------------------------------------------------------------

def test_compile_fullgraph_no_graph_break():
    """aot_eager runs the same ops, so results and gradients must be bitwise those of eager."""
    torch._dynamo.reset()
    case = make_inputs(5, 3, 37, routing="map")  # (T, K, D)
    g = grad_out_for(case, 5, 37)

    def combine(x, w, ids, emap):
        return moe_fused_mul_sum(x, w, topk_ids=ids, expert_map=emap)

    compiled = torch.compile(combine, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (combine, compiled):
        x = case.inputs.clone().requires_grad_()
        w = case.topk_weights.clone().requires_grad_()
        out = fn(x, w, case.topk_ids, case.expert_map)
        out.backward(g)
        results.append((out.detach(), x.grad, w.grad))
    for eager, comp in zip(*results):
        assert torch.equal(eager, comp)


def test_compile_fullgraph_outputs_in_place():
    torch._dynamo.reset()
    case = make_inputs(5, 3, 37, routing="map")  # (T, K, D)

    def combine_into(x, w, ids, emap, out):
        moe_fused_mul_sum(x, w, out, ids, emap)
        return out

    compiled = torch.compile(combine_into, fullgraph=True, backend="aot_eager")
    out = torch.full((5, 37), float("nan"), device=DEVICE)
    with torch.no_grad():
        result = compiled(case.inputs, case.topk_weights, case.topk_ids, case.expert_map, out)
    assert torch.equal(result, moe_fused_mul_sum(case.inputs, case.topk_weights,
                                                 topk_ids=case.topk_ids,
                                                 expert_map=case.expert_map))
    assert torch.equal(out, result)


@pytest.mark.parametrize("gathered", [False, True], ids=["dense", "gathered"])
def test_opcheck(gathered):
    case = make_inputs(4, 3, 16, routing="map", gathered=gathered)  # (T, K, D)
    x = case.inputs.clone().requires_grad_()
    w = case.topk_weights.clone().requires_grad_()
    torch.library.opcheck(torch.ops.ep_moe.fused_mul_sum.default,
                          (x, w, case.topk_ids, case.expert_map, case.row_index))


def test_opcheck_out_variant():
    case = make_inputs(4, 3, 16, routing="map")  # (T, K, D)
    out = torch.empty(4, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.ep_moe.fused_mul_sum_out.default,
                          (case.inputs, case.topk_weights, case.topk_ids, case.expert_map,
                           None, out))


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_offsets_beyond_int32():
    """T * K * D and T * D both above 2^31 elements (bf16 inputs 8.6 GB): every pointer offset
    must be int64. Only a few tokens at both ends are checked against the reference."""
    T, K, D = 2**18 + 5, 2, 8192
    assert T * D > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, K, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.rand(T, K, device="cuda", generator=g) + 0.1).requires_grad_()
    ids = torch.randint(0, 4, (T, K), device="cuda", generator=g)
    emap = torch.tensor([0, -1, 1, 2], device="cuda")
    x.requires_grad_()
    out = moe_fused_mul_sum(x, w, topk_ids=ids, expert_map=emap)  # (T, D)
    grad_out = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    out.backward(grad_out)
    rows = torch.tensor([0, 1, T - 3, T - 2, T - 1], device="cuda")
    case = Case(x.detach()[rows], w.detach()[rows], ids[rows], emap, None, ids[rows] != 1)
    ref_out, ref_gx, ref_gw, out_abs, gw_abs = combine_reference(case, grad_out[rows])
    assert_close_to("output", out.detach()[rows], ref_out, out_abs, torch.bfloat16)
    assert_close_to("grad_inputs", x.grad[rows], ref_gx, ref_gx.abs(), torch.bfloat16)
    assert_close_to("grad_weights", w.grad[rows], ref_gw, gw_abs, torch.float32)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay():
    """Capture one call into a static output; replay after copying new data into the inputs."""
    T, K, D = 64, 8, 2048
    first, second = make_inputs(T, K, D, torch.bfloat16, seed=0), \
        make_inputs(T, K, D, torch.bfloat16, seed=1)
    x, w = first.inputs.clone(), first.topk_weights.clone()
    ids, emap = first.topk_ids.clone(), first.expert_map.clone()
    out = torch.full((T, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    call = lambda: moe_fused_mul_sum(x, w, out, ids, emap)  # noqa: E731
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()  # warm-up compiles the kernel outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        for src in (first, second):
            out.fill_(float("nan"))
            for dst, new in ((x, src.inputs), (w, src.topk_weights), (ids, src.topk_ids),
                             (emap, src.expert_map)):
                dst.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            ref, _, _, out_abs, _ = combine_reference(src, grad_out_for(src, T, D))
            assert_close_to("output", out, ref, out_abs, torch.bfloat16)


@needs_triton
def test_bf16_output_rounds_to_nearest_even():
    """K = 1: out = bf16(w * x) with one fp32 product, the same in the kernel and in torch, so
    the stored bf16 must equal torch's round-to-nearest-even cast bit for bit. A truncating
    cast (the CPU interpreter's own) differs on about half the elements."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 1, 96, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.rand(64, 1, generator=g).to(DEVICE) + 0.5
    got = moe_fused_mul_sum(x, w)
    want = (w[:, :, None] * x.float()).sum(1).to(torch.bfloat16)
    assert torch.equal(got, want), (got != want).sum().item()
