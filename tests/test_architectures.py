"""Every supported architecture end to end: a tiny random Hugging Face model converts to an
HIQ2 GGUF, llama.cpp (patched runtime) loads it, and its logits match the PyTorch model
holding the file's weights.

Norm weights and biases are randomised too (HF initialises them to constants), so a
wrong norm convention (Gemma's 1 + w), a dropped bias (Qwen2) or a wrong q/k row
order shows up in the logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_cli_errors import cli

# Same bounds as tests/test_llama_runtime.py: llama.cpp rounds activations to Q8_0 for
# the HIQ2 dot products, which moves logits by a few percent of their spread; a layout
# error moves them by about their whole spread.
MEAN_TOL = 0.03    # mean |diff| / std(logits)
MAX_TOL = 0.15     # max |diff| / std(logits)

COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
              tie_word_embeddings=True, initializer_range=0.08)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM, MistralConfig(**COMMON, head_dim=32, sliding_window=512)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    # untied head: exercises a separate Q8_0 output matrix
    return Qwen2ForCausalLM, Qwen2Config(**{**COMMON, "tie_word_embeddings": False}, rope_theta=1e6)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    # head_dim 64 with 4 heads: q is 256 wide while the model is 128 wide
    return Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=64)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    # a 16-token window on layer 0, global attention on layer 1; the prompt is longer
    return Gemma3ForCausalLM, Gemma3TextConfig(
        **COMMON, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


ARCHITECTURES = {"mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3_text": _gemma3}


def make_tiny_model(path, tokenizer, factory, seed=0):
    model_cls, cfg = factory()
    cfg.vocab_size = len(tokenizer)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, None)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:            # norms and biases
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def converted(request, smollm_tokenizer, runtime_lib, tmp_path_factory):
    arch = request.param
    d = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), smollm_tokenizer, ARCHITECTURES[arch])
    out = d / "tiny.gguf"
    # RTN: the quickest quantizer; what is tested here is the layout, not the rounding
    r = cli("convert", d, "-o", out, "--bpw", "3.0", "--no-eval", "--calib-windows", "2",
            "--method", "rtn", "--ratio-strategy", "fixed", "-q")
    assert r.returncode == 0, r.stderr
    return arch, d, out


def test_registered():
    from converters import supported_model_types
    assert set(ARCHITECTURES) | {"llama"} <= set(supported_model_types())


def test_logits_match_torch(converted, smollm_tokenizer):
    from converters import converter_for
    from hiq2gguf import llama, model_io
    from hiq2gguf.gguf_io import field_value, open_reader
    from hiq2gguf.reader import dequantized_state

    arch, d, gguf_path = converted
    model, _ = model_io.load(model_io.resolve(str(d)))
    conv = converter_for(model.config)
    assert field_value(open_reader(gguf_path), "general.architecture") == conv.arch_name
    state = dequantized_state(gguf_path, conv, {n: tuple(p.shape) for n, p in model.state_dict().items()})
    assert sum(n.endswith("proj.weight") for n in state) == 7 * 2
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(torch.from_numpy(state[n]))
    ids = smollm_tokenizer("The history of the Roman Empire spans many centuries and",
                           add_special_tokens=False)["input_ids"] * 4
    assert len(ids) > 2 * 16        # longer than gemma's sliding window
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    with llama.open_model(gguf_path, n_ctx=256, logits_all=True, n_threads=2) as llm:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    diff = np.abs(got - ref) / ref.std()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (arch, diff.mean(), diff.max())
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * MAX_TOL * ref.std()
    assert clear.sum() >= 5
    assert (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_gemma3_norms_stored_plus_one(smollm_tokenizer, tmp_path):
    """llama.cpp multiplies by the stored norm weight; HF Gemma by 1 + w."""
    from converters import converter_for
    from hiq2gguf import model_io
    from hiq2gguf.gguf_io import open_reader
    from hiq2gguf.writer import write_gguf

    d = make_tiny_model(tmp_path / "g", smollm_tokenizer, _gemma3)
    source = model_io.resolve(str(d))
    model, tok = model_io.load(source)
    conv = converter_for(model.config)
    out = tmp_path / "g.gguf"
    write_gguf(out, conv, model, source, tok, {}, {}, {})
    stored = {t.name: np.asarray(t.data) for t in open_reader(out).tensors}
    hf = model.state_dict()
    for hf_name in ("model.layers.0.post_attention_layernorm.weight", "model.layers.1.self_attn.q_norm.weight",
                    "model.norm.weight"):
        np.testing.assert_allclose(stored[conv.gguf_name(hf_name)], hf[hf_name].numpy() + 1, rtol=0, atol=1e-7)
    # biases are not norms
    assert not conv._is_norm("model.layers.0.mlp.down_proj.weight")


@pytest.mark.parametrize("change, match", [
    (dict(query_pre_attn_scalar=64), "query_pre_attn_scalar"),
    (dict(hidden_activation="gelu"), "activation"),
])
def test_gemma3_refuses_what_llamacpp_computes_differently(change, match):
    from converters import UnsupportedArchitecture, converter_for
    import gguf

    _, cfg = _gemma3()
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(UnsupportedArchitecture, match=match):
        converter_for(cfg).set_hparams(gguf.GGUFWriter(None, "gemma3"))


def test_sliding_window_refused_where_llamacpp_has_none():
    from transformers import Qwen2Config
    from converters import UnsupportedArchitecture, converter_for
    import gguf

    cfg = Qwen2Config(**COMMON, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(UnsupportedArchitecture, match="sliding"):
        converter_for(cfg).set_hparams(gguf.GGUFWriter(None, "qwen2"))
