"""A linear layer whose weight is the packed HIQ2 bytes the GGUF file stores.

On a GPU with Triton installed the forward pass multiplies straight from the
bytes (kernels/triton: GEMV for a few tokens, GEMM for a window); elsewhere it
dequantizes with the PyTorch path and calls ``F.linear``. Either way the weight
is bit for bit the fake-quantized one, so a model built from these layers
computes what the fake-quantized model computes, up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiq2gguf.formats import HIQ2Type
from hiq2gguf.quantize import dequantize_packed, triton_kernels, use_triton


class HIQ2Linear(torch.nn.Module):
    """``y = x @ W^T + b`` with W held as packed HIQ2 bytes (a uint8 buffer)."""

    def __init__(self, raw: torch.Tensor, qtype: HIQ2Type, shape: tuple[int, int],
                 bias: torch.Tensor | None = None):
        super().__init__()
        qtype.check_shape(shape)
        if tuple(raw.shape) != (shape[0], qtype.row_bytes(shape[1])):
            raise ValueError(f"{qtype.name} bytes {tuple(raw.shape)} do not hold a {tuple(shape)} weight")
        self.qtype = qtype
        self.out_features, self.in_features = shape
        self.register_buffer("raw", raw.to(torch.uint8).contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.raw):
            y = triton_kernels().matmul(x, self.raw, self.qtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, dequantize_packed(self.raw, self.qtype).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.qtype.name}"


def use_packed_linears(model: torch.nn.Module, packed: dict) -> torch.nn.Module:
    """In place: every ``nn.Linear`` whose weight is in ``packed`` (name -> PackedTensor,
    as ``convert.quantize_model`` returns) becomes an ``HIQ2Linear`` over those bytes,
    on the device of the weight it replaces. Returns ``model``."""
    for name, pt in packed.items():
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight":
            raise ValueError(f"{name}: not a linear weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, torch.nn.Linear) or tuple(old.weight.shape) != tuple(pt.shape):
            raise ValueError(f"{module_name}: expected nn.Linear of shape {tuple(pt.shape)}, got {old}")
        raw = torch.from_numpy(pt.raw).to(old.weight.device)
        setattr(parent, child, HIQ2Linear(raw, pt.qtype, pt.shape, old.bias))
    return model
