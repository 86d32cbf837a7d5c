"""hiq2gguf.load: a llama_cpp.Llama on the patched runtime, from a plain `import hiq2gguf`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.test_cli_errors import cli


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, runtime_lib, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "tiny.gguf"
    r = cli("convert", tiny_llama_dir, "-o", out, "--bpw", "3.0", "--no-eval", "--calib-windows", "1",
            "--method", "rtn", "--ratio-strategy", "fixed", "-q")
    assert r.returncode == 0, r.stderr
    return out


def test_import_is_light():
    code = ("import sys, hiq2gguf; heavy = [m for m in ('torch', 'numpy', 'llama_cpp', 'transformers') "
            "if m in sys.modules]; print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
    assert callable(__import__("hiq2gguf").load)


def test_load_returns_llama_on_patched_runtime(tiny_gguf, runtime_lib, smollm_tokenizer):
    import hiq2gguf

    llm = hiq2gguf.load(tiny_gguf, n_ctx=512, n_threads=2, logits_all=True)
    try:
        import llama_cpp
        assert isinstance(llm, llama_cpp.Llama)
        assert llm.n_ctx() == 512                           # kwargs reach llama_cpp.Llama
        assert llama_cpp.llama_cpp._lib._name.startswith(str(runtime_lib))   # the patched libllama
        # it computes: greedy generation is deterministic and extends the prompt
        a = llm("Once upon a time", max_tokens=6, temperature=0.0)["choices"][0]["text"]
        b = llm("Once upon a time", max_tokens=6, temperature=0.0)["choices"][0]["text"]
        assert a == b and len(a) > 0
        ids = smollm_tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)])
        assert np.isfinite(scores).all() and scores.std() > 0
    finally:
        llm.close()

    with hiq2gguf.open_model(tiny_gguf, n_ctx=256) as llm2:
        assert llm2.n_ctx() == 256


def test_load_errors_are_clear(tmp_path, runtime_lib):
    import hiq2gguf
    from hiq2gguf.gguf_io import CorruptGGUF

    with pytest.raises(CorruptGGUF, match="no such file"):
        hiq2gguf.load(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(CorruptGGUF, match="not a GGUF"):
        hiq2gguf.load(bad)
