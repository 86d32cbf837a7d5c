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

import torch

from hiq2gguf.formats import BLOCK, GROUP, Codes
from hiq2gguf.quantize import RTNConfig, codes_from_tensors, floored_importance, round_to_grid, search_block_grid


class GPTQ:
    def __init__(self, n_cols: int):
        self.H = torch.zeros(n_cols, n_cols, dtype=torch.float64)
        self.n = 0
        self.rounded: torch.Tensor | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        """x: inputs of the layer, [..., n_cols]."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x

    def quantize(self, weight: torch.Tensor, n_high: int, importance: torch.Tensor | None = None,
                 damp: float = 0.01, cfg: RTNConfig = RTNConfig()) -> Codes:
        W = weight.detach().to(torch.float32).clone()
        rows, cols = W.shape
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        Hinv = Hinv.to(torch.float32)

        nb = cols // BLOCK
        imp = floored_importance(importance, W, cfg)
        d_all = torch.zeros(rows, nb, dtype=torch.float16)
        z_all = torch.zeros(rows, nb)
        high_all = torch.zeros(rows, nb, BLOCK // GROUP, dtype=torch.bool)
        levels = torch.zeros(rows, cols)
        rounded = torch.zeros(rows, cols)
        for b in range(nb):
            c0, c1 = b * BLOCK, (b + 1) * BLOCK
            high_g, d, z = search_block_grid(W[:, c0:c1].unsqueeze(1), n_high,
                                             imp[:, c0:c1].unsqueeze(1), cfg)
            high_g, d, z = high_g[:, 0], d[:, 0], z[:, 0]
            d_all[:, b], z_all[:, b], high_all[:, b] = d, z, high_g
            high = high_g.repeat_interleave(GROUP, dim=-1)
            W1 = W[:, c0:c1].clone()
            Err = torch.zeros_like(W1)
            Hb = Hinv[c0:c1, c0:c1]
            for j in range(BLOCK):
                w = W1[:, j]
                lv, q = round_to_grid(w[:, None], high[:, j:j + 1], d, z)
                lv, q = lv[:, 0], q[:, 0]
                levels[:, c0 + j] = lv
                rounded[:, c0 + j] = w
                e = (w - q) / Hb[j, j]
                W1[:, j:] -= e.unsqueeze(1) * Hb[j, j:].unsqueeze(0)
                Err[:, j] = e
            W[:, c1:] -= Err @ Hinv[c0:c1, c1:]
        self.rounded = rounded
        return codes_from_tensors(d_all, z_all, high_all, levels.reshape(rows, nb, BLOCK))
