"""llama-cpp-python bound to the patched runtime."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from hiq2gguf import runtime
from hiq2gguf.formats import is_hiq2
from hiq2gguf.gguf_io import CorruptGGUF, open_reader


def load(path: str | os.PathLike, **llama_kwargs):
    """A ``llama_cpp.Llama`` for ``path`` on the patched runtime (checks the file first)."""
    reader = open_reader(path)        # clear errors for missing/truncated/foreign files
    ours = any(is_hiq2(t.tensor_type) for t in reader.tensors)
    del reader
    lib = runtime.configure_python()
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise runtime.RuntimeMissing("the llama-cpp-python package is not installed") from e
    llama_kwargs.setdefault("verbose", False)
    try:
        return Llama(model_path=str(Path(path)), **llama_kwargs)
    except ValueError as e:
        hint = (" (it holds HIQ2 tensors: check that the library in use is the patched one, "
                f"{lib})") if ours else ""
        raise CorruptGGUF(f"llama.cpp could not load {path}: {e}{hint}") from e


@contextlib.contextmanager
def open_model(path, **llama_kwargs) -> Iterator[object]:
    llm = load(path, **llama_kwargs)
    try:
        yield llm
    finally:
        llm.close()
