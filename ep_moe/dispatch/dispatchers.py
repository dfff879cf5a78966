"""The dispatchers and their handles: local, all-to-all (exact or fixed-size) and all-gather.

See the package docstring for the interface they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from ..kernels.dispatch_layout import (FP8_ROWS, META_COPIES, META_PAIRS, dispatch_layout,
                                       gather_send_rows, packed_row, packed_scales,
                                       push_send_rows, split_packed)
from ..kernels.common import needs_grad
from ..kernels.fused_mul_sum import SplitOutputs
from ..permute import count_ids, sum_rows
from ..placement import ExpertPlacement
from ..plan import ForwardPlan
from .collectives import (AllGather, ReduceScatter, ReturnRows, SendRows,
                          start_all_to_all, start_exchange_rows)
from .peer import (START_CHANNEL, PeerBuffers, check_peer_device, partials_channel,
                   peer_exchange_supported, rows_channel)


# --------------------------------------------------------------------------------------------
# Handles and the common result
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalHandle:
    num_tokens: int
    num_local_pairs: int


@dataclass(frozen=True)
class AllToAllHandle:
    """num_local_pairs: received (row, slot) pairs whose expert is local (P).
    copy_index: (T, W) int32 row of token t's copy for rank w in the send buffer, -1 if none.
    input_splits / output_splits: rows sent to / received from each rank."""

    num_tokens: int
    num_local_pairs: int
    copy_index: torch.Tensor
    input_splits: tuple[int, ...]
    output_splits: tuple[int, ...]


@dataclass(frozen=True)
class AllGatherHandle:
    """tokens_per_rank: T of every rank; each rank's tokens are padded to max(tokens_per_rank)."""

    num_tokens: int
    num_local_pairs: int
    tokens_per_rank: tuple[int, ...]


Handle = Union[LocalHandle, AllToAllHandle, AllGatherHandle]


@dataclass(frozen=True)
class Dispatched:
    """Rows this rank computes: x (R, D), topk_ids (R, K) global ids (-1: padding row),
    topk_weights (R, K) fp32, and the handle `combine` needs. pairs_exact: whether
    `handle.num_local_pairs` is the count of local pairs, or (a fixed-size exchange, which
    reads nothing back) a bound on it. pairs_per_expert: the local pairs of each local expert,
    on the host where the exchange read them anyway (the exact exchanges), else None.
    x_scale: (R, D/128) fp32 where the rows travelled as FP8 (x is then e4m3, a strided view
    of the received bytes), else None."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: Handle
    pairs_exact: bool = True
    pairs_per_expert: Optional[tuple[int, ...]] = None
    x_scale: Optional[torch.Tensor] = None


def _wait(work: Optional[dist.Work]) -> None:
    """Make the current stream wait for an exchange issued earlier (None: already done)."""
    if work is not None:
        work.wait()


@dataclass(frozen=True)
class _InFlight:
    """A dispatch whose rows' exchange may still run (work None: done, as under autograd,
    whose Function waits). `wait()` waits on the current stream, then unpacks the routing."""

    recv_x: torch.Tensor
    recv_routing: torch.Tensor
    handle: AllToAllHandle
    pairs_per_expert: Optional[tuple[int, ...]]
    work: Optional[dist.Work]
    recv_scale: Optional[torch.Tensor] = None  # FP8 rows' scales

    def wait(self) -> Dispatched:
        _wait(self.work)
        K = self.recv_routing.shape[1] // 2
        recv_ids, recv_weights = _unpack_routing(self.recv_routing, K)
        return Dispatched(self.recv_x, recv_ids, recv_weights, self.handle,
                          pairs_exact=self.pairs_per_expert is not None,
                          pairs_per_expert=self.pairs_per_expert, x_scale=self.recv_scale)


def check_capacity(T: int, capacity: int) -> None:
    # raised before any collective, on this rank: checking every rank's T together would
    # take the very host sync a fixed-size exchange exists to avoid, so a rank over capacity
    # leaves the others waiting in their first collective (as any error on one rank does)
    if T > capacity:
        raise ValueError(f"x has {T} tokens on this rank, more than "
                         f"MoEConfig.max_tokens_per_rank={capacity}: a fixed-size exchange "
                         f"takes at most that many on every rank")


def chunk_bounds(capacity: int, chunks: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) of a pipelined fixed-size exchange's chunks, covering [0, capacity).

    From three chunks on, the first and the last are half the size of the others: the first
    chunk's rows and the last chunk's partials travel while no experts run, so they are the
    exchange time left exposed. Empty ranges (capacity < chunks) are dropped; every rank gets
    the same ranges from the same config."""
    weights = [1] * chunks if chunks < 3 else [1] + [2] * (chunks - 2) + [1]
    edges, total = [0], 0
    for w in weights:
        total += w
        edges.append(-(-capacity * total // sum(weights)))  # ceil
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _pairs_bound(rows: int, K: int) -> int:
    """Most local (row, slot) pairs `rows` received rows can hold: every slot, so the bound
    holds even for ids repeated within a token (the router never repeats one)."""
    return rows * K


def _pack_routing(topk_ids, topk_weights):
    # one message for both: ids < 2^24 are exact in fp32, and the weights keep their autograd
    return torch.cat([topk_weights.float(), topk_ids.float()], dim=1)  # (T, 2K)


def _unpack_routing(routing, K):
    return routing[:, K:].long(), routing[:, :K]


# --------------------------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------------------------

class _Dispatcher:
    """`run`, what the layer calls: dispatch, compute, combine, as the forward's plan says.

    peer_exchange: whether the group's ranks can store into each other's memory (the exchange
    over NVLink), asked once when the dispatcher is built; the planner reads it."""

    peer_exchange = False

    def run(self, x, topk_ids, topk_weights, compute, plan: ForwardPlan) -> torch.Tensor:
        sent = self.dispatch(x, topk_ids, topk_weights, **self._row_format(plan))
        return self.combine(compute(sent), sent.handle)

    @staticmethod
    def _row_format(plan: ForwardPlan) -> dict:
        return {"fp8": True} if plan.fp8_dispatch else {}


class LocalDispatcher(_Dispatcher):
    """One rank owns every expert: rows are the tokens themselves."""

    def dispatch(self, x, topk_ids, topk_weights) -> Dispatched:
        T, K = topk_ids.shape
        return Dispatched(x, topk_ids, topk_weights.float(), LocalHandle(T, T * K))

    def combine(self, partial, handle: LocalHandle) -> torch.Tensor:
        return partial


class AllToAllDispatcher(_Dispatcher):
    """Each token travels once to every rank that owns at least one of its K experts.

    The expert rank reduces the token's local slots into one partial row, which travels back;
    the home rank adds a token's partials in rank order (deterministic). Three NCCL calls per
    forward: the split sizes (the one host sync), the rows out, the partials back.

    With `capacity` C (`MoEConfig.max_tokens_per_rank`) the exchange has a fixed size: rank w's
    copies sit at rows [w * C, (w + 1) * C) of the send buffer, padding rows carry no slot, and
    every split is C rows. No split sizes travel and nothing is read back to the host, so the
    forward can be captured in a CUDA graph; the price is the padding's bytes, and buffers
    sized by the bound on local pairs.

    Where the plan's exchange is "nvlink" (fixed-size, CUDA, inference) the rows and partials
    are stored straight into the peers' symmetric memory instead (`_run_peer`, `peer.py`).

    Without autograd (inference) the exchanges skip their autograd Functions. Every rank must
    then agree on whether gradients are wanted: the backward's exchanges run on the ranks whose
    forward recorded them, and a rank that recorded none would leave the others waiting.
    """

    def __init__(self, placement: ExpertPlacement, group: ProcessGroup,
                 capacity: Optional[int] = None, peer_exchange: bool = False):
        self.placement, self.group, self.capacity = placement, group, capacity
        self.world_size = placement.world_size
        self.peer_exchange = peer_exchange
        self._num_local_experts: Optional[int] = None  # this rank's, on the first exact dispatch
        self._tables: dict = {}
        self._peer: Optional[PeerBuffers] = None  # exchange "nvlink": on the first forward
        self._streams: dict = {}

    def run(self, x, topk_ids, topk_weights, compute, plan: ForwardPlan) -> torch.Tensor:
        """Dispatch, compute, combine; with `plan.chunks` > 1 (fixed-size exchange only) a
        pipeline.

        Inference: every chunk's rows are issued at once, and no exchange is waited for before
        its result is read, so chunk i + 1's rows travel while chunk i's experts run and chunk
        i's partials travel home while chunk i + 1's experts run (on NCCL the exchanges run
        on the group's stream). Training: the chunks in turn. All ranks issue the same
        collectives in the same order."""
        if plan.exchange == "nvlink":
            return self._run_peer(x, topk_ids, topk_weights, compute, plan.chunks,
                                  plan.fp8_dispatch)
        if plan.chunks == 1:
            return super().run(x, topk_ids, topk_weights, compute, plan)
        T = x.shape[0]
        check_capacity(T, self.capacity)  # the chunks cover `capacity` tokens
        bounds = [(min(a, T), min(b, T), b - a) for a, b in chunk_bounds(self.capacity,
                                                                        plan.chunks)]
        if plan.grad:
            sent = [self.dispatch(x[a:b], topk_ids[a:b], topk_weights[a:b], C)
                    for a, b, C in bounds]
            return torch.cat([self.combine(compute(s), s.handle) for s in sent])
        started = [self._start_dispatch(x[a:b], topk_ids[a:b], topk_weights[a:b], C,
                                        plan.fp8_dispatch) for a, b, C in bounds]
        returning = []
        for flight in started:
            sent = flight.wait()
            returning.append((sent.handle, *self._start_return(compute(sent), sent.handle)))
        y = x.new_empty(x.shape)  # each chunk's sums written in place (no concatenation)
        for (a, b, _), (handle, back, work) in zip(bounds, returning):
            _wait(work)
            sum_rows(back, handle.copy_index, out=y[a:b])
        return y

    def _run_peer(self, x, topk_ids, topk_weights, compute, num_chunks: int,
                  fp8: bool = False) -> torch.Tensor:
        """`run` over NVLink (`ep_moe.dispatch.peer`): the chunks' rows are stored into the
        expert ranks' buffers on a send stream, each chunk's experts wait for its barrier, the
        slot reductions store the partials into the home ranks' buffers, and the home sums wait
        for the partials' barriers (on a return stream). One chunk or many, no host sync.
        fp8: the rows stored as e4m3 with their scales (`gather_send_rows`)."""
        check_peer_device(x, self.group)
        (T, K), D, C = topk_ids.shape, x.shape[1], self.capacity
        check_capacity(T, C)
        peer = self._peer_buffers(x, K, fp8)
        W, rank = self.world_size, peer.rank
        owner, experts = self._owner_and_table(x.device)
        main = torch.cuda.current_stream(x.device)
        send, ret = self._side_streams(x.device)
        first = (rank + 1) % W  # each rank starts with another, so the stores spread
        peer.barrier(START_CHANNEL)  # every rank is done reading the last forward's regions
        chunks, offset = [], 0
        for a, b in chunk_bounds(C, num_chunks):
            # the layout on the main stream: the home sums need it too
            layout = dispatch_layout(topk_ids[min(a, T):min(b, T)], owner, experts,
                                     capacity=b - a)
            chunks.append((min(a, T), min(b, T), b - a, W * offset, layout))
            offset += b - a
        landed = []
        send.wait_stream(main)
        with torch.cuda.stream(send):
            for i, (a, b, Ci, row, layout) in enumerate(chunks):
                views, addresses = peer.outputs("recv", row + rank * Ci, Ci)
                push_send_rows(x[a:b], topk_weights[a:b], topk_ids[a:b], layout, views, first,
                               addresses, fp8=fp8)
                peer.barrier(rows_channel(i))
                landed.append(send.record_event())
        for i, ((a, b, Ci, row, layout), event) in enumerate(zip(chunks, landed)):
            main.wait_event(event)
            received = peer.recv(rank, row, W * Ci)
            recv_x, recv_routing = split_packed(received, D, K)
            recv_ids, recv_weights = _unpack_routing(recv_routing, K)
            handle = AllToAllHandle(b - a, _pairs_bound(W * Ci, K), layout.copy_index,
                                    (Ci,) * W, (Ci,) * W)
            sent = Dispatched(recv_x, recv_ids, recv_weights, handle, pairs_exact=False,
                              x_scale=packed_scales(received, D))
            views, addresses = peer.outputs("back", row + rank * Ci, Ci)
            compute(sent, outputs=SplitOutputs(views, first, addresses))
            ret.wait_stream(main)
            with torch.cuda.stream(ret):
                peer.barrier(partials_channel(i))
        main.wait_stream(ret)
        y = x.new_empty(x.shape)
        for a, b, Ci, row, layout in chunks:
            sum_rows(peer.back(rank, row, W * Ci), layout.copy_index, out=y[a:b])
        return y

    def _peer_buffers(self, x, K, fp8: bool) -> PeerBuffers:
        row_dtype = FP8_ROWS if fp8 else x.dtype
        width = packed_row(x.shape[1], K, row_dtype)[0]
        key = (x.device, row_dtype, x.dtype, self.world_size * self.capacity, width, x.shape[1])
        if self._peer is None or self._peer.key != key:  # a collective, on every rank alike
            self._peer = PeerBuffers(self.group, *key)
        return self._peer

    def _side_streams(self, device):
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _owner_and_table(self, device):
        if device not in self._tables:  # constants, cached per device (not module state)
            self._tables[device] = (self.placement.owner(device),
                                    self.placement.padded_local_experts(device))
        return self._tables[device]

    def dispatch(self, x, topk_ids, topk_weights, capacity: Optional[int] = None,
                 fp8: bool = False) -> Dispatched:
        """capacity: the fixed-size exchange's rows per rank (default: the dispatcher's).
        fp8: the rows travel as e4m3 with a scale per 128 columns (`Dispatched.x_scale`;
        inference only: no gradient flows back through quantized rows)."""
        return self._start_dispatch(x, topk_ids, topk_weights, capacity or self.capacity,
                                    fp8).wait()

    def _start_dispatch(self, x, topk_ids, topk_weights, C: Optional[int],
                        fp8: bool = False) -> "_InFlight":
        T, K = topk_ids.shape
        if C is not None:
            check_capacity(T, C)
        grad = needs_grad(x, topk_weights)
        if fp8 and grad:  # before any collective, on every rank alike
            raise ValueError("FP8 rows (fp8=True) are for inference: x and topk_weights must "
                             "not require grad")
        owner, table = self._owner_and_table(x.device)
        layout = dispatch_layout(topk_ids, owner, table, capacity=C or 0)
        if C is None:
            meta_work = dist.all_to_all_single(layout.recv_meta, layout.send_meta,
                                               group=self.group, async_op=True)
        # while the meta travels
        send = gather_send_rows(x, topk_weights, topk_ids, layout, fp8=fp8)
        if C is None:
            meta_work.wait()  # on NCCL a stream wait, not a host block
            # host sync: split sizes must be on the CPU for all_to_all_single (and with them
            # each local expert's pairs, which the experts then take without a sync)
            sent, received = layout.meta.tolist()
            input_splits = tuple(row[META_COPIES] for row in sent)
            output_splits = tuple(row[META_COPIES] for row in received)
            send = send[:sum(input_splits)]
            if self._num_local_experts is None:
                rank = dist.get_rank(self.group)
                self._num_local_experts = len(self.placement.local_experts[rank])
            end = META_PAIRS + self._num_local_experts  # the columns past it are padding
            pairs_per_expert = tuple(map(sum, zip(*(row[META_PAIRS:end] for row in received))))
            num_local_pairs = sum(pairs_per_expert)
        else:  # fixed-size: C rows each way, known on the host
            input_splits = output_splits = (C,) * self.world_size
            num_local_pairs = _pairs_bound(C * self.world_size, K)
            pairs_per_expert = None
        splits = (output_splits, input_splits)
        work = recv_scale = None
        if grad:
            recv_x, recv_routing = SendRows.apply(x, topk_weights, send, layout.copy_index,
                                                   splits, self.group)
        else:  # inference: no autograd node, the rows' exchange issued sooner after the sync
            recv_x, recv_scale, recv_routing, work = start_exchange_rows(
                send, splits, x.shape[1], K, self.group)
        handle = AllToAllHandle(T, num_local_pairs, layout.copy_index, input_splits,
                                output_splits)
        return _InFlight(recv_x, recv_routing, handle, pairs_per_expert, work, recv_scale)

    def _start_return(self, partial, handle: AllToAllHandle):
        """The partials' exchange home: (rows, work to wait for); work None: done."""
        if needs_grad(partial):
            return ReturnRows.apply(partial, handle.input_splits, handle.output_splits,
                                     self.group), None
        return start_all_to_all(partial, handle.input_splits, handle.output_splits, self.group)

    def combine(self, partial, handle: AllToAllHandle) -> torch.Tensor:
        back, work = self._start_return(partial, handle)
        _wait(work)
        return sum_rows(back, handle.copy_index)


class AllGatherDispatcher(_Dispatcher):
    """Every rank sees every token: all-gather tokens and routing, compute the local experts'
    slots for all of them, reduce-scatter (fp32) the partial sums home. One fixed-size exchange
    each way and no per-token bookkeeping; measured slower than all-to-all at 64 and at 8192
    tokens per GPU on 4 GPUs (docs/performance.md), kept as the simpler baseline.

    With `capacity` C (`MoEConfig.max_tokens_per_rank`) every rank pads to C tokens and no
    count is gathered: nothing is read back to the host."""

    def __init__(self, placement: ExpertPlacement, group: ProcessGroup, rank: int,
                 capacity: Optional[int] = None):
        self.placement, self.group, self.capacity = placement, group, capacity
        self.world_size = placement.world_size
        self.local_experts = list(placement.local_experts[rank])

    def dispatch(self, x, topk_ids, topk_weights) -> Dispatched:
        T, K = topk_ids.shape
        E, C = self.placement.num_experts, self.capacity
        if C is not None:
            check_capacity(T, C)
            tokens_per_rank = (C,) * self.world_size
            num_local_pairs = _pairs_bound(C * self.world_size, K)
            pairs_per_expert = None
        else:
            counts = torch.cat([torch.tensor([T], device=x.device),
                                count_ids(topk_ids, E)])
            all_counts = counts.new_empty(self.world_size * (1 + E))
            dist.all_gather_into_tensor(all_counts, counts, group=self.group)
            all_counts = all_counts.view(self.world_size, 1 + E)
            # host sync: token counts for the uneven all-gather, local pair counts for the sort
            # and the experts
            all_counts = all_counts.cpu()
            tokens_per_rank = tuple(all_counts[:, 0].tolist())
            pairs_per_expert = tuple(all_counts[:, [1 + g for g in self.local_experts]]
                                     .sum(0).tolist())
            num_local_pairs = sum(pairs_per_expert)
        pad = max(tokens_per_rank) - T
        routing = _pack_routing(topk_ids, topk_weights)
        routing = torch.cat([routing, routing.new_full((pad, 2 * K), -1.0)])  # id -1: no slot
        x = F.pad(x, (0, 0, 0, pad))
        recv_x = AllGather.apply(x, self.group)
        recv_ids, recv_weights = _unpack_routing(AllGather.apply(routing, self.group), K)
        handle = AllGatherHandle(T, num_local_pairs, tokens_per_rank)
        return Dispatched(recv_x, recv_ids, recv_weights, handle, pairs_exact=C is None,
                          pairs_per_expert=pairs_per_expert)

    def combine(self, partial, handle: AllGatherHandle) -> torch.Tensor:
        return ReduceScatter.apply(partial, self.group)[:handle.num_tokens].to(partial.dtype)


def make_dispatcher(config, placement: ExpertPlacement, group: Optional[ProcessGroup],
                    rank: int):
    """The dispatcher `config.dispatcher` names (`MoEConfig`), or the local one for W = 1.
    With `exchange="auto"` and a fixed-size all-to-all, asks the group (a collective, on every
    rank alike) whether its ranks can take the exchange over NVLink."""
    if placement.world_size == 1:
        return LocalDispatcher()
    if config.dispatcher == "all_to_all":
        peer = (config.exchange == "auto" and config.max_tokens_per_rank is not None
                and peer_exchange_supported(group))
        return AllToAllDispatcher(placement, group, config.max_tokens_per_rank, peer)
    return AllGatherDispatcher(placement, group, rank, config.max_tokens_per_rank)
