"""Softmax router top-k in one kernel: (T, E) fp32 logits -> (T, K) expert ids and weights.

torch runs this as a top-k (a radix select, then a sort of the K picked) and a softmax, three
kernels whose cost grows with T: at 4096 tokens of Qwen3's 128 experts they took ~37 µs of a
0.8 ms forward for 2 MB of logits. Here a program reads a few tokens' logits once and picks
the K largest in turn: 5.3 µs (1x H100).

Selection is on the logits (softmax is monotone), largest first; among equal logits the lower
expert id comes first (torch's top-k promises no order there). A NaN logit ranks above every
number, +inf too, as in torch.topk, and makes the token's weights NaN. Ids are always K
distinct experts in [0, E). Differentiable: the backward is the softmax's, in torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import check_triton, needs_grad


# --------------------------------------------------------------------------------------------
# 1. Triton kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _softmax_topk_kernel(
    # pointers
    logits_ptr, ids_ptr, weights_ptr,
    # sizes
    T, E,
    # strides
    stride_t,
    # meta-parameters
    K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
    RENORM: tl.constexpr,
):
    """Tokens [pid*BLOCK_T, (pid+1)*BLOCK_T): ids and fp32 weights of their K best experts.
    RENORM: softmax over the K picked logits; else each one's softmax probability over E."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, E_POW2)
    ks = tl.arange(0, K_POW2)
    t_ok = t < T
    real = (e < E)[None, :] & t_ok[:, None]  # (BLOCK_T, E_POW2)
    x = tl.load(logits_ptr + t[:, None] * stride_t + e[None, :], mask=real,
                other=-float("inf"))
    is_nan = x != x
    rank = tl.where(is_nan, float("inf"), x)  # NaN as +inf here; above +inf in the picks
    free = real  # experts not picked yet; lanes past E never are
    # (masked lanes loaded -inf; tokens past T get 0, not -inf, so their unstored lanes
    # compute no inf - inf)
    row_max = tl.where(t_ok, tl.max(rank, 1), 0.0)
    ids = tl.zeros((BLOCK_T, K_POW2), dtype=tl.int64)
    num = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for k in tl.static_range(K):
        best = tl.max(tl.where(free, rank, -float("inf")), 1)
        # the lowest free NaN, as torch.topk ranks NaN above +inf; else the lowest free id
        # holding the best value: distinct ids even when every free logit is -inf
        nan_left = free & is_nan
        any_nan = tl.max(nan_left.to(tl.int32), 1) > 0
        best_left = tl.where(any_nan[:, None], nan_left, free & (rank == best[:, None]))
        pick = tl.min(tl.where(best_left, e[None, :], E_POW2), 1)
        chosen = e[None, :] == pick[:, None]
        free = free & ~chosen
        logit = tl.sum(tl.where(chosen, x, 0.0), 1)  # the original value: NaN stays NaN
        slot = ks[None, :] == k
        ids = tl.where(slot, pick.to(tl.int64)[:, None], ids)
        num = tl.where(slot, tl.exp(logit - row_max)[:, None], num)
    if RENORM:  # softmax over the K picked
        denom = tl.sum(num, 1)
    else:  # softmax over all E
        denom = tl.sum(tl.where(real, tl.exp(x - row_max[:, None]), 0.0), 1)
    denom = tl.where(t_ok, denom, 1.0)  # tokens past T: nothing stored, nothing to divide
    out = t[:, None] * K + ks[None, :]
    mask = t_ok[:, None] & (ks < K)[None, :]
    tl.store(ids_ptr + out, ids, mask=mask)
    tl.store(weights_ptr + out, num / denom[:, None], mask=mask)


# --------------------------------------------------------------------------------------------
# 2. Launcher, and the backward's math (torch)
# --------------------------------------------------------------------------------------------

def topk_config(E: int) -> tuple[int, int]:
    """(tokens a program, warps): about 128 logits a warp, so the K passes of reductions stay
    short (1x H100: for E = 128 one token to a one-warp program took 2.7 / 5.3 / 15.1 µs at
    16 / 4096 / 16384 tokens, ~4K logits over 4 warps 11.5 / 12.1 / 24.5; for E = 8, 16
    tokens over 4 warps were within 0.2 µs of the best at every T)."""
    e_pow2 = triton.next_power_of_2(E)
    if e_pow2 <= 16:
        return 128 // e_pow2, 4
    return max(1, 128 // e_pow2), max(1, min(4, e_pow2 // 128))


def _launch(logits: torch.Tensor, k: int, renormalize: bool,
            config: Optional[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, weights
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_t, num_warps = config or topk_config(E)
    _softmax_topk_kernel[(triton.cdiv(T, block_t),)](
        logits, ids, weights, T, E, logits.stride(0),
        K=k, K_POW2=triton.next_power_of_2(k), E_POW2=triton.next_power_of_2(E),
        BLOCK_T=block_t, RENORM=renormalize, num_warps=num_warps)
    return ids, weights


def _logits_grad(grad_weights, logits, ids, weights, renormalize: bool, num_experts: int):
    """d loss / d logits through the softmax: with renormalisation only the K picked logits
    get a gradient, without it every logit does (through the softmax's sum)."""
    g = grad_weights.float()
    g_dot_w = (g * weights).sum(-1, keepdim=True)  # (T, 1)
    scattered = weights.new_zeros(ids.shape[0], num_experts)
    if renormalize:  # w = softmax over the picked logits
        return scattered.scatter_(1, ids, weights * (g - g_dot_w))
    # w_k = p[ids_k], p = softmax over all E: dp_i / dl_j = p_i (delta_ij - p_j)
    p = logits.softmax(-1)
    return p * (scattered.scatter_(1, ids, g) - g_dot_w)


# --------------------------------------------------------------------------------------------
# 3. Autograd: a custom op for torch.compile (it calls the kernel, never traces it), and the
#    same wiring as an autograd.Function for eager calls (no custom-op dispatch cost)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("ep_moe::softmax_topk", mutates_args=())
def _softmax_topk_op(logits: torch.Tensor, k: int,
                     renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(logits, k, renormalize, None)


@_softmax_topk_op.register_fake
def _(logits, k, renormalize):
    T = logits.shape[0]
    return (logits.new_empty(T, k, dtype=torch.int64), logits.new_empty(T, k))


def _setup_context(ctx, inputs, output):
    logits, k, renormalize = inputs
    ids, weights = output
    ctx.save_for_backward(logits, ids, weights)
    ctx.renormalize, ctx.num_experts = renormalize, logits.shape[1]
    ctx.mark_non_differentiable(ids)


def _backward(ctx, grad_ids, grad_weights):
    logits, ids, weights = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    return _logits_grad(grad_weights, logits, ids, weights, ctx.renormalize,
                        ctx.num_experts), None, None


_softmax_topk_op.register_autograd(_backward, setup_context=_setup_context)


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, renormalize):
        ids, weights = _launch(logits, k, renormalize, None)
        ctx.save_for_backward(None if renormalize else logits, ids, weights)
        ctx.renormalize, ctx.num_experts = renormalize, logits.shape[1]
        ctx.mark_non_differentiable(ids)
        return ids, weights

    @staticmethod
    def backward(ctx, grad_ids, grad_weights):
        logits, ids, weights = ctx.saved_tensors
        if grad_weights is None:
            return None, None, None
        return _logits_grad(grad_weights, logits, ids, weights, ctx.renormalize,
                            ctx.num_experts), None, None


# --------------------------------------------------------------------------------------------
# 4. Public function
# --------------------------------------------------------------------------------------------


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool,
                 config: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) float32 logits -> topk_ids (T, K) int64 and topk_weights (T, K) float32, best
    first. `renormalize`: the weights are a softmax over the K picked logits (they sum to 1);
    else each picked expert's softmax probability over all E. Differentiable in `logits`
    (an autograd node only where a gradient is needed). Triton (CUDA, or CPU under
    TRITON_INTERPRET=1). `config`: (tokens a program, a power of two; warps); default
    `topk_config`."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or \
            logits.dtype != torch.float32:
        raise ValueError(f"logits must be a (T, E) float32 tensor, got "
                         f"{getattr(logits, 'shape', type(logits))} "
                         f"{getattr(logits, 'dtype', '')}")
    T, E = logits.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, E={E}], got {k!r}")
    if config is not None and (len(config) != 2 or config[0] < 1 or config[0] & (config[0] - 1)
                               or config[1] < 1):
        raise ValueError(f"config must be (tokens a program, a power of two; warps >= 1), "
                         f"got {config!r}")
    check_triton("softmax_topk", logits)
    if torch.compiler.is_compiling():
        return _softmax_topk_op(logits, k, renormalize)
    if needs_grad(logits):
        return _SoftmaxTopK.apply(logits, k, renormalize)
    return _launch(logits, k, renormalize, config)
