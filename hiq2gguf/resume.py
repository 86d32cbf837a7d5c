"""Resumable conversion: per-block checkpoints beside the output.

A conversion to ``OUT.gguf`` keeps its intermediate results in ``OUT.gguf.partial/``:

- ``calib-KEY.pt``: the calibration (windows, Fisher) - KEY hashes the source
  weights and the calibration settings;
- ``plan-KEY.json``: the per-layer types and the solver's report - KEY adds the
  plan settings (the solver may stop at its time limit, so a rerun must not
  solve again: it could pick another plan);
- ``blocks-KEY/block-NNNN.npz``: the packed tensors of every finished
  transformer block, and ``blocks-KEY/state.pt``: what the next block needs
  (the block-sequential quantizers' float and quantized trajectories) - KEY
  adds the plan, the method and its settings.

Every file is written atomically (temporary file + rename), so a conversion
killed at any point (``kill -9``) finds only complete files; rerunning the same
command skips what is done and writes the same bytes. A changed config gives
new keys, and stale block directories are removed. The directory goes away
once the GGUF is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hiq2gguf.formats import Codes, HIQ2Type, get_type, pack_tensor
from hiq2gguf.gguf_io import atomic_output

STATE_FILE = "state.pt"


def partial_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_output(path) as tmp:
        write(tmp)


def save_torch(path: Path, obj) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def save_json(path: Path, obj) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


# ---- keys ---------------------------------------------------------------------
_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (memory stays flat)."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def source_digest(path: str | os.PathLike) -> str:
    """What the source weights are: the bytes of a GGUF file, or of a Hugging Face
    directory's config and weight files."""
    p = Path(path)
    files = ([p] if p.is_file() else
             sorted(f for f in p.iterdir() if f.is_file() and (
                 f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def key_of(*parts) -> str:
    """A short hash of ``parts`` (anything ``repr`` spells deterministically)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def plan_spelling(plan: dict[str, object]) -> list[tuple[str, str]]:
    return [(n, t.name) for n, t in plan.items()]


# ---- the block store ------------------------------------------------------------
class BlockCheckpoints:
    """``block-NNNN.npz`` per finished block (packed bytes + type of each weight)
    and ``state.pt`` (what the next block needs) in ``root/blocks-KEY/``."""

    def __init__(self, root: Path, key: str, n_blocks: int):
        self.dir = root / f"blocks-{key}"
        self.n_blocks = n_blocks
        if root.is_dir():                       # blocks of another config: never reused
            for stale in root.glob("blocks-*"):
                if stale != self.dir:
                    shutil.rmtree(stale, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, b: int) -> Path:
        return self.dir / f"block-{b:04d}.npz"

    def n_done(self) -> int:
        """Finished blocks 0..n-1: a block counts once its file and the state after it
        are on disk (a kill between the two leaves the block to be done again)."""
        n = 0
        while n < self.n_blocks and self.path(n).exists():
            n += 1
        state = self.state()                    # written after the block's file: the last complete block
        return 0 if state is None else min(n, state["block"] + 1)

    def state(self) -> dict | None:
        p = self.dir / STATE_FILE
        return load_torch(p) if p.exists() else None

    def save(self, b: int, packed: dict[str, tuple[HIQ2Type, np.ndarray]], state: dict | None) -> None:
        arrays = {f"raw{i}": raw for i, (_, raw) in enumerate(packed.values())}
        meta = json.dumps([[n, t.name] for n, (t, _) in packed.items()])

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
        _atomic(self.path(b), write)
        if state is not None:
            save_torch(self.dir / STATE_FILE, {"block": b, **state})

    def load(self, b: int) -> dict[str, tuple[HIQ2Type, np.ndarray]]:
        with np.load(self.path(b)) as f:
            meta = json.loads(f["meta"].tobytes().decode())
            return {n: (get_type(t), f[f"raw{i}"]) for i, (n, t) in enumerate(meta)}


# ---- block-sequential quantizer state ------------------------------------------
def sequential_state(seq) -> dict:
    """What a ``sequential.BlockSequential`` needs to go on after its finished blocks."""
    return {"next_block": seq.next_block, "x_q": seq.x_q, "x_fp": seq.x_fp,
            "records": [asdict(r) for r in seq.records]}


def resume_sequential(seq, state: dict) -> None:
    """Put ``state`` (from ``sequential_state``) back: the next block it quantizes is
    the one after the checkpointed ones, on the saved trajectories."""
    from tqdm import tqdm

    from hiq2gguf.sequential import BlockRecord, capture_block_inputs

    _, seq.block_kwargs = capture_block_inputs(seq.model, seq.windows[:1])
    seq.next_block = state["next_block"]
    seq.x_q, seq.x_fp = state["x_q"], state["x_fp"]
    seq.records = [BlockRecord(**r) for r in state["records"]]
    seq.bar = tqdm(total=len(seq.blocks), initial=seq.next_block, desc=f"{seq.method} blocks", unit="block",
                   disable=not seq.progress)


class ResumableQuantizeFn:
    """Wraps a ``quantize_fn`` (``convert.quantize_model``): weights of finished
    blocks come from the checkpoints; each newly finished block is checkpointed
    with the state the inner quantizer needs for the next one."""

    def __init__(self, inner: Callable, store: BlockCheckpoints, plan: dict[str, HIQ2Type],
                 block_index: Callable[[str], int | None], log: Callable[[str], None] = print):
        self.inner, self.store, self.plan = inner, store, plan
        self.block_index = block_index
        self.names_of: dict[int, list[str]] = {}
        for n in plan:
            b = block_index(n)
            if b is not None:
                self.names_of.setdefault(b, []).append(n)
        self.n_done = store.n_done()
        self.pending: dict[str, Codes] = {}
        self.loaded: tuple[int, dict] | None = None
        self.stateful = hasattr(inner, "next_block")           # BlockSequential
        if self.n_done:
            log(f"resuming: {self.n_done}/{store.n_blocks} blocks done")
            if self.stateful:
                resume_sequential(inner, store.state())

    @property
    def records(self) -> list:
        return getattr(self.inner, "records", [])

    def done(self, b: int | None) -> bool:
        return b is not None and b < self.n_done

    def packed(self, b: int) -> dict[str, tuple[HIQ2Type, np.ndarray]]:
        if self.loaded is None or self.loaded[0] != b:
            self.loaded = (b, self.store.load(b))
        return self.loaded[1]

    def __call__(self, name: str, weight: torch.Tensor, qtype) -> Codes:
        b = self.block_index(name)
        if self.done(b):
            qtype, raw = self.packed(b)[name]
            return qtype.unpack(raw)
        codes = self.inner(name, weight, qtype)
        if b is None:
            return codes
        self.pending[name] = codes
        names = self.names_of[b]
        if all(n in self.pending for n in names):
            packed = {n: (self.plan[n], pack_tensor(n, self.plan[n], self.pending.pop(n))) for n in names}
            self.store.save(b, packed, sequential_state(self.inner) if self.stateful else {})
            self.n_done = b + 1
        return codes
