"""The FP8 format of the routed experts (`MoEConfig.expert_quant = "fp8"`), in torch.

Weights: e4m3 (`torch.float8_e4m3fn`) with one fp32 scale per 128 x 128 block, the layout of
DeepSeek-V3's and Qwen3's FP8 checkpoints and of transformers' `FP8Experts`:
    gate_up_proj (e, 2I, D) e4m3, gate_up_proj_scale_inv (e, 2I/128, D/128) fp32
    down_proj (e, D, I) e4m3,     down_proj_scale_inv (e, D/128, I/128) fp32
and the weight a block stands for is its e4m3 values times its scale ("scale_inv" is
transformers' name: the inverse of the factor the weights were multiplied by).

Activations: quantized on the fly per token and 128 columns (a "group"), inside the kernels
(`ep_moe.kernels.common.quantize_fp8`); `quantize_groups` here is the same arithmetic in torch,
step for step, for the reference and the tests:
    amax = max(|x| over the group, FP8_EPS);  scale = amax / 448;  q = e4m3(x * (448 / amax))
Both divisions are correctly rounded fp32 divisions and the cast rounds to nearest even, so
the kernels' and torch's e4m3 values and scales agree bit for bit on the same fp32 input.

Products of few large experts at prefill (`blockwise_mm`): cuBLAS's block-scaled FP8 GEMM
(`torch.nn.functional.scaled_mm` with 1 x 128 activation and 128 x 128 weight scaling, torch
>= 2.10 built with CUDA >= 12.9, Hopper only), one call per expert.

What a benchmark needs: `expert_weight_bytes` (one expert's bytes as the experts' path reads
them, scales included) for the weight-read floor of a decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# E4M3_MAX: the largest finite e4m3 (fn) value; FP8_BLOCK: the side of a weight scale block and
# an activation group's width; FP8_EPS: the smallest amax a group is scaled by (an all-zero
# group, a padding row, gets finite scales). One definition, shared with the kernels.
from .kernels.common import E4M3_MAX, FP8_BLOCK as BLOCK, FP8_EPS, per_device

E4M3 = torch.float8_e4m3fn

# cuBLAS's block-scaled FP8 GEMM (torch >= 2.10): None where torch lacks it
_SCALING = getattr(F, "ScalingType", None)
_BLOCKWISE = _SCALING is not None and hasattr(F, "scaled_mm") and \
    hasattr(_SCALING, "BlockWise1x128") and hasattr(_SCALING, "BlockWise128x128")


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and 128 columns: (..., N) float -> (q (..., N) e4m3, scale (..., N/128) fp32),
    q * scale ~ x; the kernels' arithmetic (see the module docstring). N a multiple of 128."""
    *lead, N = x.shape
    if N % BLOCK:
        raise ValueError(f"x must have a last dim that is a multiple of {BLOCK}, got {N}")
    g = x.float().reshape(*lead, N // BLOCK, BLOCK)
    # a NaN is left out of its group's amax, as in the kernels (Triton's max ignores NaN): it
    # stays NaN alone, its group's other values keep finite scales
    amax = g.abs().nan_to_num(nan=0.0).amax(-1).clamp(min=FP8_EPS)
    limit = torch.full_like(amax, E4M3_MAX)
    inv = limit / amax  # tensor / tensor: torch's scalar division multiplies by a reciprocal
    scale = amax / limit
    q = (g * inv[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.reshape(*lead, N), scale


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N, K) float -> (q (..., N, K) e4m3, scale_inv (..., N/128, K/128) fp32): one scale
    per 128 x 128 block, amax / 448 (an all-zero block gets scale FP8_EPS / 448 and zeros)."""
    *lead, N, K = w.shape
    if N % BLOCK or K % BLOCK:
        raise ValueError(f"w must have its last two dims multiples of {BLOCK}, got {N} x {K}")
    blocks = w.float().reshape(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    amax = blocks.abs().amax((-3, -1)).clamp(min=FP8_EPS)  # (..., N/128, K/128)
    limit = torch.full_like(amax, E4M3_MAX)
    inv, scale = limit / amax, amax / limit
    q = (blocks * inv[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.reshape(w.shape), scale


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., N, K) e4m3 and (..., N/128, K/128) scales -> (..., N, K) of `dtype` (computed in
    fp32, or float64 when `dtype` is)."""
    *lead, N, K = q.shape
    work = torch.float64 if dtype == torch.float64 else torch.float32
    blocks = q.to(work).reshape(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    w = blocks * scale_inv.to(work)[..., :, None, :, None]
    return w.reshape(q.shape).to(dtype)


def check_fp8_shapes(D: int, I: int, what: str = "MoEConfig.expert_quant='fp8'") -> None:
    """ValueError unless D and I are multiples of 128 (the scale blocks and activation groups
    tile them exactly, and the gate | up halves of gate_up_proj split at a block edge)."""
    for name, n in (("hidden_size", D), ("intermediate_size", I)):
        if n % BLOCK:
            raise ValueError(f"{what} needs {name} to be a multiple of {BLOCK} (the 128 x 128 "
                             f"weight scale blocks), got {name}={n}")


def check_weight_and_scales(name: str, q: torch.Tensor, scale_inv: torch.Tensor,
                            shape: tuple) -> None:
    """TypeError / ValueError naming `name` unless `q` is an e4m3 tensor of `shape` and
    `{name}_scale_inv` fp32 (or e8m0, a power of two, which the caller converts) of its
    blocks' shape, every scale positive and finite. Reads the scales (a host sync: for loading
    weights, not for a forward)."""
    if not isinstance(q, torch.Tensor) or q.dtype != E4M3:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"{name} must be a torch.float8_e4m3fn tensor, got {got}")
    if tuple(q.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(q.shape)}")
    scale_name = f"{name}_scale_inv"
    blocks = (*shape[:-2], shape[-2] // BLOCK, shape[-1] // BLOCK)
    if not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_floating_point():
        got = scale_inv.dtype if isinstance(scale_inv, torch.Tensor) else \
            type(scale_inv).__name__
        raise TypeError(f"{scale_name} must be a float tensor (fp32), got {got}")
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(f"{scale_name} must have shape {blocks} (one scale per 128 x 128 block "
                         f"of {name} {tuple(shape)}), got {tuple(scale_inv.shape)}")
    s = scale_inv.float()
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):  # host sync: checking loaded weights
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{scale_name} must hold positive finite scales, got "
                         f"{s[first].item()!r} at {first} ({int(bad.sum())} bad of "
                         f"{s.numel()})")


def expert_weight_bytes(D: int, I: int, gated: bool = True, fp8: bool = False,
                        element_size: int = 2) -> int:
    """Bytes one routed expert's weights take as the experts' path reads them: w13 and w2 in
    `element_size` bytes, or (fp8) in e4m3 plus their fp32 block scales.

    A decode step's weight-read floor is (hit experts) * this / the copy ceiling (bytes read
    and written per second): Mixtral 8x7B (D 4096, I 14336) 352.3 MB an expert in bf16,
    176.2 MB in FP8 (of which the scales are 43 kB)."""
    up = 2 * I if gated else I
    values = up * D + D * I
    if not fp8:
        return values * element_size
    scales = (up // BLOCK) * (D // BLOCK) + (D // BLOCK) * (I // BLOCK)
    return values + 4 * scales


def blockwise_mm_available(device: torch.device) -> bool:
    """Whether `blockwise_mm` runs on `device`: torch's `scaled_mm` with DeepSeek-style block
    scaling, which it implements through cuBLAS (CUDA >= 12.9) on Hopper (compute capability
    9.x) only."""
    return _BLOCKWISE and device.type == "cuda" and _cublas_block_scaling(device)


@per_device
def _cublas_block_scaling(device: torch.device) -> bool:
    if torch.version.cuda is None:
        return False
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    return (major, minor) >= (12, 9) and torch.cuda.get_device_capability(device)[0] == 9


def padded_block_scales(scale_inv: torch.Tensor) -> torch.Tensor:
    """(..., N/128, L) weight block scales -> (..., N/128, L4) with L4 = L rounded up to a
    multiple of 4 (ones past L): cuBLAS reads the 128 x 128 scales of a (N, K) operand as
    (L4, N/128) with a leading dimension of L4. The tensor itself where L is a multiple of 4."""
    pad = -scale_inv.shape[-1] % 4
    return F.pad(scale_inv, (0, pad), value=1.0) if pad else scale_inv


def blockwise_mm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor,
                 w_scale: torch.Tensor) -> torch.Tensor:
    """a @ w.T in bf16 from e4m3 operands and their block scales, on cuBLAS
    (`blockwise_mm_available`): out[m, n] = sum_k a[m, k] a_scale[m, k // 128]
    w[n, k] w_scale[n // 128, k // 128], fp32 sums.

    Args:
        a: (M, K) e4m3 rows, M a multiple of 4 (cuBLAS's scale layout), K of 128.
        a_scale: (M, K/128) fp32 stored column-major (strides (1, M)): `quantize_rows(...,
            column_major_scales=True)` or `activate_fp8(...)` writes them so.
        w: (N, K) e4m3, contiguous, N a multiple of 128.
        w_scale: (N/128, L4) fp32 contiguous, `padded_block_scales` of the (N/128, K/128) ones.
    """
    if not _BLOCKWISE:
        raise RuntimeError(f"blockwise_mm needs torch.nn.functional.scaled_mm with block scaling "
                           f"(torch >= 2.10), got torch {torch.__version__}")
    for name, t, dtype in (("a", a, E4M3), ("w", w, E4M3), ("a_scale", a_scale, torch.float32),
                           ("w_scale", w_scale, torch.float32)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.dtype != dtype:
            got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 2-D {dtype} tensor, got {got}")
    (M, K), N = a.shape, w.shape[0]
    if K % BLOCK or N % BLOCK or w.shape[1] != K:
        raise ValueError(f"a must be (M, K) and w (N, K) with K and N multiples of {BLOCK}, got "
                         f"a {tuple(a.shape)}, w {tuple(w.shape)}")
    if M % 4:
        raise ValueError(f"a must have a multiple of 4 rows (cuBLAS reads their scales 4 at a "
                         f"time), got shape {tuple(a.shape)}")
    if tuple(a_scale.shape) != (M, K // BLOCK) or a_scale.stride() != (1, M):
        raise ValueError(f"a_scale must be ({M}, {K // BLOCK}) column-major, strides (1, {M}), "
                         f"got shape {tuple(a_scale.shape)} strides {a_scale.stride()}")
    padded = (N // BLOCK, -(-K // BLOCK // 4) * 4)
    if tuple(w_scale.shape) != padded or not w_scale.is_contiguous():
        raise ValueError(f"w_scale must be {padded} and contiguous, its columns padded to a "
                         f"multiple of 4 (`padded_block_scales`), got shape "
                         f"{tuple(w_scale.shape)} strides {w_scale.stride()}")
    return F.scaled_mm(a, w.t(), a_scale, _SCALING.BlockWise1x128, w_scale.t(),
                       _SCALING.BlockWise128x128, output_dtype=torch.bfloat16)
