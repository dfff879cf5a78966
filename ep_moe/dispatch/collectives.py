"""Differentiable collectives over rows: the backward of each exchange is the reverse one.

The backward of a dispatch all-to-all is the reverse all-to-all, the backward of an all-gather
a reduce-scatter, and vice versa. Only `ep_moe.dispatch` uses them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels.dispatch_layout import packed_scales, split_packed
from ..permute import sum_rows


def start_all_to_all(x, output_splits, input_splits, group):
    """Uneven all-to-all of rows, issued and not waited for: x (sum(input_splits), ...) ->
    (out (sum(output_splits), ...), work). On NCCL the exchange runs on the group's stream;
    `work.wait()` makes the current stream wait for it (no host block), so work issued in
    between overlaps the exchange."""
    out = x.new_empty(sum(output_splits), *x.shape[1:])
    work = dist.all_to_all_single(out, x.contiguous(), list(output_splits), list(input_splits),
                                  group=group, async_op=True)
    return out, work


def all_to_all(x, output_splits, input_splits, group):
    """Uneven all-to-all of rows: x (sum(input_splits), ...) -> (sum(output_splits), ...)."""
    out, work = start_all_to_all(x, output_splits, input_splits, group)
    work.wait()
    return out


def start_exchange_rows(send, splits, D, K, group):
    """The packed rows' all-to-all, not waited for: views of the received tokens (R, D), their
    scales (R, D/128) for FP8 rows (else None) and routing (R, 2K), and the work to wait for
    before reading them. FP8 rows travel as bytes (uint8): gloo takes no float8 dtype."""
    output_splits, input_splits = splits
    out, work = start_all_to_all(send, output_splits, input_splits, group)
    recv_x, recv_routing = split_packed(out, D, K)
    return recv_x, packed_scales(out, D), recv_routing, work


def exchange_rows(send, splits, D, K, group):
    """The packed rows' all-to-all (16/32-bit rows): views of the received tokens (R, D) and
    routing (R, 2K)."""
    recv_x, _, recv_routing, work = start_exchange_rows(send, splits, D, K, group)
    work.wait()
    return recv_x, recv_routing


class SendRows(torch.autograd.Function):
    """The packed send rows (each a token and its routing, filled before the host sync) travel
    to the expert ranks in one all-to-all; the outputs are views of the received rows: the
    tokens (R, D) and the routing (R, 2K) fp32.

    Backward: the reverse all-to-all brings the gradients of the copies home and each token
    sums its copies in rank order (deterministic); the weights' gradient is the first K routing
    columns. x and topk_weights are inputs only so that their gradients land there."""

    @staticmethod
    def forward(ctx, x, topk_weights, send, copy_index, splits, group):
        ctx.save_for_backward(copy_index)
        ctx.splits, ctx.group, ctx.dtypes = splits, group, (x.dtype, topk_weights.dtype)
        return exchange_rows(send, splits, x.shape[1], topk_weights.shape[1], group)

    @staticmethod
    def backward(ctx, grad_x, grad_routing):
        (copy_index,) = ctx.saved_tensors
        output_splits, input_splits = ctx.splits
        K = grad_routing.shape[1] // 2
        grads = []
        for i, grad in enumerate((grad_x, grad_routing[:, :K])):
            if ctx.needs_input_grad[i]:
                back = all_to_all(grad, input_splits, output_splits, ctx.group)
                grads.append(sum_rows(back, copy_index).to(ctx.dtypes[i]))
            else:
                grads.append(None)
        return (*grads, None, None, None, None)


class ReturnRows(torch.autograd.Function):
    """Partial rows travel back to their tokens' home ranks; backward: the reverse all-to-all
    of their gradients."""

    @staticmethod
    def forward(ctx, partial, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return all_to_all(partial, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


class AllGather(torch.autograd.Function):
    """(N, ...) per rank -> (W*N, ...); backward: fp32 reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.dtype = group, x.dtype
        out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group).to(ctx.dtype), None


def reduce_scatter(x, group):
    # fp32 reduction: the partial sums of W ranks lose bits when added in bf16
    x = x.float().contiguous()
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


class ReduceScatter(torch.autograd.Function):
    """(W*N, ...) -> (N, ...) fp32 sum over ranks; backward: all-gather of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.dtype = group, x.dtype
        return reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.to(ctx.dtype).contiguous()
        out = grad.new_empty(dist.get_world_size(ctx.group) * grad.shape[0], *grad.shape[1:])
        dist.all_gather_into_tensor(out, grad, group=ctx.group)
        return out, None

