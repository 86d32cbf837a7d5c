"""Conversion pipeline on a tiny random llama: what the file stores is what PyTorch computes."""

import numpy as np

from converters import converter_for
from hiq2gguf import model_io
from hiq2gguf.calibrate import collect_fisher, linear_weights
from hiq2gguf.convert import quantize_model
from hiq2gguf.formats import get_type
from hiq2gguf.gguf_io import open_reader
from hiq2gguf.reader import dequantized_state
from hiq2gguf.writer import write_gguf


def test_file_equals_fake_quant_bit_for_bit(tiny_llama_dir, smollm_tokenizer, tmp_path):
    source = model_io.resolve(str(tiny_llama_dir))
    model, tok = model_io.load(source)
    conv = converter_for(model.config)
    params = linear_weights(model, conv.is_linear)
    assert len(params) == 7 * 2
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, add_special_tokens=False)["input_ids"]
    windows = [ids[:100], ids[100:200]]
    fisher, hessians = collect_fisher(model, params, windows, progress=False, hessians=True)
    assert all(float(f.sum()) > 0 for f in fisher.values())
    assert all(h.n == 200 for h in hessians.values())   # every token of both windows
    plan = {n: get_type(100 + i % 10) for i, n in enumerate(params)}   # every type (H0..H8, E8) in one file
    packed, stock = quantize_model(
        model, conv, plan, lambda n, w, t: hessians[n].quantize_as(w, t, fisher[n]), progress=False)
    out = tmp_path / "tiny.gguf"
    write_gguf(out, conv, model, source, tok, packed, stock, {})
    stored = dequantized_state(out, conv, {n: tuple(p.shape) for n, p in model.state_dict().items()})
    for name, p in model.state_dict().items():
        if name in stored:
            a = p.detach().numpy().astype(np.float32)
            assert np.array_equal(a.view(np.uint32), stored[name].view(np.uint32)), name
    # the types in the file are the planned ones
    types = {t.name: int(t.tensor_type) for t in open_reader(out).tensors}
    for name, t in plan.items():
        assert types[conv.gguf_name(name)] == t.type_id
