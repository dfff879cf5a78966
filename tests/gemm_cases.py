"""What the grouped GEMM's tests share (`test_grouped_gemm.py`, `test_triton_experts.py`):
random inputs with NaN where nothing may be read, the float64 reference and its tolerances,
and fixtures that poison the output and record the kernel's launches.

Shapes are written as (counts, K, N): `counts` the rows of each of the e experts (P = their
sum), K the inner dim, N the rows of each expert's weight (2I, gate | up, when gated).

Import from here (`from gemm_cases import make_inputs, poisoned_outputs`): pytest puts this
folder on the path, and a fixture imported into a test module is that module's fixture.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

from ep_moe.kernels import grouped_gemm as gg
from ep_moe.kernels.grouped_gemm import grouped_gemm

from conftest import DEVICE, FP16_SUBNORMAL, ROUNDING

# Allowed error = rtol * |ref| + atol + ACCUM_RTOL * bound, where `bound` carries the sums of
# |terms| of the fp32 GEMM sums through the epilogue (see `reference`). Every dtype accumulates
# in fp32: bf16 / fp16 products are exact in fp32, fp32 operands multiply in IEEE fp32 (not
# tf32, whose 10-bit mantissa would be ~1e-3 off and fail here), so the dtype only sets the
# rounding of the stored output.
TOL = {  # dtype of a, w and the output: (rtol, atol)
    # fp32 output stored as is: 1e-5 leaves room for the fp32 sigmoid / erf / exp (a few ulps)
    torch.float32: (1e-5, 0.0),
    torch.float16: (ROUNDING[torch.float16], FP16_SUBNORMAL),  # one rounding to 10 mantissa bits
    torch.bfloat16: (ROUNDING[torch.bfloat16], 0.0),  # one rounding to 7 stored mantissa bits
}
# fp32 accumulation in another order than float64: worst case K * 2^-24 of the |terms| sum,
# 1e-5 covers K <= 168 outright (K <= 64 on CPU); random-sign roundings grow as sqrt(K) * 2^-24,
# far below it at K = 512 (test_gpu_real_shape)
ACCUM_RTOL = 1e-5
SLOPE = 1.13  # max |act'| over the reals (gelu 1.129, silu 1.100, relu 1): error through act

ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}  # F.gelu: the exact (erf) form


# --------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------------------------

class Case(NamedTuple):
    a: torch.Tensor                  # (M, K): M = P without a_rows
    w: torch.Tensor                  # (e, N, K)
    counts: torch.Tensor             # (e,) rows per expert, summing to P
    a_rows: Optional[torch.Tensor]   # (P,) row of a for each sorted row, or None


def make_inputs(counts, K, N, dtype=torch.float32, *, gather=False, strided=False,
                counts_dtype=torch.int64, rows_dtype=torch.int64, seed=0) -> Case:
    """Random a and w with O(1) GEMM outputs (w scaled by 1/sqrt(K)), NaN where nothing may
    be read.

    gather: a has about P/2 rows and `a_rows` picks them in random order, repeating rows;
    rows it never picks (at least one) are NaN. strided: a and w are views of buffers with
    NaN columns past K, so a's row stride and w's N stride exceed K.
    """
    g = torch.Generator().manual_seed(seed)
    e, P = len(counts), sum(counts)
    M = P // 2 + 2 if gather else P
    a_rows = None
    a = torch.randn(M, K, generator=g)
    w = torch.randn(e, N, K, generator=g) / max(K, 1) ** 0.5
    if gather:
        perm = torch.randperm(M, generator=g)
        readable = perm[: M - 1]  # row perm[M - 1] is never read
        a_rows = readable[torch.randint(0, M - 1, (P,), generator=g)]
        unread = torch.ones(M, dtype=torch.bool)
        unread[a_rows] = False
        a[unread] = float("nan")
        a_rows = a_rows.to(rows_dtype).to(DEVICE)
    a, w = a.to(DEVICE, dtype), w.to(DEVICE, dtype)
    if strided:  # views taken after the cast, which would copy them contiguous
        a = torch.cat([a, a.new_full((M, 5), float("nan"))], 1)[:, :K]
        w = torch.cat([w, w.new_full((e, N, 3), float("nan"))], 2)[..., :K]
    return Case(a, w, torch.tensor(counts, dtype=counts_dtype, device=DEVICE), a_rows)


def reference(case: Case, activation=None, gated=True):
    """float64 `out_i = act(rows_i @ w[i].T)` per expert, and the error bound of the fp32 sums.

    Returns (out (P, N or N/2), bound): bound is sum_k |a w| for each output, carried through
    the epilogue to first order, |d(act(g) u)| <= SLOPE |dg| |u| + |act(g)| |du|.
    """
    rows = case.a.double()
    if case.a_rows is not None:
        rows = rows[case.a_rows.long()]
    assert rows.shape[0] == int(case.counts.sum()), "counts must sum to P"
    return expert_products(rows, case.w.double(), case.counts, activation, gated)


def expert_products(rows, w, counts, activation=None, gated=True):
    """float64 `act(rows_i @ w[i].T)` for each expert's run of `rows` (`counts` of them), and
    the bound sum_k |a w| carried through the activation (see `reference`)."""
    outs, bounds = [], []
    for i, x in enumerate(rows.split(counts.tolist())):
        h, h_abs = x @ w[i].T, x.abs() @ w[i].abs().T
        if activation is None:
            y, bound = h, h_abs
        elif gated:
            (gate, up), (gate_abs, up_abs) = h.chunk(2, -1), h_abs.chunk(2, -1)
            act = ACTS[activation](gate)
            y, bound = act * up, SLOPE * gate_abs * up.abs() + act.abs() * up_abs
        else:
            y, bound = ACTS[activation](h), SLOPE * h_abs
        outs.append(y)
        bounds.append(bound)
    return torch.cat(outs), torch.cat(bounds)


def assert_close_to(got, ref, bound, dtype):
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"dtype {got.dtype} != {dtype}"
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} non-finite"
    err = (got.double() - ref).abs()
    rtol, atol = TOL[dtype]
    bad = err > rtol * ref.abs() + atol + ACCUM_RTOL * bound
    assert not bad.any(), (f"{int(bad.sum())}/{bad.numel()} elements off, first at "
                           f"{tuple(bad.nonzero()[0].tolist())}, worst error "
                           f"{float(err.max()):.3g}")


def check(case: Case, activation=None, gated=True, config=None, persistent=False):
    """`grouped_gemm` on `case` against the float64 reference; returns its output."""
    out = grouped_gemm(case.a, case.w, case.counts, case.a_rows, activation, gated, config,
                       persistent)
    ref, bound = reference(case, activation, gated)
    assert_close_to(out, ref, bound, case.a.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Fixtures: the output poisoned, the launches recorded
# --------------------------------------------------------------------------------------------

@pytest.fixture
def poisoned_outputs(monkeypatch):
    """NaN-fill the output `grouped_gemm` allocates, so an element it fails to write shows up
    as non-finite; returns the list of tensors so poisoned."""
    poisoned = []
    new_empty = torch.Tensor.new_empty

    def nan_empty(self, *size, **kwargs):
        out = new_empty(self, *size, **kwargs)
        if out.is_floating_point():
            poisoned.append(out.fill_(float("nan")))
        return out

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_empty)
    return poisoned


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of each launch of the grouped GEMM kernel (its tile shapes and
    loop choices, which leave the products the same by design)."""
    seen = []
    kernel = gg._grouped_gemm_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gg, "_grouped_gemm_kernel", Recording())
    return seen

