"""Dispatch tokens to the ranks that own their experts, and combine the results back.

The only package that moves activations between ranks. Three dispatchers share one interface:

    dispatched = dispatcher.dispatch(x, topk_ids, topk_weights)   # rows this rank computes
    y = dispatcher.combine(partial, dispatched.handle)             # (T, D) on the home rank
    y = dispatcher.run(x, topk_ids, topk_weights, compute)         # both, compute in between

`partial` (R, D) holds, per received row, the weighted sum over the row's slots whose expert is
local. The handle is a frozen dataclass: nothing per call is kept on the dispatcher.
`compute(dispatched)` returns it; the exchange over NVLink (`MoEConfig.exchange = "nvlink"`,
`peer.py`) calls `compute(dispatched, outputs=SplitOutputs(...))` instead, and the partials
are stored straight into their home ranks' memory.

Every collective here is differentiable: the backward of a dispatch all-to-all is the reverse
all-to-all, the backward of an all-gather a reduce-scatter, and vice versa.

FP8 experts (inference): where the plan says `fp8_dispatch`, the all-to-all's rows travel as
e4m3 bytes with a scale per 128 columns (`dispatch(..., fp8=True)`, `Dispatched.x_scale`),
about half a bf16 row's bytes; the partials come back in the layer's dtype.
"""

from .dispatchers import (AllGatherDispatcher, AllGatherHandle, AllToAllDispatcher,
                          AllToAllHandle, Dispatched, Handle, LocalDispatcher, LocalHandle,
                          check_capacity, chunk_bounds, make_dispatcher)

__all__ = ["AllGatherDispatcher", "AllGatherHandle", "AllToAllDispatcher", "AllToAllHandle",
           "Dispatched", "Handle", "LocalDispatcher", "LocalHandle", "check_capacity",
           "chunk_bounds", "make_dispatcher"]
