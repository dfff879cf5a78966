"""What every kernel file shares: where Triton runs, the dtypes it takes, argument checks, the
device's SM count, and the rounding of fp32 results to 16-bit outputs."""

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
