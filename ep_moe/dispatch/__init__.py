"""Dispatch tokens to the ranks that own their experts, and combine the results back.

The only package that moves activations between ranks. Four dispatchers (local, all-to-all,
all-to-all by pairs, all-gather) share one interface:

    dispatched = dispatcher.dispatch(x, topk_ids, topk_weights)   # rows this rank computes
    y = dispatcher.combine(partial, dispatched.handle)             # (T, D) on the home rank
    y = dispatcher.run(x, topk_ids, topk_weights, compute)         # both, compute in between

`partial` (R, D) holds, per received row, the weighted sum over the row's slots whose expert is
local (the pair dispatcher's rows are single pairs of weight 1: their expert's outputs; its
home rank applies the weights). The handle is a frozen dataclass: nothing per call is kept on the dispatcher.

Every collective here is differentiable: the backward of a dispatch all-to-all is the reverse
all-to-all, the backward of an all-gather a reduce-scatter, and vice versa.
"""

from .dispatchers import (AllGatherDispatcher, AllGatherHandle, AllToAllDispatcher,
                          AllToAllHandle, Dispatched, Handle, LocalDispatcher, LocalHandle,
                          check_capacity, chunk_bounds, make_dispatcher)
from .pairs import PairAllToAllDispatcher, PairHandle

__all__ = ["AllGatherDispatcher", "AllGatherHandle", "AllToAllDispatcher", "AllToAllHandle",
           "Dispatched", "Handle", "LocalDispatcher", "LocalHandle", "check_capacity",
           "chunk_bounds", "make_dispatcher", "PairAllToAllDispatcher", "PairHandle"]
