"""tools/format_lab.py: candidate layouts for a next format (measured by weight_error --lab)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import format_lab  # noqa: E402
from format_lab import E8, LAYOUTS, Scalar, parse_layouts  # noqa: E402


def test_sizes_count_every_stored_bit():
    assert E8(16).block_bytes == 2 + 2 + 8 * 2 and E8(16).bpw == 2.5          # d, 4 sub-scales, 8 codes
    assert E8(32, mask=True).bpw == 2.5 and E8(16, entries=2048).bpw == 2.75
    assert Scalar(3, 32).block_bytes == 2 + 1 + 24 and Scalar(2, 16).bpw == 2.5
    assert parse_layouts("all") == list(LAYOUTS.values())
    with pytest.raises(ValueError, match="unknown e9"):
        parse_layouts("e8/16,e9")


def test_lattice_codes_beat_the_scalar_grid():
    """On heavy-tailed random weights the lattice codes at 2.5 bpw beat the 2-bit scalar grid at
    the same bpw (both with searched and refitted sub-block scales)."""
    rng = np.random.default_rng(1)
    w = torch.tensor(rng.standard_t(5, (16, 256)) * 0.02, dtype=torch.float32)
    imp = torch.tensor(np.exp(rng.standard_normal(256)), dtype=torch.float32)

    def err(q):
        return float((imp * (w - q) ** 2).sum() / (imp * w ** 2).sum())

    e8, sym = E8(16).quantize(w, imp), Scalar(2, 16).quantize(w, imp)
    assert err(e8) < 0.85 * err(sym) < 0.2


def test_stored_scales_are_4_bit_steps_of_an_fp16_maximum():
    s = torch.tensor([[0.0123, 0.0061, 0.0004, 0.0100]])
    q = format_lab.quantize_scales(s)
    d = torch.tensor(0.0123).to(torch.float16).to(torch.float32)
    steps = q / d * format_lab.SCALE_STEPS
    assert torch.equal(steps, steps.round()) and steps.tolist() == [[16.0, 8.0, 1.0, 13.0]]
