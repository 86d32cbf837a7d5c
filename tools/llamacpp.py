"""llama.cpp's own tools, as the benchmarks under tools/ use them.

The patched runtime (`hiq2gguf runtime build`) runs stock types unchanged, so stock
files made here by llama-quantize and files of ours are timed and scored by one build:

* ``tool(name)``: path of llama-quantize / llama-imatrix / llama-bench, resolved once
  per process (a kernel edit elsewhere during a long run does not switch the run to
  another build);
* ``imatrix``: llama-imatrix on our calibration text (BoolQ calibration half);
* ``quantize``: llama-quantize, token embeddings (= a tied output head) Q8_0 like ours;
* ``file_stats``: true bits per weight of the stored linear weights and of the whole
  file, and the types actually stored (llama-quantize falls back to other types where a
  row does not fit a type's block), cached beside the file.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from hiq2gguf import runtime
from hiq2gguf.gguf_io import atomic_output

_tool_paths: dict[str, Path] = {}


def tool(name: str) -> Path:
    """Raises runtime.RuntimeMissing (saying what to run) when the runtime is not built."""
    if name not in _tool_paths:
        _tool_paths[name] = runtime.tool(name)
    return _tool_paths[name]


def run(cmd: list) -> str:
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
        raise RuntimeError(f"command failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}")
    return r.stdout


def imatrix(f32: Path, out: Path, chunks: int, threads: int) -> Path:
    """llama-imatrix over ``chunks`` x 512 tokens of the calibration text (the text our
    converter calibrates on); kept at ``out`` once made."""
    from hiq2gguf import data

    if not out.exists():
        with tempfile.TemporaryDirectory() as td:
            text = Path(td) / "calibration.txt"
            text.write_text(data.boolq_split("calibration"), encoding="utf-8")
            with atomic_output(out) as tmp:
                run([tool("llama-imatrix"), "-m", f32, "-f", text, "-o", tmp,
                     "-c", "512", "--chunks", str(chunks), "-t", str(threads)])
    return out


def quantize(f32: Path, out: Path, ftype: str, threads: int, imatrix: Path | None = None,
             pure: bool = False, tensor_types: tuple[str, ...] = ()) -> Path:
    """llama-quantize ``f32`` -> ``out`` (kept once made). ``pure``: one type everywhere
    (no per-tensor mixture); ``tensor_types``: ``--tensor-type`` overrides, e.g.
    ``("ffn_down=iq3_xxs",)``. The seconds it took go beside the file (``seconds``)."""
    if not out.exists():
        cmd = [tool("llama-quantize"), "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
        if pure:
            cmd.append("--pure")
        if imatrix is not None:
            cmd += ["--imatrix", imatrix]
        for tt in tensor_types:
            cmd += ["--tensor-type", tt]
        t0 = time.monotonic()
        with atomic_output(out) as tmp:
            run(cmd + [f32, tmp, ftype, str(threads)])
        _sidecar(out, ".seconds.json").write_text(json.dumps({"seconds": time.monotonic() - t0}))
    return out


def quantize_types() -> set[str]:
    """The ftypes this build's llama-quantize offers (its --help lists them)."""
    r = subprocess.run([str(tool("llama-quantize")), "--help"], capture_output=True, text=True)
    return set(re.findall(r"^\s*\d+\s+or\s+(\w+)\s*:", r.stdout + r.stderr, re.MULTILINE))


def seconds(path: Path) -> float | None:
    """How long ``quantize`` took to make ``path`` (None if it was not made by it)."""
    p = _sidecar(path, ".seconds.json")
    return json.loads(p.read_text())["seconds"] if p.exists() else None


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.stem + suffix)


def file_stats(path: Path) -> dict:
    """{bpw: bits per weight of the stored linear weights (inspect_gguf's), file_bpw: file bytes x 8 / all parameters, types: {stored type: count of
    linear weights}}; cached beside the file (reading a GGUF's tokenizer arrays in
    Python takes seconds)."""
    from hiq2gguf.inspect import inspect_gguf

    cache = _sidecar(path, ".bpw.json")
    stamp = path.stat().st_mtime_ns
    if cache.exists():
        c = json.loads(cache.read_text())
        if c.get("mtime_ns") == stamp and "types" in c:
            return {k: c[k] for k in ("bpw", "file_bpw", "types")}
    info = inspect_gguf(path)
    ts = [t for t in info["tensors"] if t["linear"]]
    stats = {"bpw": info["bpw"],
             "file_bpw": info["file_bpw"],
             "types": dict(Counter(t["type"] for t in ts))}
    with atomic_output(cache) as tmp:
        tmp.write_text(json.dumps({"mtime_ns": stamp, **stats}))
    return stats


def linear_bpw(path: Path) -> float:
    return file_stats(path)["bpw"]


def linear_types(path: Path) -> dict[str, int]:
    return file_stats(path)["types"]
