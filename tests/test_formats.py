"""The numpy reference of the HIQ2 family: layout, round trips, reference quantizer."""

import numpy as np
import pytest

from hiq2gguf.formats import (BLOCK, HIQ2_TYPES, Codes, FormatError, get_type, min_bpw, pack_tensor,
                              register_with_gguf)

TYPES = list(HIQ2_TYPES.values())


def random_codes(t, rows, nb, rng):
    mask = np.zeros((rows, nb), dtype=np.uint8)
    for r in range(rows):
        for b in range(nb):
            for g in rng.choice(8, t.n_high, replace=False):
                mask[r, b] |= 1 << g
    high = np.repeat(((mask[..., None] >> np.arange(8)) & 1).astype(bool), 8, axis=-1)
    levels = np.where(high, rng.integers(0, 16, (rows, nb, 64)), 5 * rng.integers(0, 4, (rows, nb, 64)))
    d = rng.uniform(0, 0.1, (rows, nb)).astype(np.float16)
    z = rng.integers(0, 256, (rows, nb)).astype(np.uint8)
    return Codes(d=d, z=z, mask=mask, levels=levels.astype(np.uint8))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_sizes_and_bpw(t):
    assert t.type_size == 20 + 2 * t.n_high
    assert t.bpw == pytest.approx(2.5 + 0.25 * t.n_high)
    assert t.block_size == BLOCK
    assert get_type(t.name) is t and get_type(t.type_id) is t


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_pack_unpack_identity(t):
    rng = np.random.default_rng(t.n_high)
    codes = random_codes(t, 3, 9, rng)
    raw = t.pack(codes)
    assert raw.shape == (3, 9 * t.type_size)
    back = t.unpack(raw)
    for f in ("d", "z", "mask", "levels"):
        np.testing.assert_array_equal(getattr(back, f), getattr(codes, f))
    assert np.array_equal(t.pack(back), raw)


def test_byte_layout_by_hand():
    """One block of HIQ2_H1 built byte by byte from FORMAT.md, decoded by the reference."""
    t = get_type("HIQ2_H1")
    blk = np.zeros(t.type_size, dtype=np.uint8)
    blk[0:2] = np.array([0.5], dtype="<f2").view(np.uint8)
    blk[2] = 32                   # z: zero point 2.0 (in units of d)
    blk[3] = 1 << 2               # group 2 (weights 16..23) is high
    blk[4 + 3] = 0b11 << 0        # weight 3: low code 3 -> level 15
    blk[4 + 1] |= 0b01 << 2       # weight 17 (byte 1, plane 1): low 2 bits = 1
    blk[20] = 0b10 << 2           # high group 0 (group 2), weight j=1 (=17): upper bits 2
    w = t.dequantize(blk[None])[0]
    expected = np.full(64, 0.5 * (0 - 2), dtype=np.float32)     # level 0 everywhere
    expected[3] = 0.5 * (15 - 2)
    expected[17] = 0.5 * ((1 | (2 << 2)) - 2)                   # level 9 in a high group
    np.testing.assert_array_equal(w, expected)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantize_ref_error_and_grid(t):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 576)).astype(np.float32)
    raw = t.quantize_ref(x)
    codes = t.unpack(raw)
    w = codes.dequantize()
    # every value lies on its block grid and within the block's error budget:
    # half a step (d for 2-bit groups: 2.5 d, for 4-bit: 0.5 d)
    d = codes.d.astype(np.float32).repeat(64, axis=1)
    high = np.repeat(((codes.mask[..., None] >> np.arange(8)) & 1).astype(bool), 8, axis=-1).reshape(4, -1)
    step = np.where(high, 0.5, 2.5) * d
    assert np.all(np.abs(w - x) <= step * (1 + 1e-5) + 1e-7)
    assert (((codes.mask[..., None] >> np.arange(8)) & 1).sum(-1) == t.n_high).all()


def test_more_high_groups_lower_error():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 1536)).astype(np.float32)
    errs = [np.mean((t.dequantize(t.quantize_ref(x)) - x) ** 2) for t in TYPES]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_quantize_ref_edge_blocks():
    t = get_type("HIQ2_H2")
    x = np.stack([np.zeros(128), np.full(128, 3.0), np.linspace(1, 2, 128), -np.linspace(1, 2, 128)]).astype(np.float32)
    w = t.dequantize(t.quantize_ref(x))
    np.testing.assert_array_equal(w[0], 0)
    np.testing.assert_allclose(w[1], 3.0, rtol=1e-3)
    # the grid always contains 0, so [1, 2] spans [0, 2]: half a 2-bit step is 2/15*2.5
    assert np.all(np.abs(w[2:] - x[2:]) <= 2 / 15 * 2.5 + 1e-3)


def test_shape_errors():
    t = get_type("HIQ2_H0")
    with pytest.raises(FormatError, match="multiple of 64"):
        t.quantize_ref(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(FormatError):
        t.unpack(np.zeros((1, 21), dtype=np.uint8))
    with pytest.raises(FormatError):
        get_type("Q4_0")
    assert min_bpw() == 2.375


@pytest.mark.parametrize("name", ["HIQ2_H0", "HIQ2_H3", "HIQ2_E8", "HIQ2_E8_8K", "HIQ2_E8_XS"])
def test_weights_beyond_a_float16_scale_are_not_written(name):
    """The reference quantizer's block scale of |w| = 1e7 overflows float16: ``pack``
    stores the inf as the C quantizer does (bytes unchanged through unpack), but a file's
    tensor (``pack_tensor``) refuses it, naming the tensor; 1e4 still fits."""
    t = get_type(name)
    x = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)
    x[1, 70] = 1e4
    codes = t.unpack(t.quantize_ref(x))
    assert np.array_equal(pack_tensor("w", t, codes), t.quantize_ref(x))
    assert np.isfinite(t.dequantize(t.quantize_ref(x))).all()
    x[1, 70] = 1e7
    with np.errstate(over="ignore"):
        raw = t.quantize_ref(x)
    assert np.array_equal(t.pack(t.unpack(raw)), raw) and np.isinf(t.unpack(raw).d).any()
    with pytest.raises(FormatError, match="^blk.0.w: .*too large for a float16 block scale"):
        pack_tensor("blk.0.w", t, t.unpack(raw))


def test_bad_mask_rejected():
    t = get_type("HIQ2_H1")
    raw = t.quantize_ref(np.ones((1, 64), dtype=np.float32))
    raw[0, 3] = 0b11  # two bits set for a one-high-group type
    with pytest.raises(FormatError):
        t.unpack(raw)


def test_gguf_write_read_roundtrip(tmp_path):
    import gguf

    register_with_gguf()
    t = get_type("HIQ2_H3")
    x = np.random.default_rng(3).standard_normal((6, 192)).astype(np.float32)
    raw = t.quantize_ref(x)
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType(t.type_id))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = gguf.GGUFReader(path)
    (tensor,) = r.tensors
    assert int(tensor.tensor_type) == t.type_id
    assert [int(v) for v in tensor.shape] == [192, 6]
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(raw.shape), raw)
