"""Reading and writing GGUF files: our type ids registered, clear errors, atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from hiq2gguf.formats import is_hiq2, register_with_gguf


class CorruptGGUF(ValueError):
    pass


def open_reader(path: str | os.PathLike):
    """A GGUFReader that knows our types; truncated or foreign files raise CorruptGGUF."""
    import gguf

    register_with_gguf()
    path = Path(path)
    if not path.is_file():
        raise CorruptGGUF(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CorruptGGUF(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise CorruptGGUF(f"{path}: unreadable GGUF ({type(e).__name__}: {e}); truncated or corrupt") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CorruptGGUF(f"{path}: truncated (tensor {t.name} runs past the end of the file)")
    return reader


def field_value(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def check_source_gguf(path: Path) -> str:
    """Architecture of a GGUF to convert; refuses files that already hold our types."""
    reader = open_reader(path)
    if any(is_hiq2(t.tensor_type) for t in reader.tensors):
        raise CorruptGGUF(f"{path}: already an hiq2gguf output; convert the original model instead")
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise CorruptGGUF(f"{path}: no general.architecture field")
    return str(arch)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; it replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
