"""llama-cpp-python bound to the patched runtime."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from hiq2gguf import runtime
from hiq2gguf.gguf_io import open_reader


def load(path: str | os.PathLike, **llama_kwargs):
    """A ``llama_cpp.Llama`` for ``path`` on the patched runtime (checks the file first)."""
    open_reader(path)                 # clear errors for missing/truncated/foreign files
    runtime.configure_python()
    from llama_cpp import Llama

    llama_kwargs.setdefault("verbose", False)
    return Llama(model_path=str(Path(path)), **llama_kwargs)


@contextlib.contextmanager
def open_model(path, **llama_kwargs) -> Iterator[object]:
    llm = load(path, **llama_kwargs)
    try:
        yield llm
    finally:
        llm.close()
