"""The CUDA build (`hiq2gguf runtime build --cuda`) on a GPU: llama.cpp's
test-backend-ops with the CUDA backend under test, compared with the CPU backend
in reference mode (NMSE per op), for every HIQ2 member.

What it exercises for HIQ2 weights: MUL_MAT with 1..8 activation columns goes to
our mmvq vec_dot (kernels/cuda/hiq2-cuda.cuh), wider ones to our dequantize +
cuBLAS; MUL_MAT_ID likewise; GET_ROWS to our get_rows. A build whose
supports_op accepted a type without an mmvq vec_dot would abort here.

Skipped where no CUDA device exists (nvidia-smi lists no GPU) or the CUDA build
is missing; a skip here means the CUDA kernels were not run.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from hiq2gguf import runtime


def _cuda_device() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and "GPU" in r.stdout else None


pytestmark = pytest.mark.skipif(_cuda_device() is None, reason="no CUDA device (nvidia-smi lists no GPU)")


@pytest.fixture(scope="module")
def test_backend_ops():
    try:
        return runtime.tool("test-backend-ops", cuda=True)
    except runtime.RuntimeMissing as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("h", range(9))
def test_backend_ops_cuda_vs_cpu(test_backend_ops, h):
    name = f"hiq2_h{h}"
    r = subprocess.run([str(test_backend_ops), "test", "-b", "CUDA0", "-p", rf"{name}[,)]"],
                       capture_output=True, text=True, timeout=1800)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-2000:]
    results = re.findall(r"^\s+([A-Z_]+)\((.*)\): (.*)$", out, re.M)
    failed = [f"{op}({p}): {s}" for op, p, s in results if "OK" not in s and "not supported" not in s]
    assert not failed, "\n".join(failed[:20])

    def passed(op: str, cond=lambda p: True) -> list[str]:
        return [p for o, p, s in results if o == op and "OK" in s and cond(p)]

    # every batch width of llama.cpp's MUL_MAT cases with F32 activations runs on the GPU
    widths = {int(m.group(1)) for p in passed("MUL_MAT", lambda p: "type_b=f32" in p)
              if (m := re.search(r",n=(\d+),", p))}
    assert set(range(1, 9)) <= widths, f"mmvq widths run: {sorted(widths)}"
    assert any(n > 8 for n in widths), "no dequantize + cuBLAS case ran"
    unsupported = [p for o, p, s in results if o == "MUL_MAT" and "type_b=f32" in p and "not supported" in s]
    assert not unsupported, unsupported[:5]
    assert passed("GET_ROWS"), "GET_ROWS did not run on CUDA"
    assert passed("MUL_MAT_ID")
