"""Block-by-block processing (sequential.capture_block_inputs, run_block): running the
decoder blocks one at a time, each with the keyword arguments the model gives it,
reproduces the whole model's forward.

Gemma3 gives its sliding-window layers a local rope and a sliding mask and its
global layers another rope and the causal mask, so reusing the first block's
arguments for every block changes the hidden states; the windows here are longer
than its 16-token sliding window.
"""

from __future__ import annotations

import pytest
import torch

from hiq2gguf.sequential import capture_block_inputs, decoder_blocks, run_block
from tests.test_architectures import ARCHITECTURES, COMMON, make_tiny_model

WINDOW = 40        # tokens, > 2 x Gemma3's sliding window


def _gemma3_three_blocks():
    # sliding, global, sliding: block 2 shares block 0's arguments, block 1 differs
    model_cls, cfg = ARCHITECTURES["gemma3_text"]()
    cfg.num_hidden_layers = 3
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    return model_cls, cfg


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM, LlamaConfig(**{**COMMON, "num_hidden_layers": 3})


FACTORIES = {"gemma3_text": _gemma3_three_blocks, "llama": _llama}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def tiny(request, smollm_tokenizer, tmp_path_factory):
    """(architecture, model directory, model, two calibration windows)."""
    from transformers import AutoModelForCausalLM

    arch = request.param
    d = make_tiny_model(tmp_path_factory.mktemp(f"seq-{arch}"), smollm_tokenizer, FACTORIES[arch], seed=2)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (2, WINDOW), generator=g).tolist()
    return arch, d, model, windows


@torch.no_grad()
def test_blocks_run_one_by_one_reproduce_the_model(tiny):
    arch, _, model, windows = tiny
    inputs, kwargs = capture_block_inputs(model, windows)
    blocks = [b for _, b in decoder_blocks(model)]
    assert len(inputs) == len(windows) and len(kwargs) == len(blocks) == 3
    decoder = model.get_decoder()
    for w, h in zip(windows, inputs):
        ref = decoder(input_ids=torch.tensor([w]), output_hidden_states=True)
        for i, block in enumerate(blocks):
            torch.testing.assert_close(h, ref.hidden_states[i])          # what enters block i
            h = run_block(block, h, kwargs[i])
        torch.testing.assert_close(decoder.norm(h), ref.last_hidden_state)


@torch.no_grad()
def test_gemma3_blocks_get_their_own_rope_and_mask(tiny):
    arch, _, model, windows = tiny
    if arch != "gemma3_text":
        pytest.skip("one kind of block")
    inputs, kwargs = capture_block_inputs(model, windows[:1])
    # same layer type: the same tensors (nothing copied per block)
    assert kwargs[2]["position_embeddings"] is kwargs[0]["position_embeddings"]
    assert kwargs[2]["attention_mask"] is kwargs[0]["attention_mask"]
    assert kwargs[1]["position_embeddings"] is not kwargs[0]["position_embeddings"]
    # and the difference matters: block 1 run with block 0's arguments is off
    blocks = [b for _, b in decoder_blocks(model)]
    h1 = run_block(blocks[0], inputs[0], kwargs[0])
    right, wrong = run_block(blocks[1], h1, kwargs[1]), run_block(blocks[1], h1, kwargs[0])
    assert (right - wrong).abs().max() > 1e-2 * right.abs().max()


@torch.no_grad()
def test_capture_needs_no_block_weights(tiny):
    """The streamed model (blocks on the meta device) captures what the loaded one does."""
    from hiq2gguf.streaming import StreamedModel

    _, d, model, windows = tiny
    sm = StreamedModel(d)
    assert all(p.is_meta for _, b in sm.blocks for p in b.parameters())
    got_inputs, got = capture_block_inputs(sm.model, windows)
    ref_inputs, ref = capture_block_inputs(model, windows)
    for a, b in zip(got_inputs, ref_inputs):
        torch.testing.assert_close(a, b)
    for a, b in zip(got, ref):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k])


@torch.no_grad()
def test_suffix_loss_runs_each_block_with_its_own_arguments(tiny):
    """sensitivity.BlockInputs: the loss from block b on equals the full forward's loss."""
    from hiq2gguf.sensitivity import BlockInputs

    _, _, model, windows = tiny
    runner = BlockInputs(model, windows)
    assert runner.suffix
    ids = torch.tensor(windows)
    full = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    for b in range(model.config.num_hidden_layers):
        assert runner.loss(b) == pytest.approx(full, rel=1e-5)
