"""The C kernels of the patched llama.cpp against the numpy reference (hiq2gguf.formats).

Loads libggml-base / libggml-cpu of the built runtime with ctypes and checks,
for every type of ours (the H family and the E8 members) and for every build of libggml-cpu: the runtime's own
(-march=native; on an AVX-512 host its AVX-512 kernels) and the CPU variants
(runtime.CPU_VARIANTS: AVX2, and the portable C), which are built on first use
and run here when the CPU can execute them:
  * type traits (name, block size, type size) and CPU traits (vec_dot_type Q8_0);
  * dequantize (to_float) == formats.dequantize, bit for bit;
  * reference quantize (from_float_ref, CPU from_float, ggml_quantize_chunk)
    == formats.quantize_ref, byte for byte;
  * vec_dot against Q8_0 == float64 dequant(w) . dequant(q8_0(y)) within
    VEC_DOT_RTOL * sum |w_i y_i| (float32 accumulation over <= 24 blocks);
  * vec_dot's 2 x 2 tile and the GEMM of the llamafile_sgemm hook (every build has one
    for the H family; the E8 members have neither: one product per call, the hook declines them)
    within the same bound, and a mul_mat graph on the CPU backend;
  * ggml_validate_row_data accepts valid rows and rejects a bad mask popcount (H family),
    NaN / inf / negative scales;
  * the E8 codebook in ggml-base is formats.e8_grid(8192) (each member's is a prefix), and
    the committed header kernels/ggml/hiq2-e8grid.h is what gen_e8grid.py writes;
  * each library's kernels are its own (not interposed by another loaded build) and
    use the vector registers of its instruction set, no wider (objdump).
Skipped (with the reason) when the runtime is not built.
"""

from __future__ import annotations

import ctypes as C
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiq2gguf import runtime
from hiq2gguf.formats import ALL_TYPES, E8_TYPES, HIQ2_TYPES, HIQ2Type, e8_grid, e8_parity, get_type

GGML_TYPE_Q8_0 = 8
QK8_0 = 32
Q8_0_BYTES = 34
VEC_DOT_RTOL = 1e-5

TYPES = sorted(ALL_TYPES)            # ids 100..112: the H family and the E8 members
H_TYPES = sorted(HIQ2_TYPES)         # ids 100..108: what has a 2 x 2 tile, a GEMM and a mask
E8_IDS = [t.type_id for t in E8_TYPES]   # 109..112
COLS = [64, 576, 1536]


def _ref_rows(t, rows: int) -> int:
    """Rows of float test data for type t: the numpy reference quantizer searches the whole
    codebook per group, seconds per 1536-column row for HIQ2_E8_8K's 8192 entries, so that
    member gets one row (the C quantizer is fast; it is the reference that is slow)."""
    return 1 if getattr(t, "entries", 0) > 2048 else rows


@functools.cache
def _references(type_id: int, rows: int, cols: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (floats, formats' quantize_ref bytes) of _float_cases, computed once for every
    build of libggml-cpu under test (the ggml fixture's parameters)."""
    t = get_type(type_id)
    out = {}
    for name, x in _float_cases(_ref_rows(t, rows), cols, seed).items():
        with np.errstate(all="ignore"):
            out[name] = (x, t.quantize_ref(x))
    return out


# ---- ctypes bindings ---------------------------------------------------------------
class TypeTraits(C.Structure):       # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", C.c_char_p),
        ("blck_size", C.c_int64),
        ("blck_size_interleave", C.c_int64),
        ("type_size", C.c_size_t),
        ("is_quantized", C.c_bool),
        ("to_float", C.c_void_p),
        ("from_float_ref", C.c_void_p),
    ]


class TypeTraitsCpu(C.Structure):    # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [
        ("from_float", C.c_void_p),
        ("vec_dot", C.c_void_p),
        ("vec_dot_type", C.c_int),
        ("nrows", C.c_int64),
    ]


# void (*ggml_to_float_t)(const void * x, float * y, int64_t k)
TO_FLOAT = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)
# void (*ggml_from_float_t)(const float * x, void * y, int64_t k)
FROM_FLOAT = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p, C.c_int64)
# void (*ggml_vec_dot_t)(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc)
VEC_DOT = C.CFUNCTYPE(None, C.c_int, C.c_void_p, C.c_size_t, C.c_void_p, C.c_size_t, C.c_void_p, C.c_size_t, C.c_int)


class Ggml:
    """libggml-base of the runtime with its libggml-cpu, or with a CPU variant's (cpu_lib)."""

    def __init__(self, libdir: Path, cpu_lib: Path | None = None, variant: str = "native"):
        self.variant = variant
        self.base = C.CDLL(str(libdir / "libggml-base.so"), mode=C.RTLD_GLOBAL)
        # the runtime's libggml-cpu first in every case: a later load by soname (libllama)
        # must find it, not a variant
        self.cpu = C.CDLL(str(libdir / "libggml-cpu.so"), mode=C.RTLD_GLOBAL)
        self.cpu_path = libdir / "libggml-cpu.so"
        if cpu_lib is not None:
            # local, and DEEPBIND: the variant's references to its own functions (the type
            # traits table) bind to its own definitions, not to the runtime's global ones
            self.cpu = C.CDLL(str(cpu_lib), mode=os.RTLD_LOCAL | os.RTLD_DEEPBIND)
            self.cpu_path = cpu_lib
        self.base.ggml_get_type_traits.restype = C.POINTER(TypeTraits)
        self.base.ggml_get_type_traits.argtypes = [C.c_int]
        self.base.ggml_validate_row_data.restype = C.c_bool
        self.base.ggml_validate_row_data.argtypes = [C.c_int, C.c_void_p, C.c_size_t]
        self.base.ggml_quantize_chunk.restype = C.c_size_t
        self.base.ggml_quantize_chunk.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_int64,
                                                  C.c_int64, C.c_int64, C.c_void_p]
        self.cpu.ggml_get_type_traits_cpu.restype = C.POINTER(TypeTraitsCpu)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [C.c_int]
        self.cpu.ggml_cpu_init.restype = None
        self.cpu.ggml_cpu_init()

    def traits(self, type_id: int) -> TypeTraits:
        return self.base.ggml_get_type_traits(type_id).contents

    def traits_cpu(self, type_id: int) -> TypeTraitsCpu:
        return self.cpu.ggml_get_type_traits_cpu(type_id).contents

    # numpy-level helpers (row by row, as ggml calls them)
    def to_float(self, type_id: int, raw: np.ndarray, cols: int) -> np.ndarray:
        fn = TO_FLOAT(self.traits(type_id).to_float)
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        fn(raw.ctypes.data, out.ctypes.data, out.size)        # whole tensor in one call
        return out

    def _from_float(self, ptr: int, x: np.ndarray, nbytes_row: int) -> np.ndarray:
        fn = FROM_FLOAT(ptr)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], nbytes_row), dtype=np.uint8)
        for r in range(x.shape[0]):
            fn(x[r].ctypes.data, out[r].ctypes.data, x.shape[1])
        return out

    def quantize_ref(self, type_id: int, x: np.ndarray, nbytes_row: int) -> np.ndarray:
        return self._from_float(self.traits(type_id).from_float_ref, x, nbytes_row)

    def quantize_cpu(self, type_id: int, x: np.ndarray, nbytes_row: int) -> np.ndarray:
        return self._from_float(self.traits_cpu(type_id).from_float, x, nbytes_row)

    def quantize_chunk(self, type_id: int, x: np.ndarray, nbytes_row: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], nbytes_row), dtype=np.uint8)
        n = self.base.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0,
                                          x.shape[0], x.shape[1], None)
        assert n == out.size
        return out

    def q8_0(self, y: np.ndarray) -> np.ndarray:
        return self._from_float(self.traits_cpu(GGML_TYPE_Q8_0).from_float, y[None, :],
                                y.size // QK8_0 * Q8_0_BYTES)[0]

    def vec_dot(self, type_id: int, wrow: np.ndarray, q8: np.ndarray, n: int) -> float:
        fn = VEC_DOT(self.traits_cpu(type_id).vec_dot)
        s = np.zeros(1, dtype=np.float32)
        wrow = np.ascontiguousarray(wrow)
        q8 = np.ascontiguousarray(q8)
        fn(n, s.ctypes.data, 0, wrow.ctypes.data, 0, q8.ctypes.data, 0, 1)
        return float(s[0])

    def validate(self, type_id: int, raw: np.ndarray) -> bool:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        return bool(self.base.ggml_validate_row_data(type_id, raw.ctypes.data, raw.nbytes))


@pytest.fixture(scope="module", params=["native", *runtime.CPU_VARIANTS])
def ggml(request, runtime_lib, cpu_variant_lib_dir) -> Ggml:
    if request.param == "native":
        return Ggml(runtime_lib)
    return Ggml(runtime_lib, cpu_variant_lib_dir(request.param) / "libggml-cpu.so", request.param)


# ---- data --------------------------------------------------------------------------
def _float_cases(rows: int, cols: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    cases = {
        "normal": rng.standard_normal((rows, cols)).astype(f32),
        "weights": (rng.standard_normal((rows, cols)) * 0.02).astype(f32),
        "heavy_tail": (rng.standard_t(2.0, (rows, cols)) * 0.05).astype(f32),
        "outliers": (rng.standard_normal((rows, cols)) * 0.01).astype(f32),
        "zeros": np.zeros((rows, cols), f32),
        "neg_zeros": np.full((rows, cols), -0.0, f32),
        "constant_pos": np.full((rows, cols), 0.37, f32),
        "constant_neg": np.full((rows, cols), -1.25, f32),
        "all_positive": np.abs(rng.standard_normal((rows, cols))).astype(f32) + f32(0.1),
        "all_negative": -np.abs(rng.standard_normal((rows, cols))).astype(f32) - f32(0.1),
        "huge": (rng.standard_normal((rows, cols)) * 1e5).astype(f32),       # d near fp16 max
        "overflow": (rng.standard_normal((rows, cols)) * 1e7).astype(f32),   # d -> inf
        "small": (rng.standard_normal((rows, cols)) * 1e-5).astype(f32),     # fp16 subnormal d
        "tiny": (rng.standard_normal((rows, cols)) * 1e-9).astype(f32),      # d -> 0
        "f32_denormal": (rng.standard_normal((rows, cols)) * 1e-40).astype(f32),
        "integers": rng.integers(-8, 8, (rows, cols)).astype(f32),           # score ties, exact halves
        "halves": (rng.integers(-32, 32, (rows, cols)) * 0.5).astype(f32),
        "sparse": np.where(rng.random((rows, cols)) < 0.05,
                           rng.standard_normal((rows, cols)), 0).astype(f32),
    }
    cases["outliers"][:, rng.integers(0, cols, 3)] = f32(3.0)
    # real-ish weights with one huge value per row, and with whole blocks of zeros
    one_huge = (rng.standard_normal((rows, cols)) * 0.02).astype(f32)
    one_huge[np.arange(rows), rng.integers(0, cols, rows)] = f32(40.0)
    cases["one_huge"] = one_huge
    zero_blocks = (rng.standard_normal((rows, cols)) * 0.02).astype(f32)
    zero_blocks.reshape(rows, -1, 64)[:, ::2] = 0
    zero_blocks[0] = 0                                                   # and an all-zero row
    cases["zero_blocks"] = zero_blocks
    # blocks where one group alone is large and the rest identical (tie handling)
    t = np.full((rows, cols), 0.5, f32)
    t[:, 8:16] = 2.0
    cases["group_ties"] = t
    return cases


def _random_raw(t, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random blocks: any finite fp16 d (incl. subnormal/negative), any other bits; for the H
    family popcount(mask) = H (every bit pattern of an E8 member's scales, codes and
    extension bytes is valid)."""
    rng = np.random.default_rng(seed)
    nb = cols // 64
    raw = rng.integers(0, 256, (rows, nb, t.type_size), dtype=np.uint8)
    d = rng.standard_normal((rows, nb)).astype(np.float16) * np.float16(0.1)
    d[:, ::3] = (rng.integers(0, 1 << 10, (rows, (nb + 2) // 3)).astype(np.uint16)).view(np.float16)
    d[:, 1::5] = np.float16(65504)
    d = np.where(np.isfinite(d), d, np.float16(1.0)).astype(np.float16)
    raw[..., 0:2] = d.astype("<f2").view(np.uint8).reshape(rows, nb, 2)
    if not isinstance(t, HIQ2Type):
        return raw.reshape(rows, nb * t.type_size)
    masks = np.zeros((rows, nb), np.uint8)
    for r in range(rows):
        for b in range(nb):
            for g in rng.choice(8, t.n_high, replace=False):
                masks[r, b] |= np.uint8(1 << int(g))
    raw[..., 3] = masks
    return raw.reshape(rows, nb * t.type_size)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    ai, bi = a.view(np.uint32), b.view(np.uint32)
    if not np.array_equal(ai, bi):
        idx = np.argwhere(ai != bi)
        i = tuple(idx[0])
        raise AssertionError(f"{len(idx)} values differ; first at {i}: C={a[i]!r} ({ai[i]:#010x}) "
                             f"numpy={b[i]!r} ({bi[i]:#010x})")


def _bytes_equal(c: np.ndarray, ref: np.ndarray, t, what: str) -> None:
    assert c.shape == ref.shape
    if not np.array_equal(c, ref):
        r, col = np.argwhere(c != ref)[0]
        blk = col // t.type_size
        raise AssertionError(
            f"{what}: bytes differ (row {r}, block {blk}, byte {col % t.type_size}); "
            f"C={c[r, blk * t.type_size:(blk + 1) * t.type_size].tolist()} "
            f"numpy={ref[r, blk * t.type_size:(blk + 1) * t.type_size].tolist()}")


# ---- tests -------------------------------------------------------------------------
@pytest.mark.parametrize("type_id", TYPES)
def test_traits(ggml, type_id):
    t = get_type(type_id)
    tr = ggml.traits(type_id)
    assert tr.type_name.decode() == t.name.lower()
    assert tr.blck_size == t.block_size == 64
    assert tr.type_size == t.type_size
    assert tr.is_quantized
    assert tr.to_float and tr.from_float_ref
    cpu = ggml.traits_cpu(type_id)
    assert cpu.from_float and cpu.vec_dot
    assert cpu.vec_dot_type == GGML_TYPE_Q8_0
    # the E8 members' vec_dot computes one product per call
    assert cpu.nrows in ((1, 2) if type_id in HIQ2_TYPES else (1,))


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("type_id", TYPES)
def test_dequantize_random_blocks(ggml, type_id, cols):
    t = get_type(type_id)
    raw = _random_raw(t, 5, cols, seed=type_id * 1000 + cols)
    _bits_equal(ggml.to_float(type_id, raw, cols), t.dequantize(raw))


@pytest.mark.parametrize("cols", [576, 1536])
@pytest.mark.parametrize("type_id", TYPES)
def test_quantize_and_dequantize_match_numpy(ggml, type_id, cols):
    t = get_type(type_id)
    nbytes = t.row_bytes(cols)
    for name, (x, ref) in _references(type_id, 4, cols, type_id + cols).items():
        _bytes_equal(ggml.quantize_ref(type_id, x, nbytes), ref, t, f"{name}: from_float_ref")
        _bytes_equal(ggml.quantize_cpu(type_id, x, nbytes), ref, t, f"{name}: cpu from_float")
        _bytes_equal(ggml.quantize_chunk(type_id, x, nbytes), ref, t, f"{name}: ggml_quantize_chunk")
        with np.errstate(all="ignore"):
            deq = t.dequantize(ref)
        _bits_equal(ggml.to_float(type_id, ref, cols), deq)


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("type_id", TYPES)
def test_vec_dot_q8_0(ggml, type_id, cols):
    t = get_type(type_id)
    rng = np.random.default_rng(type_id * 7 + cols)
    cases = _references(type_id, 3, cols, cols)
    for name in ("normal", "weights", "heavy_tail", "outliers", "all_positive", "all_negative",
                 "zeros", "integers", "small"):
        w, raw = cases[name]
        wd = t.dequantize(raw).astype(np.float64)
        for r in range(w.shape[0]):
            y = (rng.standard_normal(cols) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
            q8 = ggml.q8_0(y)
            blocks = q8.reshape(-1, Q8_0_BYTES)
            dy = blocks[:, 0:2].copy().view("<f2").astype(np.float64)
            qy = blocks[:, 2:].view(np.int8).astype(np.float64)
            yd = (dy * qy).reshape(-1)
            terms = wd[r] * yd
            ref = terms.sum()
            got = ggml.vec_dot(type_id, raw[r], q8, cols)
            tol = VEC_DOT_RTOL * np.abs(terms).sum() + 1e-30
            assert abs(got - ref) <= tol, f"{name} row {r}: C={got!r} ref={ref!r} tol={tol:g}"


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("type_id", TYPES)
def test_vec_dot_random_blocks(ggml, type_id, cols):
    """Random blocks (every code, the largest |n| and d up to 65504) against float64."""
    t = get_type(type_id)
    raw = _random_raw(t, 4, cols, seed=type_id * 5 + cols)
    wd = t.dequantize(raw).astype(np.float64)
    q8, yd = _q8_columns(ggml, cols, 3, seed=type_id + 17 * cols)
    got = np.array([[ggml.vec_dot(type_id, raw[r], q8[c], cols) for c in range(3)] for r in range(4)])
    _check_products(got, wd, yd, "vec_dot, random blocks")


def _q8_columns(ggml, cols: int, ncols: int, seed: int):
    """ncols random activation columns as Q8_0 rows, and their exact float64 values."""
    rng = np.random.default_rng(seed)
    q8 = np.stack([ggml.q8_0((rng.standard_normal(cols) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32))
                   for _ in range(ncols)])
    blocks = q8.reshape(ncols, -1, Q8_0_BYTES)
    dy = blocks[..., 0:2].copy().view("<f2").astype(np.float64)
    qy = blocks[..., 2:].view(np.int8).astype(np.float64)
    return q8, (dy * qy).reshape(ncols, cols)


def _check_products(got: np.ndarray, wd: np.ndarray, yd: np.ndarray, what: str) -> None:
    ref = wd @ yd.T                                            # [rows, cols] float64
    tol = VEC_DOT_RTOL * (np.abs(wd) @ np.abs(yd).T) + 1e-30
    bad = np.argwhere(~(np.abs(got - ref) <= tol))
    assert bad.size == 0, f"{what}: {len(bad)} products off, first {tuple(bad[0])}: C={got[tuple(bad[0])]!r} ref={ref[tuple(bad[0])]!r}"


@pytest.mark.parametrize("cols", [576, 1536])
@pytest.mark.parametrize("type_id", H_TYPES)
def test_vec_dot_2x2_tile(ggml, type_id, cols):
    """nrc == 2 (ggml's 2 rows x 2 columns call, used when the traits say nrows == 2)."""
    t = get_type(type_id)
    raw = _random_raw(t, 2, cols, seed=type_id + 3 * cols)
    wd = t.dequantize(raw).astype(np.float64)
    q8, yd = _q8_columns(ggml, cols, 2, seed=cols + type_id)
    fn = VEC_DOT(ggml.traits_cpu(type_id).vec_dot)
    bs = 5                                                     # any output column stride
    s = np.full(bs + 2, np.nan, dtype=np.float32)
    fn(cols, s.ctypes.data, bs, raw.ctypes.data, raw.strides[0], q8.ctypes.data, q8.strides[0], 2)
    got = np.array([[s[0], s[bs]], [s[1], s[bs + 1]]], dtype=np.float64)
    assert np.isnan(s[2:bs]).all(), "wrote outside the 2 x 2 tile"
    _check_products(got, wd, yd, "2x2 tile")


def _sgemm_fn(ggml):
    fn = ggml.cpu.ggml_hiq2_sgemm
    fn.restype = C.c_bool
    fn.argtypes = [C.c_void_p, C.c_int, C.c_int, C.c_int64, C.c_int64, C.c_int64, C.c_void_p, C.c_int64,
                   C.c_void_p, C.c_int64, C.c_void_p, C.c_int64, C.c_int]
    return fn


@pytest.mark.parametrize("shape", [(7, 6, 576), (4, 9, 1536), (1, 3, 64)])
@pytest.mark.parametrize("type_id", H_TYPES)
def test_sgemm(ggml, type_id, shape):
    """ggml_hiq2_sgemm (llamafile_sgemm hook): every thread's static share, odd sizes, strided C."""
    m, n, cols = shape
    t = get_type(type_id)
    fn = _sgemm_fn(ggml)
    raw = _random_raw(t, m, cols, seed=type_id * 11 + cols)
    wd = t.dequantize(raw).astype(np.float64)
    q8, yd = _q8_columns(ggml, cols, n, seed=type_id + m)
    ldc = m + 3
    for nth in (1, 2, 3):
        out = np.full((n, ldc), np.nan, dtype=np.float32)
        for ith in range(nth):
            done = fn(None, ith, nth, m, n, cols // 64, raw.ctypes.data, raw.strides[0] // t.type_size,
                      q8.ctypes.data, q8.strides[0] // Q8_0_BYTES, out.ctypes.data, ldc, type_id)
            assert done, "the HIQ2 GEMM declined an HIQ2 x Q8_0 product"
        assert np.isnan(out[:, m:]).all(), "wrote outside C"
        _check_products(out[:, :m].T.astype(np.float64), wd, yd, f"sgemm nth={nth}")


@pytest.mark.parametrize("type_id", E8_IDS)
def test_sgemm_declines_e8(ggml, type_id):
    """The E8 members have no GEMM: the hook says no without writing, so ggml runs its vec_dot
    loop (test_graph_mul_mat_and_get_rows checks that path)."""
    t = get_type(type_id)
    m, n, cols = 4, 3, 576
    raw = _random_raw(t, m, cols, seed=3)
    q8, _ = _q8_columns(ggml, cols, n, seed=4)
    out = np.full((n, m), np.nan, dtype=np.float32)
    assert not _sgemm_fn(ggml)(None, 0, 1, m, n, cols // 64, raw.ctypes.data, raw.strides[0] // t.type_size,
                               q8.ctypes.data, q8.strides[0] // Q8_0_BYTES, out.ctypes.data, m, type_id)
    assert np.isnan(out).all()


def test_e8_codebook(ggml):
    """ggml-base's codebook and parities are the reference's largest (8192 entries), of which
    every member's codebook is a prefix."""
    entries = max(t.entries for t in E8_TYPES)
    ref = e8_grid(entries)
    grid = np.frombuffer(C.string_at(C.addressof(C.c_uint64.in_dll(ggml.base, "ggml_hiq2_e8_grid")), entries * 8),
                         np.uint8).reshape(entries, 8)
    parity = np.frombuffer(C.string_at(C.addressof(C.c_uint8.in_dll(ggml.base, "ggml_hiq2_e8_parity")), entries),
                           np.uint8)
    assert np.array_equal(grid, ref)
    assert np.array_equal(parity, e8_parity(ref))
    for t in E8_TYPES:
        assert np.array_equal(grid[:t.entries], t.grid), t.name
        assert t.ref_amax == int(t.grid.max()) - 1       # hiq2.h's HIQ2_E8_FOREACH column A
    # what the AVX2 vec_dot derives the parity from instead (odd magnitudes 1..9: the xor
    # of their bit 1), and its int16 pair sums: 2 * max magnitude * 128 must not saturate
    assert (ref % 2 == 1).all() and int(ref.max()) == 9
    assert np.array_equal(np.bitwise_xor.reduce((ref >> 1) & 1, axis=1), e8_parity(ref))
    assert 2 * int(ref.max()) * 128 < 32767


def test_e8_grid_header_is_generated():
    """kernels/ggml/hiq2-e8grid.h is what gen_e8grid.py writes from formats.e8_grid(8192) today."""
    gen = runtime.KERNELS_DIR / "gen_e8grid.py"
    r = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("type_id", TYPES)
def test_validate_row_data(ggml, type_id):
    t = get_type(type_id)
    x = np.random.default_rng(type_id).standard_normal((1, 576)).astype(np.float32)
    good = t.quantize_ref(x)[0]
    assert ggml.validate(type_id, good)

    if type_id in HIQ2_TYPES:
        bad = good.copy()                      # popcount(mask) != H in block 3
        off = 3 * t.type_size + 3
        bad[off] = np.uint8(0xFF) if t.n_high != 8 else np.uint8(0x7F)
        assert not ggml.validate(type_id, bad)
    else:
        # every bit pattern of an E8 member's scales, codes and extension bytes is valid,
        # and so is d = -0
        raw = _random_raw(t, 1, 576, seed=type_id)[0]
        raw.reshape(-1, t.type_size)[:, 0:2] = np.abs(raw.reshape(-1, t.type_size)[:, 0:2].copy().view("<f2")).view(np.uint8)
        assert ggml.validate(type_id, raw)
        raw[0:2] = np.array([-0.0], "<f2").view(np.uint8)
        assert ggml.validate(type_id, raw)

    for name, val in [("nan", np.nan), ("inf", np.inf), ("neg", -0.5), ("neg_inf", -np.inf),
                      ("neg_subnormal", -6e-8)]:
        bad = good.copy()                      # d of block 5
        bad[5 * t.type_size: 5 * t.type_size + 2] = np.array([val], "<f2").view(np.uint8)
        assert not ggml.validate(type_id, bad), name

    assert not ggml.validate(type_id, good[:-1])   # not a whole number of blocks


@pytest.mark.parametrize("type_id", H_TYPES)
def test_invalid_mask_is_consistent(ggml, type_id):
    """Data that fails validation (too many mask bits) must not crash or read past a block:
    to_float and vec_dot agree (groups beyond the H-th set bit decode as low groups)."""
    t = get_type(type_id)
    cols = 576
    raw = _random_raw(t, 2, cols, seed=type_id)
    raw.reshape(2, -1, t.type_size)[..., 3] = 0xFF
    w = ggml.to_float(type_id, raw, cols).astype(np.float64)
    assert np.isfinite(w).all()
    rng = np.random.default_rng(type_id)
    for r in range(2):
        q8 = ggml.q8_0(rng.standard_normal(cols).astype(np.float32))
        b = q8.reshape(-1, Q8_0_BYTES)
        yd = (b[:, 0:2].copy().view("<f2").astype(np.float64) * b[:, 2:].view(np.int8)).reshape(-1)
        terms = w[r] * yd
        got = ggml.vec_dot(type_id, raw[r], q8, cols)
        assert abs(got - terms.sum()) <= VEC_DOT_RTOL * np.abs(terms).sum() + 1e-30


# ---- through a ggml graph on the CPU backend (mul_mat threads + src1 -> Q8_0, get_rows) ----
class InitParams(C.Structure):       # struct ggml_init_params
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


def _graph_api(g: Ggml):
    b, cpu = g.base, g.cpu
    b.ggml_init.restype = C.c_void_p
    b.ggml_init.argtypes = [InitParams]
    b.ggml_free.argtypes = [C.c_void_p]
    b.ggml_new_tensor_2d.restype = C.c_void_p
    b.ggml_new_tensor_2d.argtypes = [C.c_void_p, C.c_int, C.c_int64, C.c_int64]
    b.ggml_new_tensor_1d.restype = C.c_void_p
    b.ggml_new_tensor_1d.argtypes = [C.c_void_p, C.c_int, C.c_int64]
    b.ggml_get_data.restype = C.c_void_p
    b.ggml_get_data.argtypes = [C.c_void_p]
    b.ggml_mul_mat.restype = C.c_void_p
    b.ggml_mul_mat.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p]
    b.ggml_get_rows.restype = C.c_void_p
    b.ggml_get_rows.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p]
    b.ggml_new_graph.restype = C.c_void_p
    b.ggml_new_graph.argtypes = [C.c_void_p]
    b.ggml_build_forward_expand.argtypes = [C.c_void_p, C.c_void_p]
    cpu.ggml_graph_compute_with_ctx.restype = C.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [C.c_void_p, C.c_void_p, C.c_int]
    return b, cpu


def _put(b, t, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    C.memmove(b.ggml_get_data(t), arr.ctypes.data, arr.nbytes)


def _get(b, t, shape, dtype=np.float32) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(C.string_at(b.ggml_get_data(t), n), dtype=dtype).reshape(shape).copy()


@pytest.mark.parametrize("type_id", [100, 102, 105, 108, *E8_IDS])
def test_graph_mul_mat_and_get_rows(ggml, type_id):
    t = get_type(type_id)
    K, M, N = 576, 40, 7
    rng = np.random.default_rng(type_id)
    w = (rng.standard_normal((M, K)) * 0.05).astype(np.float32)
    x = rng.standard_normal((N, K)).astype(np.float32)
    # ggml's quantizer (byte-identical to formats' quantize_ref, tested above; the numpy
    # one takes seconds for these 40 rows in the larger E8 members)
    raw = ggml.quantize_chunk(type_id, w, t.row_bytes(K))
    b, cpu = _graph_api(ggml)
    ctx = b.ggml_init(InitParams(64 << 20, None, False))
    assert ctx
    try:
        A = b.ggml_new_tensor_2d(ctx, type_id, K, M)
        B = b.ggml_new_tensor_2d(ctx, 0, K, N)              # GGML_TYPE_F32
        idx = b.ggml_new_tensor_1d(ctx, 26, 5)              # GGML_TYPE_I32
        _put(b, A, raw)
        _put(b, B, x)
        rows = np.array([0, 39, 7, 7, 20], dtype=np.int32)
        _put(b, idx, rows)
        Y = b.ggml_mul_mat(ctx, A, B)                       # [N, M]
        R = b.ggml_get_rows(ctx, A, idx)                    # [5, K] f32
        gf = b.ggml_new_graph(ctx)
        b.ggml_build_forward_expand(gf, Y)
        b.ggml_build_forward_expand(gf, R)
        assert cpu.ggml_graph_compute_with_ctx(ctx, gf, 2) == 0
        y = _get(b, Y, (N, M)).astype(np.float64)
        r = _get(b, R, (5, K))
    finally:
        b.ggml_free(ctx)

    wd = t.dequantize(raw)
    _bits_equal(r, wd[rows])
    xq = np.stack([ggml.q8_0(x[n]) for n in range(N)]).reshape(N, -1, Q8_0_BYTES)
    xd = (xq[..., 0:2].copy().view("<f2").astype(np.float64) * xq[..., 2:].view(np.int8)).reshape(N, K)
    terms_abs = np.abs(xd) @ np.abs(wd.astype(np.float64)).T
    ref = xd @ wd.astype(np.float64).T
    assert (np.abs(y - ref) <= VEC_DOT_RTOL * terms_abs + 1e-30).all()


# ---- which code runs: each library's own kernels, of its own instruction set ----------
class DlInfo(C.Structure):           # Dl_info (dlfcn.h)
    _fields_ = [("dli_fname", C.c_char_p), ("dli_fbase", C.c_void_p),
                ("dli_sname", C.c_char_p), ("dli_saddr", C.c_void_p)]


def _library_of(address: int) -> Path:
    libc = C.CDLL(None)
    libc.dladdr.restype = C.c_int
    libc.dladdr.argtypes = [C.c_void_p, C.POINTER(DlInfo)]
    info = DlInfo()
    assert libc.dladdr(address, C.byref(info)), f"no library holds address {address:#x}"
    return Path(info.dli_fname.decode()).resolve()


def test_kernels_are_the_librarys_own(ggml):
    """The CPU traits (what ggml's mul_mat calls) and the GEMM hook of the library under test
    point into that library: a CPU variant loaded beside the runtime's libggml-cpu (same
    symbol names) runs its own code, not the runtime's."""
    lib = ggml.cpu_path.resolve()
    for type_id in TYPES:
        cpu = ggml.traits_cpu(type_id)
        assert _library_of(cpu.vec_dot) == lib, type_id
        assert _library_of(cpu.from_float) == lib, type_id
    sgemm = C.cast(ggml.cpu.ggml_hiq2_sgemm, C.c_void_p).value
    assert _library_of(sgemm) == lib


VECTOR_BITS = {"xmm": 128, "ymm": 256, "zmm": 512}
# what -march=native must enable for the AVX-512 kernels (HIQ2_AVX512 in hiq2.h)
AVX512_KERNEL_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bitalg", "avx512_vnni",
                       "bmi2", "f16c"}


def _vector_registers(lib: Path) -> dict[str, set[str]]:
    """function name -> vector register classes (xmm/ymm/zmm) its machine code uses."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True,
                         text=True, check=True).stdout
    funcs: dict[str, set[str]] = {}
    regs: set[str] | None = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if m:
            regs = funcs.setdefault(m.group(1), set())
        elif regs is not None:
            regs.update(re.findall(r"%([xyz]mm)\d", line))
    return funcs


def _expected_vector_bits(variant: str) -> int | None:
    if variant in runtime.CPU_VARIANTS:
        return runtime.CPU_VARIANTS[variant].vector_width
    # native: known only where the host has everything the AVX-512 kernels need
    return 512 if AVX512_KERNEL_FLAGS <= runtime.host_cpu_flags() else None


def test_kernels_use_their_instruction_set(ggml):
    """Every member's vec_dot and the GEMM use vector registers exactly as wide as the
    build's instruction set: zmm in the AVX-512 build, ymm (no zmm) in the AVX2 variant,
    nothing wider than xmm (SSE2 baseline) in the portable build."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) not installed")
    expected = _expected_vector_bits(ggml.variant)
    if expected is None:
        pytest.skip("native build on a CPU without the AVX-512 kernels' features: width not known")
    funcs = _vector_registers(ggml.cpu_path)
    widest = {name: max((VECTOR_BITS[r] for r in regs), default=0) for name, regs in funcs.items()}
    for h in range(9):
        name = f"ggml_vec_dot_hiq2_h{h}_q8_0"
        assert widest.get(name) == expected, f"{name}: {sorted(funcs.get(name, ()))}, expected {expected} bits"
    # the E8 members' kernel is AVX2 at most (the AVX-512 build runs it too), inlined into
    # each member's vec_dot
    for t in E8_TYPES:
        name = f"ggml_vec_dot_{t.name.lower()}_q8_0"
        assert name in funcs and min(expected, 256) <= widest[name] <= expected, (name, sorted(funcs.get(name, ())))
    # the GEMM: ggml_hiq2_sgemm with its per-member kernels (static, inlined or not)
    gemm = [name for name in funcs if name == "ggml_hiq2_sgemm" or name.startswith("hiq2_gemm_h")]
    assert max(widest[name] for name in gemm) == expected, {name: sorted(funcs[name]) for name in gemm}
    if ggml.variant in runtime.CPU_VARIANTS:
        # nothing in the whole variant library is wider than its instruction set
        over = sorted(name for name, bits in widest.items() if bits > expected)
        assert not over, f"{len(over)} functions use wider registers, e.g. {over[:5]}"
