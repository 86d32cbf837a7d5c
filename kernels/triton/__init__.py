"""Triton kernels for HIQ2: dequantize and fused dequantize-matmul (see hiq2.py).

Importing this package imports ``triton``; callers that must run without it
(the PyTorch evaluation path on CPU) check for ``triton`` first.
"""

from kernels.triton.hiq2 import GEMV_MAX_ROWS, dequantize, gemm, gemv, matmul

__all__ = ["GEMV_MAX_ROWS", "dequantize", "gemm", "gemv", "matmul"]
