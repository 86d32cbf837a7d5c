"""Triton kernels (kernels/triton) against the numpy reference, in the Triton
interpreter on the CPU (``TRITON_INTERPRET=1``, set before triton is imported).

Dequantization must reproduce the reference float32 bits. The matmuls sum in
a different order than torch, so they are held to the float32 rounding bound
of a K-term dot product: |y - y_ref| <= 2 K u (|x| @ |W|^T), u = 2^-24 (each of
the two results is within K u of the exact sum), plus a float64 check.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from hiq2gguf import evaluate, quantize  # noqa: E402
from hiq2gguf.formats import (ALL_TYPES, E8, E8_2K, E8_8K, E8_LOW_BITS,  # noqa: E402
                              E8_TYPES, FIRST_TYPE_ID, N_GROUPS, E8Type, FormatError, HIQ2Type,
                              e8_grid, e8_parity, get_type)
from hiq2gguf.writer import PackedTensor  # noqa: E402
from kernels.triton import dequantize, gemm, gemv, matmul  # noqa: E402
from kernels.triton.hiq2 import e8_table  # noqa: E402

TYPES = list(ALL_TYPES.values())          # HIQ2_H0..H8 and HIQ2_E8, _2K, _8K
U32 = 2.0 ** -24


def member(n_high: int) -> HIQ2Type:
    return get_type(FIRST_TYPE_ID + n_high)


def random_raw(t, rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Valid bytes of type ``t`` with every field random and finite fp16 scales of
    every magnitude (zero, subnormal, normal up to 65504; signed, which the formula
    allows). H members: any code bits, a random mask of popcount H, any zero point.
    HIQ2_E8*: every bit pattern of sub-scales, codes and ext bytes is valid; the last
    block reaches the largest |integer| (q = 16 and in every group the first entry with
    the codebook's largest magnitude, 5, 7, 9; every stored sign negative)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, n_blocks, t.type_size), dtype=np.uint8)
    bits = rng.integers(0, 1 << 16, size=(rows, n_blocks), dtype=np.uint32).astype(np.uint16)
    d = bits.view(np.float16)
    d = np.where(np.isfinite(d), d, np.float16(1.5))            # no inf/nan scales
    d.flat[0] = 0.0
    if d.size > 1:
        d.flat[1] = np.float16(6e-8)                            # smallest subnormal
    if d.size > 2:
        d.flat[2] = np.float16(65504)                           # largest finite
    blocks[..., 0:2] = d.astype("<f2").view(np.uint8).reshape(rows, n_blocks, 2)
    if isinstance(t, E8Type):
        e = int(np.flatnonzero(t.grid.max(1) == t.grid.max())[0])
        blocks[-1, -1, 2:t.codes_at] = 0xFF
        code = (e & 511) | (0x7F << 9)               # weight 7 by the rule: negative unless parity odd
        blocks[-1, -1, t.codes_at:t.base_bytes] = np.array([code] * N_GROUPS, dtype="<u2").view(np.uint8)
        set_ext(blocks[-1, -1], t, range(N_GROUPS), e >> E8_LOW_BITS)
        return blocks.reshape(rows, n_blocks * t.type_size)
    masks = np.zeros((rows, n_blocks), dtype=np.uint8)
    for idx in np.ndindex(rows, n_blocks):
        for g in rng.permutation(N_GROUPS)[:t.n_high]:
            masks[idx] |= np.uint8(1 << g)
    blocks[..., 3] = masks
    blocks[0, 0, 2] = 255                                       # extreme zero points
    if n_blocks > 1:
        blocks[0, 1, 2] = 0
    return blocks.reshape(rows, n_blocks * t.type_size)


def ext_int(block: np.ndarray, t: E8Type) -> int:
    """The little-endian integer of a block's ext bytes (FORMAT.md)."""
    return int.from_bytes(block[t.base_bytes:t.type_size].tobytes(), "little")


def set_ext(block: np.ndarray, t: E8Type, groups, upper: int) -> None:
    """Store ``upper`` as the index bits above the 9th of ``groups`` of one block."""
    if not t.ext_bits:
        return
    v = ext_int(block, t)
    for g in groups:
        v = v & ~(((1 << t.ext_bits) - 1) << (t.ext_bits * g)) | upper << (t.ext_bits * g)
    block[t.base_bytes:t.type_size] = np.frombuffer(v.to_bytes(t.type_size - t.base_bytes, "little"),
                                                    np.uint8)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(
        a.view(np.uint32), b.view(np.uint32))


def assert_dot_close(y: torch.Tensor, x: torch.Tensor, w_ref: np.ndarray):
    """y (from the kernel) against torch's float32 matmul of the reference weights,
    within the rounding bound of the module docstring, and against float64."""
    w = torch.from_numpy(w_ref)
    k = w.shape[1]
    y32 = x.float() @ w.T
    y64 = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert y.shape == y32.shape
    assert torch.all((y.double() - y32.double()).abs() <= 2 * k * U32 * scale)
    assert torch.all((y.double() - y64).abs() <= k * U32 * scale)


# ---- dequantize -----------------------------------------------------------
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,n_blocks", [(1, 1), (7, 3), (5, 9)])
def test_dequantize_bit_exact_random_bytes(t, rows, n_blocks):
    """Odd block and row counts; 21 and 45 blocks also leave partial programs."""
    raw = random_raw(t, rows, n_blocks, seed=100 * t.type_id + rows)
    w = dequantize(torch.from_numpy(raw), t).numpy()
    assert same_bits(w, t.dequantize(raw))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_quantized_weights(t):
    """Bytes from the reference quantizer (real code statistics, an all-zero block)."""
    x = np.random.default_rng(t.type_id).standard_normal((6, 320)).astype(np.float32) * 0.05
    x[0, :64] = 0
    x[1, 70] = 3.0
    raw = t.quantize_ref(x)
    assert same_bits(dequantize(torch.from_numpy(raw), t, blocks_per_program=4).numpy(),
                     t.dequantize(raw))


def fp16_bytes(v: float) -> np.ndarray:
    return np.array([v], dtype="<f2").view(np.uint8)


def test_dequantize_reads_every_field():
    """Flipping a bit of d, z, ql or qh, or moving a high group, changes the weights
    (and they still match the reference)."""
    t = member(3)
    raw = random_raw(t, 1, 1, seed=5)
    raw[0, 0:2] = fp16_bytes(0.5)
    raw[0, 3] = 0b00010110
    base = dequantize(torch.from_numpy(raw), t).numpy()
    for byte, bit in ((1, 1), (2, 1), (3, 0b00000011), (4, 1), (19, 128), (20, 1), (25, 64)):
        flipped = raw.copy()
        flipped[0, byte] ^= bit
        got = dequantize(torch.from_numpy(flipped), t).numpy()
        assert same_bits(got, t.dequantize(flipped))
        assert not np.array_equal(got, base), f"byte {byte} ignored"


def test_e8_table_is_the_codebook():
    """The kernels' packed table decodes to formats' 8192-entry codebook and its
    parities, and every member's codebook is a prefix of it (one table serves all)."""
    table = e8_table().astype(np.int64)
    grid = 2 * ((table[:, None] >> (3 * np.arange(8))) & 7) + 1
    assert np.array_equal(grid, e8_grid(8192))
    assert np.array_equal((table >> 24) & 1, e8_parity(e8_grid(8192)))
    assert not (table >> 25).any()
    for t in E8_TYPES:
        assert t.entries <= len(table) and np.array_equal(grid[:t.entries], t.grid)


@pytest.mark.parametrize("t", E8_TYPES, ids=lambda t: t.name)
def test_e8_dequantize_reads_every_field(t):
    """HIQ2_E8*: every bit of d, each sub-scale nibble, index (low 9 in the code and
    every ext bit of every group) and stored sign bits changes the weights it should
    (and only those), matching the reference; a stored sign or an index of the other
    parity also flips weight 7 of the group. All flips in one launch, one per row."""
    raw = random_raw(t, 1, 1, seed=7 + t.type_id)
    raw[0, 0:2] = fp16_bytes(0.5)
    grid, parity = t.grid, e8_parity(t.grid)
    code = raw[0, t.codes_at:t.base_bytes].view("<u2")
    upper = [(ext_int(raw[0], t) >> (t.ext_bits * g)) & ((1 << t.ext_bits) - 1) for g in range(N_GROUPS)]
    index = [int(code[g]) & 511 | upper[g] << E8_LOW_BITS for g in range(N_GROUPS)]

    def index_moves(g, bit):                                    # index bit flipped in group g
        e, other = index[g], index[g] ^ (1 << bit)
        moved = {8 * g + j for j in range(8) if grid[other, j] != grid[e, j]}
        return moved | ({8 * g + 7} if parity[other] != parity[e] else set())

    flips = [(1, 1, set(range(64)))]                            # (byte, bit mask, weights moved): d
    for k in range(t.n_sub):                                    # sub-scale k: its 16 or 32 weights
        flips.append((2 + k // 2, 1 << (4 * (k % 2)), set(range(t.sub * k, t.sub * (k + 1)))))
    g, c = 5, t.codes_at
    for j in range(7):                                          # stored sign j: weights j and 7
        flips.append((c + 2 * g + (9 + j) // 8, 1 << ((9 + j) % 8), {8 * g + j, 8 * g + 7}))
    for bit in range(E8_LOW_BITS):                              # low index bits: magnitudes (+ sign 7)
        flips.append((c + 2 * g + bit // 8, 1 << (bit % 8), index_moves(g, bit)))
    for h in range(N_GROUPS):                                   # ext bit k of group h: index bit 9 + k
        for k in range(t.ext_bits):
            pos = t.ext_bits * h + k
            flips.append((t.base_bytes + pos // 8, 1 << (pos % 8), index_moves(h, E8_LOW_BITS + k)))
    assert len(flips) == 17 + t.n_sub + 8 * t.ext_bits

    rows = np.repeat(raw, len(flips) + 1, axis=0)               # row 0 unchanged
    for r, (byte, bit, _) in enumerate(flips, 1):
        rows[r, byte] ^= bit
    got = dequantize(torch.from_numpy(rows), t).numpy()
    assert same_bits(got, t.dequantize(rows))
    for r, (byte, bit, moved) in enumerate(flips, 1):
        assert moved and set(np.flatnonzero(got[r] != got[0]).tolist()) == moved, (byte, bit)


# ---- matmul ---------------------------------------------------------------
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_gemv_matches_torch(t):
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(t.type_id)) * 0.1
    raw = t.quantize_ref(np.random.default_rng(t.type_id).standard_normal((37, 192)).astype(np.float32))
    for rows in (1, 3):
        y = gemv(x[:rows], torch.from_numpy(raw), t, block_n=16)
        assert_dot_close(y, x[:rows], t.dequantize(raw))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_gemm_matches_torch(t):
    """20 x 192 activations, 24 output rows: partial tiles in both directions."""
    x = torch.randn(20, 192, generator=torch.Generator().manual_seed(t.type_id))
    raw = random_raw(t, 24, 3, seed=t.type_id)
    for b in range(3):   # comparable scales, so that no block hides below the others' rounding
        raw[:, b * t.type_size:b * t.type_size + 2] = fp16_bytes(0.01 * (b + 1))
    y = gemm(x, torch.from_numpy(raw), t, block_m=16, block_n=16)
    assert_dot_close(y, x, t.dequantize(raw))


@pytest.mark.parametrize("t", [member(2), E8, E8_8K], ids=lambda t: t.name)
def test_matmul_batched_shapes_and_both_paths(t):
    raw = t.quantize_ref(np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32))
    w = t.dequantize(raw)
    g = torch.Generator().manual_seed(2)
    for shape in ((128,), (1, 1, 128), (2, 5, 128)):     # 1 and 10 rows: GEMV and GEMM
        x = torch.randn(*shape, generator=g)
        y = matmul(x, torch.from_numpy(raw), t)
        assert y.shape == shape[:-1] + (16,)
        assert_dot_close(y.reshape(-1, 16), x.reshape(-1, 128), w)


# gemm with bfloat16 is left out: the interpreter's tl.dot reads bfloat16 operands
# as raw bits (a bare 16x16 bfloat16 tl.dot is off by ~1e10 there), so only a GPU can test it
@pytest.mark.parametrize("t", [member(5), E8, E8_8K], ids=lambda t: t.name)
@pytest.mark.parametrize("kernel,dtype", [("gemv", torch.float16), ("gemm", torch.float16),
                                          ("gemv", torch.bfloat16)])
def test_half_activations(t, kernel, dtype):
    """16-bit activations: gemv multiplies the exact float32 weights, gemm rounds them
    to the activations' dtype; both sum in float32 and round once to that dtype."""
    raw = t.quantize_ref(np.random.default_rng(3).standard_normal((16, 128)).astype(np.float32))
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    w = torch.from_numpy(t.dequantize(raw))
    if kernel == "gemv":
        y = gemv(x, torch.from_numpy(raw), t, block_n=16)
    else:
        y = gemm(x, torch.from_numpy(raw), t, block_m=16, block_n=16)
        w = w.to(dtype).float()
    assert y.dtype == dtype
    ref = x.float() @ w.T
    scale = x.float().abs() @ w.abs().T
    # the final rounding to dtype: one ulp, since the interpreter converts float32 to
    # bfloat16 by truncation (compiled code rounds to nearest, half an ulp)
    ulp = torch.finfo(dtype).eps
    assert torch.all((y.float() - ref).abs() <= ulp * ref.abs() + 2 * 128 * U32 * scale + 1e-6)


@pytest.mark.parametrize("t", [member(1), E8, E8_2K], ids=lambda t: t.name)
def test_bad_input_is_refused_clearly(t):
    raw = torch.from_numpy(t.quantize_ref(np.ones((2, 128), np.float32)))
    with pytest.raises(FormatError, match="whole number"):
        dequantize(raw[:, :-1].contiguous(), t)
    with pytest.raises(FormatError, match="uint8"):
        dequantize(raw.to(torch.int16), t)
    with pytest.raises(FormatError, match="contiguous"):
        dequantize(raw[:, :t.type_size], t)
    with pytest.raises(ValueError, match="128 columns"):
        gemv(torch.ones(1, 64), raw, t)
    with pytest.raises(ValueError, match="128 columns"):
        gemm(torch.ones(20, 192), raw, t)
    with pytest.raises(ValueError, match="128 columns"):
        matmul(torch.ones(64), raw, t)


def test_type_is_a_formats_type_object():
    """The member is a type object of hiq2gguf.formats, never a bare number: an H
    member's n_high (the old argument) and ids are refused, not reinterpreted."""
    raw = torch.from_numpy(member(1).quantize_ref(np.ones((2, 64), np.float32)))
    for bad in (1, 9, FIRST_TYPE_ID + 1, "HIQ2_H1", HIQ2Type(9)):
        with pytest.raises(FormatError, match="not an HIQ2 type"):
            dequantize(raw, bad)
        with pytest.raises(FormatError, match="not an HIQ2 type"):
            matmul(torch.ones(1, 64), raw, bad)
    # HIQ2_E8, _2K, _8K blocks are 20, 22, 24 bytes like HIQ2_H0, H1, H2's: the type,
    # not the size, picks the decode
    for h, t in zip(range(3), E8_TYPES):
        same = random_raw(member(h), 2, 1, seed=h)
        hw = dequantize(torch.from_numpy(same), member(h)).numpy()
        ew = dequantize(torch.from_numpy(same), t).numpy()
        assert same_bits(hw, member(h).dequantize(same)) and same_bits(ew, t.dequantize(same))
        assert not np.array_equal(hw, ew)


# ---- the PyTorch dispatch ---------------------------------------------------
def test_dequantize_packed_cpu_path_is_unchanged_and_exact():
    """On CPU tensors the dispatch never reaches Triton: numpy unpack + dequantize_torch."""
    t = member(4)
    raw = random_raw(t, 3, 2, seed=9)
    assert not quantize.use_triton(torch.from_numpy(raw))
    ref = quantize.dequantize_torch(t.unpack(raw)).numpy()
    assert same_bits(quantize.dequantize_packed(torch.from_numpy(raw), t).numpy(), ref)
    assert same_bits(ref, t.dequantize(raw))


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route the GPU branch of the dispatch to the interpreted kernels on CPU tensors
    (the only difference left from a GPU run is the ``is_cuda`` test)."""
    calls = []

    def use(t):
        calls.append(t.shape)
        return True

    monkeypatch.setattr(quantize, "use_triton", use)
    from hiq2gguf import packed_linear
    monkeypatch.setattr(packed_linear, "use_triton", use)
    return calls


@pytest.mark.parametrize("t", [member(6), E8, E8_2K], ids=lambda t: t.name)
def test_dequantize_packed_triton_branch(triton_on_cpu, t):
    raw = random_raw(t, 4, 3, seed=11)
    assert same_bits(quantize.dequantize_packed(torch.from_numpy(raw), t).numpy(), t.dequantize(raw))
    assert triton_on_cpu


def test_packed_model_matches_fake_quantized_model(triton_on_cpu):
    """A tiny llama with HIQ2Linear layers (Triton path) gives the logits of the same
    model with fake-quantized float weights, for one token (GEMV) and a window (GEMM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hiq2gguf.packed_linear import HIQ2Linear, use_packed_linears

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    packed = {}
    members = list(E8_TYPES) + [member(h) for h in (0, 3, 5, 8)]   # one per linear
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            qt = members[len(packed)]
            raw = qt.quantize_ref(p.detach().numpy())
            packed[name] = PackedTensor(qtype=qt, raw=raw, shape=tuple(p.shape))
            p.data.copy_(torch.from_numpy(qt.dequantize(raw)))        # the fake-quantized model
    assert len(packed) == 7
    ids = torch.tensor([[3, 17, 40, 5, 9, 60, 2, 33, 8, 21]])
    with torch.no_grad():
        ref_window = model(input_ids=ids).logits
        ref_token = model(input_ids=ids[:, :1]).logits
        ref_ppl = evaluate.ppl_torch(model, [ids[0].tolist()], progress=False)
        use_packed_linears(model, packed)
        assert sum(isinstance(m, HIQ2Linear) for m in model.modules()) == 7
        n_calls = len(triton_on_cpu)
        got_window = model(input_ids=ids).logits
        got_token = model(input_ids=ids[:, :1]).logits
        got_ppl = evaluate.ppl_torch(model, [ids[0].tolist()], progress=False)
    assert len(triton_on_cpu) == n_calls + 21                 # every layer took the Triton branch
    torch.testing.assert_close(got_window, ref_window, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_token, ref_token, rtol=1e-4, atol=1e-5)
    assert got_ppl.n_tokens == ref_ppl.n_tokens == 4
    assert abs(got_ppl.ppl - ref_ppl.ppl) <= 1e-4 * ref_ppl.ppl


def test_hiq2linear_cpu_fallback_equals_linear():
    """Without the GPU branch: F.linear on the reference weights, bias included (same
    values; not asserted bit for bit: BLAS may sum differently for other buffers)."""
    from hiq2gguf.packed_linear import HIQ2Linear

    t = member(7)
    raw = random_raw(t, 12, 2, seed=13)
    bias = torch.randn(12)
    layer = HIQ2Linear(torch.from_numpy(raw), t, (12, 128), bias)
    x = torch.randn(3, 128)
    w = torch.from_numpy(t.dequantize(raw))
    expected = torch.nn.functional.linear(x, w, bias)
    scale = x.abs() @ w.abs().T + bias.abs()
    assert torch.all((layer(x) - expected).abs() <= 2 * 129 * U32 * scale)
    with pytest.raises(ValueError, match="do not hold"):
        HIQ2Linear(torch.from_numpy(raw), t, (12, 192))
