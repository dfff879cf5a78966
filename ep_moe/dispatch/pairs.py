"""The pair dispatcher: every (token, expert) pair travels to its expert, one all-to-all per
local expert slot, and the home rank weights and sums what comes back.

Against `AllToAllDispatcher`, which sends a token once to each rank and gets one partial sum
back: a token with several experts on one rank travels once per expert (T K rows out and
back instead of one per (token, rank)), and the routing stays home. In exchange the rows
arrive grouped by expert, so the expert rank runs its GEMMs on the received buffer as it is
(no sort, no gather, no reduction there), and in inference expert j's GEMMs start as soon as
its own exchange lands, while the next expert's rows are still on the wire, and its outputs
travel home while the next expert runs. For a few large experts per rank and a small K
(Mixtral: 2 of 8 experts a token, 2 experts a rank at W = 4) the extra bytes are few and
each hidden exchange is long; for many small experts (Qwen3: 8 of 128) it is the wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..kernels import fused_mul_sum_rows
from ..kernels.expert_sort import sort_by_expert
from ..permute import expand_rows
from ..placement import ExpertPlacement
from .dispatchers import Dispatched, _Dispatcher


@dataclass(frozen=True)
class PairHandle:
    """row_index: (T, K) int32 row of pair (t, k) in the send buffer, -1 for an id outside
    [0, E). topk_weights: (T, K) the weights the home rank applies (kept with their autograd
    history). send_splits[j][w]: pairs this rank sends to rank w's local expert j;
    recv_splits[j][w]: pairs rank w sends to this rank's local expert j (j < the most local
    experts any rank has; a rank with fewer gets zeros past its own)."""

    num_tokens: int
    num_local_pairs: int
    row_index: torch.Tensor
    topk_weights: torch.Tensor
    send_splits: tuple[tuple[int, ...], ...]
    recv_splits: tuple[tuple[int, ...], ...]


def _starts(splits) -> list[int]:
    """Row where each slot's segment begins in a buffer of the segments end to end."""
    starts, total = [], 0
    for s in splits:
        starts.append(total)
        total += sum(s)
    return starts + [total]


def _exchange_segments(x, in_splits, out_splits, group, async_op=False, out=None):
    """One all-to-all per local expert slot j: x's segment j (rows by destination rank,
    in_splits[j]) -> out's segment j (rows by source rank, out_splits[j]). Returns out and
    the works (None each unless async_op)."""
    a, b = _starts(in_splits), _starts(out_splits)
    if out is None:
        out = x.new_empty(b[-1], *x.shape[1:])
    works = [dist.all_to_all_single(out[b[j]:b[j + 1]], x[a[j]:a[j + 1]],
                                    list(out_splits[j]), list(in_splits[j]), group=group,
                                    async_op=async_op)
             for j in range(len(in_splits))]
    return out, works


class _SegmentedAllToAll(torch.autograd.Function):
    """Rows by local expert slot, one all-to-all each; backward: the reverse exchanges."""

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return _exchange_segments(x.contiguous(), in_splits, out_splits, group)[0]

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        back = _exchange_segments(grad.contiguous(), out_splits, in_splits, ctx.group)[0]
        return back, None, None, None


class PairAllToAllDispatcher(_Dispatcher):
    """See the module docstring. Exact split sizes only (one host sync per forward: the pair
    counts per (rank, expert) slot); `run` is the pipelined inference path."""

    def __init__(self, placement: ExpertPlacement, group: ProcessGroup, rank: int):
        self.placement, self.group = placement, group
        self.world_size = placement.world_size
        self.num_local_experts = len(placement.local_experts[rank])
        self.local_experts = placement.local_experts[rank]
        self._tables: dict = {}

    def _slot_of_expert(self, device) -> torch.Tensor:
        """(E,) int64 sort key of each global expert: local slot j on its rank w -> j W + w,
        so the pairs sorted by it lie slot after slot, each slot's rank after rank."""
        if device not in self._tables:  # a constant, cached per device (not module state)
            W = self.world_size
            key = torch.empty(self.placement.num_experts, dtype=torch.int64)
            for w, experts in enumerate(self.placement.local_experts):
                for j, g in enumerate(experts):
                    key[g] = j * W + w
            self._tables[device] = key.to(device)
        return self._tables[device]

    def _send(self, x, topk_ids):
        """Sort the pairs by (slot, rank), gather their rows, and exchange the counts: (send
        rows (T K, D), the sort, send_splits, recv_splits)."""
        T, K = topk_ids.shape
        W, slots = self.world_size, self.placement.max_local_experts
        order = sort_by_expert(topk_ids, slots * W, T * K, self._slot_of_expert(x.device))
        counts = order.num_tokens_per_expert.view(slots, W).t().contiguous()  # (W, slots)
        meta = counts.new_empty(2, W, slots)
        meta[0] = counts
        meta_work = dist.all_to_all_single(meta[1], meta[0], group=self.group, async_op=True)
        send = expand_rows(x, order.source_rows, order.row_index)  # while the counts travel
        meta_work.wait()  # on NCCL a stream wait, not a host block
        # host sync: split sizes must be on the CPU for all_to_all_single
        sent, received = meta.tolist()
        send_splits = tuple(tuple(sent[w][j] for w in range(W)) for j in range(slots))
        recv_splits = tuple(tuple(received[w][j] for w in range(W)) for j in range(slots))
        return send, order, send_splits, recv_splits

    def dispatch(self, x, topk_ids, topk_weights):
        """The rows this rank computes, grouped by local expert (`Dispatched.rows_by_expert`):
        each one pair, of weight 1 (the weights are applied at home)."""
        T = topk_ids.shape[0]
        send, order, send_splits, recv_splits = self._send(x, topk_ids)
        n_send = sum(map(sum, send_splits))
        recv = _SegmentedAllToAll.apply(send[:n_send], send_splits, recv_splits, self.group)
        per_expert = tuple(sum(s) for s in recv_splits[:self.num_local_experts])
        handle = PairHandle(T, sum(per_expert), order.row_index, topk_weights, send_splits,
                            recv_splits)
        return Dispatched(recv, *self._routing(per_expert, x.device), handle,
                          pairs_per_expert=per_expert, rows_by_expert=True)

    def _routing(self, per_expert, device):
        """(R, 1) global expert of each received row and (R, 1) fp32 weights of 1, so that
        any compute reads the rows as pairs; the layer's reads neither."""
        ids = torch.tensor(self.local_experts, dtype=torch.int64)
        ids = ids.repeat_interleave(torch.tensor(per_expert, dtype=torch.int64))
        ids = ids.to(device, non_blocking=True)[:, None]
        return ids, torch.ones(ids.shape, dtype=torch.float32, device=device)

    def combine(self, out_rows, handle: PairHandle) -> torch.Tensor:
        """Expert outputs (R, D) home, then each token's weighted sum over its K pairs, in
        slot order (fp32 accumulation, deterministic)."""
        back = _SegmentedAllToAll.apply(out_rows, handle.recv_splits, handle.send_splits,
                                        self.group)
        return fused_mul_sum_rows(back, handle.topk_weights, handle.row_index)

    def run(self, x, topk_ids, topk_weights, compute) -> torch.Tensor:
        """Dispatch, compute, combine. Under no_grad: every slot's exchange issued at once, and
        slot j's rows computed as soon as they land and sent home at once, so the next
        slot's rows arrive and this slot's outputs leave while the experts run (on NCCL the
        exchanges run on the group's stream, in issue order)."""
        # the pipeline only under no_grad: with grad enabled the experts' weights may want
        # gradients whatever x and the weights do, and its exchanges record nothing
        if torch.is_grad_enabled():
            sent = self.dispatch(x, topk_ids, topk_weights)
            return self.combine(compute(sent), sent.handle)

        T, D = topk_ids.shape[0], x.shape[1]
        send, order, send_splits, recv_splits = self._send(x, topk_ids)
        recv, works = _exchange_segments(send, send_splits, recv_splits, self.group,
                                         async_op=True)
        e = self.num_local_experts
        per_expert = tuple(sum(s) for s in recv_splits[:e])
        handle = PairHandle(T, sum(per_expert), order.row_index, topk_weights, send_splits,
                            recv_splits)
        ids, ones = self._routing(per_expert, x.device)
        r, s = _starts(recv_splits), _starts(send_splits)
        back = x.new_empty(send.shape)  # rows past the pairs' count are never read
        returns = []
        for j, work in enumerate(works):
            work.wait()
            rows = slice(r[j], r[j + 1])
            if j < e:  # this rank's expert j alone: its counts one-hot
                only = tuple(n if i == j else 0 for i, n in enumerate(per_expert))
                out = compute(Dispatched(recv[rows], ids[rows], ones[rows], handle,
                                         pairs_per_expert=only, rows_by_expert=True))
            else:  # a slot this rank lacks: nothing came, but every rank joins each exchange
                out = recv[rows]
            returns.append(dist.all_to_all_single(
                back[s[j]:s[j + 1]], out.contiguous(), list(send_splits[j]),
                list(recv_splits[j]), group=self.group, async_op=True))
        for work in returns:
            work.wait()
        return fused_mul_sum_rows(back, topk_weights, order.row_index)
