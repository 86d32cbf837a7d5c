"""Bad input: one clear line on stderr, a non-zero exit, and no output file left behind."""

import json
import os
import subprocess
import sys

import gguf
import pytest
import torch

from tests.conftest import make_tiny_llama


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "hiq2gguf", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def assert_clean_failure(r, out_dir, *phrases):
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hiq2gguf: error: ")
    for p in phrases:
        assert p in last, last
    assert not any(out_dir.iterdir()), list(out_dir.iterdir())


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_model(out_dir, tmp_path):
    r = cli("convert", tmp_path / "nope", "-o", out_dir / "x.gguf", "--bpw", "3")
    assert_clean_failure(r, out_dir, "model not found")


def test_directory_without_config(out_dir, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    r = cli("convert", d, "-o", out_dir / "x.gguf", "--bpw", "3")
    assert_clean_failure(r, out_dir, "no config.json")


def test_unknown_architecture_hf(out_dir, tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64,
                                               "num_hidden_layers": 1, "num_attention_heads": 1,
                                               "intermediate_size": 64, "vocab_size": 10}))
    r = cli("convert", d, "-o", out_dir / "x.gguf", "--bpw", "3")
    assert_clean_failure(r, out_dir, "unsupported architecture 'bert'", "llama")


def test_unknown_architecture_gguf(out_dir, tmp_path):
    p = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(p, "phi2")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = cli("convert", p, "-o", out_dir / "x.gguf", "--bpw", "3")
    assert_clean_failure(r, out_dir, "unsupported architecture 'phi2'")


def test_budget_below_minimum(out_dir):
    r = cli("convert", "-o", out_dir / "x.gguf", "--bpw", "2.2")
    assert_clean_failure(r, out_dir, "minimum is 2.375")


@pytest.mark.parametrize("flag", ["--calib-windows", "--quant-windows", "--eval-windows"])
def test_window_counts_must_be_positive(out_dir, flag):
    r = cli("convert", "-o", out_dir / "x.gguf", "--bpw", "3", flag, "0")
    assert r.returncode == 2
    assert f"argument {flag}: must be a positive whole number, got 0" in r.stderr.strip().splitlines()[-1]
    assert not any(out_dir.iterdir())


def test_shape_that_does_not_fit(out_dir, tmp_path, smollm_tokenizer):
    d = make_tiny_llama(tmp_path / "odd", smollm_tokenizer, hidden=96, intermediate=128, heads=4, kv_heads=2)
    r = cli("convert", d, "-o", out_dir / "x.gguf", "--bpw", "3", "--no-eval", "--calib-windows", "1")
    assert_clean_failure(r, out_dir, "q_proj", "multiple of 64")


@pytest.mark.parametrize("value, strategy, phrase", [
    (float("nan"), "optimized", "the weights hold NaN or inf"),
    (1e9, "optimized", "loss model is not finite"),                       # gradients overflow
    (1e9, "fixed", "HIQ2_H2: weights too large for a float16 block scale"),   # no gradients: at packing
])
def test_weights_that_do_not_fit(out_dir, tmp_path, smollm_tokenizer, value, strategy, phrase):
    from transformers import LlamaForCausalLM

    d = make_tiny_llama(tmp_path / "bad", smollm_tokenizer)
    model = LlamaForCausalLM.from_pretrained(d)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value
    model.save_pretrained(d)
    r = cli("convert", d, "-o", out_dir / "x.gguf", "--bpw", "3", "--no-eval", "--calib-windows", "1",
            "--method", "rtn", "--ratio-strategy", strategy, "--no-cache")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hiq2gguf: error: ") and phrase in last, last
    if strategy == "fixed" or value != value:
        assert "model.layers.1.mlp.down_proj.weight" in last, last
    assert not (out_dir / "x.gguf").exists()


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(os.urandom(4096))
    for cmd in (("inspect", p), ("run", p, "-p", "hi"), ("ppl", p)):
        r = cli(*cmd)
        assert r.returncode == 2
        assert "not a GGUF file" in r.stderr.strip().splitlines()[-1]


def test_truncated_gguf(tmp_path):
    import numpy as np

    from hiq2gguf.formats import get_type, register_with_gguf

    register_with_gguf()
    t = get_type("HIQ2_H1")
    raw = t.quantize_ref(np.random.default_rng(0).standard_normal((64, 576)).astype(np.float32))
    p = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_tensor("blk.0.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType(t.type_id))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ok = cli("inspect", p)
    assert ok.returncode == 0 and "HIQ2_H1" in ok.stdout
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    r = cli("inspect", p)
    assert r.returncode == 2
    assert "truncated" in r.stderr.strip().splitlines()[-1]
