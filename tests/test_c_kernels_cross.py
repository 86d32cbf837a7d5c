"""The HIQ2 CPU kernels compiled for AArch64 (their NEON code) and run under qemu-user,
against the numpy reference (hiq2gguf.formats).

ctypes cannot load an AArch64 library into this process, so tests/c/hiq2_cpu_check.c
is compiled with kernels/ggml/hiq2.c and hiq2-cpu.c (against the runtime's patched
llama.cpp headers) into a static AArch64 program, run under qemu-aarch64-static; it
prints dequantize, vec_dot (1 x 1 and the nrc == 2 tile) and the GEMM
(ggml_hiq2_sgemm, 1 to 3 threads' static shares; for the E8 members dequantize and vec_dot,
and it checks that the GEMM declines) for random blocks and Q8_0 activations. The same program built for this machine with the compiler's default
flags (x86-64: the portable code) checks the program itself, and the AArch64 build
must give its bits exactly. Needs Debian's gcc-aarch64-linux-gnu and
qemu-user-static for the AArch64 part (skipped without them).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hiq2gguf import runtime
from hiq2gguf.formats import ALL_TYPES, HIQ2_TYPES, get_type
from tests.test_c_kernels import Q8_0_BYTES, _bits_equal, _check_products, _random_raw

HARNESS = Path(__file__).resolve().parent / "c" / "hiq2_cpu_check.c"
TYPES = sorted(ALL_TYPES)            # the H family and the E8 members


@dataclass(frozen=True)
class Target:
    name: str
    cc: str
    flags: tuple[str, ...]
    runner: tuple[str, ...]          # prefix that runs a program of this target here


TARGETS = [
    # the build machine's compiler and default ISA: the portable code, and a check of the program
    Target("host", "cc", (), ()),
    # AArch64 base ISA (NEON, no dot-product extension)
    Target("aarch64", "aarch64-linux-gnu-gcc", ("-march=armv8-a",),
           ("qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu")),
]


def _build(t: Target, tmp_path_factory) -> Path:
    missing = [exe for exe in (t.cc, *t.runner[:1]) if shutil.which(exe) is None]
    if missing:
        pytest.skip(f"{t.name}: {', '.join(missing)} not installed (Debian: gcc-aarch64-linux-gnu, qemu-user-static)")
    root = runtime.source_dir()
    exe = tmp_path_factory.mktemp(f"hiq2-{t.name}") / "hiq2_cpu_check"
    k = runtime.KERNELS_DIR
    cmd = [t.cc, *t.flags, "-O2", "-std=gnu11", "-ffp-contract=off", "-static",
           f"-I{k}", f"-I{root / 'ggml' / 'include'}", f"-I{root / 'ggml' / 'src'}",
           f"-I{root / 'ggml' / 'src' / 'ggml-cpu'}",
           str(HARNESS), str(k / "hiq2.c"), str(k / "hiq2-cpu.c"), "-o", str(exe), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, " ".join(cmd) + "\n" + r.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def programs(runtime_lib, tmp_path_factory):
    """target name -> the check program built for it (built on first use)."""
    built: dict[str, Path] = {}

    def get(t: Target) -> Path:
        if t.name not in built:
            built[t.name] = _build(t, tmp_path_factory)
        return built[t.name]

    return get


def _run(t: Target, exe: Path, type_id: int, shape, seed: int):
    """(stdout floats, W blocks, Q8_0 activations) for random inputs of one shape."""
    rows, cols, K = shape
    t_ = get_type(type_id)
    raw = _random_raw(t_, rows, K, seed=seed)
    rng = np.random.default_rng(seed + 1)
    y = rng.standard_normal((cols, K)) * rng.choice([1e-3, 1.0, 50.0], (cols, 1))
    q8 = _q8_0(y)
    stdin = np.array([type_id, K, rows, cols], "<i4").tobytes() + raw.tobytes() + q8.tobytes()
    r = subprocess.run([*t.runner, str(exe)], input=stdin, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    return np.frombuffer(r.stdout, np.float32), raw, q8


def _q8_0(y: np.ndarray) -> np.ndarray:
    """Rows of floats as Q8_0 blocks (any valid blocks do: the reference reads them back)."""
    b = y.reshape(y.shape[0], -1, 32).astype(np.float32)
    d = (np.abs(b).max(axis=2) / 127).astype(np.float16)
    inv = np.where(d > 0, 1 / np.maximum(d.astype(np.float32), 1e-30), 0)
    q = np.clip(np.round(b * inv[..., None]), -127, 127).astype(np.int8)
    out = np.empty((b.shape[0], b.shape[1], Q8_0_BYTES), np.uint8)
    out[..., 0:2] = d.astype("<f2").view(np.uint8).reshape(b.shape[0], b.shape[1], 2)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(y.shape[0], -1)


def _q8_0_values(q8: np.ndarray, cols: int) -> np.ndarray:
    b = q8.reshape(q8.shape[0], -1, Q8_0_BYTES)
    dy = b[..., 0:2].copy().view("<f2").astype(np.float64)
    return (dy * b[..., 2:].view(np.int8)).reshape(q8.shape[0], cols)


SHAPES = [(6, 4, 576), (5, 7, 1536), (1, 1, 64)]      # rows, columns, K


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("type_id", TYPES)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_kernels_against_numpy(programs, target, type_id, shape):
    rows, cols, K = shape
    t = get_type(type_id)
    out, raw, q8 = _run(target, programs(target), type_id, shape, seed=type_id * 13 + K + rows)
    # vec_dot, then (H family) the 2 x 2 tiles and three GEMM splits
    n_products = 5 if type_id in HIQ2_TYPES else 1
    assert out.size == rows * K + n_products * rows * cols
    _bits_equal(out[:rows * K].reshape(rows, K), t.dequantize(raw))

    wd = t.dequantize(raw).astype(np.float64)
    yd = _q8_0_values(q8, K)
    products = out[rows * K:].reshape(n_products, cols, rows).transpose(0, 2, 1).astype(np.float64)
    _check_products(products[0], wd, yd, f"{target.name} vec_dot")
    if n_products == 1:
        return
    # one kernel for all of them: the 2 x 2 tiles and every thread split give vec_dot's bits
    er, ec = rows // 2 * 2, cols // 2 * 2
    assert np.array_equal(products[1][:er, :ec], products[0][:er, :ec]), f"{target.name}: 2x2 tiles"
    for i, nth in ((2, 1), (3, 2), (4, 3)):
        assert np.array_equal(products[i], products[0]), f"{target.name}: sgemm with {nth} threads"


@pytest.mark.parametrize("type_id", TYPES)
def test_neon_gives_the_portable_bits(programs, type_id):
    """The NEON integer sums are exact and the float steps are the portable code's, so the
    AArch64 build and the portable x86-64 build agree bit for bit."""
    host, arm = TARGETS
    shape = (5, 7, 1536)
    a, _, _ = _run(host, programs(host), type_id, shape, seed=type_id)
    b, _, _ = _run(arm, programs(arm), type_id, shape, seed=type_id)
    assert np.array_equal(a, b, equal_nan=True)
