"""Block-sequential quantization (as GPTQ and OmniQuant do it).

The transformer blocks are quantized one after the other. Block i is
calibrated on the outputs of the already quantized blocks 0..i-1 on the
calibration windows (``x_q``); the learned quantizers are trained to make
its output match the float model's output of block i on the float
trajectory (``y``), so a block can also absorb some of the error of the
blocks before it. Only the activations at block boundaries are kept (two
copies: float and quantized trajectory), so working memory stays near one
block.

    fn = block_quantize_fn("hybrid", model, plan, windows, fisher)
    packed, stock = convert.quantize_model(model, converter, plan, fn)

``BlockSequential`` is a ``quantize_fn`` for ``convert.quantize_model``: asked
for the first weight of a block, it quantizes the whole block and hands out
its codes one weight at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from transformers.cache_utils import Cache
from tqdm import tqdm

from hiq2gguf.formats import Codes, HIQ2Type
from hiq2gguf.gptq import GPTQ, GPTQConfig, gptq_key
from hiq2gguf.learned import STAGES, FixedCodes, ReconstructionConfig, preset, start_stage, train_stage
from hiq2gguf.quantize import dequantize_torch, quantize_member

METHODS = ("rtn", "gptq", *STAGES)


class _Stop(Exception):
    pass


def decoder_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, module) of every transformer block, in order."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers to quantize block by block")
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)] + ".", m) for m in layers]


@torch.no_grad()
def capture_block_inputs(model, windows: list[list[int]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering the first block for every window, and for every block
    the keyword arguments the model passes it (rotary embeddings, mask, positions).

    Blocks may get different ones: Gemma3's sliding layers get a local rope and a
    sliding-window mask, its full layers a global rope and the causal mask. The
    model runs with every block's forward replaced by one that records its
    arguments and passes the hidden states through, so no block weight is used
    (blocks may sit on the meta device). Blocks of the same kind share the model's
    tensors (nothing is copied)."""
    if len({len(w) for w in windows}) != 1:
        raise ValueError("calibration windows must all have the same length")
    blocks = [b for _, b in decoder_blocks(model)]
    inputs: list[torch.Tensor] = []
    kwargs: dict[int, dict] = {}

    def recorder(i: int):
        def forward(*args, **kw):
            hidden = args[0] if args else kw["hidden_states"]
            if i == 0:
                inputs.append(hidden)
            if i not in kwargs:
                # no KV cache: blocks run window after window (and backward) on these
                # arguments; transformers names it past_key_value(s), or cache from 5.24
                kwargs[i] = {k: v for k, v in kw.items()
                             if k != "hidden_states" and not isinstance(v, Cache)
                             and k not in ("past_key_values", "past_key_value", "cache")}
                kwargs[i]["use_cache"] = False
            if i == len(blocks) - 1 or len(kwargs) == len(blocks):
                raise _Stop                 # the rest (final norm, head) is not needed
            return hidden
        return forward

    own = [b.__dict__.get("forward") for b in blocks]     # a forward set on the instance (e.g. by a wrapper)
    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    try:
        for w in windows:
            try:
                model(input_ids=torch.tensor([w]), use_cache=False)
            except _Stop:
                pass
    finally:
        for b, f in zip(blocks, own):
            if f is None:
                del b.forward
            else:
                b.forward = f
    missing = [i for i in range(len(blocks)) if i not in kwargs]
    if missing or len(inputs) != len(windows):
        raise ValueError(f"{type(model).__name__}: the model's forward did not call decoder blocks {missing}")
    return inputs, [kwargs[i] for i in range(len(blocks))]


def run_block(block: torch.nn.Module, x: torch.Tensor, kwargs: dict,
              weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Block's output hidden states for input ``x`` with its keyword arguments ``kwargs``
    (from ``capture_block_inputs``), optionally with some parameters replaced by ``weights``."""
    out = functional_call(block, weights, (x,), kwargs) if weights else block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out      # older transformers return (hidden, ...)


@dataclass
class BlockRecord:
    block: int
    seconds: float
    out_err: float                    # mean squared error of the quantized block's output vs the float one
    stages: list[dict] = field(default_factory=list)


class BlockSequential:
    """quantize_fn(name, weight, qtype) -> codes, block by block (see module docstring)."""

    def __init__(self, method: str, model, plan: dict[str, HIQ2Type], windows: list[list[int]],
                 fisher: dict[str, torch.Tensor] | None = None, recon: ReconstructionConfig | None = None,
                 progress: bool = True, gptq: GPTQConfig = GPTQConfig()):
        if method not in METHODS or method == "rtn":
            raise ValueError(f"no block-sequential method {method!r} (known: {', '.join(METHODS[1:])})")
        self.method, self.model, self.plan = method, model, plan
        self.fisher = fisher or {}
        self.recon = recon or preset("fast")
        self.gptq = gptq
        self.progress = progress
        self.blocks = decoder_blocks(model)
        self.block_of = {}
        for name in plan:
            owner = [i for i, (prefix, _) in enumerate(self.blocks) if name.startswith(prefix)]
            if owner:
                self.block_of[name] = owner[0]
        self.next_block = 0
        self.codes: dict[str, Codes] = {}
        self.records: list[BlockRecord] = []
        self.x_q = self.x_fp = None
        self.block_kwargs: list[dict] = []       # the keyword arguments of every block (capture_block_inputs)
        self.windows = windows
        self.bar = None

    # ---- quantize_fn ------------------------------------------------------
    def __call__(self, name: str, weight: torch.Tensor, qtype) -> Codes:
        if name not in self.block_of:       # a linear weight outside the blocks
            return quantize_member(weight, qtype, self.fisher.get(name))
        if qtype != self.plan[name]:
            raise ValueError(f"{name}: asked for {qtype.name}, the plan says {self.plan[name].name}")
        while name not in self.codes:
            if self.next_block > self.block_of[name]:
                raise RuntimeError(f"{name}: its block was already quantized and handed out")
            self._quantize_block(self.next_block)
            self.next_block += 1
        return self.codes.pop(name)

    # ---- one block ----------------------------------------------------------
    def _run(self, i: int, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return run_block(self.blocks[i][1], x, self.block_kwargs[i], weights)

    def _quantize_block(self, i: int) -> None:
        t0 = time.time()
        prefix, block = self.blocks[i]
        if self.x_q is None:
            inputs, self.block_kwargs = capture_block_inputs(self.model, self.windows)
            self.x_fp, self.x_q = inputs, [x.clone() for x in inputs]
            self.bar = tqdm(total=len(self.blocks), desc=f"{self.method} blocks", unit="block",
                            disable=not self.progress)
        names = [n for n in self.plan if self.block_of.get(n) == i]
        local = {n: n[len(prefix):] for n in names}          # name inside the block
        saved = {n: p.requires_grad for n, p in block.named_parameters()}
        block.requires_grad_(False)
        try:
            with torch.no_grad():
                y = [self._run(i, {}, x) for x in self.x_fp]
            if self.method == "gptq":
                codes, stages = {n: c for n, (c, _) in self._gptq(i, names, local).items()}, []
            else:
                codes, stages = self._learned(block, names, local, y, i)
            fake = {local[n]: dequantize_torch(c) for n, c in codes.items()}
            with torch.no_grad():
                self.x_q = [self._run(i, fake, x) for x in self.x_q]
            err = sum(float(((a - b) ** 2).mean()) for a, b in zip(self.x_q, y)) / len(y)
        finally:
            for n, p in block.named_parameters():
                p.requires_grad_(saved[n])
        self.x_fp = y
        self.codes.update(codes)
        self.records.append(BlockRecord(i, round(time.time() - t0, 2), err, stages))
        self.bar.update(1)
        self.bar.set_postfix(out_mse=f"{err:.3g}")
        if i == len(self.blocks) - 1:
            self.bar.close()

    def _gptq(self, i: int, names, local) -> dict[str, tuple[Codes, torch.Tensor]]:
        """name -> (GPTQ's codes, the weights they round: ``GPTQ.rounded``) for block ``i``."""
        block = self.blocks[i][1]
        modules = dict(block.named_modules())
        gptq, hooks = {}, []
        for n in names:
            mod = modules[local[n].rsplit(".", 1)[0]]
            gptq[n] = GPTQ(mod.weight.shape[1], self.gptq)
            hooks.append(mod.register_forward_hook(lambda m, inp, out, g=gptq[n]: g.add_batch(inp[0])))
        try:
            with torch.no_grad():
                for x in self.x_q:
                    self._run(i, {}, x)
        finally:
            for h in hooks:
                h.remove()
        params = dict(block.named_parameters())
        return {n: (gptq[n].quantize_as(params[local[n]].data, self.plan[n], self.fisher.get(n)), gptq[n].rounded)
                for n in names}

    def _learned(self, block, names, local, y, i) -> tuple[dict[str, Codes], list[dict]]:
        params = dict(block.named_parameters())
        prev: dict[str, object] = {n: None for n in names}
        stats = []
        for kind in STAGES[self.method]:
            if kind is GPTQ:      # nothing to train: error feedback on the Hessian of the layer inputs
                t0 = time.time()
                qs = {n: FixedCodes(w, c) for n, (c, w) in self._gptq(i, names, local).items()}
                stats.append({"stage": "GPTQ", "seconds": round(time.time() - t0, 2)})
                prev = qs
                continue
            qs = {n: start_stage(kind, params[local[n]].data, self.plan[n], self.fisher.get(n), prev[n],
                                 self.recon) for n in names}
            steps, lr = self.recon.steps(kind)
            r = train_stage(lambda w, x: self._run(i, w, x),
                            {local[n]: q for n, q in qs.items()}, self.x_q, y, steps, lr, self.recon,
                            desc=f"block {i} {kind.__name__}", progress=self.progress)
            stats.append({"stage": kind.__name__, **r})
            prev = qs
        return {n: q.codes() for n, q in prev.items()}, stats


# raised when what a method makes of a block changes, so that checkpoints of blocks made
# before do not mix with new ones: 2 = learned lattice scales (E8Scales) in the hybrid and
# LWC, GPTQ's bounded lattice units (GPTQConfig.unit_growth)
BLOCKS_REVISION = 2


def block_settings(cfg) -> tuple[str, ...]:
    """What a block's quantized result depends on, besides the weights, calibration windows
    and plan, for ``cfg`` (a ``convert.ConvertConfig``): the parts of its checkpoint key."""
    return (cfg.method, repr(preset(cfg.preset)), *gptq_key(cfg.gptq), f"blocks-r{BLOCKS_REVISION}")


def block_quantize_fn(method: str, model, plan: dict[str, HIQ2Type], windows: list[list[int]],
                      fisher: dict[str, torch.Tensor] | None = None, recon: ReconstructionConfig | None = None,
                      progress: bool = True, gptq: GPTQConfig = GPTQConfig()):
    """The ``quantize_fn`` of ``method`` for ``convert.quantize_model``: RTN layer by
    layer, the others block-sequentially on the calibration ``windows``."""
    if method == "rtn":
        fisher = fisher or {}
        return lambda name, w, qtype: quantize_member(w, qtype, fisher.get(name))
    return BlockSequential(method, model, plan, windows, fisher, recon, progress, gptq)
