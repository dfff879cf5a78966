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


def emulated_blockwise_mm(a, a_scale, w, w_scale):
    """cuBLAS's block-scaled FP8 product (`ep_moe.fp8.blockwise_mm`, Hopper only) in float64,
    rounded to bf16, after checking the operand layouts it documents (what cuBLAS would
    misread): the per-expert FP8 path on any device."""
    from ep_moe.fp8 import E4M3, dequantize_blocks

    M, K = a.shape
    N, L = w.shape[0], K // 128
    assert a.dtype == E4M3 and w.dtype == E4M3 and w.shape[1] == K and M % 4 == 0
    assert a_scale.shape == (M, L) and a_scale.stride() == (1, M), a_scale.stride()
    assert w_scale.is_contiguous() and w_scale.shape == (N // 128, -(-L // 4) * 4)
    a64 = (a.double().view(M, L, 128) * a_scale.double()[..., None]).view(M, K)
    w64 = dequantize_blocks(w, w_scale[:, :L], torch.float64)
    return (a64 @ w64.t()).to(torch.bfloat16)


def emulate_blockwise_mm(setattr_, calls=None):
    """Route the layer's per-expert FP8 products to `emulated_blockwise_mm` and tell its plan
    they run: `setattr_` is monkeypatch.setattr in a test, plain setattr in a spawned rank.
    `calls` (a list) collects the row and column counts of a of each product."""
    import ep_moe.experts
    import ep_moe.layer

    def product(*args):
        if calls is not None:
            calls.append(tuple(args[0].shape))
        return emulated_blockwise_mm(*args)

    setattr_(ep_moe.experts, "blockwise_mm", product)
    setattr_(ep_moe.layer, "blockwise_mm_available", lambda device: True)
