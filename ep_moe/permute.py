"""Row bookkeeping between tokens and expert-sorted rows (no collectives, no host syncs).

A *row index* (T, K) names, for each slot (t, k), the row of an expanded buffer that holds
token t's copy for that slot, or -1 for none. Expanding tokens into rows and summing rows back
into tokens are transposes of each other, and both run through the deterministic Triton
combine: no atomics, so gradients are bitwise reproducible.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import fused_mul_sum_rows
from .kernels.gather import gather_rows
from .kernels.common import needs_grad


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64 occurrences of each id in [0, n) among `ids` (any shape).

    Not `torch.bincount`: on CUDA it reads max(ids) back to the host, a hidden sync per call.
    Integer atomics add in any order to the same result, so this stays deterministic.
    """
    flat = ids.reshape(-1).long()
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def _gather(x, source_rows, count):
    return x[source_rows] if count is None else gather_rows(x, source_rows, count)


class _ExpandRows(torch.autograd.Function):
    """rows[row_index[t, k]] = x[t]; the backward sums each token's rows back (fixed order)."""

    @staticmethod
    def forward(ctx, x, source_rows, row_index, count):
        ctx.save_for_backward(row_index)
        return _gather(x, source_rows, count)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_index,) = ctx.saved_tensors
        ones = torch.ones(row_index.shape, dtype=torch.float32, device=grad_rows.device)
        return fused_mul_sum_rows(grad_rows.contiguous(), ones, row_index), None, None, None


def expand_rows(x: torch.Tensor, source_rows: torch.Tensor, row_index: torch.Tensor,
                count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T, D) -> (P, D): row p is x[source_rows[p]]; `row_index` (T, K) is the inverse map.
    count: optional one-element device tensor: only rows p < count are real (P a bound, as
    behind a fixed-size exchange); the rest are left unwritten where Triton runs."""
    if needs_grad(x):
        return _ExpandRows.apply(x, source_rows, row_index, count)
    return _gather(x, source_rows, count)  # no autograd node: less host time


def sum_rows(rows: torch.Tensor, row_index: torch.Tensor,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(P, D) -> (T, D): token t gets the plain sum of its rows, in slot order; written into
    `out` (T, D) when given."""
    ones = torch.ones(row_index.shape, dtype=torch.float32, device=rows.device)
    return fused_mul_sum_rows(rows, ones, row_index, outputs=out)
