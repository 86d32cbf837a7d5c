"""Sensitivity matrix M of the quadratic loss model, gradient-projection estimator
(method.md s.6).

With per-sample gradients g(s) and each candidate's perturbation
Delta_(l,m) = Q_m(W_l) - W_l, the empirical Fisher gives

    M_(l,m),(k,n) = mean_s <g_l(s), Delta_(l,m)> <g_k(s), Delta_(k,n)>,

one backward pass per calibration sequence and one dot product per (layer,
candidate), with every cross-layer term included. M = P^T P / S is a sum of
squares, hence positive semi-definite.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm


class GradientProjection:
    """``deltas[name]``: list of candidate perturbations of that weight (any float dtype)."""

    def __init__(self, model, params: dict[str, torch.nn.Parameter], deltas: dict[str, list[torch.Tensor]]):
        self.model = model
        self.params = params
        self.names = list(deltas)
        self.deltas = deltas
        self.rows: list[np.ndarray] = []

    def add_batch(self, input_ids: torch.Tensor) -> None:
        for p in self.model.parameters():
            p.grad = None
        out = self.model(input_ids=input_ids, labels=input_ids)
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


def gradient_projection_matrix(model, params, deltas, windows, progress: bool = True) -> np.ndarray:
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    tracked = {id(params[n]) for n in deltas}
    for p in model.parameters():
        p.requires_grad_(id(p) in tracked)
    est = GradientProjection(model, params, deltas)
    try:
        for w in tqdm(windows, desc="sensitivity", unit="seq", disable=not progress):
            est.add_batch(torch.tensor([w]))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return est.matrix()
