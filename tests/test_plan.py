"""Per-layer ratio plans on a tiny llama: budget held, never worse than the fixed ratio
under the loss model, and M a positive semi-definite Fisher projection."""

import numpy as np
import pytest
import torch

from converters import converter_for
from hiq2gguf import model_io
from hiq2gguf.calibrate import collect_fisher, linear_weights
from hiq2gguf.formats import get_type
from hiq2gguf.plan import (BudgetError, candidate_perturbations, candidate_types, fixed_plan,
                           layer_bits, optimized_plan)
from hiq2gguf.sensitivity import gradient_projection_matrix


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
    M = gradient_projection_matrix(model, params, deltas, windows, progress=False)
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
    plan, info = optimized_plan(model, params, fisher, bpw, windows, candidates=cands, progress=False)
    elements = sum(r * c for r, c in shapes.values())
    bits = sum(layer_bits(shapes[n], t) for n, t in plan.items())
    assert bits <= bpw * elements
    assert info["status"] == "optimal" and info["gap"] < 1e-3
    fixed = fixed_plan(shapes, bpw)
    assert set(t.name for t in fixed.values()) == {"HIQ2_H2"}
    # the fixed plan is feasible and among the candidates: the optimum cannot be worse
    assert get_type("HIQ2_H2") in candidate_types(bpw)
    assert info["objective"] <= _model_objective(model, params, fisher, windows, fixed, cands) * (1 + 1e-6)


def _model_objective(model, params, fisher, windows, plan, cands):
    deltas = candidate_perturbations(params, fisher, {n: [t] for n, t in plan.items()}, progress=False)
    M = gradient_projection_matrix(model, params, deltas, windows, progress=False)
    return 0.5 * float(M.sum())


def test_budget_errors():
    with pytest.raises(BudgetError, match="minimum is 2.50"):
        candidate_types(2.4)
    assert [t.name for t in candidate_types(2.6)] == ["HIQ2_H0", "HIQ2_H1", "HIQ2_H2", "HIQ2_H3", "HIQ2_H4"]
