"""A tiny random llama, converted to HIQ2 GGUF, run by llama.cpp through llama-cpp-python
on the patched runtime: its logits match the PyTorch model holding the file's weights."""

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


def test_logits_match_torch(tiny_llama_dir, tiny_gguf, smollm_tokenizer):
    from converters import converter_for
    from hiq2gguf import llama, model_io
    from hiq2gguf.reader import dequantized_state

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


def test_cli_run_and_ppl(tiny_gguf, tmp_path):
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
        assert t["bpw"] == pytest.approx(member.bpw) and t["ratio"] == pytest.approx(member.n_high / 8)
    total = sum(t["bpw"] * t["elements"] for t in ours) / sum(t["elements"] for t in ours)
    assert info["bpw"] == pytest.approx(total) and total <= 3.0
