"""GPTQ on the HIQ2 grid (Frantar et al., 2022).

Columns (input channels) are rounded left to right; the rounding error of each
column is spread over the columns not yet rounded through the Cholesky factor
of the inverse Hessian H = 2 X^T X / n of the layer's calibration inputs. The
grid of each 64-column block (its high groups, scale d and zero point z) is
fixed when the algorithm reaches the block, from the weights as updated so
far, by the same importance-weighted search as RTN. Every value it emits is a
grid level, so the result packs into the file unchanged. ``rounded`` keeps the
weights as the error feedback had updated them when each column was rounded:
their nearest levels are the codes (the hybrid's AdaRound starts from them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiq2gguf.formats import (BLOCK, E8, E8_SCALE_STEPS, GROUP, N_GROUPS, Codes, E8Codes, E8Type,
                              HIQ2Type)
from hiq2gguf.quantize import (E8Config, RTNConfig, codes_from_tensors, e8_codes, e8_decoded, e8_round, e8_values,
                               e8_rms_units, floored_importance, round_to_grid, search_block_grid, search_e8_units,
                               store_e8_units)


@dataclass
class GPTQConfig:
    damp: float = 0.01                # of the mean Hessian diagonal, added to the diagonal
    # activation order: inputs in decreasing order of their Hessian diagonal, so the error
    # of the most active ones is fixed first and fed to the rest. For the H members column
    # by column, their grids (scale, zero point, high groups) then searched up front on the
    # weights as given ("static groups": a block's columns are no longer reached together);
    # for the lattice members whole 64-column blocks, each block's scales still searched
    # when it is reached (on a test layer static scales lost more than the order gained)
    act_order: bool = False
    # lattice members: a block's sub-block units are searched on its weights as the error
    # feedback left them, but never above this many times the largest unit the search
    # would try on the weights as given. Unbounded, the feedback and the units can feed
    # each other: on Qwen2.5's blk.2.ffn_down (a few weights 800x the row's rms, 8960
    # inputs seen in 8192 calibration tokens) the squared error of the rows holding those
    # weights grew to 90x their squared norm and the model broke (perplexity 1080)
    unit_growth: float = 2.0


def gptq_key(cfg: GPTQConfig) -> tuple[str, ...]:
    """What a cache key of GPTQ's results adds for ``cfg``: nothing for the defaults, so
    that checkpoints made before the config existed still count."""
    return () if cfg == GPTQConfig() else (repr(cfg),)


class GPTQ:
    def __init__(self, n_cols: int, cfg: GPTQConfig = GPTQConfig()):
        self.H = torch.zeros(n_cols, n_cols, dtype=torch.float64)
        self.n = 0
        self.cfg = cfg
        self.rounded: torch.Tensor | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        """x: inputs of the layer, [..., n_cols]."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x

    def _prepare(self, weight: torch.Tensor, unit: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight with dead input columns zeroed, in processing order; upper Cholesky factor
        of the damped inverse Hessian in that order; the order: original column of each
        processed one). ``unit``: columns that move together under activation order."""
        W = weight.detach().to(torch.float32).clone()
        cols = W.shape[1]
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        order = torch.arange(cols)
        if self.cfg.act_order:
            units = torch.diag(H).reshape(-1, unit).sum(-1)
            order = (torch.argsort(units, descending=True, stable=True)[:, None] * unit
                     + torch.arange(unit)).flatten()
            W, H = W[:, order], H[order][:, order]
        H += self.cfg.damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        return W, Hinv.to(torch.float32), order

    def quantize(self, weight: torch.Tensor, n_high: int, importance: torch.Tensor | None = None,
                 cfg: RTNConfig = RTNConfig()) -> Codes:
        W, Hinv, order = self._prepare(weight)
        rows, cols = W.shape
        nb = cols // BLOCK
        imp = floored_importance(importance, weight, cfg)
        d_all = torch.zeros(rows, nb, dtype=torch.float16)
        z_all = torch.zeros(rows, nb)
        high_all = torch.zeros(rows, nb, BLOCK // GROUP, dtype=torch.bool)
        if self.cfg.act_order:
            w0 = W[:, torch.argsort(order)]
            high_all, d_all, z_all = search_block_grid(w0.reshape(rows, nb, BLOCK), n_high,
                                                       imp.reshape(rows, nb, BLOCK), cfg)
        levels = torch.zeros(rows, cols)
        rounded = torch.zeros(rows, cols)
        for c0 in range(0, cols, BLOCK):
            c1 = c0 + BLOCK
            if not self.cfg.act_order:     # the block's grid from the weights as updated so far
                b = c0 // BLOCK
                high_g, d, z = search_block_grid(W[:, c0:c1].unsqueeze(1), n_high, imp[:, c0:c1].unsqueeze(1), cfg)
                d_all[:, b], z_all[:, b], high_all[:, b] = d[:, 0], z[:, 0], high_g[:, 0]
            W1 = W[:, c0:c1].clone()
            Err = torch.zeros_like(W1)
            Hb = Hinv[c0:c1, c0:c1]
            for j in range(BLOCK):
                c = int(order[c0 + j])                # the original column, and its block's grid
                b = c // BLOCK
                w = W1[:, j]
                lv, q = round_to_grid(w[:, None], high_all[:, b, (c % BLOCK) // GROUP, None],
                                      d_all[:, b], z_all[:, b])
                levels[:, c] = lv[:, 0]
                rounded[:, c] = w
                e = (w - q[:, 0]) / Hb[j, j]
                W1[:, j:] -= e.unsqueeze(1) * Hb[j, j:].unsqueeze(0)
                Err[:, j] = e
            W[:, c1:] -= Err @ Hinv[c0:c1, c1:]
        self.rounded = rounded
        return codes_from_tensors(d_all, z_all, high_all, levels.reshape(rows, nb, BLOCK))

    def quantize_as(self, weight: torch.Tensor, qtype: HIQ2Type | E8Type, importance: torch.Tensor | None = None
                    ) -> Codes | E8Codes:
        """GPTQ's codes of ``weight`` as any of our types."""
        if isinstance(qtype, E8Type):
            return self.quantize_e8(weight, importance, qtype=qtype)
        return self.quantize(weight, qtype.n_high, importance)

    def quantize_e8(self, weight: torch.Tensor, importance: torch.Tensor | None = None,
                    cfg: E8Config = E8Config(), qtype: E8Type = E8) -> E8Codes:
        """GPTQ for HIQ2_E8: a block's sub-block scales are searched (as ``quantize_e8``
        does) when the algorithm reaches it (blocks in activation order with
        ``cfg.act_order``); each 8-column group is rounded to lattice
        points as one vector, then its columns' errors are fed forward one by one (the
        later columns of the group included, whose codes are already fixed: together
        that is the block update of jointly quantized columns)."""
        W, Hinv, order = self._prepare(weight, BLOCK)
        rows, cols = W.shape
        nb = cols // BLOCK
        imp = floored_importance(importance, weight, RTNConfig(importance_floor=cfg.importance_floor))
        max_units = self.cfg.unit_growth * max(cfg.search) * e8_rms_units(W.reshape(rows, nb, BLOCK), qtype)
        d_all = torch.zeros(rows, nb, dtype=torch.float16)
        q_all = torch.ones(rows, nb, qtype.n_sub)
        idx_all = torch.zeros(rows, nb, N_GROUPS, dtype=torch.int64)
        neg_all = torch.zeros(rows, nb, BLOCK, dtype=torch.bool)
        for c0 in range(0, cols, BLOCK):
            c1 = c0 + BLOCK
            b = int(order[c0]) // BLOCK                # the block processed here (activation order)
            d, q = store_e8_units(search_e8_units(W[:, c0:c1], imp[:, b * BLOCK:(b + 1) * BLOCK], cfg, qtype,
                                                  max_units[:, c0 // BLOCK]))
            d_all[:, b], q_all[:, b] = d, q
            W1 = W[:, c0:c1].clone()
            Err = torch.zeros_like(W1)
            Hb = Hinv[c0:c1, c0:c1]
            # a column's rounding error costs (w - q)^2 / U_jj^2 in GPTQ's objective: the
            # metric of the vector rounding (a scalar grid's nearest level needs none)
            metric = 1 / torch.diag(Hb) ** 2
            df = d.to(torch.float32)
            for g in range(N_GROUPS):
                g0, g1 = g * GROUP, (g + 1) * GROUP
                qg = q[:, g0 // qtype.sub]
                unit = df * qg / E8_SCALE_STEPS
                unit = torch.where(unit > 0, unit, torch.ones_like(unit))
                idx, neg = e8_round(W1[:, g0:g1] / unit[:, None], metric[g0:g1].expand(rows, GROUP), qtype.entries)
                idx_all[:, b, g] = idx
                neg_all[:, b, g0:g1] = neg
                wq = e8_decoded(df[:, None], qg[:, None], e8_values(idx, neg, qtype.entries))
                for j in range(g0, g1):
                    e = (W1[:, j] - wq[:, j - g0]) / Hb[j, j]
                    W1[:, j:] -= e.unsqueeze(1) * Hb[j, j:].unsqueeze(0)
                    Err[:, j] = e
            W[:, c1:] -= Err @ Hinv[c0:c1, c1:]
        self.rounded = weight.detach().to(torch.float32)     # no levels for a later stage to round
        return e8_codes(d_all, q_all, idx_all, neg_all, qtype)
