"""Ratio optimization: the solvers return the brute-force optimum of small problems."""

import itertools

import numpy as np
import pytest

from hiq2gguf.optimize import InfeasibleBudget, RatioProblem, solve


def brute_force(p: RatioProblem):
    best = None
    for choice in itertools.product(*[range(len(b)) for b in p.bits]):
        if p.total_bits(list(choice)) <= p.budget_bits + 1e-9:
            f = p.objective(list(choice))
            if best is None or f < best[0] - 1e-12:
                best = (f, list(choice))
    return best


def make_problem(seed, n_layers=5, n_cand=3, block=None, dense_psd=False, slack=0.4):
    rng = np.random.default_rng(seed)
    bits = [sorted(rng.uniform(1000, 4000, n_cand).round()) for _ in range(n_layers)]
    n = n_layers * n_cand
    # more bits -> less loss, plus interactions
    if dense_psd:
        G = rng.standard_normal((8, n))
        M = G.T @ G / 8
    else:
        M = rng.standard_normal((n, n)) * 0.3
        M = (M + M.T) / 2
        layer = np.repeat(np.arange(n_layers), n_cand)
        if block is not None:
            same_block = (layer[:, None] // block) == (layer[None, :] // block)
            M = np.where(same_block, M, 0.0)
    for l in range(n_layers):
        for c in range(n_cand):
            M[l * n_cand + c, l * n_cand + c] += 3.0 * (n_cand - c)
    lo = sum(b[0] for b in bits)
    hi = sum(b[-1] for b in bits)
    return RatioProblem(bits=bits, M=M, budget_bits=lo + slack * (hi - lo))


@pytest.mark.parametrize("seed", range(4))
def test_block_sparse_milp_matches_brute_force(seed):
    p = make_problem(seed, block=2)
    sol = solve(p, "linearized")
    f, choice = brute_force(p)
    assert sol.objective == pytest.approx(f, abs=1e-9)
    assert sol.bits <= p.budget_bits
    assert sol.status == "optimal" and sol.gap < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_dense_outer_approximation_matches_brute_force(seed):
    p = make_problem(100 + seed, n_layers=5, n_cand=3, dense_psd=True)
    sol = solve(p, "outer")
    f, _ = brute_force(p)
    assert sol.objective == pytest.approx(f, rel=1e-6, abs=1e-9)
    assert sol.bits <= p.budget_bits and sol.status == "optimal"
    # the linearized MILP is exact for any M, dense too
    assert solve(p, "linearized").objective == pytest.approx(f, rel=1e-6, abs=1e-9)


def test_infeasible_budget_names_the_range():
    p = make_problem(7)
    lo, hi = p.bits_range()
    p.budget_bits = lo - 1
    with pytest.raises(InfeasibleBudget, match=f"smallest achievable is {lo:.0f} bits, the largest {hi:.0f}"):
        solve(p)


def test_outer_refuses_indefinite_m():
    p = make_problem(8)
    p.M = p.M - 10 * np.eye(p.M.shape[0])
    with pytest.raises(ValueError, match="positive semi-definite"):
        solve(p, "outer")


@pytest.mark.parametrize("seed", range(3))
def test_shrunk_gradient_matrix_with_low_rank_factor_matches_brute_force(seed):
    """The gradient estimator's M after cross-layer shrinkage: full rank, but its
    cross-layer part is (1 - lambda) P^T P / S, so outer approximation runs on the
    S-row factor plus a linear term; same optimum as brute force."""
    from hiq2gguf.sensitivity import GradientProjection

    rng = np.random.default_rng(200 + seed)
    n_layers, n_cand, S = 6, 3, 12
    # a shared direction (real cross-layer terms) plus per-sequence noise
    rows = (rng.standard_normal((S, 1)) @ rng.standard_normal((1, n_layers * n_cand))
            + 0.7 * rng.standard_normal((S, n_layers * n_cand)))
    layer = np.repeat(np.arange(n_layers), n_cand)
    M, lam = GradientProjection.shrink_cross_layer(rows, layer)
    assert 0 < lam < 1
    assert np.linalg.eigvalsh(M)[0] > -1e-9 * np.abs(M).max()
    np.testing.assert_allclose(np.diag(M), (rows ** 2).mean(0))
    base = make_problem(300 + seed, n_layers=n_layers, n_cand=n_cand)
    p = RatioProblem(bits=base.bits, M=M, budget_bits=base.budget_bits,
                     factor=rows * np.sqrt((1 - lam) / S))
    sol = solve(p)
    f, _ = brute_force(p)
    assert sol.method == "outer" and sol.status == "optimal"
    assert sol.objective == pytest.approx(f, rel=1e-4, abs=1e-9)
    assert sol.bits <= p.budget_bits
