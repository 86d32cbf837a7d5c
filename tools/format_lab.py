"""Candidate layouts for a next HIQ2 format, screened before any kernel is written.

Each candidate is a small class: its bits per 64-weight block (everything a file
would store: scales, mask, codes) and a PyTorch quantizer that returns the
dequantized weights, with the same kind of importance-weighted scale search our
RTN and ggml's quantizers use. tools/weight_error.py measures them beside our
members and the stock types (``--lab``); docs/DESIGN.md has what they showed.
None of this is in the file format: these are measurements for choosing one.

Layouts (64-weight blocks, so 576-wide rows still fit; ``S`` weights per sub-block,
each with a 4-bit scale ``q in 1..16`` times the block's fp16 ``d``, no zero point):
- ``sym2/S``: every weight on the symmetric 2-bit grid {-3, -1, 1, 3} x d q / 16.
- ``sym3/S``: every weight on the symmetric 3-bit grid {-7, ..., 7} (odd) x d q / 16.
- ``e8/S``: 8-weight vectors from a lattice codebook: 512 magnitude vectors of odd
  integers (the smallest by norm, ``hiq2gguf.formats.e8_grid``) with 7 sign bits; the
  eighth sign makes the signed sum a multiple of 4, which puts every code on the
  E8 lattice (coset 2 D8 + 1). 16 bits per 8 weights = 2 bits per weight.
  ``e8x2048/S``: the 2048 smallest, 18 bits per 8 weights; ``e8x8192/S``: 8192, 20 bits.
- ``+mask``: one more byte per block, the room a member with high groups needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hiq2gguf.formats import BLOCK, GROUP  # noqa: E402  (the block and group of today's format)
from hiq2gguf.quantize import e8_round, e8_values  # noqa: E402

SCALE_STEPS = 16          # 4-bit sub-scale q in 1..16: s = d q / 16
# sub-block scale candidates, in units of the weights' root mean square (the best scale of
# every layout here lies inside: about 0.3 rms for 3 bits, 0.5 for 2 bits and E8)
SEARCH = tuple(float(f) for f in np.geomspace(0.15, 1.5, 16))
REFITS = 2                # weighted least-squares refits of the best scale


def _subblocks(w: torch.Tensor, imp: torch.Tensor, sub: int):
    rows, cols = w.shape
    if cols % BLOCK:
        raise ValueError(f"rows of {cols} are not whole 64-weight blocks")
    return w.reshape(-1, BLOCK // sub, sub), imp.expand_as(w).reshape(-1, BLOCK // sub, sub)


def quantize_scales(s: torch.Tensor) -> torch.Tensor:
    """Sub-block scales [blocks, k] -> the stored ones: d = fp16(max s), s = d q / 16."""
    d = s.amax(-1, keepdim=True).to(torch.float16).to(torch.float32)
    q = torch.clamp(torch.round(s / torch.where(d > 0, d, torch.ones_like(d)) * SCALE_STEPS), 1, SCALE_STEPS)
    return d * q / SCALE_STEPS


class Layout:
    name: str
    block_bytes: int

    @property
    def bpw(self) -> float:
        return self.block_bytes * 8 / BLOCK

    def round(self, x: torch.Tensor, imp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Weights x [blocks, k, S] on the grid of scales s [blocks, k] -> dequantized values."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
        """float [rows, cols] -> dequantized float [rows, cols]: per sub-block the scale with
        the smallest weighted error among ``SEARCH`` x rms, refitted by weighted least squares,
        then the scales as stored (4-bit steps of the block's fp16 maximum) and a final rounding."""
        x, ii = _subblocks(w, imp, self.sub)
        rms = torch.clamp(x.pow(2).mean(-1).sqrt(), min=1e-30)
        best, best_err = None, None

        def consider(s):
            nonlocal best, best_err
            s = torch.clamp(s, min=1e-30)
            q = self.round(x, ii, s)
            err = (ii * (x - q) ** 2).sum(-1)
            if best is None:
                best, best_err = s, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, s, best), torch.minimum(err, best_err)

        for f in SEARCH:
            consider(rms * f)
        for _ in range(REFITS):
            c = self.round(x, ii, best) / best[..., None]           # codes in scale units
            consider((ii * x * c).sum(-1) / torch.clamp((ii * c * c).sum(-1), min=1e-30))
        return self.round(x, ii, quantize_scales(best)).reshape(w.shape)


@dataclass
class Scalar(Layout):
    bits: int
    sub: int
    mask: bool = False

    @property
    def name(self) -> str:
        return f"sym{self.bits}/{self.sub}" + ("+mask" if self.mask else "")

    @property
    def block_bytes(self) -> int:
        return 2 + BLOCK // self.sub // 2 + self.mask + BLOCK * self.bits // 8

    def round(self, x, imp, s):
        top = 2 ** self.bits - 1
        t = x / s[..., None]
        odd = torch.clamp(2 * torch.floor(t / 2) + 1, -top, top)     # the nearest odd level
        return s[..., None] * odd


@dataclass
class E8(Layout):
    sub: int
    mask: bool = False
    entries: int = 512

    @property
    def name(self) -> str:
        size = "" if self.entries == 512 else f"x{self.entries}"
        return f"e8{size}/{self.sub}" + ("+mask" if self.mask else "")

    @property
    def block_bytes(self) -> int:
        code_bits = int(np.log2(self.entries)) + 7       # index + 7 signs per 8 weights
        return 2 + BLOCK // self.sub // 2 + self.mask + BLOCK // GROUP * code_bits // 8

    def round(self, x, imp, s):
        # the nearest codebook point under the weighted distance: hiq2gguf's own rounding
        shape = x.shape
        u = s[..., None].expand(shape[:-1] + (shape[-1] // GROUP,)).reshape(-1, 1)
        idx, neg = e8_round(x.reshape(-1, GROUP) / u, imp.reshape(-1, GROUP), self.entries)
        return (e8_values(idx, neg, self.entries) * u).reshape(shape)


LAYOUTS = {lay.name: lay for lay in (
    Scalar(2, 32, mask=True), Scalar(2, 16), Scalar(3, 32), Scalar(3, 16),
    E8(32, mask=True), E8(16), E8(16, mask=True), E8(16, entries=2048), E8(16, entries=8192))}


def parse_layouts(spec: str | None) -> list[Layout]:
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if names == ["all"]:
        return list(LAYOUTS.values())
    if unknown := [n for n in names if n not in LAYOUTS]:
        raise ValueError(f"--lab: unknown {', '.join(unknown)} (known: {', '.join(LAYOUTS)}, or all)")
    return [LAYOUTS[n] for n in names]
