"""HIQ2_E8's quantizers (hiq2gguf.quantize, hiq2gguf.gptq) on real computations:
the fast lattice rounding equals an exhaustive search of the codebook, the codes
pack and decode to exactly the fake-quantized weights, the searched scales beat the
reference quantizer, GPTQ beats RTN on a layer's output, and at equal size the lattice
member stores weights better than HIQ2_H0 (the reason it exists)."""

import itertools

import numpy as np
import pytest
import torch

from hiq2gguf.formats import E8, E8_TYPES, e8_grid, e8_parity, get_type
from hiq2gguf.gptq import GPTQ
from hiq2gguf.quantize import _coset_round, _e8_tables, dequantize_torch, e8_round, e8_values, quantize_e8, quantize_member, quantize_rtn
from tests.test_gptq import correlated_inputs


def brute_force(t: torch.Tensor, imp: torch.Tensor, entries: int) -> torch.Tensor:
    """Smallest weighted distance from each group t [G, 8] to any codebook entry with any
    signs allowed by the lattice rule: every entry, every sign pattern."""
    grid = torch.from_numpy(e8_grid(entries).astype(np.float32)).to(torch.float64)
    parity = torch.from_numpy(e8_parity(e8_grid(entries)).astype(np.int64))
    bits = torch.arange(256)
    signs = ((bits[:, None] >> torch.arange(8)) & 1).to(torch.bool)                  # [256, 8]
    ok = ((signs.sum(-1)[None, :] + parity[:, None]) % 2) == 0                          # [512, 256]
    pts = torch.where(signs[None], -grid[:, None, :], grid[:, None, :])                 # [512, 256, 8]
    pts = pts[ok]                                                                      # [n * 128, 8]
    t, imp = t.to(torch.float64), imp.to(torch.float64)
    return torch.stack([(imp[i] * (t[i] - pts) ** 2).sum(-1).min() for i in range(len(t))])


@pytest.mark.parametrize("qtype", E8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("spread", [0.7, 2.0, 3.5])
def test_lattice_rounding_is_the_nearest_codebook_point(spread, qtype):
    """The coset rounding with the parity fix, and the search for groups whose nearest
    lattice point lies outside the codebook (most of them at spread 3.5 for HIQ2_E8;
    the larger codebooks reach further, so their spreads are scaled up)."""
    g = torch.Generator().manual_seed(int(spread * 10))
    n = 300 * 512 // qtype.entries + 20
    t = torch.randn(n, 8, generator=g) * spread * (int(qtype.grid.max()) / 5)
    imp = torch.rand(n, 8, generator=g) + 0.05
    index, negative = e8_round(t, imp, qtype.entries)
    v = e8_values(index, negative, qtype.entries).to(torch.float64)
    assert ((v.sum(-1) % 4) == 0).all()                        # lattice points (signed sum = 0 mod 4)
    ours = (imp.to(torch.float64) * (t.to(torch.float64) - v) ** 2).sum(-1)
    best = brute_force(t, imp, qtype.entries)
    assert torch.allclose(ours, best, rtol=1e-5, atol=1e-6), float((ours - best).max())


@pytest.mark.parametrize("qtype", E8_TYPES, ids=lambda t: t.name)
def test_approximate_rounding_is_a_codebook_point_no_nearer_than_the_exact(qtype):
    """The scale search's trial rounding (exact=False): lattice points of the codebook,
    the exact answer wherever the nearest coset point is in the codebook, never nearer
    than the exact search elsewhere, and in all within 30 % of its total cost."""
    g = torch.Generator().manual_seed(7)
    t = torch.randn(2000, 8, generator=g) * 2.0 * (int(qtype.grid.max()) / 5)
    imp = torch.rand(2000, 8, generator=g) + 0.05
    exact, approx = e8_round(t, imp, qtype.entries), e8_round(t, imp, qtype.entries, exact=False)
    cost = []
    for index, negative in (exact, approx):
        assert (index >= 0).all() and (index < qtype.entries).all()
        v = e8_values(index, negative, qtype.entries).to(torch.float64)
        assert ((v.sum(-1) % 4) == 0).all()
        cost.append((imp.to(torch.float64) * (t.to(torch.float64) - v) ** 2).sum(-1))
    mags, _, lookup, *_ = _e8_tables(qtype.entries)
    k, _ = _coset_round(t, imp, mags)
    inside = lookup[(k * len(mags) ** torch.arange(8)).sum(-1)] >= 0
    assert 0.3 < float(inside.float().mean()) < 0.95              # both kinds of group occur
    assert torch.equal(exact[0][inside], approx[0][inside]) and torch.equal(exact[1][inside], approx[1][inside])
    assert (cost[1] >= cost[0] - 1e-6).all()
    assert float(cost[1].sum() / cost[0].sum()) < 1.3


def weighted_error(w, q, imp):
    return float((imp * (w - q) ** 2).sum() / (imp * w ** 2).sum())


@pytest.mark.parametrize("qtype", E8_TYPES, ids=lambda t: t.name)
def test_e8_codes_pack_and_decode_to_the_fake_quantized_weights(qtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 192, generator=g) * 0.02
    w[0, :64] = 0                     # an all-zero block: d = 0
    w[1, 5] = 1.5                     # an outlier
    imp = torch.rand(192, generator=g).expand_as(w)
    codes = quantize_e8(w, imp, qtype=qtype)
    raw = qtype.pack(codes)
    assert raw.shape == (24, 3 * qtype.type_size)
    assert np.array_equal(qtype.pack(qtype.unpack(raw)), raw)
    fake = dequantize_torch(codes).numpy()
    assert np.array_equal(fake.view(np.uint32), qtype.dequantize(raw).view(np.uint32))
    assert not fake[0, :64].any()
    assert quantize_member(w, qtype, imp).index.tolist() == codes.index.tolist()
    if qtype.ext_bits:                # the extension bits are used: indices beyond the first 512
        assert (codes.index >= 512).any()


def test_searched_scales_beat_the_reference_quantizer():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 512, generator=g) * torch.rand(512, generator=g)        # uneven columns
    imp = (torch.rand(512, generator=g) ** 3).expand_as(w)                      # uneven importance
    ours = dequantize_torch(quantize_e8(w, imp))
    ref = torch.from_numpy(E8.dequantize(E8.quantize_ref(w.numpy())))
    assert weighted_error(w, ours, imp) < 0.8 * weighted_error(w, ref, imp)


def test_lattice_member_stores_weights_better_than_h0():
    """Same 2.5 bits per weight; gaussian weights and importance as real layers have."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(128, 576, generator=g)
    imp = (torch.rand(576, generator=g) + 0.1).expand_as(w)
    e8 = weighted_error(w, dequantize_torch(quantize_e8(w, imp)), imp)
    h0 = weighted_error(w, dequantize_torch(quantize_rtn(w, 0, imp)), imp)
    assert E8.bpw == get_type("HIQ2_H0").bpw
    assert e8 < 0.8 * h0, (e8, h0)


@pytest.mark.parametrize("qtype", E8_TYPES, ids=lambda t: t.name)
def test_gptq_e8_beats_rtn_on_layer_output_and_stays_on_the_grid(qtype):
    g = torch.Generator().manual_seed(6)
    W = torch.randn(64, 256, generator=g) * 0.05
    X = correlated_inputs(2048, 256, 6)
    gptq = GPTQ(256)
    for chunk in X.split(512):
        gptq.add_batch(chunk)
    codes = gptq.quantize_as(W, qtype)
    raw = qtype.pack(codes)                                     # raises if off the grid
    Wg = dequantize_torch(codes)
    assert np.array_equal(Wg.numpy().view(np.uint32), qtype.dequantize(raw).view(np.uint32))
    Wr = dequantize_torch(quantize_e8(W, qtype=qtype))
    Xt = correlated_inputs(1024, 256, 6, sample_seed=98)
    err_g = float(((Xt @ (Wg - W).T) ** 2).mean())
    err_r = float(((Xt @ (Wr - W).T) ** 2).mean())
    assert err_g < 0.8 * err_r, (err_g, err_r)


def test_larger_codebooks_store_weights_better():
    """Each step up the family (2.375, 2.5, 2.75, 3.0 bpw) lowers the weighted error:
    finer sub-scales a little, larger codebooks clearly."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 576, generator=g)
    imp = (torch.rand(576, generator=g) + 0.1).expand_as(w)
    family = sorted(E8_TYPES, key=lambda t: t.bpw)
    errs = [weighted_error(w, dequantize_torch(quantize_e8(w, imp, qtype=t)), imp) for t in family]
    assert [t.name for t in family] == ["HIQ2_E8_XS", "HIQ2_E8", "HIQ2_E8_2K", "HIQ2_E8_8K"]
    assert [t.bpw for t in family] == [2.375, 2.5, 2.75, 3.0]
    assert errs[1] < 0.97 * errs[0] and errs[2] < 0.8 * errs[1] and errs[3] < 0.8 * errs[2], errs


def test_codebooks_are_prefixes_and_the_layouts_fit():
    assert np.array_equal(e8_grid(8192)[:2048], e8_grid(2048)) and np.array_equal(e8_grid(2048)[:512], e8_grid(512))
    assert [t.type_size for t in E8_TYPES] == [20, 22, 24, 19] and [t.type_id for t in E8_TYPES] == [109, 110, 111, 112]
    for t in E8_TYPES:             # every bit pattern decodes (and packs back to itself)
        raw = np.random.default_rng(t.type_id).integers(0, 256, (5, 4 * t.type_size), dtype=np.uint8)
        assert np.array_equal(t.pack(t.unpack(raw)), raw)


@pytest.mark.parametrize("entries", [512, 2048])
def test_codebook_is_the_smallest_odd_vectors(entries):
    m = e8_grid(entries).astype(np.int64)
    assert m.shape == (entries, 8) and len({tuple(r) for r in m.tolist()}) == entries
    assert (m % 2 == 1).all() and m[0].tolist() == [1] * 8
    norms = (m ** 2).sum(-1)
    assert (norms[1:] >= norms[:-1]).all()
    taken = {tuple(r) for r in m.tolist()}
    smaller = [v for v in itertools.product([1, 3, 5, 7, 9], repeat=8)
               if sum(x * x for x in v) < norms[-1] and v not in taken]
    assert smaller == []                      # nothing left out is smaller than the largest taken
