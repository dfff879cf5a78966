"""What every kernel file shares: where Triton runs, the dtypes it takes, argument checks, the
device's SM count, the rounding of fp32 results to 16-bit outputs, and the FP8 (e4m3)
quantization of activations by rows of 128-column groups."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton decides between compiling and interpreting when a kernel is decorated, so read it once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# FP8 (`ep_moe.fp8` describes the format): e4m3's largest finite value, the width of an
# activation group and side of a weight scale block, and the smallest amax a group is scaled by
E4M3_MAX = 448.0
FP8_BLOCK = 128
FP8_EPS = 1e-10
# the same for the kernels (Triton reads only constexpr globals)
_E4M3_MAX = tl.constexpr(E4M3_MAX)
_FP8_EPS = tl.constexpr(FP8_EPS)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for `t`: on CUDA, or on the CPU under TRITON_INTERPRET=1.
    Elsewhere each public function takes its torch path (or says it has none)."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an op on these tensors. Where it does not (inference), callers
    skip their autograd Functions: each costs tens of microseconds of host time."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_tensor(name: str, value, ndim: int, dtypes, device=None) -> None:
    """TypeError / ValueError naming `name` unless `value` is a tensor of `ndim` dims, one of
    `dtypes`, on `device` (when given)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, "
                        f"got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device}, got {value.device}")


def check_triton(name: str, t: torch.Tensor) -> None:
    """RuntimeError for a function that has no torch path, where Triton cannot run."""
    if not use_triton(t):
        raise RuntimeError(f"{name} runs through Triton: needs a CUDA tensor, or a CPU tensor "
                           f"with TRITON_INTERPRET=1; got {t.device}")


def check_split_outputs(outputs, W, shape, like, first, table):
    """Checks W outputs of `shape` and like's dtype and device with contiguous rows, and the
    table of their addresses; returns the table (built when None, on a Triton device)."""
    if not isinstance(outputs, (list, tuple)) or len(outputs) != W:
        got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise ValueError(f"outputs must be a list of W = {W} tensors, got {got}")
    for w, out in enumerate(outputs):
        if (not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape)
                or out.dtype != like.dtype or out.device != like.device
                or out.stride(-1) != 1 or out.stride(0) != shape[1]):
            raise ValueError(f"outputs[{w}] must be {tuple(shape)} {like.dtype} on "
                             f"{like.device} with contiguous rows, got "
                             f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')} "
                             f"on {getattr(out, 'device', '')}")
    if not isinstance(first, int) or not 0 <= first < W:
        raise ValueError(f"first must be an int in [0, {W}), got {first!r}")
    if table is None:
        return torch.tensor([o.data_ptr() for o in outputs], dtype=torch.int64,
                            device=like.device)
    if table.shape != (W,) or table.dtype != torch.int64 or table.device != like.device:
        raise ValueError(f"table must be a ({W},) int64 tensor on {like.device}, got "
                         f"{tuple(table.shape)} {table.dtype} on {table.device}")
    return table


def empty_scales(num_rows: int, groups: int, column_major: bool,
                 device: torch.device) -> torch.Tensor:
    """(num_rows, groups) fp32 for per-row, per-128-column scales: row-major, or column-major
    (storage (groups, num_rows): strides (1, num_rows) at any size, the layout cuBLAS's 1 x
    128 block scaling reads)."""
    if column_major:
        return torch.empty(groups, num_rows, dtype=torch.float32, device=device).t()
    return torch.empty(num_rows, groups, dtype=torch.float32, device=device)


def per_device(fn):
    """Cache `fn(device)` per device in a plain dict (torch.compile traces a dict lookup; it
    only warns about, and steps through, an lru_cache)."""
    cache: dict = {}

    @functools.wraps(fn)
    def cached(device: torch.device):
        if device not in cache:
            cache[device] = fn(device)
        return cache[device]

    return cached


@per_device
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 4 under the interpreter, so loops over programs run
    several tiles each there too."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@per_device
def capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


# fp32 -> bf16 rounds to nearest even on the GPU; the interpreter (triton 3.9) truncates, so
# there the rounding is done by hand on the fp32 bits before the cast.
if INTERPRET:
    @triton.jit
    def to_output(x, dtype: tl.constexpr):
        """x (fp32) in `dtype`, rounded to nearest even."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        return x.to(dtype)
else:
    @triton.jit
    def to_output(x, dtype: tl.constexpr):
        """x (fp32) in `dtype`, rounded to nearest even."""
        return x.to(dtype)


# fp32 -> e4m3 rounds to nearest even on the GPU (cvt.rn.satfinite); the interpreter (triton
# 3.9) rounds some values wrongly (2.5% of N(0, 10) samples, e.g. 7.77 -> 4 instead of 8), so
# there the value is first rounded by hand onto the e4m3 grid, where the cast is exact (and a
# NaN, which it casts to a finite value, is set to e4m3's NaN).
if INTERPRET:
    @triton.jit
    def to_e4m3(x):
        """x (fp32, |x| <= 448) in e4m3, rounded to nearest even."""
        bits = x.to(tl.uint32, bitcast=True)
        # normal (|x| >= 2^-6): 3 of the 23 mantissa bits kept, ties to even
        normal = ((bits + (0x7FFFF + ((bits >> 20) & 1))) & 0xFFF00000).to(tl.float32,
                                                                          bitcast=True)
        # subnormal: multiples of 2^-9, the ulp of fp32 at 2^14, so adding 2^14 rounds there
        sub = (tl.abs(x) + 16384.0) - 16384.0
        sub = tl.where(x < 0, -sub, sub)
        rounded = tl.where(tl.abs(x) >= 0.015625, normal, sub).to(tl.float8e4nv)
        nan = tl.full(x.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
        return tl.where(x != x, nan, rounded)  # the interpreter casts NaN to a number
else:
    @triton.jit
    def to_e4m3(x):
        """x (fp32, |x| <= 448) in e4m3, rounded to nearest even."""
        return x.to(tl.float8e4nv)


@triton.jit
def quantize_fp8(x):
    """(M, 128) tile -> (q (M, 128) e4m3, scale (M,) fp32), q * scale ~ x, each row its own
    group: amax = max(|x|, FP8_EPS), scale = amax / 448, q = e4m3(x * (448 / amax)). Both
    divisions correctly rounded (div_rn: Triton's `/` may be approximate on the GPU), so the
    torch version (`ep_moe.fp8.quantize_groups`) gives the same bits. NaN stays NaN."""
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), _FP8_EPS)
    limit = tl.full(amax.shape, _E4M3_MAX, tl.float32)
    inv = tl.math.div_rn(limit, amax)
    scale = tl.math.div_rn(amax, limit)
    q = tl.clamp(x * inv[:, None], -_E4M3_MAX, _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    return to_e4m3(q), scale
