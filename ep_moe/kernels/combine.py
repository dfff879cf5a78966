"""Custom ops and public API of the fused weighted top-k combine.

Layers 3 and 4 of the combine (layers 1 and 2, the Triton kernels and their launchers, are in
`fused_mul_sum.py`): `torch.library` custom ops with fake and autograd registrations, so
`torch.compile` sees single nodes; a plain autograd.Function for eager calls, which skips the
custom-op dispatch's host cost; validation; and the public functions.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .fused_mul_sum import (FLOAT_DTYPES, INDEX_DTYPES, _backward_impl, _forward, _fwd_triton,
                            _num_cols, _use_triton, check_split_outputs, needs_grad)


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

def _check_tensor(name, value, ndim, dtypes, device=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, "
                        f"got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} like inputs, got {value.device}")


def _check_routing(T, K, device, topk_weights, topk_ids, expert_map):
    _check_tensor("topk_weights", topk_weights, 2, FLOAT_DTYPES, device)
    if tuple(topk_weights.shape) != (T, K):
        raise ValueError(f"topk_weights must have shape (T, K) = {(T, K)}, "
                         f"got {tuple(topk_weights.shape)}")
    if topk_ids is not None:
        _check_tensor("topk_ids", topk_ids, 2, INDEX_DTYPES, device)
        if tuple(topk_ids.shape) != (T, K):
            raise ValueError(f"topk_ids must have shape (T, K) = {(T, K)}, "
                             f"got {tuple(topk_ids.shape)}")
    if expert_map is not None:
        if topk_ids is None:
            raise ValueError("expert_map needs topk_ids: got expert_map with topk_ids=None")
        _check_tensor("expert_map", expert_map, 1, INDEX_DTYPES, device)


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
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    _check_tensor("inputs", inputs, 3, FLOAT_DTYPES)
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
    _check_tensor("outputs", outputs, 2, FLOAT_DTYPES, inputs.device)
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
    _check_tensor("inputs", inputs, 2, FLOAT_DTYPES)
    if not inputs.is_contiguous():
        raise ValueError(f"inputs must be contiguous, got strides {inputs.stride()}")
    _check_tensor("row_index", row_index, 2, INDEX_DTYPES, inputs.device)
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
    if not _use_triton(inputs):
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
