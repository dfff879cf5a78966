"""What the tests share: the device they run on, the markers that skip where Triton or CUDA is
missing, and the rounding of each stored dtype that the tolerance tables are built from.

Import from here (`from conftest import DEVICE, needs_triton, ROUNDING`): pytest puts this
folder on the path. Tolerances stay beside each test file's reference, justified there; they are
sums of the roundings below (every kernel rounds fp32 results to nearest even on every path,
the CPU interpreter included).
"""

from __future__ import annotations

import pytest
import torch

from ep_moe.kernels.common import use_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# the Triton kernels run on CUDA, and on the CPU under TRITON_INTERPRET=1 (as in CI)
TRITON_RUNS = use_triton(torch.empty(0, device=DEVICE))
needs_triton = pytest.mark.skipif(not TRITON_RUNS,
                                  reason="the Triton path needs CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Half an ulp of each stored dtype (round to nearest): the relative error of one rounding.
# fp32 2^-24; fp16 (10 mantissa bits) 2^-11; bf16 (7 mantissa bits) 2^-8.
ROUNDING = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# The smallest fp16 subnormal step: an absolute floor for results near zero in fp16.
FP16_SUBNORMAL = 2.0**-24


def capture_no_grad(module, static_x: torch.Tensor, warmups: int = 2):
    """(graph, static output) of `module(static_x)` under no_grad captured in a CUDA graph,
    after `warmups` calls on a side stream (kernels compiled, autotuned and cached outside the
    capture, as capture requires). Replay after writing new values into static_x."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmups):
            module(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = module(static_x)
    return graph, static_y
