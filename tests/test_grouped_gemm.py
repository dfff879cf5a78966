"""Triton grouped expert GEMM (`grouped_gemm`) against a float64 loop over experts: shapes,
dtypes, gathers, activations, tail tiles, tensor-descriptor loads, persistent and flattened
launches, inputs that break the layer's invariants, validation. The tile configs' rules are
tested in `test_gemm_configs.py`, the layer's path through this kernel in
`test_triton_experts.py`.

Shapes are written as (counts, K, N) (see `gemm_cases`). Pinned small configs keep the CPU
interpreter fast (tl.dot there needs block dims >= 16); the default config runs on its own
cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ep_moe.kernels import gemm_configs as gg_configs
from ep_moe.kernels import grouped_gemm as gg
from ep_moe.kernels.grouped_gemm import GemmConfig, gemm_config, grouped_gemm

from conftest import DEVICE, TRITON_RUNS, needs_triton
from gemm_cases import (assert_close_to, check, launches, make_inputs,  # noqa: F401 (fixtures)
                        poisoned_outputs, reference)

# tensor descriptors: Hopper or newer, or the interpreter
_PROBE = torch.empty(8, 8, dtype=torch.bfloat16, device=DEVICE)
needs_tma = pytest.mark.skipif(
    not (TRITON_RUNS and gg.tma_ok(_PROBE, _PROBE[None])),
    reason="tensor descriptors need a GPU of compute capability >= 9 or TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (activation, gated): no epilogue; the three gated (act(gate) * up); the three plain act(h)
MODES = [(None, True), ("silu", True), ("gelu", True), ("relu", True),
         ("silu", False), ("gelu", False), ("relu", False)]
MODE_IDS = ["none", "silu_gated", "gelu_gated", "relu_gated", "silu", "gelu", "relu"]

SMALL = GemmConfig(16, 16, 16, 1, 4, 2)  # smallest tiles tl.dot takes: most blocks per shape


# --------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------

SHAPES = [
    ([5, 0, 19, 0], 32, 32),        # empty experts in the middle and at the end; 19 > BLOCK_M:
    #                                 two row blocks, the second of 3 rows
    ([0, 0, 7, 9], 40, 48),         # leading empty experts; K=40 = 2.5 BLOCK_K: masked K tail
    ([0, 37, 0], 16, 20),           # all rows to the middle expert, 3 blocks; K = BLOCK_K
    #                                 (unmasked K loop); N/2 = 10 below BLOCK_N
    ([23], 1, 34),                  # e=1 (E_POW2 = 1); K=1, one masked K step; N/2 = 17 is one
    #                                 past BLOCK_N
    ([3, 1, 4, 1, 5, 9], 24, 64),   # e=6 not a power of two; rows of several experts share
    #                                 nothing though each is below one block
    ([0, 0, 0], 16, 32),            # P=0: (0, N) out, nothing launched
    ([4, 0, 3], 0, 32),             # K=0: an empty product, zeros
]
SHAPE_IDS = ["empty_mid_end", "empty_lead_k40", "one_expert", "e1_k1", "e6", "p0", "k0"]


@needs_triton
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts,K,N", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(poisoned_outputs, counts, K, N, dtype, gather, persistent):
    # persistent: 4 programs on the CPU, so each loops over several tiles
    case = make_inputs(counts, K, N, dtype, gather=gather)
    out = check(case, "silu", True, SMALL, persistent)
    assert out.shape == (sum(counts), N // 2)


@needs_triton
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, None)])
def test_persistent_over_a_bound(poisoned_outputs, gated, activation):
    """A buffer sized by a bound (a fixed-size exchange): P = 4x the counts' sum. The
    persistent launch covers only the real tiles; its real rows are bitwise the grid's, and
    the rows past the sum stay unwritten (poisoned here, left NaN)."""
    case = make_inputs([9, 0, 23, 5], 40, 48, torch.bfloat16, gather=True, seed=3)
    real = int(case.counts.sum())
    pad = torch.full((3 * real,), 0, dtype=case.a_rows.dtype, device=case.a_rows.device)
    a_rows = torch.cat([case.a_rows, pad])
    outs = []
    for persistent in (False, True):
        out = grouped_gemm(case.a, case.w, case.counts, a_rows, activation, gated, SMALL,
                           persistent)
        outs.append(out)
    ref, bound = reference(case, activation, gated)
    assert_close_to(outs[1][:real], ref, bound, case.a.dtype)
    assert torch.equal(outs[0][:real], outs[1][:real])
    assert all(out[real:].isnan().all() for out in outs)


@needs_triton
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gated", MODES, ids=MODE_IDS)
def test_activations(poisoned_outputs, activation, gated, dtype, gather):
    # e=4 with an empty expert, 20 rows in 2 blocks, masked K tail, N/2 = 24 past BLOCK_N
    case = make_inputs([6, 0, 20, 3], 40, 48, dtype, gather=gather, seed=1)
    out = check(case, activation, gated, SMALL)
    assert out.shape == (29, 24 if gated and activation else 48)


@needs_triton
@pytest.mark.parametrize("activation,gated", [(None, True), ("relu", False)],
                         ids=["none_gated_ignored", "relu"])
def test_odd_n_without_gating(poisoned_outputs, activation, gated):
    # N=33 is fine when nothing splits it: no activation (gated then means nothing), or plain
    case = make_inputs([6, 9], 24, 33, gather=True)
    assert check(case, activation, gated, SMALL).shape == (15, 33)


@needs_triton
@pytest.mark.parametrize("config", [
    SMALL,                               # one row block per group: plain row-major order
    GemmConfig(16, 32, 32, 2, 4, 2),     # groups of 2 row blocks; N/2 = 48: a half column tile
    GemmConfig(32, 16, 16, 3, 4, 2),     # BLOCK_M=32 above some experts' counts; 3 does not
    #                                      divide the row blocks: a short last group
    GemmConfig(16, 16, 64, 8, 4, 2),     # BLOCK_K=64 > K: one masked step; GROUP_M > blocks
], ids=str)
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
def test_pinned_configs(poisoned_outputs, config, gather):
    # 70 rows: 45 in one expert (several row blocks), empty experts first and last
    case = make_inputs([0, 45, 3, 0, 22, 0], 40, 96, torch.float32, gather=gather, seed=2)
    check(case, "gelu", True, config)
    check(case, None, True, config)  # N = 96: 6 / 3 / 2 column tiles


# 32-row tiles, an expert's last rows in a 16-row tile where they fit
TAIL = GemmConfig(32, 16, 16, 1, 4, 2, tail_m=16)
# rows per expert: 5 (one tail tile), 0, 40 (32 + a tail of 8), 33 (32 + a tail of 1), 17
# (one full tile: 17 do not fit 16), 48 (32 + a tail of exactly 16)
TAIL_COUNTS = [5, 0, 40, 33, 17, 48]


@needs_triton
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tail_tiles(poisoned_outputs, launches, dtype, gather, persistent):
    """Each expert's last row block in a 16-row tile where its rows fit, beside 32-row tiles:
    every row written once, against float64, gated and not, K = 40 (a masked K step)."""
    case = make_inputs(TAIL_COUNTS, 40, 48, dtype, gather=gather, seed=7)
    check(case, "silu", True, TAIL, persistent)
    check(case, None, True, TAIL, persistent)
    assert [(k["TAIL_M"], k["BLOCK_M"], k["FLATTEN"]) for k in launches] == [(16, 32, False)] * 2


@needs_triton
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
def test_tail_tiles_in_groups(poisoned_outputs, launches, gather):
    """Tails with row blocks in groups (few experts' configs: groups of 16 that span every
    expert's blocks): here groups of 4 over the 9 row blocks, so groups cut experts' blocks
    apart; every row written once, against float64."""
    case = make_inputs(TAIL_COUNTS, 40, 48, torch.float32, gather=gather, seed=8)
    grouped = TAIL._replace(group_m=4)
    check(case, "silu", True, grouped)
    check(case, None, True, grouped)
    assert [(k["TAIL_M"], k["GROUP_M"]) for k in launches] == [(16, 4)] * 2


@needs_triton
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
def test_tail_tiles_over_a_bound(poisoned_outputs, launches, tma):
    """The layer's loose-bound gate/up launch: gathered rows, P = 4x the counts' sum,
    persistent, with tail tiles (and weight descriptors): the real rows bitwise the grid's
    and float64's, the rows past the sum left unwritten."""
    if tma and not gg.tma_ok(_PROBE, _PROBE[None], True):
        pytest.skip("tensor descriptors need compute capability >= 9 or TRITON_INTERPRET=1")
    case = make_inputs(TAIL_COUNTS, 40, 48, torch.bfloat16, gather=True, seed=9)
    real = int(case.counts.sum())
    a_rows = torch.cat([case.a_rows, case.a_rows.new_zeros(3 * real)])
    outs = [grouped_gemm(case.a, case.w, case.counts, a_rows, "silu", True, TAIL, persistent,
                         tma=tma) for persistent in (False, True)]
    assert [(k["TAIL_M"], k["PERSISTENT"], k["FLATTEN"], k["TMA_W"]) for k in launches] == \
        [(16, False, False, tma), (16, True, False, tma)]
    ref, bound = reference(case, "silu", True)
    assert_close_to(outs[1][:real], ref, bound, torch.bfloat16)
    assert torch.equal(outs[0][:real], outs[1][:real])
    assert all(out[real:].isnan().all() for out in outs)


@needs_tma
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
def test_tail_tiles_beside_descriptor_loads(poisoned_outputs, persistent):
    """Sorted rows through a descriptor of 32-row boxes; a tail tile reads its rows by
    pointer instead (the box would be 32 rows): the same results as pointer loads everywhere,
    bit for bit, in the grid and the (unflattened: not `flatten_wins`' tile) persistent loop."""
    case = make_inputs(TAIL_COUNTS, 40, 48, torch.bfloat16, seed=8)
    outs = [grouped_gemm(case.a, case.w, case.counts, None, "silu", True, TAIL, persistent,
                         tma=tma) for tma in (False, True)]
    ref, bound = reference(case, "silu", True)
    for out in outs:
        assert_close_to(out, ref, bound, torch.bfloat16)
    assert torch.equal(outs[0], outs[1])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts,gated", [  # rows per expert across gemm_config's brackets
    ([5, 7, 0, 3], True),        # 3.75 rows per expert, an idle expert: short row tiles
    ([30, 50], True),            # 40 rows per expert, few experts: 128-row tiles, groups of 16
    ([130, 0, 170], False),      # 100 rows per expert, an idle one between; few experts, plain
    ([30, 50, 41, 0, 38, 47, 33, 45, 52], True),  # 9 experts of ~38 rows: 64-row tiles
    ([60, 71, 0, 66, 90, 75, 80, 69, 88], False),  # 9 experts of ~67 rows, plain
    ([150, 160], True),          # 155 rows per expert, gated
    ([150, 160], False),         # the same, not gated: the widest column tiles
], ids=["few_rows", "mid_rows_few_experts", "more_rows_empty", "mid_rows", "more_rows",
        "many_rows_gated", "many_rows_plain"])
def test_default_config(poisoned_outputs, counts, gated, dtype):
    case = make_inputs(counts, 40, 48, dtype, gather=True, seed=3)
    out = check(case, "silu", gated)
    # what config=None stands for (4-byte dtypes may get fewer stages or shorter K tiles)
    pinned = gemm_config(sum(counts) / len(counts), gated, case.a.element_size(),
                         num_experts=len(counts))
    assert torch.equal(out, grouped_gemm(case.a, case.w, case.counts, case.a_rows, "silu",
                                         gated, pinned))


@needs_triton
def test_strided_operands(poisoned_outputs):
    # a's row stride K+5 and w's N stride K+3, NaN beyond K: only K columns may be read
    for counts, K in (([4, 17, 0], 40), ([9, 3], 32)):  # masked K tail; unmasked (EVEN_K)
        for gather in (False, True):
            case = make_inputs(counts, K, 32, torch.bfloat16, gather=gather, strided=True)
            assert case.a.stride(0) == K + 5 and case.w.stride(1) == K + 3
            check(case, "silu", True, SMALL)


@needs_triton
def test_every_output_element_written(poisoned_outputs):
    """The output comes from `new_empty`, NaN-filled here: every element must be overwritten,
    including rows of a partial last block and columns of a partial last tile."""
    case = make_inputs([0, 19, 0, 14], 24, 36, torch.bfloat16, gather=True)
    out = check(case, "relu", False, SMALL)  # relu: many exact zeros, which garbage could match
    assert poisoned_outputs and out.data_ptr() == poisoned_outputs[-1].data_ptr(), \
        "grouped_gemm no longer allocates its output with new_empty: update poisoned_outputs"


@needs_triton
@pytest.mark.parametrize("counts_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64], ids=str)
def test_index_dtypes(poisoned_outputs, counts_dtype, rows_dtype):
    case = make_inputs([7, 0, 18], 24, 32, gather=True, counts_dtype=counts_dtype,
                       rows_dtype=rows_dtype)
    check(case, "silu", True, SMALL)


# TMA loads want rows of a multiple of 16 bytes: K of 8, 16, 24 ... in 16-bit dtypes
TMA_SHAPES = [s for s in SHAPES if s[1] % 8 == 0 and s[1] > 0 and sum(s[0]) > 0]


@needs_tma
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, None)])
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts,K,N", TMA_SHAPES,
                         ids=[i for s, i in zip(SHAPES, SHAPE_IDS) if s in TMA_SHAPES])
def test_tma_loads(poisoned_outputs, counts, K, N, dtype, gather, gated, activation,
                   persistent):
    """Tiles loaded through tensor descriptors: the same products as the pointer loads, bit
    for bit, though their tiles run past an expert's rows (sorted a) and columns (N not a
    multiple of BLOCK_N) and past K, where the pointer loads mask."""
    case = make_inputs(counts, K, N, dtype, gather=gather, seed=5)
    outs = [grouped_gemm(case.a, case.w, case.counts, case.a_rows, activation, gated, SMALL,
                         persistent, tma=tma) for tma in (False, True)]
    ref, bound = reference(case, activation, gated)
    assert_close_to(outs[1], ref, bound, dtype)
    assert torch.equal(outs[0], outs[1])


# the down projection's tile for many rows per expert, K tiles short enough for the interpreter
FLAT_TILE = GemmConfig(128, 256, 16, 8, 8, 4)


@needs_tma
@pytest.mark.parametrize("counts", [
    [130, 0, 7, 129, 1, 0, 0, 40, 3],  # 9 experts: rows past a block, empty and tiny experts
    [0] * 8 + [300],                    # one expert has every row: three row blocks
], ids=["spread", "one_expert"])
def test_flattened_persistent_launch(poisoned_outputs, monkeypatch, launches, counts):
    """persistent=None on rows read through a descriptor, 128 x 256 tiles, more than 8
    experts: `flatten_wins` picks the persistent launch whose tile and K loops are one
    flattened loop; its products are the grid's, bit for bit, and match float64."""
    picked = []

    def spy(*args):
        picked.append(gg_configs.flatten_wins(*args))
        return picked[-1]

    monkeypatch.setattr(gg, "flatten_wins", spy)
    case = make_inputs(counts, 40, 264, torch.bfloat16, seed=3)  # N past a 256-wide tile
    flat = grouped_gemm(case.a, case.w, case.counts, config=FLAT_TILE._replace(tail_m=64),
                        persistent=None)
    assert picked == [True]
    # flattened: no tail tile (its branch would stop the flattening), whatever the config asks
    assert [(k["PERSISTENT"], k["FLATTEN"], k["TAIL_M"]) for k in launches] == [(True, True, 128)]
    grid = grouped_gemm(case.a, case.w, case.counts, config=FLAT_TILE, persistent=False)
    assert (launches[1]["PERSISTENT"], launches[1]["FLATTEN"]) == (False, False)
    ref, bound = reference(case)
    assert_close_to(flat, ref, bound, torch.bfloat16)
    assert torch.equal(flat, grid)


@needs_tma
@pytest.mark.parametrize("num_experts,flattens", [(9, True), (8, False)])
def test_persistent_flattens_only_where_flatten_wins(poisoned_outputs, launches, num_experts,
                                                     flattens):
    """persistent=True (the layer's loose-bound launch) flattens only where `flatten_wins`
    does; elsewhere it loops unflattened and keeps the config's tail tiles."""
    counts = ([150, 3, 0, 40, 7, 0, 1, 60, 2] * 2)[:num_experts]
    case = make_inputs(counts, 32, 40, torch.bfloat16, seed=4)
    cfg = FLAT_TILE._replace(tail_m=64)
    out = grouped_gemm(case.a, case.w, case.counts, config=cfg, persistent=True, tma=True)
    ref, bound = reference(case)
    assert_close_to(out, ref, bound, torch.bfloat16)
    assert [(k["FLATTEN"], k["TAIL_M"]) for k in launches] == \
        [(flattens, 128 if flattens else 64)]


@pytest.fixture
def descriptors(monkeypatch):
    """Counts the tensor descriptors `grouped_gemm` makes."""
    made = []

    def counting(tensor, block_shape):
        made.append(tuple(block_shape))
        return gg.TensorDescriptor(tensor, tensor.shape, tensor.stride(), block_shape)

    monkeypatch.setattr(gg.TensorDescriptor, "from_tensor", staticmethod(counting))
    return made


@needs_tma
def test_tma_auto_and_refused(descriptors):
    case = make_inputs([3, 9], 24, 32, torch.bfloat16)
    assert gg.tma_ok(case.a, case.w)  # 16-bit, 48-byte rows
    ref, bound = reference(case)
    tall = GemmConfig(128, 16, 16, 1, 4, 2)
    for config, made in ((SMALL, []), (tall, [(16, 16), (128, 16)])):
        # tma=None: descriptors for 128-row tiles only (w's, then a's: rows not gathered)
        descriptors.clear()
        assert_close_to(grouped_gemm(case.a, case.w, case.counts, config=config), ref, bound,
                        case.a.dtype)
        assert descriptors == made
    odd = make_inputs([3, 9], 20, 32, torch.bfloat16)  # 40-byte rows: no descriptor
    wide = make_inputs([3, 9], 24, 32, torch.float32)  # 4-byte elements: pointer loads
    for c in (odd, wide):
        assert not gg.tma_ok(c.a, c.w)
        descriptors.clear()
        ref, bound = reference(c)
        assert_close_to(grouped_gemm(c.a, c.w, c.counts, config=tall), ref, bound, c.a.dtype)
        assert descriptors == []  # tma=None falls back to the pointer loads
        with pytest.raises(ValueError, match=r"^tma=True needs 16-bit a and w"):
            grouped_gemm(c.a, c.w, c.counts, config=SMALL, tma=True)


@needs_tma
def test_tma_strided_a(descriptors):
    """a a view with a row stride of K + 8 and NaN past K: its descriptor walks the real
    stride and reads only K columns. Gathered rows of an a whose stride no descriptor takes
    (K + 5) still get the weights' descriptor."""
    for extra, gather, made in ((8, False, [(16, 16), (16, 16)]), (5, True, [(16, 16)])):
        case = make_inputs([4, 17, 0, 9], 32, 32, torch.bfloat16, gather=gather, seed=8)
        M, K = case.a.shape
        a = torch.cat([case.a, case.a.new_full((M, extra), float("nan"))], 1)[:, :K]
        assert a.stride(0) == K + extra
        descriptors.clear()
        out = grouped_gemm(a, case.w, case.counts, case.a_rows, "silu", True, SMALL, tma=True)
        assert descriptors == made
        ref, bound = reference(case, "silu", True)
        assert_close_to(out, ref, bound, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("config", [None, GemmConfig(16, 32, 32, 2, 4, 2)], ids=str)
def test_deterministic(config):
    case = make_inputs([0, 21, 5, 30], 40, 64, torch.bfloat16, gather=True)
    first = grouped_gemm(case.a, case.w, case.counts, case.a_rows, "silu", config=config)
    second = grouped_gemm(case.a, case.w, case.counts, case.a_rows, "silu", config=config)
    assert torch.equal(first, second)


@needs_triton
def test_bf16_output_rounds_to_nearest_even():
    """Operands of multiples of 1/4 in [-4, 4]: every product and every partial sum over K = 64
    is exact in fp32, whatever the order, so the stored bf16 must equal torch's
    round-to-nearest-even cast of the exact result bit for bit (a truncating cast would not:
    the sums need up to 14 significant bits, bf16 keeps 8)."""
    g = torch.Generator().manual_seed(5)
    a = (torch.randint(-16, 17, (40, 64), generator=g) / 4).to(DEVICE, torch.bfloat16)
    w = (torch.randint(-16, 17, (2, 32, 64), generator=g) / 4).to(DEVICE, torch.bfloat16)
    counts = torch.tensor([17, 23], device=DEVICE)
    got = grouped_gemm(a, w, counts, config=GemmConfig(16, 32, 32, 1, 4, 2))
    want = torch.cat([a[:17].double() @ w[0].double().T, a[17:].double() @ w[1].double().T])
    assert torch.equal(got, want.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Inputs that break the layer's invariants: never memory outside the tensors
# --------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("config", [SMALL, TAIL], ids=["small", "tail"])
@pytest.mark.parametrize("counts,P", [
    ([10, 7, 23], 30),  # the last expert's rows cut at P (with TAIL: a full tile, cut)
    ([20, 12, 0], 25),  # with TAIL: the second expert's tail tile (rows 20-31) cut at 25
], ids=["last_cut", "tail_cut"])
def test_counts_past_p_write_nothing_outside(counts, P, config, persistent):
    # counts sum past the P output rows: rows past P are cut; the first P are right
    case = make_inputs([10, 7, 13], 32, 32, torch.float32, gather=True, seed=5)
    rows = case.a_rows[:P].contiguous()
    big = torch.tensor(counts, device=case.a.device)
    out = grouped_gemm(case.a, case.w, big, rows, "silu", True, config, persistent)
    assert out.shape == (P, 16)
    a64, w64 = case.a.double(), case.w.double()
    ends = [min(int(e), P) for e in torch.tensor(counts).cumsum(0)]
    parts = []
    for i, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)):
        h = a64[rows[lo:hi]] @ w64[i].t()
        parts.append(F.silu(h[:, :16]) * h[:, 16:])
    torch.testing.assert_close(out.double(), torch.cat(parts), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("config", [SMALL, TAIL], ids=["small", "tail"])
def test_negative_count_counts_as_zero(config, persistent):
    a = torch.randn(12, 32, device=DEVICE)
    w = torch.randn(3, 16, 32, device=DEVICE)
    counts = torch.tensor([-5, 12, 0], device=DEVICE)  # with TAIL: 12 rows in a tail tile
    out = grouped_gemm(a, w, counts, config=config, persistent=persistent)
    torch.testing.assert_close(out.double(), a.double() @ w[1].double().t(), rtol=1e-5, atol=1e-5)


@needs_tma
@pytest.mark.parametrize("config", [SMALL, TAIL], ids=["small", "tail"])
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
@pytest.mark.parametrize("counts", [[10, 7, 23], [-5, 30, 0], [0, 0, 45]],
                         ids=["sum_past_p", "negative", "one_past_p"])
def test_tma_bad_counts_like_pointers(counts, gather, config):
    """Counts that break the invariants (device data, never checked): the descriptor loads,
    whose tiles run past a's 30 rows where the pointer loads mask, give the same output."""
    case = make_inputs([10, 7, 13], 32, 32, torch.bfloat16, gather=gather, seed=6)
    bad = torch.tensor(counts, device=DEVICE)
    outs = [grouped_gemm(case.a, case.w, bad, case.a_rows, "silu", True, config, tma=tma)
            for tma in (False, True)]
    assert outs[0].shape == (30, 16)
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])


@needs_triton
def test_out_of_range_a_rows_read_zeros():
    a = torch.randn(8, 32, device=DEVICE)
    w = torch.randn(1, 16, 32, device=DEVICE)
    rows = torch.tensor([0, 8, -3, 7, 100], device=DEVICE)  # 8, -3, 100 are outside a
    out = grouped_gemm(a, w, torch.tensor([5], device=DEVICE), rows, config=SMALL)
    ref = a.double()[[0, 0, 0, 7, 0]] @ w[0].double().t()
    ref[[1, 2, 4]] = 0.0
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_strided_index_tensors():
    # a_rows and the counts as strided views: the launcher makes them contiguous
    case = make_inputs([5, 9, 4], 32, 32, torch.float32, gather=True, seed=7)
    rows2 = torch.stack([case.a_rows, torch.full_like(case.a_rows, 10**6)], 1)
    counts2 = torch.stack([case.counts, torch.full_like(case.counts, 10**6)], 1)
    plain = grouped_gemm(case.a, case.w, case.counts, case.a_rows, "silu", True, SMALL)
    strided = grouped_gemm(case.a, case.w, counts2[:, 0], rows2[:, 0], "silu", True, SMALL)
    assert torch.equal(plain, strided)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _bad_inputs(change):
    """Valid (a, w, counts, a_rows, activation) with one argument made invalid."""
    a = torch.randn(6, 8)
    args = dict(a=a, w=torch.randn(2, 8, 8), num_tokens_per_expert=torch.tensor([2, 4]),
                a_rows=None, activation="silu")
    return {**args, **change(args)}


@pytest.mark.parametrize("change,error,match", [
    (lambda x: dict(a=x["a"][None]), ValueError, r"^a must be 2-D"),
    (lambda x: dict(a=x["a"].tolist()), TypeError, r"^a must be a torch.Tensor"),
    (lambda x: dict(w=x["w"][0]), ValueError, r"^w must be 3-D"),
    (lambda x: dict(w=x["w"].half()), TypeError, r"^w must have a's dtype"),
    (lambda x: dict(a=x["a"].int(), w=x["w"].int()), TypeError, r"^a must have dtype"),
    (lambda x: dict(a=x["a"].double(), w=x["w"].double()), TypeError, r"^a must have dtype"),
    (lambda x: dict(w=x["w"][..., :7]), ValueError, r"^w must be \(e, N, K=8\)"),
    (lambda x: dict(num_tokens_per_expert=x["num_tokens_per_expert"][None]), ValueError,
     r"^num_tokens_per_expert must be 1-D"),
    (lambda x: dict(num_tokens_per_expert=torch.tensor([6])), ValueError,
     r"^num_tokens_per_expert must be \(2,\)"),
    (lambda x: dict(num_tokens_per_expert=torch.tensor([2.0, 4.0])), TypeError,
     r"^num_tokens_per_expert must have dtype"),
    (lambda x: dict(a_rows=torch.zeros(6)), TypeError, r"^a_rows must have dtype"),
    (lambda x: dict(a_rows=torch.zeros(6, 1, dtype=torch.int64)), ValueError,
     r"^a_rows must be 1-D"),
    (lambda x: dict(activation="tanh"), ValueError, r"^activation must be None or one of"),
    (lambda x: dict(w=torch.randn(2, 7, 8)), ValueError, r"^w must have an even N"),
    (lambda x: dict(a=torch.randn(8, 8).t()), ValueError, r"^a and w must have a contiguous"),
    (lambda x: dict(w=torch.randn(2, 8, 8).transpose(1, 2)), ValueError,
     r"^a and w must have a contiguous"),
], ids=["a_3d", "a_list", "w_2d", "w_dtype", "a_int32", "a_float64", "w_K", "counts_2d",
        "counts_len", "counts_float", "a_rows_float", "a_rows_2d", "activation", "odd_N",
        "a_strided_K", "w_strided_K"])
def test_validation(change, error, match):
    args = _bad_inputs(change)
    with pytest.raises(error, match=match):
        grouped_gemm(**args)


def test_needs_triton(monkeypatch):
    from ep_moe.kernels import common

    monkeypatch.setattr(common, "use_triton", lambda t: False)  # a CPU without the interpreter
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grouped_gemm(**_bad_inputs(lambda x: {}))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(config=GemmConfig(12, 16, 16, 1, 4, 2)), ValueError, "block_m"),   # not a power of 2
    (dict(config=GemmConfig(16, 16, 16, 0, 4, 2)), ValueError, "group_m"),   # no row group
    (dict(config=(16, 16, 16, 1, 4, 2)), TypeError, "config"),               # a plain tuple
    (dict(config=GemmConfig(32, 16, 16, 1, 4, 2, 32)), ValueError, "tail_m"),  # not below
    (dict(config=GemmConfig(32, 16, 16, 1, 4, 2, 24)), ValueError, "tail_m"),  # not a power
])
def test_config_validation(kwargs, exc, match):
    a, w = torch.randn(4, 16), torch.randn(2, 16, 16)
    with pytest.raises(exc, match=match):
        grouped_gemm(a, w, torch.tensor([2, 2]), **kwargs)


def test_no_experts_for_rows():
    with pytest.raises(ValueError, match="at least one expert"):
        grouped_gemm(torch.randn(4, 16), torch.randn(0, 16, 16), torch.zeros(0, dtype=torch.int64),
                     a_rows=torch.tensor([0, 1]))


def test_rows_of_an_empty_a():
    with pytest.raises(ValueError, match="a_rows"):
        grouped_gemm(torch.randn(0, 16), torch.randn(1, 16, 16), torch.tensor([2]),
                     a_rows=torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------
# On a GPU, at a real-ish shape
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_real_shape(dtype):
    # e=8, D=512, I=256 (w13 of 2I=512 rows), P=300 gathered from 152 tokens with one idle
    # expert; default config (37.5 rows per expert, 8 experts: 128-row tiles in one group);
    # fp32 checks IEEE, not tf32
    counts = [40, 0, 61, 17, 55, 33, 70, 24]
    case = make_inputs(counts, 512, 512, dtype, gather=True, seed=4)
    assert case.a.is_cuda
    check(case, "silu", True)
