"""The fused weighted top-k combine, `moe_fused_mul_sum`:
`out[t] = sum_k topk_weights[t, k] * inputs[t, k]`, over the slots whose expert is local.

Slots that do not count (expert not local to this rank, id out of range, row index -1) are
masked out of every load, so nothing there is ever read: NaN or garbage in a skipped slot cannot
reach the output, and no out-of-range id indexes `expert_map`.

The kernels serve two layouts of the expert outputs:
- dense: `inputs` (T, K, D), slot (t, k) is row t*K + k (`moe_fused_mul_sum`, the public API);
- gathered: `inputs` (P, D) holds only the rows that exist (expert outputs sorted by expert) and
  `row_index` (T, K) says which row slot (t, k) is, -1 for none (`fused_mul_sum_rows`). The
  layer uses this layout so it never allocates a (T, K, D) buffer that is mostly skipped
  slots, and the combine doubles as the un-permute. Each row is referenced by at most one slot.
`fused_mul_sum_rows_split` writes the gathered layout's result in W slices, one per home rank
(the exchange over NVLink).

The file reads in four layers: 1. Triton kernels; 2. launchers and the torch path (a CPU
without the interpreter); 3. custom ops (what torch.compile sees) and the eager autograd
Function; 4. the public functions, which validate their arguments.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import (FLOAT_DTYPES, INDEX_DTYPES, check_split_outputs, check_tensor, needs_grad,
                     num_sms, to_output, use_triton)


# --------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _slot_rows(
    t, weights_ptr, ids_ptr, map_ptr, rows_ptr, E,
    K: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_MAP: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    """For token t: which of its K slots count, their row in `inputs`, their fp32 weight.

    Weights, ids and row indices are loaded side by side; only the expert-map lookup waits on
    the ids, so a program pays two dependent load latencies before its row loads, not four.
    """
    k = tl.arange(0, BLOCK_K)
    slot = t * K + k  # int64: t is
    in_k = k < K
    w = tl.load(weights_ptr + slot, mask=in_k, other=0.0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + slot, mask=in_k, other=-1).to(tl.int64)
        keep = in_k & (row >= 0)
    else:
        row = slot
        keep = in_k
    if HAS_IDS:
        eid = tl.load(ids_ptr + slot, mask=in_k, other=-1).to(tl.int64)
        keep = keep & (eid >= 0)
        if HAS_MAP:
            keep = keep & (eid < E)
            local = tl.load(map_ptr + eid, mask=keep, other=-1)
            keep = keep & (local >= 0)
    # fp32 accumulation: bf16 loses accuracy when summing top-k=8. `where`, not a product:
    # the weight of a skipped slot may be NaN.
    w = tl.where(keep, w.to(tl.float32), 0.0)
    return keep, row, w


@triton.jit
def _fused_mul_sum_fwd_kernel(
    # pointers
    inputs_ptr, weights_ptr, ids_ptr, map_ptr, rows_ptr, out_ptr, table_ptr,
    # sizes
    T, D, E, tokens_per_program, num_outputs, first_output,
    # meta-parameters
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_MAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    PREFETCH: tl.constexpr, OUT_TABLE: tl.constexpr,
):
    """Program (i, j) writes columns [j*BLOCK_D, (j+1)*BLOCK_D) of `tokens_per_program` tokens.

    A token's K slot rows load as one (BLOCK_K, BLOCK_D) tile, skipped slots masked out. The
    next token's routing loads while this token's rows are in flight, so the dependent
    ids -> expert_map -> rows chain costs latency once per program, not once per token.

    OUT_TABLE (one token per program): the T rows are num_outputs slices of n = T /
    num_outputs; program i writes row i // num_outputs of slice (first_output + i) %
    num_outputs to the output whose address table_ptr holds (consecutive programs to
    different outputs), and a token with no counting slot is not written at all.
    """
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    if OUT_TABLE:
        i = tl.program_id(0).to(tl.int64)
        part = (first_output + i % num_outputs) % num_outputs
        j = i // num_outputs
        t = part * (T // num_outputs) + j
        keep, row, w = _slot_rows(t, weights_ptr, ids_ptr, map_ptr, rows_ptr, E,
                                  K, BLOCK_K, HAS_IDS, HAS_MAP, HAS_ROWS)
        if tl.sum(keep.to(tl.int32)) > 0:
            x = tl.load(inputs_ptr + row[:, None] * D + d[None, :],
                        mask=keep[:, None] & d_mask[None, :], other=0.0)
            acc = tl.sum(x.to(tl.float32) * w[:, None], axis=0)
            base = tl.load(table_ptr + part).to(tl.pointer_type(out_ptr.dtype.element_ty))
            tl.store(base + j * D + d, to_output(acc, out_ptr.dtype.element_ty), mask=d_mask)
        return
    t_start = tl.program_id(0).to(tl.int64) * tokens_per_program
    t_end = tl.minimum(t_start + tokens_per_program, T)
    keep, row, w = _slot_rows(t_start, weights_ptr, ids_ptr, map_ptr, rows_ptr, E,
                              K, BLOCK_K, HAS_IDS, HAS_MAP, HAS_ROWS)
    if PREFETCH:
        for t in range(t_start, t_end):
            x = tl.load(inputs_ptr + row[:, None] * D + d[None, :],
                        mask=keep[:, None] & d_mask[None, :], other=0.0)
            t_next = tl.minimum(t + 1, T - 1)  # the last prefetch re-reads a valid token
            keep_next, row_next, w_next = _slot_rows(t_next, weights_ptr, ids_ptr, map_ptr,
                                                     rows_ptr, E, K, BLOCK_K, HAS_IDS,
                                                     HAS_MAP, HAS_ROWS)
            acc = tl.sum(x.to(tl.float32) * w[:, None], axis=0)
            tl.store(out_ptr + t * D + d, to_output(acc, out_ptr.dtype.element_ty), mask=d_mask)
            keep, row, w = keep_next, row_next, w_next
    else:  # one token per program: nothing to prefetch
        x = tl.load(inputs_ptr + row[:, None] * D + d[None, :],
                    mask=keep[:, None] & d_mask[None, :], other=0.0)
        acc = tl.sum(x.to(tl.float32) * w[:, None], axis=0)
        tl.store(out_ptr + t_start * D + d, to_output(acc, out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _fused_mul_sum_bwd_kernel(
    # pointers
    grad_out_ptr, inputs_ptr, weights_ptr, ids_ptr, map_ptr, rows_ptr,
    grad_inputs_ptr, grad_weights_ptr,
    # sizes
    D, E,
    # meta-parameters
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_MAP: tl.constexpr, HAS_ROWS: tl.constexpr,
    NEED_GRAD_INPUTS: tl.constexpr, NEED_GRAD_WEIGHTS: tl.constexpr,
):
    """One program per token walks D, so the dot product for grad_weights needs no atomics."""
    t = tl.program_id(0).to(tl.int64)
    keep, row, w = _slot_rows(t, weights_ptr, ids_ptr, map_ptr, rows_ptr, E,
                              K, BLOCK_K, HAS_IDS, HAS_MAP, HAS_ROWS)
    k_mask = tl.arange(0, BLOCK_K) < K
    dot = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = d < D
        g = tl.load(grad_out_ptr + t * D + d, mask=d_mask, other=0.0).to(tl.float32)
        if NEED_GRAD_INPUTS:
            gi = w[:, None] * g[None, :]  # zero where the slot does not count (w masked to 0)
            if HAS_ROWS:  # gathered layout: only referenced rows exist, the rest stay zero
                gi_mask = keep[:, None] & d_mask[None, :]
            else:  # dense layout: skipped slots get explicit zeros
                gi_mask = k_mask[:, None] & d_mask[None, :]
            tl.store(grad_inputs_ptr + row[:, None] * D + d[None, :],
                     to_output(gi, grad_inputs_ptr.dtype.element_ty), mask=gi_mask)
        if NEED_GRAD_WEIGHTS:
            x = tl.load(inputs_ptr + row[:, None] * D + d[None, :],
                        mask=keep[:, None] & d_mask[None, :], other=0.0)
            dot += x.to(tl.float32) * g[None, :]
    if NEED_GRAD_WEIGHTS:
        gw = tl.sum(dot, axis=1)
        tl.store(grad_weights_ptr + t * K + tl.arange(0, BLOCK_K),
                 to_output(gw, grad_weights_ptr.dtype.element_ty), mask=k_mask)


# --------------------------------------------------------------------------------------------
# 2. Launchers (inputs already validated and contiguous)
# --------------------------------------------------------------------------------------------

class FwdConfig(NamedTuple):
    block_d: int
    num_warps: int
    programs_per_sm: int  # 0: one token per program; else tokens are packed so about this
    #                       many programs per multiprocessor cover all of T


def _fwd_config(K: int, D: int, has_map: bool) -> FwdConfig:
    """Picked by a sweep on an H200 over PERF.md's shapes at W of 1, 2 and 4
    (docs/performance.md)."""
    if has_map and D <= 4096:  # most slots skipped: wide rows per thread and several tokens
        # per program keep enough bytes in flight behind the ids -> map -> rows chain
        block_d = min(triton.next_power_of_2(max(D, 1)), 2048)
        return FwdConfig(block_d, max(1, min(4, block_d // 512)), 32)
    if has_map:  # long rows (D = 7168): one token per program, narrow tiles, many programs
        return FwdConfig(512, 2, 0)
    _, block_d, num_warps = _block_sizes(K, D)
    return FwdConfig(block_d, num_warps, 0)


def _block_sizes(K: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps): 16-byte loads per thread for 2-byte dtypes, ~8K elements
    per program so a thread has several independent loads in flight."""
    block_k = triton.next_power_of_2(K)
    block_d = min(triton.next_power_of_2(max(D, 1)), max(256, 8192 // block_k), 2048)
    num_warps = max(1, min(8, block_d // 256))
    return block_k, block_d, num_warps


def _slot_args(topk_ids, expert_map, row_index, weights):
    dummy = weights  # any valid pointer; never dereferenced when the matching HAS_* is False
    return (topk_ids if topk_ids is not None else dummy,
            expert_map if expert_map is not None else dummy,
            row_index if row_index is not None else dummy)


def _fwd_triton(inputs, weights, topk_ids, expert_map, row_index, out, table=None, first=0):
    """table: (W,) int64 addresses of W outputs (`out` one of them), each (T / W, D): the
    OUT_TABLE launch, rows with no counting slot left unwritten."""
    T, K = weights.shape
    D = out.shape[1]
    if T == 0 or D == 0:
        return
    if K == 0:  # no slots: every token gets zeros (with a table: no token is written)
        if table is None:
            out.zero_()
        return
    E = expert_map.shape[0] if expert_map is not None else 0
    block_k = triton.next_power_of_2(K)
    cfg = _fwd_config(K, D, expert_map is not None or row_index is not None)
    d_blocks = triton.cdiv(D, cfg.block_d)
    per_program = 1
    if cfg.programs_per_sm and table is None:
        per_program = max(1, T * d_blocks // (num_sms(out.device) * cfg.programs_per_sm))
    ids, emap, rows = _slot_args(topk_ids, expert_map, row_index, weights)
    grid = (triton.cdiv(T, per_program), d_blocks)
    _fused_mul_sum_fwd_kernel[grid](
        inputs, weights, ids, emap, rows, out, table if table is not None else out,
        T, D, E, per_program, 1 if table is None else table.shape[0], first,
        K=K, BLOCK_K=block_k, BLOCK_D=cfg.block_d,
        HAS_IDS=topk_ids is not None, HAS_MAP=expert_map is not None,
        HAS_ROWS=row_index is not None, PREFETCH=per_program > 1,
        OUT_TABLE=table is not None, num_warps=cfg.num_warps)


def _bwd_triton(grad_out, inputs, weights, topk_ids, expert_map, row_index,
                grad_inputs, grad_weights):
    T, K = weights.shape
    D = grad_out.shape[1]
    if T == 0 or K == 0:  # K = 0: both gradients are empty
        return
    if D == 0:
        if grad_weights is not None:
            grad_weights.zero_()
        return
    E = expert_map.shape[0] if expert_map is not None else 0
    block_k, block_d, num_warps = _block_sizes(K, D)
    block_d = min(block_d, max(64, 4096 // block_k))  # the dot accumulator lives in registers
    num_warps = max(1, min(8, block_d // 256))
    ids, emap, rows = _slot_args(topk_ids, expert_map, row_index, weights)
    _fused_mul_sum_bwd_kernel[(T,)](
        grad_out, inputs, weights, ids, emap, rows,
        grad_inputs if grad_inputs is not None else grad_out,
        grad_weights if grad_weights is not None else weights,
        D, E,
        K=K, BLOCK_K=block_k, BLOCK_D=block_d,
        HAS_IDS=topk_ids is not None, HAS_MAP=expert_map is not None,
        HAS_ROWS=row_index is not None,
        NEED_GRAD_INPUTS=grad_inputs is not None, NEED_GRAD_WEIGHTS=grad_weights is not None,
        num_warps=num_warps)


def _keep_mask(weights, topk_ids, expert_map, row_index):
    """Torch twin of `_slot_rows`: (T, K) bool mask of the slots that count."""
    keep = torch.ones(weights.shape, dtype=torch.bool, device=weights.device)
    if row_index is not None:
        keep &= row_index >= 0
    if topk_ids is not None:
        keep &= topk_ids >= 0
        if expert_map is not None:
            E = expert_map.shape[0]
            keep &= topk_ids < E
            # clamp keeps the lookup in range; the mask drops those slots anyway
            keep &= expert_map[topk_ids.clamp(0, max(E - 1, 0))] >= 0 if E > 0 else False
    return keep


def _slot_values(inputs, weights, row_index, keep):
    """(T, K, D) view or gather of the slot rows, skipped ones replaced by zeros (never used)."""
    if row_index is None:
        x = inputs  # (T, K, D)
    elif inputs.shape[0] == 0:  # nothing to gather: every slot is skipped
        x = inputs.new_zeros(*weights.shape, inputs.shape[1])
    else:
        x = inputs[row_index.clamp(min=0).long()]
    return torch.where(keep[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _fwd_torch(inputs, weights, topk_ids, expert_map, row_index, out):
    keep = _keep_mask(weights, topk_ids, expert_map, row_index)
    x = _slot_values(inputs, weights, row_index, keep)
    w = torch.where(keep, weights.float(), 0.0)
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for k in range(weights.shape[1]):  # fp32 accumulation, fixed order
        acc += w[:, k, None] * x[:, k].float()
    out.copy_(acc)


def _bwd_torch(grad_out, inputs, weights, topk_ids, expert_map, row_index,
               grad_inputs, grad_weights):
    keep = _keep_mask(weights, topk_ids, expert_map, row_index)
    g = grad_out.float()
    if grad_inputs is not None:
        gi = torch.where(keep, weights.float(), 0.0)[..., None] * g[:, None, :]  # (T, K, D)
        if row_index is None:
            grad_inputs.copy_(gi)
        else:
            grad_inputs[row_index[keep].long()] = gi[keep].to(grad_inputs.dtype)
    if grad_weights is not None:
        x = _slot_values(inputs, weights, row_index, keep).float()
        grad_weights.copy_((x * g[:, None, :]).sum(-1))


def _num_cols(inputs: torch.Tensor) -> int:
    return inputs.shape[-1]


def _forward(inputs, topk_weights, topk_ids, expert_map, row_index, out=None):
    if out is None:
        out = inputs.new_empty(topk_weights.shape[0], _num_cols(inputs))
    (_fwd_triton if use_triton(inputs) else _fwd_torch)(
        inputs, topk_weights, topk_ids, expert_map, row_index, out)
    return out


def _backward_impl(grad_out, inputs, topk_weights, topk_ids, expert_map, row_index,
                   need_inputs_grad, need_weights_grad):
    # gathered layout: rows no slot references keep a zero gradient
    alloc = torch.zeros_like if row_index is not None else torch.empty_like
    grad_inputs = alloc(inputs) if need_inputs_grad else inputs.new_empty(0)
    grad_weights = torch.empty_like(topk_weights) if need_weights_grad else \
        topk_weights.new_empty(0)
    (_bwd_triton if use_triton(inputs) else _bwd_torch)(
        grad_out.contiguous(), inputs, topk_weights, topk_ids, expert_map, row_index,
        grad_inputs if need_inputs_grad else None, grad_weights if need_weights_grad else None)
    return grad_inputs, grad_weights


# --------------------------------------------------------------------------------------------
# 3. Custom ops: torch.compile sees them as single nodes; autograd runs the Triton backward
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ep_moe::fused_mul_sum", mutates_args=())
def _fused_mul_sum_op(inputs: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: Optional[torch.Tensor], expert_map: Optional[torch.Tensor],
                      row_index: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(inputs, topk_weights, topk_ids, expert_map, row_index)


@_fused_mul_sum_op.register_fake
def _(inputs, topk_weights, topk_ids, expert_map, row_index):
    return inputs.new_empty(topk_weights.shape[0], _num_cols(inputs))


@torch.library.custom_op("ep_moe::fused_mul_sum_out", mutates_args=("out",))
def _fused_mul_sum_out_op(inputs: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: Optional[torch.Tensor], expert_map: Optional[torch.Tensor],
                          row_index: Optional[torch.Tensor], out: torch.Tensor) -> None:
    _forward(inputs, topk_weights, topk_ids, expert_map, row_index, out)


@_fused_mul_sum_out_op.register_fake
def _(inputs, topk_weights, topk_ids, expert_map, row_index, out):
    return None


@torch.library.custom_op("ep_moe::fused_mul_sum_backward", mutates_args=())
def _fused_mul_sum_backward_op(
        grad_out: torch.Tensor, inputs: torch.Tensor, topk_weights: torch.Tensor,
        topk_ids: Optional[torch.Tensor], expert_map: Optional[torch.Tensor],
        row_index: Optional[torch.Tensor], need_inputs_grad: bool, need_weights_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_out, inputs, topk_weights, topk_ids, expert_map, row_index,
                          need_inputs_grad, need_weights_grad)


@_fused_mul_sum_backward_op.register_fake
def _(grad_out, inputs, topk_weights, topk_ids, expert_map, row_index,
      need_inputs_grad, need_weights_grad):
    return (torch.empty_like(inputs) if need_inputs_grad else inputs.new_empty(0),
            torch.empty_like(topk_weights) if need_weights_grad else topk_weights.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, ids, emap, rows = inputs
    ctx.save_for_backward(x, w, ids, emap, rows)


def _backward(ctx, grad_out):
    x, w, ids, emap, rows = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = _fused_mul_sum_backward_op(grad_out, x, w, ids, emap, rows, need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None), None, None, None


_fused_mul_sum_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedMulSum(torch.autograd.Function):
    """The same kernels without the custom-op dispatch, which costs tens of microseconds of
    host time per call; used outside torch.compile, where nothing needs to trace the op."""

    @staticmethod
    def forward(ctx, inputs, topk_weights, topk_ids, expert_map, row_index):
        ctx.save_for_backward(inputs, topk_weights, topk_ids, expert_map, row_index)
        return _forward(inputs, topk_weights, topk_ids, expert_map, row_index)

    @staticmethod
    def backward(ctx, grad_out):
        x, w, ids, emap, rows = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw = _backward_impl(grad_out, x, w, ids, emap, rows, need_x, need_w)
        return (gx if need_x else None), (gw if need_w else None), None, None, None


# --------------------------------------------------------------------------------------------
# 4. Public functions
# --------------------------------------------------------------------------------------------

def _check_routing(T, K, device, topk_weights, topk_ids, expert_map):
    check_tensor("topk_weights", topk_weights, 2, FLOAT_DTYPES, device)
    if tuple(topk_weights.shape) != (T, K):
        raise ValueError(f"topk_weights must have shape (T, K) = {(T, K)}, "
                         f"got {tuple(topk_weights.shape)}")
    if topk_ids is not None:
        check_tensor("topk_ids", topk_ids, 2, INDEX_DTYPES, device)
        if tuple(topk_ids.shape) != (T, K):
            raise ValueError(f"topk_ids must have shape (T, K) = {(T, K)}, "
                             f"got {tuple(topk_ids.shape)}")
    if expert_map is not None:
        if topk_ids is None:
            raise ValueError("expert_map needs topk_ids: got expert_map with topk_ids=None")
        check_tensor("expert_map", expert_map, 1, INDEX_DTYPES, device)


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.contiguous() if t is not None else None


def moe_fused_mul_sum(
    inputs: torch.Tensor,
    topk_weights: torch.Tensor,
    outputs: Optional[torch.Tensor] = None,
    topk_ids: Optional[torch.Tensor] = None,
    expert_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted sum over the top-k slots: `out[t] = sum_k topk_weights[t, k] * inputs[t, k]`.

    Args:
        inputs: (T, K, D) float32 / float16 / bfloat16, contiguous. Expert outputs per slot.
        topk_weights: (T, K) float32 / float16 / bfloat16. Accumulation is always fp32.
        outputs: optional (T, D) tensor of inputs' dtype and device, contiguous: written in
            place and returned. With autograd active the result is computed then copied into it.
        topk_ids: optional (T, K) int32 / int64 expert ids. Without `expert_map` a slot counts
            where `topk_ids[t, k] >= 0` (ids already local; -1 marks an empty slot).
        expert_map: optional (E,) int32 / int64, local id of each global expert or -1 where
            another rank owns it. A slot counts where `0 <= topk_ids[t, k] < E` and
            `expert_map[topk_ids[t, k]] >= 0`.

    Returns:
        (T, D) tensor of inputs' dtype. Slots that do not count are never read (NaN there
        cannot leak); a token with no counting slot gets zeros. Deterministic. Differentiable
        in `inputs` (zero gradient for skipped slots) and `topk_weights`.
    """
    check_tensor("inputs", inputs, 3, FLOAT_DTYPES)
    if not inputs.is_contiguous():
        raise ValueError(f"inputs must be contiguous, got strides {inputs.stride()} "
                         f"for shape {tuple(inputs.shape)}")
    T, K, D = inputs.shape
    _check_routing(T, K, inputs.device, topk_weights, topk_ids, expert_map)
    _check_outputs(outputs, T, D, inputs)
    args = (inputs, _contig(topk_weights), _contig(topk_ids), _contig(expert_map), None)
    return _dispatch(args, outputs)


def _check_outputs(outputs, T, D, inputs):
    if outputs is None:
        return
    check_tensor("outputs", outputs, 2, FLOAT_DTYPES, inputs.device)
    if tuple(outputs.shape) != (T, D) or outputs.dtype != inputs.dtype:
        raise ValueError(f"outputs must be ({T}, {D}) {inputs.dtype}, got "
                         f"{tuple(outputs.shape)} {outputs.dtype}")
    if not outputs.is_contiguous():
        raise ValueError(f"outputs must be contiguous, got strides {outputs.stride()}")


def fused_mul_sum_rows(
    inputs: torch.Tensor,
    topk_weights: torch.Tensor,
    row_index: torch.Tensor,
    topk_ids: Optional[torch.Tensor] = None,
    expert_map: Optional[torch.Tensor] = None,
    outputs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gathered-layout combine: `out[t] = sum_k w[t, k] * inputs[row_index[t, k]]`.

    Args:
        inputs: (P, D) rows, contiguous; each row referenced by at most one slot.
        topk_weights: (T, K) float weights.
        row_index: (T, K) int32 / int64 row of each slot in `inputs`, -1 for none (never read).
        topk_ids, expert_map: as in `moe_fused_mul_sum`, further masks.
        outputs: optional (T, D) contiguous tensor of inputs' dtype: written and returned.

    Returns:
        (T, D) tensor of inputs' dtype, deterministic, differentiable in inputs and weights.
    """
    T, K = _check_rows_args(inputs, topk_weights, row_index, topk_ids, expert_map)
    _check_outputs(outputs, T, inputs.shape[1], inputs)
    args = (inputs, _contig(topk_weights), _contig(topk_ids), _contig(expert_map),
            row_index.contiguous())
    return _dispatch(args, outputs)


def _check_rows_args(inputs, topk_weights, row_index, topk_ids, expert_map):
    """The gathered layout's arguments; returns (T, K)."""
    check_tensor("inputs", inputs, 2, FLOAT_DTYPES)
    if not inputs.is_contiguous():
        raise ValueError(f"inputs must be contiguous, got strides {inputs.stride()}")
    check_tensor("row_index", row_index, 2, INDEX_DTYPES, inputs.device)
    T, K = row_index.shape
    _check_routing(T, K, inputs.device, topk_weights, topk_ids, expert_map)
    return T, K


class SplitOutputs(NamedTuple):
    """Where `fused_mul_sum_rows_split` writes: W views, the slice to start with, and the
    (W,) int64 table of the views' addresses (None: built per call)."""

    views: list
    first: int = 0
    table: Optional[torch.Tensor] = None


def fused_mul_sum_rows_split(
    inputs: torch.Tensor,
    topk_weights: torch.Tensor,
    row_index: torch.Tensor,
    outputs: list,
    first: int = 0,
    table: Optional[torch.Tensor] = None,
) -> None:
    """`fused_mul_sum_rows` written in W slices: rows [w n, (w + 1) n) of the (T, D) result,
    n = T / W, into outputs[w] (on CUDA, views of other ranks' memory: the stores are the
    exchange). One launch, consecutive programs writing to different outputs (from slice
    `first` on). A row with no counting slot is not written (under the NVLink exchange those
    are the padding rows, which their home rank never reads). Inference only: no autograd.

    Args:
        inputs, topk_weights, row_index: as in `fused_mul_sum_rows`; T divisible by W.
        outputs: W tensors (n, D) of inputs' dtype and device, rows contiguous.
        first: the slice the first programs write.
        table: (W,) int64 tensor of outputs[w].data_ptr() on inputs' device; built here when
            None (a host-to-device copy, which a CUDA graph cannot capture: pass it built).
    """
    T, K = _check_rows_args(inputs, topk_weights, row_index, None, None)
    if needs_grad(inputs, topk_weights):
        raise ValueError("fused_mul_sum_rows_split has no backward: call it without autograd "
                         "(torch.no_grad()), got inputs or topk_weights that require grad")
    W = len(outputs) if isinstance(outputs, (list, tuple)) else 0
    if W == 0 or T % W:
        raise ValueError(f"outputs must be a list of W tensors with W dividing T = {T}, got "
                         f"{W if W else type(outputs).__name__}")
    table = check_split_outputs(outputs, W, (T // W, inputs.shape[1]), inputs, first, table)
    weights, rows = topk_weights.contiguous(), row_index.contiguous()
    if not use_triton(inputs):
        full = _forward(inputs, weights, None, None, rows)
        for w, out in enumerate(outputs):
            out.copy_(full[w * (T // W):(w + 1) * (T // W)])
        return
    _fwd_triton(inputs, weights, None, None, rows, outputs[0], table, first)


def _dispatch(args, outputs):
    inputs, topk_weights = args[0], args[1]
    grad = needs_grad(inputs, topk_weights)
    compiling = torch.compiler.is_compiling()
    if outputs is None:
        if compiling:
            return _fused_mul_sum_op(*args)
        return _EagerFusedMulSum.apply(*args) if grad else _forward(*args)
    if not compiling:
        if grad:
            return outputs.copy_(_EagerFusedMulSum.apply(*args))
        return _forward(*args, out=outputs)
    if grad:  # a mutating op cannot carry autograd: compute, then copy (differentiable)
        return outputs.copy_(_fused_mul_sum_op(*args))
    _fused_mul_sum_out_op(*args, outputs)
    return outputs
