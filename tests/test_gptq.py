"""GPTQ on the HIQ2 grid: lower layer-output error than RTN, output exactly on the grid."""

import numpy as np
import pytest
import torch

from hiq2gguf.formats import get_type
from hiq2gguf.gptq import GPTQ
from hiq2gguf.quantize import dequantize_torch, quantize_rtn


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
