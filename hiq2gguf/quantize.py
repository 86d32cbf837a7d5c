"""Quantizers on exactly the HIQ2 grid (PyTorch), and PyTorch dequantization.

A quantizer turns a float weight into ``formats.Codes``; packing is always
done by the numpy reference in ``formats``. ``dequantize_torch`` is the
PyTorch fake-quantization of those codes and equals the reference
dequantization of the packed bytes bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hiq2gguf.formats import BLOCK, GROUP, LOW_STEP, N_GROUPS, Codes, FormatError

# Candidate shrink factors for the block range [lo, hi]: RTN searches them and
# keeps the one with the smallest importance-weighted squared error.
DEFAULT_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6)


@dataclass
class RTNConfig:
    shrink: tuple[float, ...] = DEFAULT_SHRINK
    importance_floor: float = 1e-3   # x mean importance, so no weight is ignored entirely


def _blocks(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    if cols % BLOCK:
        raise FormatError(f"HIQ2 needs a multiple of {BLOCK} input columns, got {cols}")
    return w.reshape(rows, cols // BLOCK, BLOCK)


def grid_round(wb: torch.Tensor, high: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Round blocks to the grid spanning [lo, hi] (per block) -> (d fp16, z, levels, w_hat).

    ``high`` is a bool [..., 64] marking weights of high groups. Follows the
    reference quantizer's arithmetic (FORMAT.md), vectorised.
    """
    d = ((hi - lo) / 15).to(torch.float16)
    df = d.to(torch.float32)
    zero = df == 0
    safe = torch.where(zero, torch.ones_like(df), df)
    z = torch.clamp(torch.floor(-lo / safe * 16 + 0.5), 0, 255)
    z = torch.where(zero, torch.zeros_like(z), z)
    t = wb / safe[..., None] + (z / 16)[..., None]
    lv_high = torch.clamp(torch.floor(t + 0.5), 0, 15)
    lv_low = torch.clamp(torch.floor((t + 2.5) / LOW_STEP), 0, 3) * LOW_STEP
    levels = torch.where(high, lv_high, lv_low)
    levels = torch.where(zero[..., None], torch.zeros_like(levels), levels)
    w_hat = df[..., None] * (16 * levels - z[..., None]) / 16
    return d, z, levels, w_hat


def choose_mask(wb: torch.Tensor, imp: torch.Tensor, n_high: int) -> torch.Tensor:
    """Per block, the ``n_high`` groups where 4 bits save the most importance-weighted
    squared error over 2 bits (on the block's min/max grid) -> bool [..., 8]."""
    shape = wb.shape[:-1] + (N_GROUPS,)
    if n_high == 0:
        return torch.zeros(shape, dtype=torch.bool)
    if n_high == N_GROUPS:
        return torch.ones(shape, dtype=torch.bool)
    lo = torch.clamp(wb.amin(-1), max=0)
    hi = torch.clamp(wb.amax(-1), min=0)
    all_low = torch.zeros_like(wb, dtype=torch.bool)
    *_, w_low = grid_round(wb, all_low, lo, hi)
    *_, w_high = grid_round(wb, ~all_low, lo, hi)
    gain = imp * ((wb - w_low) ** 2 - (wb - w_high) ** 2)
    gain = gain.reshape(shape + (GROUP,)).sum(-1)
    top = torch.topk(gain, n_high, dim=-1).indices
    return torch.zeros(shape, dtype=torch.bool).scatter_(-1, top, True)


def quantize_rtn(weight: torch.Tensor, n_high: int, importance: torch.Tensor | None = None,
                 cfg: RTNConfig = RTNConfig()) -> Codes:
    """Round-to-nearest on the HIQ2 grid with an importance-weighted search of the
    block range; the high groups are the ones importance says gain most."""
    w = weight.detach().to(torch.float32)
    wb = _blocks(w)
    if importance is None:
        imp = torch.ones_like(wb)
    else:
        imp = _blocks(importance.detach().to(torch.float32))
        imp = imp + cfg.importance_floor * imp.mean().clamp_min(1e-30)
    high_g = choose_mask(wb, imp, n_high)
    high = high_g.repeat_interleave(GROUP, dim=-1)
    lo0 = torch.clamp(wb.amin(-1), max=0)
    hi0 = torch.clamp(wb.amax(-1), min=0)
    best = None
    for a in cfg.shrink:
        for b in cfg.shrink:
            d, z, levels, w_hat = grid_round(wb, high, lo0 * a, hi0 * b)
            err = (imp * (wb - w_hat) ** 2).sum(-1)
            if best is None:
                best = [err, d, z, levels]
                continue
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better, d, best[1])
            best[2] = torch.where(better, z, best[2])
            best[3] = torch.where(better[..., None], levels, best[3])
    _, d, z, levels = best
    weights = (1 << torch.arange(N_GROUPS, dtype=torch.int32))
    mask = (high_g.to(torch.int32) * weights).sum(-1)
    return Codes(d=d.numpy(), z=z.to(torch.uint8).numpy(), mask=mask.to(torch.uint8).numpy(),
                 levels=levels.to(torch.uint8).numpy())


def dequantize_torch(codes: Codes) -> torch.Tensor:
    """PyTorch fake-quantization: w = d * (16 L - z) / 16 in float32 (exact)."""
    d = torch.from_numpy(np.ascontiguousarray(codes.d)).to(torch.float32)
    z = torch.from_numpy(np.ascontiguousarray(codes.z)).to(torch.int32)
    lv = torch.from_numpy(np.ascontiguousarray(codes.levels)).to(torch.int32)
    w = d[..., None] * (16 * lv - z[..., None]).to(torch.float32) / 16
    return w.reshape(w.shape[0], -1)
