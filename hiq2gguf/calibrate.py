"""Calibration statistics: Fisher information (squared gradients) per linear weight."""

from __future__ import annotations

import torch
from tqdm import tqdm


def linear_weights(model, is_linear) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_linear(n)}


class FisherCollector:
    """Empirical Fisher diagonal F = E_s[g_s^2], one calibration sequence per sample.

    ``add_batch`` runs forward and backward on one sequence (next-token
    cross-entropy) and accumulates the squared gradient of every tracked weight.
    """

    def __init__(self, model, params: dict[str, torch.nn.Parameter]):
        self.model = model
        self.params = params
        self.sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.n_samples = 0

    def add_batch(self, input_ids: torch.Tensor) -> float:
        for p in self.model.parameters():
            p.grad = None
        out = self.model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        for n, p in self.params.items():
            self.sums[n] += p.grad.to(torch.float32) ** 2
            p.grad = None
        self.n_samples += input_ids.shape[0]
        return float(out.loss.detach())

    def fisher(self) -> dict[str, torch.Tensor]:
        return {n: s / max(self.n_samples, 1) for n, s in self.sums.items()}


def collect_fisher(model, params, windows: list[list[int]], progress: bool = True,
                   hessians: bool = False):
    """Fisher diagonal of every weight in ``params`` over the calibration windows; with
    ``hessians``, also each linear layer's input Hessian (GPTQ), from the same passes.
    Returns the Fisher dict, or (Fisher, Hessians) with ``hessians``."""
    from hiq2gguf.gptq import GPTQ

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    tracked = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in tracked)
    collector = FisherCollector(model, params)
    gptq: dict[str, GPTQ] = {}
    hooks = []
    if hessians:
        modules = dict(model.named_modules())
        for name in params:
            mod = modules[name.rsplit(".", 1)[0]]
            gptq[name] = GPTQ(mod.weight.shape[1])
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, g=gptq[name]: g.add_batch(inp[0])))
    try:
        bar = tqdm(windows, desc="calibrate", unit="seq", disable=not progress)
        for w in bar:
            loss = collector.add_batch(torch.tensor([w]))
            bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return (collector.fisher(), gptq) if hessians else collector.fisher()


@torch.no_grad()
def collect_input_squares(model, params, windows: list[list[int]], progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean squared input activation of every column of every weight in ``params``,
    E[x_j^2] over all calibration tokens: the diagonal of the GPTQ Hessian X^T X / n,
    and what llama-imatrix collects (the importance matrix of ggml's quantizers)."""
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(p.shape[1], dtype=torch.float64) for n, p in params.items()}
    counts = dict.fromkeys(params, 0)

    def hook(name):
        def add(module, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float64)
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]
        return add

    hooks = [modules[n.rsplit(".", 1)[0]].register_forward_hook(hook(n)) for n in params]
    try:
        for w in tqdm(windows, desc="input squares", unit="seq", disable=not progress):
            model(input_ids=torch.tensor([w]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / max(counts[n], 1)).to(torch.float32) for n in params}
