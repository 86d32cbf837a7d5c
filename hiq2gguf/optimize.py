"""Layer-wise ratio optimization: pick one candidate per layer under a bits budget,
minimizing the quadratic model of the loss increase  dL ~ 1/2 d^T M d  (method.md s.2).

``d`` stacks one-hot choices, one block of variables per layer. The problem is
modelled in Pyomo and solved by HiGHS, which has MILP but no MIQP:

- ``linearized``: for every pair of layers with a nonzero cross block, the products
  d_i d_j of their choices become variables y_ij tied to the one-hot choices by row
  and column sums (the reformulation-linearization of a product of two assignment
  constraints): an exact MILP with a tight relaxation, small when M is block-sparse
  (the paper's same-block-only M).
- ``outer``: outer approximation for a positive semi-definite M (the gradient
  estimator gives a sum of squares): the MILP  min eta  s.t.  eta >= tangent of
  f(d) = 1/2 d^T M d at each iterate, repeated until the best point found and
  the MILP's lower bound meet; exact for convex f on binary points.
Products inside one layer vanish (one-hot), so only cross-layer terms matter.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np


class InfeasibleBudget(ValueError):
    pass


@dataclass
class RatioProblem:
    """``bits[l][m]``: exact file bits of layer l at candidate m; M over the flattened
    (layer, candidate) index, symmetric."""

    bits: list[list[float]]
    M: np.ndarray
    budget_bits: float
    # optional low-rank factor Q (r x n) with Q^T Q equal to M outside the layers' own
    # blocks: on one-hot choices 1/2 d^T M d = c.d + 1/2 |Q d|^2 with c = (diag M - diag Q^T Q)/2,
    # which lets outer approximation work on r parabolas instead of rank(M)
    factor: np.ndarray | None = None

    def __post_init__(self):
        self.M = np.asarray(self.M, dtype=np.float64)
        n = sum(len(b) for b in self.bits)
        if self.M.shape != (n, n):
            raise ValueError(f"M must be {n}x{n} for {len(self.bits)} layers, got {self.M.shape}")
        self.M = (self.M + self.M.T) / 2

    @property
    def offsets(self) -> list[int]:
        return list(itertools.accumulate([0] + [len(b) for b in self.bits]))[:-1]

    def index(self, layer: int, cand: int) -> int:
        return self.offsets[layer] + cand

    def one_hot(self, choice: list[int]) -> np.ndarray:
        d = np.zeros(self.M.shape[0])
        for l, m in enumerate(choice):
            d[self.index(l, m)] = 1
        return d

    def objective(self, choice: list[int]) -> float:
        d = self.one_hot(choice)
        return 0.5 * float(d @ self.M @ d)

    def total_bits(self, choice: list[int]) -> float:
        return float(sum(self.bits[l][m] for l, m in enumerate(choice)))

    def bits_range(self) -> tuple[float, float]:
        return (sum(min(b) for b in self.bits), sum(max(b) for b in self.bits))


@dataclass
class Solution:
    choice: list[int]
    objective: float          # 1/2 d^T M d at the choice
    status: str
    gap: float                # relative gap between the objective and the proven lower bound
    seconds: float
    method: str
    iterations: int = 1
    bits: float = 0.0
    log: list[str] = field(default_factory=list)


def _base_model(p: RatioProblem):
    import pyomo.environ as pyo

    m = pyo.ConcreteModel()
    m.I = pyo.RangeSet(0, p.M.shape[0] - 1)
    m.d = pyo.Var(m.I, domain=pyo.Binary)
    m.one = pyo.ConstraintList()
    for l, b in enumerate(p.bits):
        m.one.add(sum(m.d[p.index(l, c)] for c in range(len(b))) == 1)
    flat_bits = [x for b in p.bits for x in b]
    # budget in bits; scaled to keep coefficients near 1 for the solver
    scale = max(flat_bits)
    m.budget = pyo.Constraint(expr=sum(flat_bits[i] / scale * m.d[i] for i in m.I) <= p.budget_bits / scale)
    return m


def _solve_milp(m, time_limit: float, mip_gap: float = 1e-7):
    from pyomo.contrib.appsi.solvers import Highs

    solver = Highs()
    solver.config.time_limit = time_limit
    solver.config.mip_gap = mip_gap
    solver.config.load_solution = False
    res = solver.solve(m)
    if "infeasible" in res.termination_condition.name.lower():
        return None, res
    if res.best_feasible_objective is None:
        raise TimeoutError(f"HiGHS found no feasible choice within {time_limit:.0f} s "
                           f"({res.termination_condition.name})")
    res.solution_loader.load_vars()
    return res, res


def _choice_from(m, p: RatioProblem) -> list[int]:
    choice = []
    for l, b in enumerate(p.bits):
        vals = [m.d[p.index(l, c)].value for c in range(len(b))]
        choice.append(int(np.argmax(vals)))
    return choice


def _layer_of(p: RatioProblem) -> np.ndarray:
    return np.repeat(np.arange(len(p.bits)), [len(b) for b in p.bits])


def solve_linearized(p: RatioProblem, time_limit: float = 300) -> Solution:
    import pyomo.environ as pyo

    t0 = time.time()
    m = _base_model(p)
    layer = _layer_of(p)
    # every pair of layers with a nonzero cross block gets its whole block of products y_ij = d_i d_j,
    # tied to the one-hot choices by row and column sums (sum_j y_ij = d_i, sum_i y_ij = d_j): exact on
    # binary d, and a far tighter relaxation than per-product bounds (y >= d_i + d_j - 1)
    offsets = p.offsets
    layer_pairs = sorted({(layer[i], layer[j]) for i, j in zip(*np.nonzero(np.triu(p.M, 1)))
                          if layer[i] != layer[j]})
    pairs = [(offsets[a] + u, offsets[b] + v) for a, b in layer_pairs
             for u in range(len(p.bits[a])) for v in range(len(p.bits[b]))]
    m.P = pyo.Set(initialize=pairs, dimen=2)
    m.y = pyo.Var(m.P, bounds=(0, 1))
    m.lin = pyo.ConstraintList()
    for a, b in layer_pairs:
        ia = [offsets[a] + u for u in range(len(p.bits[a]))]
        ib = [offsets[b] + v for v in range(len(p.bits[b]))]
        for i in ia:
            m.lin.add(sum(m.y[i, j] for j in ib) == m.d[i])
        for j in ib:
            m.lin.add(sum(m.y[i, j] for i in ia) == m.d[j])
    diag = np.diag(p.M)
    m.obj = pyo.Objective(expr=0.5 * sum(diag[i] * m.d[i] for i in m.I)
                          + sum(p.M[i, j] * m.y[i, j] for i, j in pairs))
    res, raw = _solve_milp(m, time_limit)
    if res is None:
        _raise_infeasible(p)
    choice = _choice_from(m, p)
    obj = p.objective(choice)
    bound = raw.best_objective_bound
    gap = _gap(obj, bound)
    status = {"optimal": "optimal", "maxTimeLimit": "time limit"}.get(raw.termination_condition.name,
                                                                     raw.termination_condition.name)
    return Solution(choice, obj, status, gap, time.time() - t0, "linearized",
                    bits=p.total_bits(choice))


def solve_outer_approximation(p: RatioProblem, tol: float = 1e-4, max_iter: int = 200,
                              time_limit: float = 300, grid: int = 8) -> Solution:
    """Outer approximation for a positive semi-definite M.

    M = P^T P (eigen-factor, rank r) makes f(d) = 1/2 d^T M d = sum_k 1/2 u_k^2 with
    u_k = P_k . d: a sum of one-dimensional parabolas. Each iteration solves the MILP
    min sum_k eta_k over the tangents collected so far (eta_k >= a u_k - a^2/2 at each
    point a), whose optimum is a lower bound, and adds the tangents at its solution;
    it stops when the best visited point meets the bound (relative ``tol``) or at
    ``time_limit`` seconds with the best point and its proven gap. The first MILP
    already has ``grid`` tangents per parabola spread over the range u_k can take,
    so it starts from a piecewise-linear model, not from eta >= 0.
    """
    import pyomo.environ as pyo

    scale = float(np.abs(p.M).max()) or 1.0
    Ms = p.M / scale          # unit-sized: tolerances must not depend on the loss scale
    if p.factor is not None:
        P = np.asarray(p.factor, dtype=np.float64) / np.sqrt(scale)
        c = 0.5 * (np.diag(Ms) - (P ** 2).sum(axis=0))
    else:
        lam, V = np.linalg.eigh(Ms)
        if lam[0] < -1e-9 * max(1.0, abs(lam[-1])):
            raise ValueError("outer approximation needs a positive semi-definite M "
                             f"(smallest eigenvalue {lam[0] * scale:.3g}); use the linearized MILP")
        keep = lam > 1e-12 * lam[-1]
        P = (V[:, keep] * np.sqrt(lam[keep])).T          # r x n, Ms ~= P^T P
        c = np.zeros(Ms.shape[0])
    t0 = time.time()
    m = _base_model(p)
    m.K = pyo.RangeSet(0, P.shape[0] - 1)
    m.u = pyo.Var(m.K)
    m.eta = pyo.Var(m.K, bounds=(0, None))
    m.proj = pyo.Constraint(m.K, rule=lambda m, k: m.u[k] == sum(float(P[k, i]) * m.d[i]
                                                                 for i in m.I if P[k, i] != 0))
    m.obj = pyo.Objective(expr=sum(float(c[i]) * m.d[i] for i in m.I if c[i] != 0) + sum(m.eta[k] for k in m.K))
    m.cuts = pyo.ConstraintList()
    # range of each u_k over all choices: per layer the smallest / largest coefficient
    lo = np.zeros(P.shape[0])
    hi = np.zeros(P.shape[0])
    for l, b in enumerate(p.bits):
        blk = P[:, p.index(l, 0):p.index(l, 0) + len(b)]
        lo += blk.min(axis=1)
        hi += blk.max(axis=1)
    for k in range(P.shape[0]):
        for a in np.linspace(lo[k], hi[k], grid):
            m.cuts.add(m.eta[k] >= float(a) * m.u[k] - 0.5 * float(a) ** 2)
    best, best_f, lower, log = None, np.inf, -np.inf, []

    def converged() -> bool:
        return best_f - lower <= tol * max(abs(best_f), 1e-12)

    it = 0
    for it in range(1, max_iter + 1):
        left = time_limit - (time.time() - t0)
        if left <= 0:
            break
        res, raw = _solve_milp(m, left, mip_gap=tol / 10)
        if res is None:
            _raise_infeasible(p)
        bound = raw.best_objective_bound
        if bound is not None and np.isfinite(bound):
            lower = max(lower, bound)
        choice = _choice_from(m, p)
        u = P @ p.one_hot(choice)
        f = float(c @ p.one_hot(choice)) + 0.5 * float(u @ u)
        if f < best_f:
            best, best_f = choice, f
        log.append(f"iter {it}: f={f:.6g} best={best_f:.6g} lower={lower:.6g}")
        if converged():
            break
        for k, a in enumerate(u):
            m.cuts.add(m.eta[k] >= float(a) * m.u[k] - 0.5 * float(a) ** 2)
    status = "optimal" if converged() else ("time limit" if time.time() - t0 >= time_limit
                                            else "iteration limit")
    return Solution(best, p.objective(best), status, _gap(best_f, lower), time.time() - t0, "outer", it,
                    bits=p.total_bits(best), log=log)


def solve(p: RatioProblem, method: str = "auto", **kw) -> Solution:
    lo, hi = p.bits_range()
    if p.budget_bits < lo:
        _raise_infeasible(p)
    if method == "auto" and p.factor is not None:
        method = "outer"
    if method == "auto":
        # block-sparse M (the paper's estimator): exact MILP; a dense M is only ever
        # positive semi-definite here (gradient estimator) and goes to outer approximation
        layer = _layer_of(p)
        block = np.abs(p.M) > 0
        cross = np.count_nonzero(np.triu(block, 1)[layer[:, None] != layer[None, :]])
        n = p.M.shape[0]
        dense = cross > 0.25 * n * (n - 1) / 2
        method = "outer" if dense and np.linalg.eigvalsh(p.M)[0] >= -1e-9 * np.abs(p.M).max() else "linearized"
    if method == "linearized":
        return solve_linearized(p, **kw)
    if method == "outer":
        return solve_outer_approximation(p, **kw)
    raise ValueError(f"unknown method {method!r}")


def _gap(obj: float, bound: float) -> float:
    if bound is None or not np.isfinite(bound):
        return float("inf")
    return max(0.0, obj - bound) / max(abs(obj), 1e-12)


def _raise_infeasible(p: RatioProblem):
    lo, hi = p.bits_range()
    raise InfeasibleBudget(f"budget of {p.budget_bits:.0f} bits is infeasible: the smallest achievable "
                           f"is {lo:.0f} bits, the largest {hi:.0f}")
