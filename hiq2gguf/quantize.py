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

from hiq2gguf.formats import (BLOCK, E8, E8_ENTRIES, E8_SCALE_STEPS, GROUP, LOW_STEP,
                              N_GROUPS, Codes, E8Codes, E8Type, FormatError, HIQ2Type, e8_grid, e8_parity)

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


# ---- HIQ2_E8: lattice codes (formats.E8) ---------------------------------------------

@dataclass
class E8Config:
    # sub-block unit candidates, in units of the one at which the sub-block's root mean
    # square is the codebook's (2.32 for HIQ2_E8, 3.27 for HIQ2_E8_8K): on four of Qwen's
    # weights the best lies between 0.8 and 1.3 for every member, and these six err less
    # than the old 0.3-1.0 x rms x 5 / (largest magnitude) did (0.3 % HIQ2_E8, 1 % 8K)
    search: tuple[float, ...] = tuple(float(f) for f in np.geomspace(0.8, 1.8, 6))
    refits: int = 2                  # weighted least-squares refits of each sub-block's unit
    exact_search: bool = False       # the trial roundings' groups outside the codebook (e8_round)
    importance_floor: float = 1e-3


# entries priced exactly for a group outside the codebook (e8_round)
SHORTLIST = 8


@functools.cache
def _e8_tables(entries: int) -> tuple:
    """For the codebook ``formats.e8_grid(entries)``: (the odd magnitudes a coordinate can
    take [M]; the codebook as float [n, 8]; index of each magnitude vector by its key
    sum_j k_j M^j with m_j = 2 k_j + 1, or -1 where the vector is not in the codebook;
    per lattice parity p (0, 1) the entries of that parity [n_p] and [m^2, -2 m] of
    them stacked [16, n_p], so that for weights a and importance i the matrix product
    [i, i a] @ it is sum_j i_j (m_j^2 - 2 a_j m_j), each entry's weighted distance less
    its constant sum_j i_j a_j^2)."""
    g = e8_grid(entries)
    grid = torch.from_numpy(g.astype(np.float32))
    mags = torch.arange(1, int(g.max()) + 1, 2, dtype=torch.float32)
    k = (grid.to(torch.int64) - 1) // 2
    key = (k * len(mags) ** torch.arange(GROUP)).sum(-1)
    lookup = torch.full((len(mags) ** GROUP,), -1, dtype=torch.int64)
    lookup[key] = torch.arange(entries)
    parity = torch.from_numpy(e8_parity(g).astype(bool))
    by_parity = [torch.nonzero(parity == p)[:, 0] for p in (False, True)]
    expand = [torch.cat([grid[e] * grid[e], -2 * grid[e]], 1).T.contiguous() for e in by_parity]
    return mags, grid, lookup, by_parity, expand, float(grid.pow(2).mean().sqrt())


def _coset_round(t: torch.Tensor, imp: torch.Tensor, mags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point of the odd E8 coset with magnitudes in ``mags`` of every group ``t``
    [G, 8] under sum imp_j (t_j - c_j)^2 -> (magnitude index [G, 8], negative bool [G, 8]).

    The distance is separable: every coordinate rounds to its nearest magnitude and,
    where the parity rule is broken, the one coordinate whose cheapest parity-changing
    alternative (the neighbouring magnitude, or the other sign) costs least moves: any
    fix needs an odd number of such moves."""
    top = len(mags) - 1
    a, neg = t.abs(), t < 0
    cost = (a[..., None] - mags) ** 2                             # [G, 8, M], sign of t
    k0 = cost.argmin(-1)
    base = cost.gather(-1, k0[..., None])[..., 0]
    up = cost.gather(-1, torch.clamp(k0 + 1, max=top)[..., None])[..., 0]
    down = cost.gather(-1, torch.clamp(k0 - 1, min=0)[..., None])[..., 0]
    inf = torch.full_like(base, float("inf"))
    up = torch.where(k0 < top, up, inf)
    down = torch.where(k0 > 0, down, inf)
    flip = (a + mags[k0]) ** 2
    fix = imp * (torch.minimum(torch.minimum(up, down), flip) - base)
    k = k0.clone()
    bad = ((k.sum(-1) + neg.sum(-1)) % 2) == 1
    j = fix.argmin(-1)
    rows = torch.nonzero(bad)[:, 0]
    jj = j[rows]
    kj = k0[rows, jj]
    best_move = torch.stack([up[rows, jj], down[rows, jj], flip[rows, jj]], -1).argmin(-1)   # up, down, flip
    k[rows, jj] = torch.where(best_move == 0, kj + 1, torch.where(best_move == 1, kj - 1, kj))
    neg[rows, jj] = torch.where(best_move == 2, ~neg[rows, jj], neg[rows, jj])
    return k, neg


# factors a group outside the codebook is shrunk by for e8_round's approximate search,
# used by scale searches of codebooks larger than APPROXIMATE_ABOVE entries
SHRINK = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
APPROXIMATE_ABOVE = 2048


def e8_round(t: torch.Tensor, imp: torch.Tensor, entries: int = E8_ENTRIES, exact: bool = True,
             chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook point of every group ``t`` [G, 8] (weights in units of their
    group's scale) under the weighted distance sum imp_j (t_j - c_j)^2 -> (index int64 [G],
    negative bool [G, 8]).

    The nearest point of the whole coset (``_coset_round``) is the answer where the
    codebook holds it. Groups whose point lies outside the codebook (its norm too large:
    for HIQ2_E8 above 48, bar 61 vectors of norm 56) are searched over all entries (those
    of the wrong sign parity through a shortlist: ``SHORTLIST``); with ``exact=False``
    (a scale search's trial roundings) they take instead the best codebook point among
    the coset roundings of the group shrunk by ``SHRINK``: an upper bound on the exact
    cost, a matrix product of 8192 entries cheaper, falling back to the search only where
    no shrink lands in the codebook."""
    mags, grid, lookup, by_parity, expand, _ = _e8_tables(entries)
    keys = len(mags) ** torch.arange(GROUP)
    k, neg = _coset_round(t, imp, mags)
    index = lookup[(k * keys).sum(-1)]
    out = torch.nonzero(index < 0)[:, 0]
    if not exact and len(out):
        to, io = t[out], imp[out]
        best = torch.full((len(out),), float("inf"))
        for f in SHRINK:
            ks, ns = _coset_round(to * f, io, mags)
            idx = lookup[(ks * keys).sum(-1)]
            c = torch.where(ns, -mags[ks], mags[ks])
            err = torch.where(idx >= 0, (io * (to - c) ** 2).sum(-1), torch.full_like(best, float("inf")))
            better = err < best
            best = torch.minimum(err, best)
            index[out[better]], neg[out[better]] = idx[better], ns[better]
        out = out[torch.isinf(best)]
    a = t.abs()
    sign_parity = (t[out] < 0).sum(-1) % 2
    for p in (0, 1):                                             # outside the codebook: every entry
        rows_p = out[sign_parity == p]
        right, wrong = by_parity[p], by_parity[1 - p]             # a point's signs carry its parity
        for c0 in range(0, len(rows_p), chunk):
            g = rows_p[c0:c0 + chunk]
            ig, c = imp[g], imp[g] * a[g]
            x = torch.cat([ig, c], 1)
            best, pick = (x @ expand[p]).min(-1)                 # right parity: priced exactly
            # an entry of the wrong parity also flips its cheapest sign (4 imp_j a_j m_j >= 4
            # min_j imp_j a_j, the same for all): price the ones nearest before that exactly
            err, short = (x @ expand[1 - p]).topk(min(SHORTLIST, len(wrong)), dim=-1, largest=False)
            fcost, jf = (4 * c[:, None, :] * grid[wrong[short]]).min(-1)                   # [c, K]
            cost, s_pick = (err + fcost).min(-1)
            r = torch.arange(len(g))
            use_wrong = cost < best
            index[g] = torch.where(use_wrong, wrong[short[r, s_pick]], right[pick])
            sign = t[g] < 0
            jw = jf[r, s_pick]
            sign[r[use_wrong], jw[use_wrong]] ^= True
            neg[g] = sign
    return index, neg


def e8_values(index: torch.Tensor, negative: torch.Tensor, entries: int = E8_ENTRIES) -> torch.Tensor:
    """Signed codebook points [..., 8] of ``index`` [...] (in units of the group's scale)."""
    m = _e8_tables(entries)[1][index]
    return torch.where(negative, -m, m)


def e8_decoded(d: torch.Tensor, q: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The weights the file decodes: d * (q * signed magnitude) / 16 with ``d`` float [...],
    ``q`` and ``values`` broadcastable to the weights; exact in float32 (FORMAT.md)."""
    return d * (values * q) / 16


def store_e8_units(units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block units [..., n_sub] -> as the file stores them: (d fp16 [...], q [..., n_sub] in 1..16),
    d = fp16(max unit), unit = d q / 16."""
    d = units.amax(-1).to(torch.float16)
    df = d.to(torch.float32)[..., None]
    q = torch.clamp(torch.floor(units / torch.where(df > 0, df, torch.ones_like(df)) * E8_SCALE_STEPS + 0.5),
                    1, E8_SCALE_STEPS)
    return d, torch.where(df > 0, q, torch.ones_like(q))


def _e8_sub(x: torch.Tensor, qtype: E8Type) -> torch.Tensor:
    """[..., 64k] -> [..., k, n_sub, groups per sub-block, 8]: blocks, sub-blocks, groups."""
    return x.reshape(*x.shape[:-1], -1, qtype.n_sub, qtype.sub // GROUP, GROUP)


def e8_rms_units(wb: torch.Tensor, qtype: E8Type = E8) -> torch.Tensor:
    """Per sub-block (16 or 32 weights) of blocks ``wb`` [..., 64] the unit at which its root
    mean square is the codebook's -> float [..., n_sub] (the scale search's reference)."""
    rms = torch.clamp(_e8_sub(wb, qtype)[..., 0, :, :, :].pow(2).mean((-1, -2)).sqrt(), min=1e-30)
    return rms / _e8_tables(qtype.entries)[5]


def search_e8_units(wb: torch.Tensor, imp: torch.Tensor, cfg: E8Config = E8Config(),
                    qtype: E8Type = E8, max_unit: torch.Tensor | None = None) -> torch.Tensor:
    """Per sub-block of blocks ``wb`` [..., 64] the unit (scale of codebook magnitude 1)
    among ``cfg.search`` x its rms with the smallest importance-weighted error, then
    refitted by weighted least squares with the codes held -> float [..., n_sub].
    ``max_unit`` [..., n_sub]: no unit above it is tried."""
    x, ii = _e8_sub(wb, qtype)[..., 0, :, :, :], _e8_sub(imp, qtype)[..., 0, :, :, :]   # [..., n_sub, -, 8]
    rms = e8_rms_units(wb, qtype)
    top = max_unit if max_unit is not None else torch.full_like(rms, float("inf"))

    def trial(unit, exact):
        """(error of the sub-blocks at ``unit`` [..., n_sub], their codebook points [..., n_sub, -, 8])."""
        u = unit[..., None, None]
        idx, neg = e8_round((x / u).reshape(-1, GROUP), ii.reshape(-1, GROUP), qtype.entries, exact=exact)
        c = e8_values(idx, neg, qtype.entries).reshape(x.shape)
        return (ii * (x - u * c) ** 2).sum((-1, -2)), c

    best = best_err = best_c = None

    def keep(unit, err, c):
        """Each sub-block's unit, error and points where ``unit`` errs less than the best so far."""
        nonlocal best, best_err, best_c
        if best is None:
            best, best_err, best_c = unit, err, c
            return
        better = err < best_err
        best, best_err = torch.where(better, unit, best), torch.minimum(err, best_err)
        best_c = torch.where(better[..., None, None], c, best_c)

    # HIQ2_E8_8K's candidates are screened by e8_round's approximate rounding, the winner and
    # its refits priced exactly: half the time, 1.5 % more error on Qwen's weights. For the
    # smaller codebooks the exact search is about as fast (HIQ2_E8_2K: 1.2x, 1.8 % error)
    exact = cfg.exact_search or qtype.entries <= APPROXIMATE_ABOVE
    for f in cfg.search:
        unit = torch.clamp(torch.minimum(rms * f, top), min=1e-30)
        keep(unit, *trial(unit, exact))
    if not exact:
        best_err, best_c = trial(best, True)
    for _ in range(cfg.refits):
        unit = (ii * x * best_c).sum((-1, -2)) / torch.clamp((ii * best_c * best_c).sum((-1, -2)), min=1e-30)
        unit = torch.clamp(torch.minimum(unit, top), min=1e-30)
        keep(unit, *trial(unit, True))
    return best


def round_e8_block(wb: torch.Tensor, imp: torch.Tensor, d: torch.Tensor, q: torch.Tensor, qtype: E8Type = E8):
    """Codes of blocks ``wb`` [..., 64] on the stored scales (d [...], q [..., n_sub]) ->
    (index [..., 8], negative bool [..., 64], dequantized float [..., 64]); exactly the
    values the file decodes."""
    unit = (d.to(torch.float32)[..., None] * q / E8_SCALE_STEPS)                # [..., n_sub]
    u = torch.where(unit > 0, unit, torch.ones_like(unit))
    u = u.repeat_interleave(qtype.sub // GROUP, dim=-1)[..., None]               # [..., 8, 1]
    shape = wb.shape[:-1]
    g = wb.reshape(*shape, N_GROUPS, GROUP)
    idx, neg = e8_round((g / u).reshape(-1, GROUP), imp.reshape(-1, GROUP), qtype.entries)
    idx, neg = idx.reshape(*shape, N_GROUPS), neg.reshape(*shape, BLOCK)
    values = e8_values(idx, neg.reshape(*shape, N_GROUPS, GROUP), qtype.entries).reshape(*shape, BLOCK)
    return idx, neg, e8_decoded(d.to(torch.float32)[..., None], q.repeat_interleave(qtype.sub, dim=-1), values)


def e8_codes(d: torch.Tensor, q: torch.Tensor, index: torch.Tensor, negative: torch.Tensor, qtype: E8Type) -> E8Codes:
    return E8Codes(d=d.to(torch.float16).numpy(), scales=q.to(torch.uint8).numpy(),
                   index=index.to(torch.int64).numpy().astype(np.uint16), negative=negative.numpy().astype(bool),
                   entries=qtype.entries)


def quantize_e8(weight: torch.Tensor, importance: torch.Tensor | None = None,
                cfg: E8Config = E8Config(), qtype: E8Type = E8) -> E8Codes:
    """Round-to-nearest lattice codes (any HIQ2_E8* member) with importance-weighted
    searched sub-block scales."""
    w = weight.detach().to(torch.float32)
    wb = _blocks(w)
    imp = _blocks(floored_importance(importance, w, RTNConfig(importance_floor=cfg.importance_floor)))
    d, q = store_e8_units(search_e8_units(wb, imp, cfg, qtype))
    idx, neg, _ = round_e8_block(wb, imp, d, q, qtype)
    return e8_codes(d, q, idx, neg, qtype)


def quantize_member(weight: torch.Tensor, qtype: HIQ2Type | E8Type, importance: torch.Tensor | None = None
                    ) -> Codes | E8Codes:
    """Importance-weighted round-to-nearest codes of ``weight`` as any of our types."""
    if isinstance(qtype, E8Type):
        return quantize_e8(weight, importance, qtype=qtype)
    return quantize_rtn(weight, qtype.n_high, importance)


def dequantize_torch(codes: Codes | E8Codes) -> torch.Tensor:
    """PyTorch fake-quantization: w = d * (16 L - z) / 16, or for HIQ2_E8 d * n / 16,
    in float32 (exact)."""
    if isinstance(codes, E8Codes):
        d = torch.from_numpy(np.ascontiguousarray(codes.d)).to(torch.float32)
        n = torch.from_numpy(codes.integers()).to(torch.float32)
        w = d[..., None] * n / 16
        return w.reshape(w.shape[0], -1)
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
