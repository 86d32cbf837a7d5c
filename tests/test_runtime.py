"""The patched-runtime bookkeeping: cache key and the check that refuses a stock llama.cpp."""

import ctypes.util
import shutil

import pytest

from hiq2gguf import runtime


def test_build_key_follows_kernel_sources(tmp_path, monkeypatch):
    src = tmp_path / "ggml"
    shutil.copytree(runtime.KERNELS_DIR, src)
    monkeypatch.setattr(runtime, "KERNELS_DIR", src)
    k1 = runtime.build_key()
    assert runtime.build_key() == k1
    (src / "hiq2.c").write_text((src / "hiq2.c").read_text() + "\n/* edit */\n")
    assert runtime.build_key() != k1


def test_unpatched_library_is_refused(tmp_path):
    libc = ctypes.util.find_library("c")
    assert libc
    import glob
    cands = [p for p in glob.glob(f"/lib/*/{libc}") + glob.glob(f"/usr/lib/*/{libc}")]
    assert cands
    shutil.copy(cands[0], tmp_path / "libggml-base.so")   # a real library without our kernels
    with pytest.raises(runtime.RuntimeMissing, match="not patched"):
        runtime.check_patched(tmp_path)


def test_patched_library_is_accepted(runtime_lib):
    runtime.check_patched(runtime_lib)
