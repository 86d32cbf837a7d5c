"""Sensitivity matrix M of the quadratic loss model dL ~ 1/2 d^T M d, two estimators
behind one interface (``ESTIMATORS[name](...).estimate(windows, checkpoint)``).

Both see the candidate perturbations Delta_(l,m) = Q_m(W_l) - W_l of every linear
weight l and candidate type m, and fill M over the flattened (layer, candidate)
index.

- ``gradient`` (method.md s.6): with per-sequence gradients g(s),
  M_(l,m),(k,n) = mean_s <g_l(s), Delta_(l,m)> <g_k(s), Delta_(k,n)>:
  one backward pass per calibration sequence, every cross-layer term included,
  M = P^T P / S positive semi-definite.
- ``loss`` (the paper's, method.md s.2): loss differences on calibration text.
  M_ii = 2 [L(theta + Delta_i) - L(theta)] from quantizing one layer at one
  candidate; for two layers of the same transformer block the cross term is
  M_ij = dL(i and j) - dL(i) - dL(j) (polarization); zero across blocks.

Both are long: their partial state goes to a checkpoint file after every step,
so a killed run resumes where it stopped and gives the same M.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hiq2gguf.gguf_io import atomic_output
from hiq2gguf.sequential import run_block


class Checkpoint:
    """Named numpy arrays in one ``.npz`` file, rewritten atomically (write + rename),
    so the file on disk is always a complete earlier state."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.arrays: dict[str, np.ndarray] = {}
        if self.path and self.path.exists():
            with np.load(self.path) as f:
                self.arrays = {k: f[k] for k in f.files}

    def get(self, name: str, default=None):
        return self.arrays.get(name, default)

    def save(self, **arrays: np.ndarray) -> None:
        self.arrays.update(arrays)
        if not self.path:
            return
        with atomic_output(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **self.arrays)


def cache_key(params: dict[str, torch.Tensor], windows: list[list[int]], settings: dict) -> str:
    """What M depends on: the weights, the calibration tokens and the estimator settings
    (candidate types, quantizer, estimator parameters)."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(np.asarray([x for w in windows for x in w] + [len(windows)], dtype=np.int64).tobytes())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()[:24]


class _Perturbed:
    """Context manager: weights get ``W + Delta`` inside, their exact old values after."""

    def __init__(self, params, changes: list[tuple[str, torch.Tensor]]):
        self.params, self.changes, self.saved = params, changes, []

    def __enter__(self):
        with torch.no_grad():
            for name, delta in self.changes:
                p = self.params[name]
                self.saved.append((p, p.data.clone()))
                p.data.add_(delta.to(p.dtype))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, old in self.saved:
                p.data.copy_(old)
        return False


class GradientProjection:
    """``deltas[name]``: list of candidate perturbations of that weight (any float dtype)."""

    name = "gradient"

    def __init__(self, model, params: dict[str, torch.nn.Parameter], deltas: dict[str, list[torch.Tensor]],
                 block_of=None, progress: bool = True):
        self.model = model
        self.params = params
        self.names = list(deltas)
        self.deltas = deltas
        self.progress = progress
        self.rows: list[np.ndarray] = []

    def add_batch(self, input_ids: torch.Tensor) -> None:
        for p in self.model.parameters():
            p.grad = None
        out = self.model(input_ids=input_ids, labels=input_ids, use_cache=False)
        out.loss.backward()
        row = []
        for name in self.names:
            g = self.params[name].grad.to(torch.float32)
            for delta in self.deltas[name]:
                row.append(float((g * delta.to(torch.float32)).sum()))
            self.params[name].grad = None
        self.rows.append(np.asarray(row))

    def matrix(self) -> np.ndarray:
        P = np.stack(self.rows)
        return P.T @ P / len(self.rows)

    @staticmethod
    def shrink_cross_layer(rows: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, float]:
        """M with its cross-layer entries shrunk toward zero (Ledoit-Wolf intensity).

        With S sequences M has rank <= S, far below the number of layers: the
        optimizer could then pick a mix whose per-sequence first-order terms cancel
        across layers, and the model would predict a loss increase of ~0 for it (we
        saw 1e-5 predicted against 0.3 nats measured). The cross-layer entries are
        mostly sampling noise at this S, so they are shrunk by the intensity
        lambda = sum Var(M_ij) / sum M_ij^2 over cross-layer pairs, estimated from the
        per-sequence products. (1 - lambda) M + lambda D, D the layer-diagonal blocks
        of M, stays positive semi-definite.
        """
        P = np.asarray(rows, dtype=np.float64)
        S = P.shape[0]
        M = P.T @ P / S
        cross = layer[:, None] != layer[None, :]
        if S < 2 or not cross.any():
            return M, 0.0
        second = (P ** 2).T @ (P ** 2) / S                 # mean_s (p_si p_sj)^2
        var = np.clip(second - M ** 2, 0, None) / (S - 1)   # variance of the mean M_ij
        denom = float((M[cross] ** 2).sum())
        lam = 1.0 if denom == 0 else float(np.clip(var[cross].sum() / denom, 0.0, 1.0))
        out = M.copy()
        out[cross] *= 1.0 - lam
        return out, lam

    def estimate(self, windows: list[list[int]], checkpoint: Checkpoint | None = None) -> np.ndarray:
        checkpoint = checkpoint or Checkpoint(None)
        done = checkpoint.get("rows")
        self.rows = list(done) if done is not None else []
        saved = {n: p.requires_grad for n, p in self.model.named_parameters()}
        tracked = {id(self.params[n]) for n in self.names}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in tracked)
        try:
            bar = tqdm(windows, desc="sensitivity (gradient)", unit="seq", disable=not self.progress,
                       initial=len(self.rows), total=len(windows))
            for w in windows[len(self.rows):]:
                self.add_batch(torch.tensor([w]))
                checkpoint.save(rows=np.stack(self.rows))
                bar.update()
            bar.close()
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(saved[n])
        return self.matrix()


class BlockInputs:
    """Loss of the calibration windows evaluated from transformer block ``b`` on, with
    the inputs of every block captured once from the unperturbed model: perturbing
    a weight of block b leaves blocks before it unchanged, so each loss evaluation
    costs only the blocks from b to the end (on average half a forward pass).

    Works for models laid out as ``model.model.layers`` / ``model.model.norm`` /
    ``model.lm_head`` (the LLaMA family); other layouts fall back to full passes.
    """

    def __init__(self, model, windows: list[list[int]]):
        self.model = model
        if len({len(w) for w in windows}) != 1:
            raise ValueError("loss windows must all have the same length")
        self.ids = torch.tensor(windows)
        inner = getattr(model, "model", None)
        self.layers = getattr(inner, "layers", None)
        self.suffix = (self.layers is not None and hasattr(inner, "norm") and hasattr(model, "lm_head")
                       and not getattr(model.config, "final_logit_softcapping", None))
        self.inputs: list[tuple[torch.Tensor, dict]] = []
        if self.suffix:
            hooks = [layer.register_forward_pre_hook(self._capture, with_kwargs=True) for layer in self.layers]
            try:
                with torch.no_grad():
                    model(input_ids=self.ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()

    def _capture(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.inputs.append((hidden.detach(), rest))

    @torch.no_grad()
    def loss(self, block: int = 0) -> float:
        labels = self.ids[:, 1:]
        if not self.suffix:
            return float(self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss)
        h = self.inputs[block][0]
        for layer, (_, kwargs) in zip(self.layers[block:], self.inputs[block:]):   # each block its own
            h = run_block(layer, h, kwargs)                                        # (mask, rope: Gemma3)
        logits = self.model.lm_head(self.model.model.norm(h))[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                       labels.reshape(-1)))


class LossDifference:
    """The paper's estimator. ``pairs="extreme"`` (default) measures each same-block pair of
    layers once, both at their first candidate (the largest perturbation), and scales
    that cross term to the other candidate pairs by the square roots of the diagonal
    entries (a correlation per layer pair); ``pairs="all"`` measures every candidate
    pair, |candidates|^2 times the cost. ``block_of(name)`` gives a layer's block."""

    name = "loss"

    def __init__(self, model, params, deltas: dict[str, list[torch.Tensor]], block_of,
                 pairs: str = "extreme", progress: bool = True):
        if pairs not in ("extreme", "all"):
            raise ValueError(f"pairs must be 'extreme' or 'all', got {pairs!r}")
        self.model, self.params, self.deltas, self.pairs, self.progress = model, params, deltas, pairs, progress
        self.names = list(deltas)
        self.n_cand = [len(deltas[n]) for n in self.names]
        self.offsets = list(itertools.accumulate([0] + self.n_cand))[:-1]
        self.block = [block_of(n) for n in self.names]

    def _pair_jobs(self) -> list[tuple[int, int, int, int]]:
        """(layer a, cand m, layer b, cand n) with a < b in the same block."""
        jobs = []
        for a, b in itertools.combinations(range(len(self.names)), 2):
            if self.block[a] is None or self.block[a] != self.block[b]:
                continue
            cands = (itertools.product(range(self.n_cand[a]), range(self.n_cand[b]))
                     if self.pairs == "all" else [(0, 0)])
            jobs += [(a, m, b, n) for m, n in cands]
        return jobs

    def estimate(self, windows: list[list[int]], checkpoint: Checkpoint | None = None) -> np.ndarray:
        checkpoint = checkpoint or Checkpoint(None)
        n = sum(self.n_cand)
        single = checkpoint.get("single", np.full(n, np.nan))
        jobs = self._pair_jobs()
        joint = checkpoint.get("joint", np.full(len(jobs), np.nan))
        runner = BlockInputs(self.model, windows)
        base = float(checkpoint.get("base", runner.loss()))
        todo = int(np.isnan(single).sum() + np.isnan(joint).sum())
        bar = tqdm(total=n + len(jobs), initial=n + len(jobs) - todo, desc="sensitivity (loss)",
                   unit="eval", disable=not self.progress)
        last_save = time.time()

        def first_block(*layers: int) -> int:
            blocks = [self.block[a] for a in layers]
            return 0 if None in blocks else min(blocks)

        for a, name in enumerate(self.names):
            for m in range(self.n_cand[a]):
                i = self.offsets[a] + m
                if np.isnan(single[i]):
                    with _Perturbed(self.params, [(name, self.deltas[name][m])]):
                        single[i] = runner.loss(first_block(a)) - base
                    bar.update()
                    if time.time() - last_save > 20:
                        checkpoint.save(base=np.float64(base), single=single, joint=joint)
                        last_save = time.time()
        for j, (a, m, b, nn) in enumerate(jobs):
            if np.isnan(joint[j]):
                with _Perturbed(self.params, [(self.names[a], self.deltas[self.names[a]][m]),
                                              (self.names[b], self.deltas[self.names[b]][nn])]):
                    joint[j] = runner.loss(first_block(a, b)) - base
                bar.update()
                if time.time() - last_save > 20:
                    checkpoint.save(base=np.float64(base), single=single, joint=joint)
                    last_save = time.time()
        bar.close()
        checkpoint.save(base=np.float64(base), single=single, joint=joint)
        return self.matrix(single, jobs, joint)

    def matrix(self, single: np.ndarray, jobs, joint: np.ndarray) -> np.ndarray:
        M = np.diag(2.0 * single)
        scale = np.sqrt(np.clip(2.0 * single, 0, None))
        for (a, m, b, n), dl in zip(jobs, joint):
            i, k = self.offsets[a] + m, self.offsets[b] + n
            cross = dl - single[i] - single[k]
            if self.pairs == "all":
                M[i, k] = M[k, i] = cross
                continue
            if scale[i] == 0 or scale[k] == 0:
                continue
            rho = cross / (scale[i] * scale[k])
            ia = slice(self.offsets[a], self.offsets[a] + self.n_cand[a])
            kb = slice(self.offsets[b], self.offsets[b] + self.n_cand[b])
            block = rho * np.outer(scale[ia], scale[kb])
            M[ia, kb] = block
            M[kb, ia] = block.T
        return M


ESTIMATORS = {cls.name: cls for cls in (GradientProjection, LossDifference)}
