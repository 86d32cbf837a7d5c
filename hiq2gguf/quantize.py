"""Quantizers on exactly the HIQ2 grid (PyTorch), and PyTorch dequantization.

A quantizer turns a float weight into ``formats.Codes``; packing is always
done by the numpy reference in ``formats``. ``dequantize_torch`` is the
PyTorch fake-quantization of those codes and equals the reference
dequantization of the packed bytes bit for bit (tested). ``dequantize_packed``
starts from the packed bytes instead and, on a CUDA tensor with Triton
installed, runs the Triton kernel (kernels/triton), bit for bit the same values.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from hiq2gguf.formats import BLOCK, GROUP, LOW_STEP, N_GROUPS, Codes, FormatError, HIQ2Type

# Candidate shrink factors for the block range [lo, hi]: RTN searches them and
# keeps the one with the smallest importance-weighted squared error.
DEFAULT_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6)


@dataclass
class RTNConfig:
    shrink: tuple[float, ...] = DEFAULT_SHRINK
    importance_floor: float = 1e-3   # x mean importance, so no weight is ignored entirely
    refits: int = 2                  # least-squares refits of the searched grid (refit_grid)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    if cols % BLOCK:
        raise FormatError(f"HIQ2 needs a multiple of {BLOCK} input columns, got {cols}")
    return w.reshape(rows, cols // BLOCK, BLOCK)


def grid_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale d (fp16) and zero point z (float, 0..255) of the grid spanning [lo, hi]."""
    d = ((hi - lo) / 15).to(torch.float16)
    df = d.to(torch.float32)
    safe = torch.where(df == 0, torch.ones_like(df), df)
    z = torch.clamp(torch.floor(-lo / safe * 16 + 0.5), 0, 255)
    return d, torch.where(df == 0, torch.zeros_like(z), z)


def _nearest_levels(w: torch.Tensor, d: torch.Tensor, z: torch.Tensor):
    """Nearest high (0..15) and low (0, 5, 10, 15) levels of ``w`` [..., n] on the grid
    (d, z) [...], 0 where d == 0 -> (high levels, low levels, d and z as float [..., 1])."""
    df = d.to(torch.float32)[..., None]
    zf = z[..., None]
    zero = df == 0
    t = w / torch.where(zero, torch.ones_like(df), df) + zf / 16
    lv_high = torch.clamp(torch.floor(t + 0.5), 0, 15)
    lv_low = torch.clamp(torch.floor((t + 2.5) / LOW_STEP), 0, 3) * LOW_STEP
    return (torch.where(zero, torch.zeros_like(lv_high), lv_high),
            torch.where(zero, torch.zeros_like(lv_low), lv_low), df, zf)


def round_to_grid(w: torch.Tensor, high: torch.Tensor, d: torch.Tensor, z: torch.Tensor):
    """Nearest grid levels of ``w`` [..., n] on the grid (d, z) [...] -> (levels, w_hat).

    ``high`` (bool, broadcastable to ``w``) marks weights of high groups: 16 levels;
    the others use levels 0, 5, 10, 15. ``w_hat`` is exactly the dequantized value.
    """
    lv_high, lv_low, df, zf = _nearest_levels(w, d, z)
    levels = torch.where(high, lv_high, lv_low)
    return levels, df * (16 * levels - zf) / 16


def round_both_ways(w: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``round_to_grid``'s w_hat of every weight as a high and as a low weight."""
    lv_high, lv_low, df, zf = _nearest_levels(w, d, z)
    return df * (16 * lv_high - zf) / 16, df * (16 * lv_low - zf) / 16


def choose_masks(wb: torch.Tensor, imp: torch.Tensor, n_highs: list[int]) -> list[torch.Tensor]:
    """Per block and member: the ``n_high`` groups where 4 bits save the most
    importance-weighted squared error over 2 bits (on the block's min/max grid)
    -> bool [..., 8] for each of ``n_highs``; the gains are computed once."""
    shape = wb.shape[:-1] + (N_GROUPS,)
    gain = None
    masks = []
    for n_high in n_highs:
        if n_high in (0, N_GROUPS):
            masks.append(torch.full(shape, n_high == N_GROUPS, dtype=torch.bool))
            continue
        if gain is None:
            lo = torch.clamp(wb.amin(-1), max=0)
            hi = torch.clamp(wb.amax(-1), min=0)
            d, z = grid_params(lo, hi)
            w_high, w_low = round_both_ways(wb, d, z)
            gain = imp * ((wb - w_low) ** 2 - (wb - w_high) ** 2)
            gain = gain.reshape(shape + (GROUP,)).sum(-1)
        top = torch.topk(gain, n_high, dim=-1).indices
        masks.append(torch.zeros(shape, dtype=torch.bool).scatter_(-1, top, True))
    return masks


def choose_mask(wb: torch.Tensor, imp: torch.Tensor, n_high: int) -> torch.Tensor:
    return choose_masks(wb, imp, [n_high])[0]


def floored_importance(importance: torch.Tensor | None, like: torch.Tensor,
                       cfg: RTNConfig = RTNConfig()) -> torch.Tensor:
    """Importance per weight, lifted by a small floor so that no weight is ignored."""
    if importance is None:
        return torch.ones_like(like, dtype=torch.float32)
    imp = importance.detach().to(torch.float32)
    return imp + cfg.importance_floor * imp.mean().clamp_min(1e-30)


def search_block_grids(wb: torch.Tensor, n_highs: list[int], imp: torch.Tensor,
                       cfg: RTNConfig = RTNConfig()) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per block [..., 64] and member: the high groups and the (d, z) among ``cfg.shrink``
    x ``cfg.shrink`` shrinkings of the block range with the smallest importance-weighted
    squared rounding error, refitted (``refit_grid``) -> [(high groups bool [..., 8],
    d fp16 [...], z float [...])] for each of ``n_highs``.

    A weight's rounding on a grid depends on the mask only through being high or low, so
    one rounding of every weight both ways per shrinking serves every member (the
    gradient estimator's candidates are six members of every weight)."""
    masks = choose_masks(wb, imp, n_highs)
    lo0 = torch.clamp(wb.amin(-1), max=0)
    hi0 = torch.clamp(wb.amax(-1), min=0)
    groups = wb.shape[:-1] + (N_GROUPS, GROUP)
    alone = masks[0].repeat_interleave(GROUP, dim=-1) if len(masks) == 1 else None
    best = [None] * len(masks)
    for a in cfg.shrink:
        for b in cfg.shrink:
            d, z = grid_params(lo0 * a, hi0 * b)
            if alone is not None:       # one member (GPTQ, the final RTN): its own mask, half the work
                errs = [(imp * (wb - round_to_grid(wb, alone, d, z)[1]) ** 2).sum(-1)]
            else:                       # per group: the error if the group is high, and if it is low
                e_high, e_low = ((imp * (wb - w_hat) ** 2).reshape(groups).sum(-1)
                                 for w_hat in round_both_ways(wb, d, z))
                errs = [torch.where(mask, e_high, e_low).sum(-1) for mask in masks]
            for k, err in enumerate(errs):
                if best[k] is None:
                    best[k] = [err, d, z]
                    continue
                better = err < best[k][0]
                best[k] = [torch.where(better, new, old) for new, old in zip((err, d, z), best[k])]
    return [(mask, *refit_grid(wb, imp, mask, d, z, err, cfg.refits)) for mask, (err, d, z) in zip(masks, best)]


def refit_grid(wb: torch.Tensor, imp: torch.Tensor, high_g: torch.Tensor, d: torch.Tensor, z: torch.Tensor,
               err: torch.Tensor, refits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Improve a searched grid (d, z) [...] of blocks ``wb`` [..., 64] whose weighted
    error is ``err``: with the levels L it rounds to held fixed, the best affine map
    ``w ~ a L + b`` is a weighted least-squares fit per block (what the shrink search
    only samples); (d, z) = (fp16(a), 16 (-b / d)) is kept where it rounds with less
    error. ``refits`` rounds of this; -> (d, z)."""
    high = high_g.repeat_interleave(GROUP, dim=-1)
    for _ in range(refits):
        L, _ = round_to_grid(wb, high, d, z)
        sw, sl, sll = imp.sum(-1), (imp * L).sum(-1), (imp * L * L).sum(-1)
        sx, slx = (imp * wb).sum(-1), (imp * L * wb).sum(-1)
        det = sw * sll - sl * sl
        ok = det > 1e-12 * sw * sll                  # a block on one level has no slope to fit
        safe = torch.where(ok, det, torch.ones_like(det))
        a = (sw * slx - sl * sx) / safe
        b = (sll * sx - sl * slx) / safe
        a16 = a.to(torch.float16).to(torch.float32)     # the scale as stored: finite, above 0
        ok &= torch.isfinite(a16) & (a16 > 0)
        d_new = torch.where(ok, a, d.to(torch.float32)).to(torch.float16)
        z_new = torch.clamp(torch.floor(-b / torch.where(ok, d_new.to(torch.float32), torch.ones_like(b)) * 16 + 0.5),
                            0, 255)
        z_new = torch.where(ok, z_new, z)
        e_new = (imp * (wb - round_to_grid(wb, high, d_new, z_new)[1]) ** 2).sum(-1)
        better = e_new < err
        d, z, err = torch.where(better, d_new, d), torch.where(better, z_new, z), torch.minimum(e_new, err)
    return d, z


def search_block_grid(wb: torch.Tensor, n_high: int, imp: torch.Tensor, cfg: RTNConfig = RTNConfig()):
    """``search_block_grids`` for one member -> (high groups, d, z)."""
    return search_block_grids(wb, [n_high], imp, cfg)[0]


def codes_from_tensors(d: torch.Tensor, z: torch.Tensor, high_g: torch.Tensor, levels: torch.Tensor) -> Codes:
    bits = 1 << torch.arange(N_GROUPS, dtype=torch.int32)
    mask = (high_g.to(torch.int32) * bits).sum(-1)
    return Codes(d=d.to(torch.float16).numpy(), z=z.to(torch.uint8).numpy(),
                 mask=mask.to(torch.uint8).numpy(), levels=levels.to(torch.uint8).numpy())


def quantize_rtn_members(weight: torch.Tensor, n_highs: list[int], importance: torch.Tensor | None = None,
                         cfg: RTNConfig = RTNConfig()) -> list[Codes]:
    """Round-to-nearest on the HIQ2 grid with an importance-weighted search of the
    block range, for each member in ``n_highs`` (one shared search); the high groups
    are the ones importance says gain most."""
    w = weight.detach().to(torch.float32)
    wb = _blocks(w)
    imp = _blocks(floored_importance(importance, w, cfg))
    out = []
    for high_g, d, z in search_block_grids(wb, n_highs, imp, cfg):
        levels, _ = round_to_grid(wb, high_g.repeat_interleave(GROUP, dim=-1), d, z)
        out.append(codes_from_tensors(d, z, high_g, levels))
    return out


def quantize_rtn(weight: torch.Tensor, n_high: int, importance: torch.Tensor | None = None,
                 cfg: RTNConfig = RTNConfig()) -> Codes:
    return quantize_rtn_members(weight, [n_high], importance, cfg)[0]


def dequantize_torch(codes: Codes) -> torch.Tensor:
    """PyTorch fake-quantization: w = d * (16 L - z) / 16 in float32 (exact)."""
    d = torch.from_numpy(np.ascontiguousarray(codes.d)).to(torch.float32)
    z = torch.from_numpy(np.ascontiguousarray(codes.z)).to(torch.int32)
    lv = torch.from_numpy(np.ascontiguousarray(codes.levels)).to(torch.int32)
    w = d[..., None] * (16 * lv - z[..., None]).to(torch.float32) / 16
    return w.reshape(w.shape[0], -1)


@functools.cache
def triton_kernels():
    """The Triton kernels (``kernels.triton``) when ``triton`` is installed, else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    import kernels.triton
    return kernels.triton


def use_triton(t: torch.Tensor) -> bool:
    """Whether work on ``t`` goes to the Triton kernels: a CUDA tensor and Triton installed."""
    return t.is_cuda and triton_kernels() is not None


def dequantize_packed(raw: torch.Tensor, qtype: HIQ2Type) -> torch.Tensor:
    """Packed bytes (uint8 [rows, row_bytes], as the file stores them) -> float32
    [rows, cols] on ``raw``'s device: the Triton kernel on a GPU, else the numpy
    unpacking and ``dequantize_torch`` (both bit for bit the reference)."""
    if use_triton(raw):
        return triton_kernels().dequantize(raw, qtype)
    codes = qtype.unpack(raw.detach().cpu().numpy())
    return dequantize_torch(codes).to(raw.device)
