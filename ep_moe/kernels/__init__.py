"""Triton kernels: tensors in, tensors out. Nothing here imports the layer."""

from .fused_mul_sum import fused_mul_sum_rows, moe_fused_mul_sum

__all__ = ["moe_fused_mul_sum", "fused_mul_sum_rows"]
