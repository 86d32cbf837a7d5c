"""Which HIQ2 member each linear weight gets: one fixed ratio, or per-layer ratios
chosen by the quadratic loss model under the bits budget."""

from __future__ import annotations


import torch

from hiq2gguf.formats import BLOCK, HIQ2_TYPES, HIQ2Type, max_bpw, min_bpw
from hiq2gguf.optimize import InfeasibleBudget, RatioProblem, solve
from hiq2gguf.quantize import RTNConfig, dequantize_torch, quantize_rtn

# Candidate perturbations only need to be representative, not the final rounding:
# a coarser range search keeps estimating M cheap.
ESTIMATE_RTN = RTNConfig(shrink=(1.0, 0.8, 0.6))


class BudgetError(ValueError):
    pass


def layer_bits(shape: tuple[int, int], t: HIQ2Type) -> int:
    """Exact bits a weight of ``shape`` occupies in the file as type ``t``."""
    return shape[0] * (shape[1] // BLOCK) * t.type_size * 8


def check_budget(bpw: float) -> None:
    if bpw < min_bpw() - 1e-9:
        raise BudgetError(f"--bpw {bpw:g} is below the smallest HIQ2 size: "
                          f"the minimum is {min_bpw():.2f} bits per weight")


def fixed_ratio_type(bpw: float) -> HIQ2Type:
    """The family member with the most high groups whose size fits the budget."""
    check_budget(bpw)
    fitting = [t for t in HIQ2_TYPES.values() if t.bpw <= bpw + 1e-9]
    return max(fitting, key=lambda t: t.n_high)


def fixed_plan(shapes: dict[str, tuple[int, int]], bpw: float) -> dict[str, HIQ2Type]:
    t = fixed_ratio_type(bpw)
    return {n: t for n in shapes}


def candidate_types(bpw: float, spread: float = 1.0) -> list[HIQ2Type]:
    """Members within ``spread`` bits per weight of the budget (the optimizer's choices)."""
    check_budget(bpw)
    lo, hi = bpw - spread, min(bpw + spread, max_bpw())
    return [t for t in HIQ2_TYPES.values() if lo - 1e-9 <= t.bpw <= hi + 1e-9]


def candidate_perturbations(params, fisher, types: dict[str, list[HIQ2Type]],
                            progress: bool = True) -> dict[str, list[torch.Tensor]]:
    """Delta = Q_t(W) - W for every layer and candidate type (bfloat16 to halve memory)."""
    from tqdm import tqdm

    out = {}
    for n in tqdm(list(types), desc="candidates", unit="layer", disable=not progress):
        w = params[n].data
        out[n] = [(dequantize_torch(quantize_rtn(w, t.n_high, fisher[n], ESTIMATE_RTN)) - w).to(torch.bfloat16)
                  for t in types[n]]
    return out


def optimized_plan(model, params: dict[str, torch.nn.Parameter], fisher: dict[str, torch.Tensor],
                   bpw: float, windows: list[list[int]], candidates: list[HIQ2Type] | None = None,
                   method: str = "auto", progress: bool = True) -> tuple[dict[str, HIQ2Type], dict]:
    """Per-layer types minimizing 1/2 d^T M d (gradient-projection M) under the budget."""
    from hiq2gguf.sensitivity import gradient_projection_matrix

    cands = candidates or candidate_types(bpw)
    names = list(params)
    deltas = candidate_perturbations(params, fisher, {n: cands for n in names}, progress)
    M = gradient_projection_matrix(model, params, deltas, windows, progress)
    del deltas
    shapes = {n: tuple(params[n].shape) for n in names}
    elements = sum(s[0] * s[1] for s in shapes.values())
    problem = RatioProblem(bits=[[layer_bits(shapes[n], t) for t in cands] for n in names], M=M,
                           budget_bits=bpw * elements)
    try:
        sol = solve(problem, method)
    except InfeasibleBudget:
        lo, hi = (x / elements for x in problem.bits_range())
        raise BudgetError(f"--bpw {bpw:g} is infeasible with candidates "
                          f"{', '.join(t.name for t in cands)}: achievable {lo:.4f} .. {hi:.4f}") from None
    plan = {n: cands[c] for n, c in zip(names, sol.choice)}
    info = {"name": "highs", "method": sol.method, "status": sol.status, "objective": sol.objective,
            "gap": sol.gap, "seconds": round(sol.seconds, 2), "iterations": sol.iterations,
            "candidates": [t.name for t in cands], "estimator": "gradient",
            "predicted_loss_increase": sol.objective}
    return plan, info
