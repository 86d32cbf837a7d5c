"""GPTQ on the HIQ2 grid: lower layer-output error than RTN, output exactly on the grid."""

import numpy as np
import pytest
import torch

from hiq2gguf.formats import get_type, high_group_flags
from hiq2gguf.gptq import GPTQ, GPTQConfig
from hiq2gguf.quantize import dequantize_torch, quantize_member, quantize_rtn, round_to_grid


def correlated_inputs(n, cols, seed, sample_seed=None):
    """Inputs with correlated channels of very different scales; ``seed`` fixes the law,
    ``sample_seed`` the draw."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 3 + 0.1      # some channels far larger
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    return (torch.randn(n, cols, generator=g) @ mix) * scale


@pytest.mark.parametrize("n_high", [0, 2])
def test_gptq_beats_rtn_on_layer_output(n_high):
    g = torch.Generator().manual_seed(10 + n_high)
    W = torch.randn(64, 256, generator=g) * 0.05
    X = correlated_inputs(2048, 256, n_high)
    gptq = GPTQ(256)
    for chunk in X.split(512):
        gptq.add_batch(chunk)
    codes = gptq.quantize(W, n_high)
    Wg = dequantize_torch(codes)
    Wr = dequantize_torch(quantize_rtn(W, n_high))
    Xt = correlated_inputs(1024, 256, n_high, sample_seed=99)   # held-out draw, same law
    err_g = ((Xt @ (Wg - W).T) ** 2).mean()
    err_r = ((Xt @ (Wr - W).T) ** 2).mean()
    assert err_g < 0.8 * err_r, (err_g, err_r)


def test_gptq_output_is_on_the_grid():
    t = get_type("HIQ2_H3")
    W = torch.randn(32, 192, generator=torch.Generator().manual_seed(5))
    gptq = GPTQ(192)
    gptq.add_batch(correlated_inputs(500, 192, 5))
    codes = gptq.quantize(W, 3, torch.rand(32, 192))
    raw = t.pack(codes)
    fake = dequantize_torch(codes).numpy()
    ref = t.dequantize(raw)
    assert np.array_equal(fake.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(t.pack(t.unpack(raw)), raw)


def test_hessian_is_running_mean_of_outer_products():
    X = torch.randn(300, 8, dtype=torch.float64)
    gptq = GPTQ(8)
    gptq.add_batch(X[:100])
    gptq.add_batch(X[100:])
    torch.testing.assert_close(gptq.H, 2 * X.T @ X / 300)


@pytest.mark.parametrize("name", ["HIQ2_H0", "HIQ2_H2", "HIQ2_E8"])
def test_activation_order_beats_the_natural_order(name):
    """GPTQ with activation order (columns of the H members, 64-column blocks of the
    lattice members) leaves less layer output error than in the natural order, on
    inputs whose channels differ in scale; its codes decode to the file's values."""
    t = get_type(name)
    g = torch.Generator().manual_seed(21)
    W = torch.randn(128, 512, generator=g) * 0.02
    X = correlated_inputs(4096, 512, 21)
    Xt = correlated_inputs(2048, 512, 21, sample_seed=99)
    imp = (X ** 2).mean(0).expand_as(W)
    errs = {}
    for act_order in (False, True):
        gptq = GPTQ(512, GPTQConfig(act_order=act_order))
        gptq.add_batch(X)
        codes = gptq.quantize_as(W, t, imp)
        fake = dequantize_torch(codes)
        assert np.array_equal(fake.numpy().view(np.uint32), t.dequantize(t.pack(codes)).view(np.uint32))
        errs[act_order] = float(((Xt @ (fake - W).T) ** 2).mean())
    assert errs[True] < 0.99 * errs[False], errs
    rtn = float(((Xt @ (dequantize_torch(quantize_member(W, t, imp)) - W).T) ** 2).mean())
    assert errs[True] < 0.8 * rtn, (errs, rtn)


def test_activation_order_rounds_every_column_once():
    """``rounded`` (what AdaRound continues from) holds each column as GPTQ's updates left it
    when it was rounded, in the original column order: its nearest levels are the codes."""
    g = torch.Generator().manual_seed(22)
    W = torch.randn(16, 256, generator=g) * 0.02
    gptq = GPTQ(256, GPTQConfig(act_order=True))
    gptq.add_batch(correlated_inputs(1000, 256, 22))
    codes = gptq.quantize(W, 2)
    d = torch.from_numpy(codes.d).to(torch.float32)
    z = torch.from_numpy(codes.z).to(torch.float32)
    w = gptq.rounded.reshape(16, 4, 64)
    high = torch.from_numpy(high_group_flags(codes.mask)).repeat_interleave(8, dim=-1)
    levels, _ = round_to_grid(w, high, d.to(torch.float16), z)
    assert torch.equal(levels, torch.from_numpy(codes.levels).to(levels.dtype))


def test_lattice_units_stay_bounded_under_a_massive_input():
    """One input channel 300x the others and one weight on it 800x the row's rms, seen in
    fewer calibration rows than columns (Qwen2.5's early ffn_down): unbounded, GPTQ's
    feedback and the lattice's searched units grow each other and the weights run away
    (the test checks that this case does that); with the default bound the result stays
    near RTN's weights and no worse than RTN on held-out inputs."""
    g = torch.Generator().manual_seed(5)
    cols = 1024
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5

    def inputs(n):
        x = torch.randn(n, cols, generator=g) @ mix
        x[:, 600] *= 300
        return x

    W = torch.randn(32, cols, generator=g) * 0.006
    W[0, 600] = 4.8
    X, Xt = inputs(512), inputs(4096)
    E8 = get_type("HIQ2_E8")

    def errors(Wq):
        E = Wq - W
        return float((E ** 2).sum() / (W ** 2).sum()), float(((Xt @ E.T) ** 2).sum() / ((Xt @ W.T) ** 2).sum())

    rtn = errors(dequantize_torch(quantize_member(W, E8)).reshape(W.shape))
    found = {}
    for growth in (GPTQConfig().unit_growth, float("inf")):
        gptq = GPTQ(cols, GPTQConfig(unit_growth=growth))
        gptq.add_batch(X)
        found[growth] = errors(dequantize_torch(gptq.quantize_as(W, E8)).reshape(W.shape))
    assert found[float("inf")][0] > 100 * rtn[0], (found, rtn)          # the runaway, unbounded
    bounded = found[GPTQConfig().unit_growth]
    assert bounded[0] < 2 * rtn[0] and bounded[1] < 1.02 * rtn[1], (bounded, rtn)
