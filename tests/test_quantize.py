"""PyTorch quantizer and fake-quantization against the numpy reference."""

import numpy as np
import pytest
import torch

from hiq2gguf.formats import get_type
from hiq2gguf.quantize import dequantize_torch, quantize_rtn


@pytest.mark.parametrize("n_high", range(9))
def test_fake_quant_equals_reference_dequant_bit_for_bit(n_high):
    t = get_type(100 + n_high)
    g = torch.Generator().manual_seed(n_high)
    w = torch.randn(96, 576, generator=g) * 0.02
    w[0, :64] = 0                       # an all-zero block
    w[1, 5] = 0.7                       # an outlier
    imp = torch.rand(96, 576, generator=g)
    codes = quantize_rtn(w, n_high, imp)
    fake = dequantize_torch(codes).numpy()
    ref = t.dequantize(t.pack(codes))
    assert fake.dtype == ref.dtype == np.float32
    assert np.array_equal(fake.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("n_high", [0, 2, 5])
def test_rtn_search_beats_reference_minmax(n_high):
    t = get_type(100 + n_high)
    w = torch.randn(64, 1536, generator=torch.Generator().manual_seed(7))
    rtn = dequantize_torch(quantize_rtn(w, n_high)).numpy()
    ref = t.dequantize(t.quantize_ref(w.numpy()))
    assert np.mean((rtn - w.numpy()) ** 2) < 0.9 * np.mean((ref - w.numpy()) ** 2)


def test_high_groups_follow_importance():
    """With flat weights, the groups carrying the importance become the high groups."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    imp = torch.full_like(w, 1e-3)
    imp[:, 24:32] = 100.0      # group 3 of block 0
    imp[:, 64 + 48:64 + 56] = 100.0   # group 6 of block 1
    codes = quantize_rtn(w, 1, imp)
    assert (codes.mask[:, 0] == 1 << 3).all()
    assert (codes.mask[:, 1] == 1 << 6).all()


def test_importance_weighting_lowers_weighted_error():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 576, generator=g)
    imp = torch.rand(32, 576, generator=g) ** 4
    plain = dequantize_torch(quantize_rtn(w, 1)) - w
    weighted = dequantize_torch(quantize_rtn(w, 1, imp)) - w
    assert (imp * weighted ** 2).sum() < (imp * plain ** 2).sum()


def test_members_share_one_range_search():
    """Several members searched at once: each gets what searching it alone gives, and
    every block's grid is the best of the shrinkings for that member's mask."""
    from hiq2gguf.formats import GROUP
    from hiq2gguf.quantize import (RTNConfig, _blocks, choose_mask, grid_params, quantize_rtn_members,
                                   round_to_grid)

    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 192, generator=g) * torch.rand(24, 1, generator=g)
    imp = torch.rand(24, 192, generator=g) ** 4
    cfg = RTNConfig(shrink=(1.0, 0.8, 0.6))
    n_highs = [0, 1, 3, 8]
    together = quantize_rtn_members(w, n_highs, imp, cfg)
    wb, ib = _blocks(w), _blocks(imp)
    lo, hi = torch.clamp(wb.amin(-1), max=0), torch.clamp(wb.amax(-1), min=0)
    for n_high, codes in zip(n_highs, together):
        alone = quantize_rtn(w, n_high, imp, cfg)
        for f in ("d", "z", "mask", "levels"):
            assert np.array_equal(getattr(codes, f), getattr(alone, f)), (n_high, f)
        high = choose_mask(wb, ib, n_high).repeat_interleave(GROUP, dim=-1)
        chosen = (ib * (wb - _blocks(dequantize_torch(codes))) ** 2).sum(-1)
        for a in cfg.shrink:
            for b in cfg.shrink:
                _, w_hat = round_to_grid(wb, high, *grid_params(lo * a, hi * b))
                assert (chosen <= (ib * (wb - w_hat) ** 2).sum(-1) * (1 + 1e-6)).all(), (n_high, a, b)
    assert len({c.mask.tobytes() for c in together}) == len(n_highs)


@pytest.mark.parametrize("n_high", [0, 2])
def test_least_squares_refit_lowers_the_searched_error(n_high):
    """refit_grid: every block's error at most that of the searched grid, lower in most
    blocks and in total, with a grid the format stores (finite fp16 d > 0, z in 0..255)."""
    from hiq2gguf.quantize import RTNConfig

    g = torch.Generator().manual_seed(6)
    w = torch.randn(32, 256, generator=g) * torch.rand(32, 1, generator=g) + 0.01
    imp = torch.rand(32, 256, generator=g) ** 4

    def block_err(codes):
        e = imp * (w - dequantize_torch(codes)) ** 2
        return e.reshape(32, -1, 64).sum(-1)

    searched = quantize_rtn(w, n_high, imp, RTNConfig(refits=0))
    refitted = quantize_rtn(w, n_high, imp, RTNConfig(refits=2))
    e0, e1 = block_err(searched), block_err(refitted)
    assert (e1 <= e0 * (1 + 1e-6)).all()
    assert (e1 < e0).float().mean() > 0.5 and e1.sum() < 0.97 * e0.sum()
    d = refitted.d.astype(np.float32)
    assert np.isfinite(d).all() and (d > 0).all() and refitted.z.dtype == np.uint8
    assert np.array_equal(refitted.mask, searched.mask)          # the high groups stay
