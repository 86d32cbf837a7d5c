"""The CUDA patch (kernels/cuda/patch.py) on the pinned llama.cpp source, without a
GPU or nvcc: it applies after the ggml patch, only after it, idempotently, and
every HIQ2 member that supports_op accepts for MUL_MAT gets an mmvq vec_dot (the
pitfall in runtime.md: a yes without one aborts small batches). Also the two
builds' cache keys: CUDA kernel edits never invalidate the CPU build."""

from __future__ import annotations

import re
import shutil
import tarfile

import pytest

from hiq2gguf import runtime


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    sdist = runtime.cache_dir() / "dl" / runtime.SDIST_FILE
    if not sdist.exists():
        pytest.skip(f"pinned llama.cpp sdist not downloaded ({sdist}); `hiq2gguf runtime build` fetches it")
    out = tmp_path_factory.mktemp("llama-src")
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers()
                   if re.search(r"/vendor/llama\.cpp/(ggml|tests)/", m.name) and (m.isfile() or m.isdir())]
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(out, members=members, **kw)
    return next(out.glob("*/vendor/llama.cpp"))


@pytest.fixture
def tree(pristine, tmp_path):
    root = tmp_path / "llama.cpp"
    shutil.copytree(pristine, root)
    return root


def _patches():
    ggml = runtime._load_patch_module()
    cuda = runtime._load_patch_module(runtime.CUDA_KERNELS_DIR / "patch.py", "hiq2_cuda_patch")
    return ggml, cuda


def test_cuda_patch_needs_the_ggml_patch(tree):
    ggml, cuda = _patches()
    with pytest.raises(ggml.PatchError, match="kernels/ggml/patch.py first"):
        cuda.apply(tree, verbose=False)


def test_cuda_patch_applies_once_and_covers_every_member(tree):
    ggml, cuda = _patches()
    ggml.apply(tree, verbose=False)
    assert cuda.apply(tree, verbose=False) is True
    files = {rel: (tree / rel).read_text() for rel in cuda.EDITS}
    assert cuda.apply(tree, verbose=False) is False                      # idempotent
    assert {rel: (tree / rel).read_text() for rel in cuda.EDITS} == files
    assert (tree / "ggml/src/ggml-cuda/hiq2-cuda.cuh").read_bytes() == \
        (runtime.CUDA_KERNELS_DIR / "hiq2-cuda.cuh").read_bytes()

    cu = files["ggml/src/ggml-cuda/ggml-cuda.cu"]
    mmvq = files["ggml/src/ggml-cuda/mmvq.cu"]
    header = (runtime.CUDA_KERNELS_DIR / "hiq2-cuda.cuh").read_text()
    # supports_op: MUL_MAT/MUL_MAT_ID and GET_ROWS accept the family
    supports = cu[cu.index("        case GGML_OP_MUL_MAT:\n        case GGML_OP_MUL_MAT_ID:\n            {"):]
    mul_mat = supports[:supports.index("case GGML_OP_OUT_PROD:")]
    assert "GGML_HIQ2_CASES" in mul_mat.split("return true;")[0]
    get_rows = supports[supports.index("        case GGML_OP_GET_ROWS:\n"):]
    assert "GGML_HIQ2_CASES" in get_rows[:get_rows.index("case GGML_OP_GET_ROWS_BACK:")]
    # ... so mmvq must have a vec_dot, a vdr and a dispatch case for each member
    assert "HIQ2_CUDA_VEC_DOT_CASES" in mmvq and "HIQ2_FOREACH(HIQ2_CUDA_VEC_DOT_CASE)" in header
    assert "GGML_HIQ2_CASES return VDR_HIQ2_Q8_1_MMVQ;" in mmvq
    for h in range(9):
        assert f"mul_mat_vec_q_switch_ncols_dst<GGML_TYPE_HIQ2_H{h}>" in mmvq
        assert f"dequantize_hiq2<{h}>>(src0_d" in files["ggml/src/ggml-cuda/getrows.cu"]
    # dequantize to F32/F16/BF16, contiguous and strided (cuBLAS path)
    conv = files["ggml/src/ggml-cuda/convert.cu"]
    assert conv.count("HIQ2_CUDA_DEQUANTIZE_CONT_CASES") == 3
    assert conv.count("HIQ2_CUDA_DEQUANTIZE_NC_CASES") == 3
    # MMQ is not given the family: it must keep refusing unknown types
    mmq = (tree / "ggml/src/ggml-cuda/mmq.cu").read_text()
    assert "HIQ2" not in mmq and "mmq_supported = false;" in mmq


def test_cuda_does_not_claim_e8(tree):
    """The E8 members (HIQ2_E8, _2K, _8K, _XS) have no CUDA kernel: the CUDA sources name only the H
    family (GGML_HIQ2_CASES and HIQ2_FOREACH list H0..H8; GGML_HIQ2_ALL_CASES, which adds the
    E8 members, is for ggml-base and the CPU), so supports_op says no for them and the
    scheduler runs them on the CPU."""
    from hiq2gguf.formats import E8_TYPES

    ggml, cuda = _patches()
    ggml.apply(tree, verbose=False)
    cuda.apply(tree, verbose=False)
    header = (runtime.KERNELS_DIR / "hiq2.h").read_text()
    foreach = re.search(r"^#define HIQ2_FOREACH\(X\) (.*)$", header, re.M).group(1)
    assert foreach.split() == [f"X({h})" for h in range(9)]
    assert re.search(r"^#define GGML_HIQ2_CASES HIQ2_FOREACH\(GGML_HIQ2_CASE\)$", header, re.M)
    # the E8 members: ggml.h's enum has each at its formats id, and the C table's rows are
    # (suffix, SUFFIX, ggml id, index bits, sub-scales, reference max magnitude) of formats' members
    ggml_h = (tree / "ggml/include/ggml.h").read_text()
    for t in E8_TYPES:
        assert re.search(rf"^\s+GGML_TYPE_{t.name} = {t.type_id},", ggml_h, re.M), t.name
    assert re.search(rf"^\s+GGML_TYPE_COUNT\s+= {max(t.type_id for t in E8_TYPES) + 1},", ggml_h, re.M)
    e8_rows = re.search(r"^#define HIQ2_E8_FOREACH\(X\) (.*)$", header, re.M).group(1)
    assert re.findall(r"X\((\w+), (\w+), (\d+), (\d+), (\d+), (\d+)\)", e8_rows) == [
        (t.name.lower()[len("hiq2_"):], t.name[len("HIQ2_"):], str(t.type_id), str(t.index_bits), str(t.n_sub),
         str(t.ref_amax)) for t in E8_TYPES]
    cuda_text = [(tree / rel).read_text() for rel in cuda.EDITS] + \
        [(runtime.CUDA_KERNELS_DIR / "hiq2-cuda.cuh").read_text()]
    for text in cuda_text:
        assert "HIQ2_E8" not in text and "GGML_HIQ2_ALL_CASES" not in text


def test_cuda_build_has_its_own_key(tmp_path, monkeypatch):
    src = tmp_path / "cuda"
    shutil.copytree(runtime.CUDA_KERNELS_DIR, src)
    monkeypatch.setattr(runtime, "CUDA_KERNELS_DIR", src)
    cpu, cuda = runtime.build_key(), runtime.build_key(cuda=True)
    assert cpu != cuda
    assert runtime._work_dir(cpu).parent != runtime._work_dir(cuda, cuda=True).parent
    (src / "hiq2-cuda.cuh").write_text((src / "hiq2-cuda.cuh").read_text() + "\n// edit\n")
    assert runtime.build_key() == cpu
    assert runtime.build_key(cuda=True) != cuda
