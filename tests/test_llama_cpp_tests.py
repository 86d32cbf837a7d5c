"""llama.cpp's own tests, run on the HIQ2 types (kernels/ggml/patch.py adds them to
both tests' type lists).

test-quantize-fns, for every type: CPU quantize -> dequantize error on synthetic
data, CPU quantize == reference quantize, and vec_dot against Q8_0 (1 x 1 and,
in builds with the 2 x 2 kernel, nrc == 2) against the float dot product of the
unquantized data.

test-backend-ops compares each op between a backend under test and the CPU
backend in reference mode. With only the CPU backend present its default run
compares nothing: it prints "Skipping CPU backend" and exits 0. `-b CPU`
makes the CPU backend the one under test, against a second CPU backend with
ggml_backend_cpu_set_use_ref. In that mode our GEMM hook (llamafile_sgemm)
declines, so every HIQ2 MUL_MAT case compares the tiled HIQ2 GEMM with ggml's
vec_dot loop over the same data (the E8 members have no GEMM: both sides run the vec_dot
loop, so for them the run checks the ops execute). Both use the same block decoder: a decoder
error is caught by test-quantize-fns and tests/test_c_kernels.py (bit-exact
against numpy), not here. The other ops (GET_ROWS, CPY, SET_ROWS, MUL_MAT_ID,
OUT_PROD, ...) run the same code on both sides; for them the run checks that
they execute, give no NaN/inf and write nothing outside their output (the
sentinel tensors around every operand).

Both run against every build of libggml-cpu: the runtime's own (-march=native) and
its CPU variants (runtime.CPU_VARIANTS: AVX2, portable C), which the same programs
load through LD_LIBRARY_PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from hiq2gguf import runtime

N_HIGH = range(9)
TYPE_NAMES = [f"hiq2_h{h}" for h in N_HIGH] + ["hiq2_e8", "hiq2_e8_2k", "hiq2_e8_8k", "hiq2_e8_xs"]


def _run(args: list, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module", params=["native", *runtime.CPU_VARIANTS])
def cpu_env(request, runtime_lib, cpu_variant_lib_dir) -> dict | None:
    """Environment under which the runtime's test programs run the libggml-cpu under test:
    None for the runtime's own; for a CPU variant its lib dir in LD_LIBRARY_PATH, which
    the dynamic loader searches before the programs' RUNPATH (checked with ldd)."""
    if request.param == "native":
        return None
    libd = cpu_variant_lib_dir(request.param)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        p for p in (str(libd), os.environ.get("LD_LIBRARY_PATH", "")) if p))
    ldd = _run(["ldd", runtime.tool("test-backend-ops")], env=env).stdout
    m = re.search(r"libggml-cpu\.so\S* => (\S+)", ldd)
    assert m and Path(m.group(1)).resolve().parent == libd.resolve(), ldd
    return env


@pytest.fixture(scope="module")
def quantize_fns_output(cpu_env) -> str:
    r = _run([runtime.tool("test-quantize-fns"), "-v"], env=cpu_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("name", TYPE_NAMES)
def test_quantize_fns_checks_every_member(quantize_fns_output, name):
    lines = [ln.strip() for ln in quantize_fns_output.splitlines() if ln.strip().startswith(name + " ")]
    checks = {ln.split(":")[0][len(name):].strip(): ln.split(":", 1)[1].split()[0] for ln in lines}
    # the checks llama.cpp runs for a quantized type with from_float, to_float and vec_dot
    for check in ("absolute quantization error", "reference implementation error", "dot product error"):
        assert checks.get(check) == "ok", f"{name}: {check}: {checks}"
    # CPU quantize is the reference quantizer (byte-identical by design): zero difference
    ref = next(ln for ln in lines if "reference implementation error" in ln)
    assert float(re.search(r"\(([-0-9.e]+)\)", ref).group(1)) == 0.0


def test_backend_ops_default_run_skips_the_only_backend(runtime_lib):
    """What llama.cpp's default invocation does on a CPU-only build: nothing."""
    r = _run([runtime.tool("test-backend-ops"), "test", "-p", "hiq2_h0"])
    assert r.returncode == 0
    assert "Skipping CPU backend" in r.stdout
    assert not re.search(r"MUL_MAT\(.*OK", r.stdout)


# ops every member must pass through llama.cpp's generic quantized-type cases
EXPECTED_OPS = ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS", "CPY", "SET_ROWS", "OUT_PROD")


# members whose test-backend-ops run is dominated by the reference quantizer (ggml-base, the
# same library under every libggml-cpu): HIQ2_E8_8K's 8192-entry search, about 12 minutes
# here. They run against the native libggml-cpu only; their vec_dot in the CPU variants is
# checked by tests/test_c_kernels.py.
SLOW_QUANTIZE = {"hiq2_e8_8k"}


@pytest.mark.parametrize("name", TYPE_NAMES)
def test_backend_ops_cpu(cpu_env, name):
    if name in SLOW_QUANTIZE and cpu_env is not None:
        pytest.skip(f"{name}: test-backend-ops runs against the native libggml-cpu only (its quantizer is slow)")
    # the name ends at a comma or parenthesis in every case's parameter list
    r = _run([runtime.tool("test-backend-ops"), "test", "-b", "CPU", "-p", rf"{name}[,)]"], env=cpu_env,
             timeout=1800 if name in SLOW_QUANTIZE else 900)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    results = re.findall(r"^\s+([A-Z_]+)\((.*)\): (.*)$", out, re.M)
    assert results, out[-2000:]
    ours = [(op, params, status) for op, params, status in results if name in params]
    assert len(ours) == len(results)
    failed = [f"{op}({params}): {status}" for op, params, status in ours
              if "OK" not in status and "not supported" not in status]
    assert not failed, "\n".join(failed[:20])
    passed = {op for op, _, status in ours if "OK" in status}
    missing = set(EXPECTED_OPS) - passed
    assert not missing, f"{name}: no passing case for {sorted(missing)}"
    # MUL_MAT against F32 activations runs (HIQ2 x Q8_0) for batch sizes 1..9 and beyond
    n_mul_mat_ok = sum(1 for op, params, status in ours
                       if op == "MUL_MAT" and "type_b=f32" in params and "OK" in status)
    assert n_mul_mat_ok >= 20
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    assert m and m.group(1) == m.group(2)
