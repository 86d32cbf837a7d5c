"""Shared fixtures: a tiny random llama model with the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from hiq2gguf.model_io import default_model_path

    p = default_model_path()
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def make_tiny_llama(path: Path, tokenizer, hidden=128, intermediate=256, layers=2, heads=4,
                    kv_heads=2, seed=0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      initializer_range=0.08, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer)


@pytest.fixture(scope="session")
def runtime_lib():
    from hiq2gguf import runtime

    try:
        return runtime.lib_dir()
    except runtime.RuntimeMissing as e:
        pytest.skip(f"patched llama.cpp runtime not built: {e}")


@pytest.fixture(scope="session")
def cpu_variant_lib_dir(runtime_lib):
    """name -> lib dir of that CPU variant of the runtime (runtime.CPU_VARIANTS: libggml-cpu
    for AVX2, or portable), built on first use (minutes when cold, then cached beside the
    runtime); skips where this CPU cannot run the variant."""
    from hiq2gguf import runtime

    def get(name: str) -> Path:
        missing = runtime.CPU_VARIANTS[name].missing_on_host()
        if missing:
            pytest.skip(f"this machine cannot run the {name} build: lacks {', '.join(missing)}")
        return runtime.build_cpu_variant(name)

    return get
