"""Per-layer ratio plans on a tiny llama: budget held, never worse than the fixed ratio
under the loss model, and M a positive semi-definite Fisher projection."""

import numpy as np
import pytest
import torch

from converters import converter_for
from hiq2gguf import model_io
from hiq2gguf.calibrate import collect_fisher, linear_weights
from hiq2gguf.formats import get_type
from hiq2gguf.plan import (BudgetError, RatioConfig, candidate_perturbations, candidate_types, fixed_plan,
                           fixed_ratio_type, layer_bits, optimized_plan, parse_ratios)
from hiq2gguf.sensitivity import BlockInputs, Checkpoint, GradientProjection, LossDifference


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, smollm_tokenizer):
    model, tok = model_io.load(model_io.resolve(str(tiny_llama_dir)))
    conv = converter_for(model.config)
    params = linear_weights(model, conv.is_linear)
    ids = tok("Rivers carry water from mountains to the sea, shaping valleys. " * 30,
              add_special_tokens=False)["input_ids"]
    windows = [ids[i * 96:(i + 1) * 96] for i in range(4)]
    fisher = collect_fisher(model, params, windows, progress=False)
    return model, params, fisher, windows


def test_gradient_projection_matrix(tiny):
    model, params, fisher, windows = tiny
    names = list(params)[:3]
    g = torch.Generator().manual_seed(0)
    deltas = {n: [torch.randn(params[n].shape, generator=g) * 1e-3 for _ in range(2)] for n in names}
    M = GradientProjection(model, params, deltas, progress=False).estimate(windows)
    assert M.shape == (6, 6)
    np.testing.assert_allclose(M, M.T)
    assert np.linalg.eigvalsh(M).min() > -1e-9 * np.abs(M).max()
    # the diagonal is the mean squared directional derivative: check one entry by hand
    sq = []
    for w in windows:
        model.zero_grad()
        for p in model.parameters():
            p.requires_grad_(p is params[names[0]])
        model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss.backward()
        sq.append(float((params[names[0]].grad * deltas[names[0]][0]).sum()) ** 2)
    for p in model.parameters():
        p.requires_grad_(True)
    assert M[0, 0] == pytest.approx(np.mean(sq), rel=1e-4)


def test_optimized_plan_holds_budget_and_beats_fixed(tiny):
    model, params, fisher, windows = tiny
    bpw = 3.1
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    cands = [get_type(n) for n in ("HIQ2_H1", "HIQ2_H2", "HIQ2_H3")]
    plan, info = optimized_plan(model, params, fisher, bpw, windows, None,
                                RatioConfig(ratios="H1,H2,H3", cache=False), progress=False)
    elements = sum(r * c for r, c in shapes.values())
    bits = sum(layer_bits(shapes[n], t) for n, t in plan.items())
    assert bits <= bpw * elements
    assert info["solver"]["status"] == "optimal" and info["solver"]["gap"] < 1e-3
    assert info["predicted_loss_increase"] <= info["predicted_loss_increase_fixed"] * (1 + 1e-6)
    fixed = fixed_plan(shapes, bpw)
    assert set(t.name for t in fixed.values()) == {"HIQ2_H2"}
    # the fixed plan is feasible and among the candidates: the optimum cannot be worse
    assert get_type("HIQ2_H2") in candidate_types(bpw)
    assert info["predicted_loss_increase"] <= _model_objective(model, params, fisher, windows, fixed, cands) * (1 + 1e-6)


def _model_objective(model, params, fisher, windows, plan, cands):
    deltas = candidate_perturbations(params, fisher, {n: [t] for n, t in plan.items()}, progress=False)
    M = GradientProjection(model, params, deltas, progress=False).estimate(windows)
    return 0.5 * float(M.sum())


def test_budget_errors():
    with pytest.raises(BudgetError, match="minimum is 2.375"):
        candidate_types(2.3)
    assert [t.name for t in candidate_types(2.6)] == ["HIQ2_E8_XS", "HIQ2_E8", "HIQ2_H0", "HIQ2_E8_2K", "HIQ2_H1",
                                                      "HIQ2_E8_8K", "HIQ2_H2", "HIQ2_H3", "HIQ2_H4"]
    assert [t.name for t in candidate_types(2.4)][:2] == ["HIQ2_E8_XS", "HIQ2_E8"]
    with pytest.raises(BudgetError, match="fixed ratio needs at least 2.50"):
        fixed_ratio_type(2.4)


def test_parse_ratios():
    assert [t.name for t in parse_ratios("H4,0,hiq2_h2,0.25")] == ["HIQ2_H0", "HIQ2_H2", "HIQ2_H4"]
    assert [t.name for t in parse_ratios("H2,e8,HIQ2_E8,e8_8k,E8_XS")] == ["HIQ2_E8_XS", "HIQ2_E8", "HIQ2_E8_8K",
                                                                             "HIQ2_H2"]
    for bad in ("H9", "E9", "0.3", "x", ""):
        with pytest.raises(BudgetError):
            parse_ratios(bad)


def test_infeasible_budget_names_the_range(tiny):
    model, params, fisher, windows = tiny
    with pytest.raises(BudgetError, match=r"smallest achievable is 3\.0000, the largest 3\.5000"):
        optimized_plan(model, params, fisher, 2.9, windows, None, RatioConfig(ratios="H2,H4", cache=False),
                       progress=False)


def test_block_suffix_loss_equals_full_forward(tiny):
    model, params, fisher, windows = tiny
    runner = BlockInputs(model, windows[:2])
    assert runner.suffix and len(runner.inputs) == model.config.num_hidden_layers
    ids = torch.tensor(windows[:2])
    with torch.no_grad():
        full = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        for b in range(model.config.num_hidden_layers):
            assert runner.loss(b) == pytest.approx(full, rel=1e-5)
        # a perturbation in the last block: its suffix loss is the full forward's loss
        name = "model.layers.1.mlp.down_proj.weight"
        old = params[name].data.clone()
        params[name].data.add_(torch.randn_like(old) * 0.05)
        full_perturbed = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        suffix = runner.loss(1)
        params[name].data.copy_(old)
    assert full_perturbed != pytest.approx(full, rel=1e-4)
    assert suffix == pytest.approx(full_perturbed, rel=1e-5)


def _two_layer_deltas(params, fisher, names):
    cands = [get_type("HIQ2_H0"), get_type("HIQ2_H4")]
    return candidate_perturbations(params, fisher, {n: cands for n in names}, progress=False)


def test_loss_difference_matrix(tiny):
    """Diagonal = 2 x measured loss increase; same-block cross term by polarization (checked
    against a direct measurement with pairs="all"); zero across blocks."""
    model, params, fisher, windows = tiny
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.mlp.down_proj.weight"]
    deltas = _two_layer_deltas(params, fisher, names)
    conv = converter_for(model.config)
    wins = windows[:2]
    M = LossDifference(model, params, deltas, conv.block_index, pairs="all", progress=False).estimate(wins)
    ids = torch.tensor(wins)

    def loss():
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids, use_cache=False).loss)

    base = loss()
    old = {n: params[n].data.clone() for n in names}
    params[names[0]].data.add_(deltas[names[0]][1].float())
    single = loss() - base
    params[names[1]].data.add_(deltas[names[1]][0].float())
    joint = loss() - base
    params[names[0]].data.copy_(old[names[0]])
    second = loss() - base
    params[names[1]].data.copy_(old[names[1]])
    assert M[1, 1] == pytest.approx(2 * single, rel=1e-3, abs=1e-6)
    assert M[1, 2] == pytest.approx(joint - single - second, rel=1e-2, abs=1e-5)
    assert np.all(M[:4, 4:] == 0) and np.all(M[4:, :4] == 0)
    # the default measures one candidate pair per layer pair and scales it by the diagonal
    Me = LossDifference(model, params, deltas, conv.block_index, progress=False).estimate(wins)
    np.testing.assert_allclose(np.diag(Me), np.diag(M), rtol=1e-6)
    assert Me[0, 2] == pytest.approx(M[0, 2], rel=1e-6)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("estimator", ["gradient", "loss"])
def test_estimation_resumes_after_interrupt(tiny, tmp_path, monkeypatch, estimator):
    """A run killed in the middle leaves a checkpoint; resuming from it gives the same M
    as an uninterrupted run, without redoing finished steps."""
    model, params, fisher, windows = tiny
    windows = windows[:3]                # equal lengths (one batch for the loss estimator)
    conv = converter_for(model.config)
    names = list(params)[:4]
    deltas = _two_layer_deltas(params, fisher, names)
    cls = {"gradient": GradientProjection, "loss": LossDifference}[estimator]
    whole = cls(model, params, deltas, block_of=conv.block_index, progress=False).estimate(windows)

    import hiq2gguf.sensitivity as sens
    calls = {"n": 0}
    real_save = sens.Checkpoint.save

    def dying_save(self, **arrays):
        calls["n"] += 1
        real_save(self, **arrays)
        if calls["n"] == 2:
            raise _Killed()

    # the loss estimator saves every 20 s: make it save (and die) on every step
    monkeypatch.setattr(sens.time, "time", lambda c=iter(range(0, 10**9, 100)): next(c))
    monkeypatch.setattr(sens.Checkpoint, "save", dying_save)
    path = tmp_path / "m.npz"
    with pytest.raises(_Killed):
        cls(model, params, deltas, block_of=conv.block_index, progress=False).estimate(windows, Checkpoint(path))
    monkeypatch.setattr(sens.Checkpoint, "save", real_save)
    partial = Checkpoint(path)
    assert partial.arrays, "nothing was checkpointed"
    counted = {"n": 0}
    real_loss, real_add = sens.BlockInputs.loss, sens.GradientProjection.add_batch

    def counting_loss(self, *a):
        counted["n"] += 1
        return real_loss(self, *a)

    def counting_add(self, *a):
        counted["n"] += 1
        return real_add(self, *a)

    monkeypatch.setattr(sens.BlockInputs, "loss", counting_loss)
    monkeypatch.setattr(sens.GradientProjection, "add_batch", counting_add)
    resumed = cls(model, params, deltas, block_of=conv.block_index, progress=False).estimate(windows, partial)
    np.testing.assert_allclose(resumed, whole, rtol=1e-6, atol=1e-12)
    total = len(windows) if estimator == "gradient" else 1 + 8 + 6   # base + singles + same-block pairs
    assert counted["n"] < total


def test_budget_with_one_feasible_choice_needs_no_estimate(tiny):
    model, params, fisher, windows = tiny
    plan, info = optimized_plan(model, params, fisher, 2.5, windows, None,
                                RatioConfig(ratios="H0,H2", cache=False), progress=False)
    assert {t.name for t in plan.values()} == {"HIQ2_H0"}
    assert info["solver"]["method"] == "forced" and info["predicted_loss_increase"] is None
