"""A tiny random llama, converted to HIQ2 GGUF, run by llama.cpp through llama-cpp-python
on the patched runtime: its logits match the PyTorch model holding the file's weights.
The same file with every linear weight re-quantized to each E8 member (HIQ2_E8, _2K, _8K:
their reference quantizer) must run and match too (llama.cpp runs them through ggml's vec_dot
loop)."""

import numpy as np
import pytest
import torch

from tests.test_cli_errors import cli

# llama.cpp quantizes activations to Q8_0 for the HIQ2 dot products, so its
# logits differ from float32 PyTorch by activation-rounding noise (measured on
# this model: mean |diff| 1.4 % and max |diff| 9 % of the logits' standard
# deviation, same top-1 everywhere). A wrong layout or permutation gives errors
# of the order of the logits themselves.
MEAN_TOL = 0.03    # mean |diff| / std(logits)
MAX_TOL = 0.15     # max |diff| / std(logits)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, runtime_lib, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-out") / "tiny.gguf"
    r = cli("convert", tiny_llama_dir, "-o", out, "--bpw", "3.0", "--no-eval", "--calib-windows", "2", "-q")
    assert r.returncode == 0, r.stderr
    return out


def _ggml_quantize_ref(qtype, x: np.ndarray) -> np.ndarray:
    """qtype's reference quantization by the runtime's ggml (ggml_quantize_chunk), byte-identical
    to qtype.quantize_ref (tests/test_c_kernels.py) and fast where numpy's is not: numpy
    searches HIQ2_E8_8K's 8192 entries per group in minutes for this model."""
    import ctypes as C

    from hiq2gguf import runtime

    base = C.CDLL(str(runtime.lib_dir() / "libggml-base.so"))
    base.ggml_quantize_chunk.restype = C.c_size_t
    base.ggml_quantize_chunk.argtypes = [C.c_int, C.c_void_p, C.c_void_p, C.c_int64, C.c_int64, C.c_int64, C.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], qtype.row_bytes(x.shape[1])), dtype=np.uint8)
    assert base.ggml_quantize_chunk(qtype.type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                    None) == out.size
    return out


def _requantize_gguf(src, dst, qtype, quantize=None) -> int:
    """Copy the GGUF ``src`` to ``dst`` with every tensor of ours re-quantized to ``qtype``
    by its reference quantizer (``quantize(x)``, default ``qtype.quantize_ref``; from the
    numpy-dequantized weights); -> tensors changed."""
    import gguf

    from hiq2gguf.formats import get_type, is_hiq2, register_with_gguf
    from hiq2gguf.gguf_io import field_value, open_reader
    from hiq2gguf.writer import _copy_field

    register_with_gguf()
    r = open_reader(src)
    w = gguf.GGUFWriter(dst, field_value(r, "general.architecture"))
    for key, field in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            _copy_field(w, key, field)
    n = 0
    for t in r.tensors:
        raw = np.asarray(t.data)
        if is_hiq2(t.tensor_type):
            weights = get_type(int(t.tensor_type)).dequantize(raw.reshape(int(t.shape[1]), -1))
            raw = (quantize or qtype.quantize_ref)(weights)
            dtype = gguf.GGMLQuantizationType(qtype.type_id)
            n += 1
        else:
            raw, dtype = np.array(raw), t.tensor_type
        w.add_tensor(t.name, np.ascontiguousarray(raw), raw_shape=raw.shape, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return n


E8_NAMES = ["HIQ2_E8", "HIQ2_E8_2K", "HIQ2_E8_8K", "HIQ2_E8_XS"]


@pytest.fixture(scope="module")
def tiny_e8_ggufs(tiny_gguf, tmp_path_factory):
    """member name -> the tiny model re-quantized to it (made on first use). HIQ2_E8 by numpy's
    quantize_ref; the larger members by ggml's (byte-identical, and fast)."""
    from hiq2gguf.formats import E8, get_type

    made = {}

    def get(name: str):
        if name not in made:
            qtype = get_type(name)
            out = tmp_path_factory.mktemp(f"tiny-{name.lower()}") / f"tiny-{name.lower()}.gguf"
            quantize = None if qtype == E8 else (lambda x: _ggml_quantize_ref(qtype, x))
            assert _requantize_gguf(tiny_gguf, out, qtype, quantize) == 7 * 2
            made[name] = out
        return made[name]

    return get


@pytest.fixture(params=["tiny_gguf", *E8_NAMES])
def any_gguf(request, tiny_gguf, tiny_e8_ggufs):
    return tiny_gguf if request.param == "tiny_gguf" else tiny_e8_ggufs(request.param)


@pytest.mark.parametrize("name", E8_NAMES)
def test_e8_file_holds_e8_weights(tiny_e8_ggufs, name):
    from hiq2gguf.formats import get_type
    from hiq2gguf.gguf_io import open_reader

    types = [int(t.tensor_type) for t in open_reader(tiny_e8_ggufs(name)).tensors]
    assert types.count(get_type(name).type_id) == 7 * 2


def test_logits_match_torch(tiny_llama_dir, any_gguf, smollm_tokenizer):
    from converters import converter_for
    from hiq2gguf import llama, model_io
    from hiq2gguf.reader import dequantized_state

    tiny_gguf = any_gguf

    model, _ = model_io.load(model_io.resolve(str(tiny_llama_dir)))
    conv = converter_for(model.config)
    state = dequantized_state(tiny_gguf, conv, {n: tuple(p.shape) for n, p in model.state_dict().items()})
    assert any(n.endswith("q_proj.weight") for n in state)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(torch.from_numpy(state[n]))
    ids = smollm_tokenizer("The history of the Roman Empire spans many centuries and",
                           add_special_tokens=False)["input_ids"] * 4
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    with llama.open_model(tiny_gguf, n_ctx=256, logits_all=True, n_threads=2) as llm:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    diff = np.abs(got - ref) / ref.std()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (diff.mean(), diff.max())
    # a random model's top two logits are often nearly tied; wherever PyTorch's top-1
    # leads by more than the largest allowed deviation, llama.cpp must pick it too
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * MAX_TOL * ref.std()
    assert clear.sum() >= 5
    assert (got.argmax(-1) == ref.argmax(-1))[clear].all()


def test_cli_run_and_ppl(any_gguf, tmp_path):
    tiny_gguf = any_gguf
    r = cli("run", tiny_gguf, "-p", "Once upon a time", "-n", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    r = cli("ppl", tiny_gguf, "--text", text, "--windows", "2", "--ctx", "128", "--json", "-q")
    assert r.returncode == 0, r.stderr
    import json
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["windows"] == 2 and np.isfinite(res["ppl"]) and res["ppl"] > 1


def test_inspect_reports_every_linear(tiny_gguf):
    r = cli("inspect", tiny_gguf, "--json")
    assert r.returncode == 0, r.stderr
    import json
    info = json.loads(r.stdout)
    ours = [t for t in info["tensors"] if t["ours"]]
    # per-layer types by default: every linear weight is ours, with its member's size and
    # ratio, and together they stay within the 3.0 bpw budget
    from hiq2gguf.formats import get_type
    assert len(ours) == 7 * 2
    for t in ours:
        member = get_type(t["type"])
        # (HIQ2_E8, which plans may pick, has ratio 0 and no n_high)
        assert t["bpw"] == pytest.approx(member.bpw) and t["ratio"] == pytest.approx(member.ratio)
    total = sum(t["bpw"] * t["elements"] for t in ours) / sum(t["elements"] for t in ours)
    assert info["bpw"] == pytest.approx(total) and total <= 3.0
