"""Which HIQ2 member each linear weight gets: one fixed ratio, or per-layer ratios
chosen by the quadratic loss model under the bits budget."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from hiq2gguf.formats import ALL_TYPES, BLOCK, HIQ2_TYPES, E8Type, FormatError, HIQ2Type, get_type, max_bpw, min_bpw
from hiq2gguf.model_io import ModelSourceError
from hiq2gguf.optimize import RatioProblem, solve
from hiq2gguf.quantize import E8Config, RTNConfig, dequantize_torch, quantize_e8, quantize_rtn_members

# Candidate perturbations only need to be representative, not the final rounding:
# a coarser range search keeps estimating M cheap.
ESTIMATE_RTN = RTNConfig(shrink=(1.0, 0.8, 0.6))
ESTIMATE_E8 = E8Config(search=(0.8, 1.0, 1.25, 1.55), refits=1)


class BudgetError(ValueError):
    pass


def layer_bits(shape: tuple[int, int], t: HIQ2Type) -> int:
    """Exact bits a weight of ``shape`` occupies in the file as type ``t``."""
    return shape[0] * (shape[1] // BLOCK) * t.type_size * 8


def check_budget(bpw: float) -> None:
    if bpw < min_bpw() - 1e-9:
        raise BudgetError(f"--bpw {bpw:g} is below the smallest HIQ2 size: the minimum is "
                          f"{min_bpw():g} bits per weight (the largest member is {max_bpw():g})")


def fixed_ratio_type(bpw: float) -> HIQ2Type:
    """The H-family member with the most high groups whose size fits the budget (the
    paper's fixed ratio)."""
    check_budget(bpw)
    fitting = [t for t in HIQ2_TYPES.values() if t.bpw <= bpw + 1e-9]
    if not fitting:
        raise BudgetError(f"--bpw {bpw:g}: the fixed ratio needs at least {HIQ2_TYPES[min(HIQ2_TYPES)].bpw:.2f} "
                          "bits per weight (HIQ2_H0); below that only the optimized plan can use HIQ2_E8_XS")
    return max(fitting, key=lambda t: t.n_high)


def fixed_plan(shapes: dict[str, tuple[int, int]], bpw: float) -> dict[str, HIQ2Type]:
    t = fixed_ratio_type(bpw)
    return {n: t for n in shapes}


def candidate_types(bpw: float, spread: float = 1.0) -> list[HIQ2Type]:
    """Our types within ``spread`` bits per weight of the budget (the optimizer's choices)."""
    check_budget(bpw)
    top = min(bpw, max_bpw())            # a budget above the largest member still has candidates
    lo, hi = top - spread, min(top + spread, max_bpw())
    return sorted((t for t in ALL_TYPES.values() if lo - 1e-9 <= t.bpw <= hi + 1e-9), key=lambda t: (t.bpw, t.name))


class Candidate(Protocol):
    """One way to store a weight, as the optimizer sees it: the type the plan records,
    its exact size in the file, and the perturbation Delta = Q(W) - W it causes.
    HIQ2 members (below) and stock llama.cpp types (stock.py) are two kinds."""

    qtype: object

    def bits(self, shape: tuple[int, int]) -> int: ...

    @staticmethod
    def deltas(cands: list, name: str, w: torch.Tensor) -> list[torch.Tensor]:
        """Delta of each of ``cands`` (candidates of this kind) for the weight ``w``, at
        once: members of one family can share work."""


def layer_deltas(cands: list[Candidate], name: str, w: torch.Tensor) -> list[torch.Tensor]:
    """Delta of every candidate of one weight, in order; candidates of one kind at once."""
    by_kind: dict[type, list[int]] = {}
    for i, c in enumerate(cands):
        by_kind.setdefault(type(c), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(cands)
    for kind, idx in by_kind.items():
        for i, d in zip(idx, kind.deltas([cands[i] for i in idx], name, w)):
            out[i] = d
    return out


@dataclass(frozen=True)
class HIQ2Candidate:
    """One of our types; Delta from Fisher-weighted RTN (a representative, cheap rounding)."""

    qtype: HIQ2Type | E8Type
    fisher: dict = field(repr=False, compare=False, hash=False)

    def bits(self, shape: tuple[int, int]) -> int:
        return layer_bits(shape, self.qtype)

    @staticmethod
    def deltas(cands: list[HIQ2Candidate], name: str, w: torch.Tensor) -> list[torch.Tensor]:
        fisher = cands[0].fisher[name]
        members = [c for c in cands if isinstance(c.qtype, HIQ2Type)]
        # one range search serves every H member (quantize_rtn_members)
        codes = dict(zip(members, quantize_rtn_members(w, [c.qtype.n_high for c in members], fisher, ESTIMATE_RTN)
                         if members else []))
        for c in cands:
            if isinstance(c.qtype, E8Type):
                codes[c] = quantize_e8(w, fisher, ESTIMATE_E8, c.qtype)
        return [dequantize_torch(codes[c]) - w for c in cands]


@dataclass
class CandidateSet:
    """The optimizer's choices for every weight (layers may differ: row-size rules)."""

    layers: dict[str, list[Candidate]]
    settings: dict                       # what the Deltas depend on besides weights and windows (cache key)
    uniform: object | None = None        # a type every layer may take: the fixed plan it is compared with

    @property
    def names(self) -> list[str]:
        seen = {c.qtype.name: c.qtype for cs in self.layers.values() for c in cs}
        return [n for n, _ in sorted(seen.items(), key=lambda kv: (kv[1].bpw, kv[0]))]


def hiq2_candidates(names, fisher, bpw: float, cfg: RatioConfig) -> CandidateSet:
    """The same members for every weight: ``cfg.ratios``, or those within 1 bpw of the budget."""
    types = parse_ratios(cfg.ratios) if cfg.ratios else candidate_types(bpw)
    try:
        fixed = fixed_ratio_type(bpw)
    except BudgetError:
        fixed = None                     # below every H member: no fixed plan to compare with
    return CandidateSet({n: [HIQ2Candidate(t, fisher) for t in types] for n in names},
                        {"candidates": tuple(t.name for t in types), "rtn": repr(ESTIMATE_RTN),
                         **({"e8": repr(ESTIMATE_E8)} if any(isinstance(t, E8Type) for t in types) else {})},
                        fixed if fixed in types else None)


def perturbations(params, layers: dict[str, list[Candidate]], progress: bool = True) -> dict[str, list[torch.Tensor]]:
    """Delta = Q(W) - W for every layer and candidate (bfloat16 to halve memory)."""
    from tqdm import tqdm

    out = {}
    for n in tqdm(list(layers), desc="candidates", unit="layer", disable=not progress):
        w = params[n].data
        out[n] = [d.to(torch.bfloat16) for d in layer_deltas(layers[n], n, w)]
    return out


def candidate_perturbations(params, fisher, types: dict[str, list[HIQ2Type]],
                            progress: bool = True) -> dict[str, list[torch.Tensor]]:
    """Delta = Q_t(W) - W for every layer and HIQ2 member (bfloat16 to halve memory)."""
    return perturbations(params, {n: [HIQ2Candidate(t, fisher) for t in ts] for n, ts in types.items()},
                         progress)


@dataclass
class RatioConfig:
    """How per-layer ratios are chosen (``ratio_strategy="optimized"``)."""

    estimator: str = "gradient"          # gradient | loss (see sensitivity.py)
    ratios: str | None = None            # candidate members, e.g. "H0,H2,H4" or "0,0.25,0.5";
                                         # default: every member within 1 bpw of the budget
    loss_windows: int = 2                # loss estimator: calibration windows it evaluates ...
    loss_ctx: int = 256                  # ... cut to this many tokens (it runs thousands of passes)
    pairs: str = "extreme"               # loss estimator: same-block pairs at "extreme" or "all" candidates
    solver: str = "auto"                 # auto | linearized | outer
    time_limit: float = 300.0            # seconds for HiGHS; past it: best choice found and its gap
    cache: bool = True                   # keep M (and partial estimates) in the cache dir


def parse_ratios(spec: str) -> list[HIQ2Type]:
    """``"H0,H2,HIQ2_H4,E8"`` or ratios of high groups ``"0,0.25,0.5"`` -> our types."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name = item.upper()
        if not name.startswith("HIQ2_") and name[:1] in ("H", "E"):
            name = "HIQ2_" + name
        if name.startswith("HIQ2_"):
            try:
                t = get_type(name)
            except FormatError:
                raise BudgetError(f"--ratios: unknown member {item!r} "
                                  "(HIQ2_H0 .. HIQ2_H8, HIQ2_E8, HIQ2_E8_2K, _8K, _XS)") from None
        else:
            try:
                r = float(item)
            except ValueError:
                raise BudgetError(f"--ratios: {item!r} is neither a member (H0..H8, E8) nor a ratio") from None
            n_high = r * 8
            if abs(n_high - round(n_high)) > 1e-6 or not 0 <= n_high <= 8:
                raise BudgetError(f"--ratios: {item} is not a storable ratio (multiples of 1/8 from 0 to 1)")
            t = next(t for t in HIQ2_TYPES.values() if t.n_high == round(n_high))
        if t not in out:
            out.append(t)
    if not out:
        raise BudgetError("--ratios: no candidates given")
    return sorted(out, key=lambda t: (t.bpw, t.name))


def optimized_plan(model, params: dict[str, torch.nn.Parameter], fisher: dict[str, torch.Tensor],
                   bpw: float, windows: list[list[int]], block_of=None, cfg: RatioConfig = RatioConfig(),
                   progress: bool = True, candidates: CandidateSet | None = None) -> tuple[dict[str, HIQ2Type], dict]:
    """Per-layer types minimizing 1/2 d^T M d under the budget; ``info`` describes the
    estimator and the solver run. ``candidates``: the choices per weight (default: the
    HIQ2 members of ``hiq2_candidates``; stock types: ``stock.stock_candidates``)."""
    from hiq2gguf.runtime import cache_dir
    from hiq2gguf.sensitivity import ESTIMATORS, Checkpoint, cache_key

    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {cfg.estimator!r} (choose from {', '.join(ESTIMATORS)})")
    names = list(params)
    cset = candidates or hiq2_candidates(names, fisher, bpw, cfg)
    shapes = {n: tuple(params[n].shape) for n in names}
    elements = sum(s[0] * s[1] for s in shapes.values())
    bits = plan_bits(shapes, cset, bpw)
    forced = forced_plan(names, cset, bits, bpw * elements, cfg.estimator)
    if forced is not None:
        return forced

    if cfg.estimator == "loss":
        est_windows = [w[:cfg.loss_ctx] for w in windows[:cfg.loss_windows]]
        settings = {"loss_ctx": cfg.loss_ctx, "pairs": cfg.pairs}
    else:
        est_windows, settings = windows, {}
    settings.update(estimator=cfg.estimator, **cset.settings)
    key = cache_key(params, est_windows, settings)
    path = cache_dir() / "sensitivity" / f"{cfg.estimator}-{key}.npz"
    ckpt = Checkpoint(path if cfg.cache else None)
    t0 = time.time()
    M = ckpt.get("M")
    resumed = M is not None or bool(ckpt.arrays)
    if M is None:
        deltas = perturbations(params, cset.layers, progress)
        est = ESTIMATORS[cfg.estimator](model, params, deltas, block_of=block_of, progress=progress,
                                        **({"pairs": cfg.pairs} if cfg.estimator == "loss" else {}))
        M = est.estimate(est_windows, ckpt)
        del deltas
        # cost of this run (an interrupted earlier run's share is not counted)
        ckpt.save(M=M, seconds=np.float64(time.time() - t0))
    est_seconds = float(ckpt.get("seconds", time.time() - t0))
    return solve_plan(names, cset, bits, bpw * elements, M, ckpt.get("rows"), cfg, {
        "estimator_seconds": round(est_seconds, 1),       # computing M (also when read from the cache)
        "estimator_cache": {"path": str(path) if cfg.cache else None, "resumed": resumed}})


def plan_bits(shapes: dict[str, tuple[int, int]], cset: CandidateSet, bpw: float) -> list[list[int]]:
    """Exact file bits of every candidate of every weight; an infeasible budget is an error."""
    bits = [[c.bits(shapes[n]) for c in cset.layers[n]] for n in shapes]
    elements = sum(s[0] * s[1] for s in shapes.values())
    lo, hi = (sum(f(b) for b in bits) / elements for f in (min, max))
    if bpw * elements < sum(min(b) for b in bits):
        raise BudgetError(f"--bpw {bpw:g} is infeasible with candidates {', '.join(cset.names)}: "
                          f"the smallest achievable is {lo:.4f}, the largest {hi:.4f}")
    return bits


def solve_plan(names: list[str], cset: CandidateSet, bits: list[list[int]], budget_bits: float, M: np.ndarray,
               rows: np.ndarray | None, cfg: RatioConfig, estimator_info: dict) -> tuple[dict[str, HIQ2Type], dict]:
    """The per-layer choice minimizing 1/2 d^T M d under ``budget_bits`` (``rows``: the
    gradient estimator's per-sequence projections, whose cross-layer part is shrunk)."""
    from hiq2gguf.sensitivity import GradientProjection

    layers = [cset.layers[n] for n in names]
    shrinkage, factor = None, None
    if cfg.estimator == "gradient":
        layer = np.repeat(np.arange(len(bits)), [len(b) for b in bits])
        M, shrinkage = GradientProjection.shrink_cross_layer(rows, layer)
        if shrinkage < 1.0:        # cross-layer part = (1 - lambda) P^T P / S: rank S, a small factor
            factor = np.asarray(rows, dtype=np.float64) * np.sqrt((1.0 - shrinkage) / len(rows))
    if not np.isfinite(M).all():
        raise ModelSourceError("the loss model is not finite: the calibration's gradients overflowed "
                               "(weights or activations beyond float32's range?)")
    problem = RatioProblem(bits=bits, M=M, budget_bits=budget_bits, factor=factor)
    sol = solve(problem, cfg.solver, time_limit=cfg.time_limit)
    plan = {n: cs[c].qtype for n, cs, c in zip(names, layers, sol.choice)}
    info = {
        "solver": {"name": "highs", "method": sol.method, "status": sol.status, "objective": sol.objective,
                   "gap": sol.gap, "seconds": round(sol.seconds, 2), "iterations": sol.iterations},
        "estimator": cfg.estimator,
        "cross_layer_shrinkage": shrinkage,             # gradient estimator: see shrink_cross_layer
        **estimator_info,
        "candidates": cset.names,
        "predicted_loss_increase": sol.objective,
        "predicted_loss_increase_fixed": _fixed_prediction(problem, layers, cset.uniform),
    }
    return plan, info


def forced_plan(names: list[str], cset: CandidateSet, bits: list[list[int]], budget_bits: float,
                estimator: str) -> tuple[dict[str, HIQ2Type], dict] | None:
    """The plan when the budget leaves one choice (no M needed), else None."""
    forced = _forced_choice(bits, budget_bits)
    if forced is None:
        return None
    plan = {n: cset.layers[n][c].qtype for n, c in zip(names, forced)}
    return plan, {"solver": {"name": "none", "method": "forced", "status": "only one feasible choice",
                             "objective": None, "gap": 0.0, "seconds": 0.0, "iterations": 0},
                  "estimator": estimator, "estimator_seconds": 0.0,
                  "estimator_cache": {"path": None, "resumed": False},
                  "candidates": cset.names, "predicted_loss_increase": None,
                  "predicted_loss_increase_fixed": None}


def _forced_choice(bits: list[list[int]], budget_bits: float) -> list[int] | None:
    """The smallest candidate everywhere, when no layer can afford any larger one
    (then M is not needed: e.g. a budget equal to the smallest member's size)."""
    floor = sum(min(b) for b in bits)
    step = min((sorted(set(b))[1] - min(b) for b in bits if len(set(b)) > 1), default=None)
    if step is None or floor + step > budget_bits:
        return [b.index(min(b)) for b in bits]
    return None


def _fixed_prediction(problem: RatioProblem, layers: list[list[Candidate]], uniform) -> float | None:
    """The loss model's prediction for the fixed plan (``uniform`` everywhere), if there is one."""
    if uniform is None:
        return None
    return problem.objective([[c.qtype for c in cs].index(uniform) for cs in layers])
