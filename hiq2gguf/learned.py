"""Learned quantizers on exactly the HIQ2 grid, trained by output reconstruction.

Each quantizer owns one linear weight. ``forward()`` gives a differentiable
fake-quantized weight for training; ``codes()`` gives the exact ``Codes``
that the file stores (computed with ``quantize.grid_params`` and
``quantize.round_to_grid``, so they pack unchanged). The high groups of
every block are fixed before training, by the Fisher-weighted choice of
``quantize.choose_mask``.

- ``LWC``: OmniQuant's learnable weight clipping. Per 64-weight block two
  clipping strengths ``sigmoid(gamma)``, ``sigmoid(beta)`` shrink the block
  range ``[min, max]``; that range sets the scale d and the zero point z.
  Rounding (levels, z, fp16 of d) is straight-through.
- ``AdaRound``: learned up/down rounding of the high-group weights on a
  fixed grid (Nagel et al., 2020). The rounding offset is the rectified
  sigmoid ``h(V)``; the regularizer ``1 - |2h - 1|^beta`` with beta
  annealed from 20 to 2 drives every ``h`` to exactly 0 or 1, and the codes
  use ``V >= 0`` (the point where ``h = 1/2``). Low groups keep the nearest
  level of the grid.

A method is a sequence of such stages (``STAGES``), each continuing from the
grid of the one before. ``hybrid``: GPTQ (``gptq.GPTQ``, error feedback across
columns) fixes every block's grid and the low-group codes, then AdaRound
learns only the high-group rounding, starting from GPTQ's codes, with the low
groups frozen at them. ``hybrid-lwc``: LWC learns the grid, then AdaRound the
high groups; its low groups keep the nearest level of LWC's grid.

On a lattice-coded weight (HIQ2_E8*) there are no levels to round up or down or a
range to clip: every learned stage trains its sub-block scales instead
(``E8Scales``), the codes held from the stage before (GPTQ's, or RTN's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from hiq2gguf.formats import (E8_SCALE_STEPS, GROUP, LOW_STEP, Codes, E8Codes, E8Type, HIQ2Type,
                              high_group_flags)
from hiq2gguf.gptq import GPTQ
from hiq2gguf.quantize import (RTNConfig, _blocks, codes_from_tensors, dequantize_torch, e8_codes, e8_decoded,
                               e8_values, floored_importance, grid_params, quantize_member, round_to_grid, search_block_grid)

# AdaRound's rectified sigmoid stretches sigmoid to (GAMMA, ZETA) and clips to [0, 1]
ZETA, GAMMA = 1.1, -0.1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 1/2) (the format's rounding) with the identity as gradient."""
    return x + (torch.floor(x + 0.5) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.float16).to(torch.float32) - x).detach()


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.ones_like(d), d)


class LearnedQuantizer(nn.Module):
    """One linear weight on a block grid with fixed high groups."""

    def __init__(self, weight: torch.Tensor, high_g: torch.Tensor):
        super().__init__()
        self.register_buffer("wb", _blocks(weight.detach().to(torch.float32)).clone())
        self.register_buffer("high_g", high_g)
        self.register_buffer("high", high_g.repeat_interleave(GROUP, dim=-1))

    def regularization(self, progress: float) -> torch.Tensor:
        """Extra loss at ``progress`` in [0, 1] of the stage's steps."""
        return torch.zeros(())

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(high groups [r, nb, 8], d fp16 [r, nb], z [r, nb]) of the exported codes."""
        raise NotImplementedError

    def codes(self) -> Codes:
        high_g, d, z = self.grid()
        levels, _ = round_to_grid(self.wb, self.high, d, z)
        return codes_from_tensors(d, z, high_g, levels)

    def _fake(self, levels: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = d[..., None] * (levels - z[..., None] / 16)
        return w.reshape(w.shape[0], -1)


class LWC(LearnedQuantizer):
    """Learnable weight clipping: the block range [sigmoid(beta) min, sigmoid(gamma) max]."""

    def __init__(self, weight: torch.Tensor, n_high: int, importance: torch.Tensor | None = None,
                 noise: bool = True, seed: int = 0):
        self.noise = noise
        self._gen = torch.Generator().manual_seed(seed)
        wb = _blocks(weight.detach().to(torch.float32))
        imp = _blocks(floored_importance(importance, weight.detach().to(torch.float32)))
        # start from the importance-weighted range search of RTN, without its least-squares
        # refit: trained from the refitted grid (a least-squares optimum in weight space)
        # the noisy steps end worse than they start, from the searched one they end better
        # (tests/test_quantizers.py)
        high_g, d, z = search_block_grid(wb, n_high, imp, RTNConfig(refits=0))
        super().__init__(weight, high_g)
        self.register_buffer("lo0", torch.clamp(wb.amin(-1), max=0))
        self.register_buffer("hi0", torch.clamp(wb.amax(-1), min=0))
        df = d.to(torch.float32)
        lo = -z / 16 * df
        hi = lo + 15 * df

        def logit(s):
            return torch.logit(s.clamp(0.02, 0.995))

        self.beta = nn.Parameter(logit(torch.where(self.lo0 < 0, lo / _safe(self.lo0), torch.ones_like(lo))))
        self.gamma = nn.Parameter(logit(torch.where(self.hi0 > 0, hi / _safe(self.hi0), torch.ones_like(hi))))

    def _range(self):
        return torch.sigmoid(self.beta) * self.lo0, torch.sigmoid(self.gamma) * self.hi0

    def forward(self) -> torch.Tensor:
        lo, hi = self._range()
        d = fp16_ste((hi - lo) / 15)
        ds = _safe(d.detach()) + (d - d.detach())
        z = torch.clamp(round_ste(-lo / ds * 16), 0, 255)
        t = self.wb / ds[..., None] + z[..., None] / 16
        if self.training and self.noise:
            # rounding replaced by its noise model: uniform over one grid step
            step = torch.where(self.high, 1.0, float(LOW_STEP))
            u = torch.rand(t.shape, generator=self._gen) - 0.5
            return self._fake(torch.clamp(t, 0, 15) + step * u, d, z)
        lv_high = torch.clamp(round_ste(t), 0, 15)
        lv_low = torch.clamp(round_ste(t / LOW_STEP), 0, 3) * LOW_STEP
        return self._fake(torch.where(self.high, lv_high, lv_low), d, z)

    @torch.no_grad()
    def grid(self):
        d, z = grid_params(*self._range())
        return self.high_g, d, z


class FixedCodes(LearnedQuantizer):
    """Codes chosen without training (GPTQ's) as a stage to continue from. ``weight``
    is what they round (``GPTQ.rounded``): its nearest levels on their grid are the
    codes, so AdaRound on it starts from exactly this rounding."""

    def __init__(self, weight: torch.Tensor, codes: Codes | E8Codes):
        if isinstance(codes, E8Codes):      # no grid of levels: nothing continues from it
            super().__init__(weight, torch.zeros(codes.index.shape, dtype=torch.bool))
        else:
            super().__init__(weight, torch.from_numpy(high_group_flags(codes.mask)))
            self.register_buffer("d", torch.from_numpy(codes.d))
            self.register_buffer("z", torch.from_numpy(codes.z).to(torch.float32))
        self.fixed = codes

    def forward(self) -> torch.Tensor:
        return dequantize_torch(self.fixed)

    def grid(self):
        return self.high_g, self.d, self.z

    def codes(self) -> Codes:
        return self.fixed


class AdaRound(LearnedQuantizer):
    """Learned rounding on a fixed grid (d, z, high groups): of the high-group weights,
    or with ``low=True`` of every weight (low groups between adjacent levels of 0, 5, 10, 15)."""

    def __init__(self, weight: torch.Tensor, high_g: torch.Tensor, d: torch.Tensor, z: torch.Tensor,
                 low: bool = False):
        super().__init__(weight, high_g)
        self.register_buffer("d", d.to(torch.float16))
        self.register_buffer("z", z.to(torch.float32))
        self.register_buffer("learn", torch.ones_like(self.high) if low else self.high.clone())
        df = self.d.to(torch.float32)
        t = self.wb / _safe(df)[..., None] + self.z[..., None] / 16
        step = torch.where(self.high, 1.0, float(LOW_STEP))
        self.register_buffer("step", step)
        self.register_buffer("base", torch.floor(t / step))      # in units of the group's step
        self.register_buffer("top", 15 / step)                   # highest code: 15 or 3
        near, _ = round_to_grid(self.wb, self.high, self.d, self.z)
        self.register_buffer("near", near)                       # levels of the weights not learned
        # start where h(V) equals the fractional part: the soft rounding is the identity
        frac = ((t / step - self.base - GAMMA) / (ZETA - GAMMA)).clamp(0.01, 0.99)
        self.V = nn.Parameter(torch.log(frac / (1 - frac)))

    @classmethod
    def rtn_grid(cls, weight: torch.Tensor, n_high: int, importance: torch.Tensor | None = None,
                 low: bool = False):
        w = weight.detach().to(torch.float32)
        high_g, d, z = search_block_grid(_blocks(w), n_high, _blocks(floored_importance(importance, w)))
        return cls(weight, high_g, d, z, low)

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _levels(self, offset: torch.Tensor) -> torch.Tensor:
        learned = torch.minimum(torch.clamp(self.base + offset, min=0), self.top) * self.step
        return torch.where(self.learn, learned, self.near)

    def hard_levels(self) -> torch.Tensor:
        """The exported rounding: down or up (V >= 0 <=> h >= 1/2), clamped to the grid."""
        return self._levels((self.V >= 0).to(torch.float32))

    def forward(self) -> torch.Tensor:
        return self._fake(self._levels(self.h()), self.d.to(torch.float32), self.z)

    def regularization(self, progress: float, warmup: float = 0.2,
                       beta_range: tuple[float, float] = (20.0, 2.0)) -> torch.Tensor:
        if progress < warmup or not bool(self.learn.any()):
            return torch.zeros(())
        b0, b1 = beta_range
        beta = b1 + (b0 - b1) * (1 - (progress - warmup) / (1 - warmup))
        learn = self.learn.to(torch.float32)       # a product, not boolean indexing: cheaper
        return ((1 - (2 * self.h() - 1).abs() ** beta) * learn).sum() / learn.sum()

    def binary_fraction(self) -> float:
        """Share of learned weights whose soft rounding h is exactly 0 or 1."""
        h = self.h()[self.learn]
        return float(((h == 0) | (h == 1)).float().mean()) if h.numel() else 1.0

    def grid(self):
        return self.high_g, self.d, self.z

    @torch.no_grad()
    def codes(self) -> Codes:
        levels = torch.where(self.d[..., None] == 0, torch.zeros_like(self.near), self.hard_levels())
        return codes_from_tensors(self.d, self.z, self.high_g, levels)


class E8Scales(LearnedQuantizer):
    """Learned sub-block scales of a lattice-coded weight (HIQ2_E8*), its codes held:
    the unit of each sub-block (16 or 32 weights) is exp(log_unit), stored as the file
    does (fp16 block maximum d, steps q = round(16 unit / d) in 1..16, both
    straight-through), so the
    trained weights are exactly the exported ones. A lattice code has no levels to
    round differently; the scales are what reconstruction can still move.
    ``lr_scale``: Adam's step on log_unit is the stage's learning rate times this."""

    lr_scale = 0.01

    def __init__(self, weight: torch.Tensor, codes: E8Codes, qtype: E8Type):
        super().__init__(weight, torch.zeros(codes.index.shape, dtype=torch.bool))
        self.qtype = qtype
        self.register_buffer("index", torch.from_numpy(codes.index.astype("int64")))
        self.register_buffer("negative", torch.from_numpy(codes.negative))
        rows, nb = codes.d.shape
        values = e8_values(self.index, self.negative.reshape(rows, nb, -1, GROUP), codes.entries)
        self.register_buffer("values", values.reshape(rows, nb, -1))                     # [r, nb, 64]
        unit = (torch.from_numpy(codes.d.astype("float32"))[..., None]
                * torch.from_numpy(codes.scales.astype("float32")) / E8_SCALE_STEPS)       # [r, nb, n_sub]
        self.register_buffer("zero", (unit <= 0).all(-1))                                  # d = 0: stays 0
        self.register_buffer("log_unit0", torch.log(torch.where(unit > 0, unit, torch.ones_like(unit))))
        self.delta = nn.Parameter(torch.zeros_like(unit))

    def _units(self) -> torch.Tensor:
        return torch.exp(self.log_unit0 + self.delta * self.lr_scale)

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d [r, nb], q [r, nb, n_sub]) as the file stores them, straight-through."""
        unit = self._units()
        d = fp16_ste(unit.amax(-1))
        q = torch.clamp(round_ste(unit / _safe(d.detach())[..., None] * E8_SCALE_STEPS), 1, E8_SCALE_STEPS)
        return torch.where(self.zero, torch.zeros_like(d), d), q

    def forward(self) -> torch.Tensor:
        d, q = self._stored()
        w = e8_decoded(d[..., None], q.repeat_interleave(self.qtype.sub, dim=-1), self.values)
        return w.reshape(w.shape[0], -1)

    @torch.no_grad()
    def codes(self) -> E8Codes:
        d, q = self._stored()
        return e8_codes(d, q, self.index, self.negative, self.qtype)


def start_stage(kind: type[LearnedQuantizer], weight: torch.Tensor, qtype: HIQ2Type | E8Type,
                importance: torch.Tensor | None, prev: LearnedQuantizer | None,
                cfg: "ReconstructionConfig | None" = None) -> LearnedQuantizer:
    """The quantizer of one stage, continuing from the previous stage's grid if any.
    HIQ2_E8 weights have no grid of levels to learn on: every stage learns their
    sub-block scales (``E8Scales``) on the previous stage's codes (GPTQ's), or on
    importance-weighted RTN's."""
    cfg = cfg or ReconstructionConfig()
    if isinstance(qtype, E8Type):
        return E8Scales(weight, prev.codes() if prev is not None else quantize_member(weight, qtype, importance),
                        qtype)
    if kind is LWC:
        return LWC(weight, qtype.n_high, importance, seed=cfg.seed)
    if prev is not None:      # round what the previous stage rounded (GPTQ: its updated weights)
        return AdaRound(prev.wb.flatten(1), *prev.grid(), low=cfg.adaround_low)
    return AdaRound.rtn_grid(weight, qtype.n_high, importance, low=cfg.adaround_low)


# method -> its stages, one after the other (GPTQ: run by sequential.BlockSequential on the
# block's layer inputs, handed on as FixedCodes)
STAGES: dict[str, tuple[type, ...]] = {
    "lwc": (LWC,),
    "adaround": (AdaRound,),
    "hybrid": (GPTQ, AdaRound),
    "hybrid-lwc": (LWC, AdaRound),
}


@dataclass
class ReconstructionConfig:
    """Block-wise reconstruction training: per stage, ``*_steps`` Adam steps on
    ``batch`` calibration windows each. The reconstruction error is measured relative
    to that of the exported codes at the start of the stage; ``reg_weight`` scales
    AdaRound's regularizer against it. ``adaround_low``: AdaRound also learns the
    rounding of the low groups (between their levels 0, 5, 10, 15); without it they
    keep their codes from the stage before (GPTQ's, or the nearest level of LWC's grid).
    ``token_relative``: each token's error is divided by the float output's mean square
    at that token (``block_error``)."""

    lwc_steps: int = 5
    lwc_lr: float = 1e-2
    adaround_steps: int = 20
    adaround_lr: float = 0.3
    adaround_low: bool = False
    batch: int = 1
    reg_weight: float = 50.0
    seed: int = 0
    token_relative: bool = False

    def steps(self, kind: type[LearnedQuantizer]) -> tuple[int, float]:
        return (self.lwc_steps, self.lwc_lr) if kind is LWC else (self.adaround_steps, self.adaround_lr)


PRESETS: dict[str, ReconstructionConfig] = {
    # finishes the default model on a 2-core CPU in minutes (few steps, large learning rates)
    "fast": ReconstructionConfig(),
    # the paper's settings (5,000 AdaRound steps at lr 1e-3, AdaRound on the high groups
    # only, LWC on the rest), for a GPU
    "paper": ReconstructionConfig(lwc_steps=1000, lwc_lr=1e-2, adaround_steps=5000, adaround_lr=1e-3,
                                  adaround_low=False),
    # "fast" with the per-token relative error (an experiment: see DESIGN, Quantizers)
    "fast-rel": ReconstructionConfig(token_relative=True),
}


def preset(name: str, **overrides) -> ReconstructionConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def block_error(out: torch.Tensor, y: torch.Tensor, token_relative: bool = False) -> torch.Tensor:
    """Mean squared error of a block's output ``out`` against the float one ``y`` [..., hidden].
    ``token_relative``: each token's squared error over the mean square of ``y`` at that token,
    as the next block sees it after its RMSNorm; plain MSE is dominated by the few tokens whose
    residual stream holds activations 10^2-10^3x the rest (Qwen2.5's first token)."""
    d = (out - y) ** 2
    if token_relative:
        d = d / y.pow(2).mean(-1, keepdim=True).clamp_min(1e-20)
    return d.mean()


def train_stage(run_block, quantizers: dict[str, LearnedQuantizer], inputs: list, targets: list,
                steps: int, lr: float, cfg: ReconstructionConfig, desc: str = "", progress: bool = False) -> dict:
    """Adam on the quantizers' parameters, minimizing the block output error
    ``|run_block(weights, x) - y|^2`` plus ``cfg.reg_weight`` x the quantizers'
    regularizers. ``run_block(weights: dict[name, tensor], x) -> y``. The error is
    measured relative to that of the exported codes at the start, so the regularizer
    weight means the same for every block. If the exported codes end worse than they
    started (few large Adam steps can overshoot a good start such as GPTQ's codes), the
    quantizers go back to their start. Returns that error (exported codes, on the
    first batch) before and after, and whether the start was kept."""
    params = [p for q in quantizers.values() for p in q.parameters()]
    if steps <= 0 or not params:
        return {"steps": 0}
    x0, y0 = torch.cat(inputs[:cfg.batch]), torch.cat(targets[:cfg.batch])

    @torch.no_grad()
    def exported_error() -> float:
        w = {n: dequantize_torch(q.codes()) for n, q in quantizers.items()}
        return float(block_error(run_block(w, x0), y0, cfg.token_relative))

    first = exported_error()
    start = [{k: v.clone() for k, v in q.state_dict().items()} for q in quantizers.values()]
    scale = max(first, 1e-30)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(cfg.seed)
    for q in quantizers.values():
        q.train()
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, disable=not progress)
    for step in bar:
        idx = torch.randint(len(inputs), (cfg.batch,), generator=g).tolist()
        x = torch.cat([inputs[i] for i in idx])
        y = torch.cat([targets[i] for i in idx])
        out = run_block({n: q() for n, q in quantizers.items()}, x)
        rec = block_error(out, y, cfg.token_relative) / scale
        reg = sum(q.regularization(step / max(steps - 1, 1)) for q in quantizers.values())
        loss = rec + cfg.reg_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rel=f"{float(rec.detach()):.3f}")
    for q in quantizers.values():
        q.eval()
    last = exported_error()
    if last > first:
        for q, state in zip(quantizers.values(), start):
            q.load_state_dict(state)
        last = first
    return {"steps": steps, "first": first, "last": last, "kept_start": last == first}
