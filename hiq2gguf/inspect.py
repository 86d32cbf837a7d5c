"""Per-tensor facts about a GGUF: type, shape, high-group ratio, bits per weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hiq2gguf.formats import ALL_TYPES
from hiq2gguf.gguf_io import field_value, open_reader


def is_linear_weight(name: str, shape: list[int]) -> bool:
    """The weights a bpw is quoted for: the 2-D tensors of the transformer blocks
    (embeddings, output head and norms are not counted)."""
    return name.startswith("blk.") and len(shape) == 2


def inspect_gguf(path: str | Path) -> dict:
    reader = open_reader(path)
    tensors = []
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]   # rows first, like torch
        elements = int(np.prod(shape))
        ours = int(t.tensor_type) in ALL_TYPES
        name = ALL_TYPES[int(t.tensor_type)].name if ours else t.tensor_type.name
        tensors.append({
            "name": t.name, "type": name, "shape": shape, "elements": elements,
            "bytes": int(t.n_bytes), "bpw": t.n_bytes * 8 / elements, "ours": ours,
            "linear": is_linear_weight(t.name, shape),
            "ratio": ALL_TYPES[int(t.tensor_type)].ratio if ours else None,
        })
    file_bytes = Path(path).stat().st_size
    params = sum(t["elements"] for t in tensors)
    ours = [t for t in tensors if t["ours"]]
    linear = [t for t in tensors if t["linear"]]
    return {
        "path": str(path),
        "architecture": field_value(reader, "general.architecture"),
        "file_bytes": file_bytes,
        "parameters": params,
        "file_bpw": file_bytes * 8 / params,
        # whatever types they are stored in (ours, or a stock file's), every byte counted
        "bpw": (sum(t["bytes"] for t in linear) * 8 / sum(t["elements"] for t in linear)) if linear else None,
        "linear_tensors": len(linear),
        "hiq2_tensors": len(ours),
        "tensors": tensors,
    }


def format_table(info: dict) -> str:
    lines = [f"{'name':<28} {'type':<9} {'shape':<14} {'ratio':>6} {'bpw':>7}"]
    for t in info["tensors"]:
        ratio = f"{t['ratio']:.3f}" if t["ratio"] is not None else "-"
        shape = "x".join(map(str, t["shape"]))
        lines.append(f"{t['name']:<28} {t['type']:<9} {shape:<14} {ratio:>6} {t['bpw']:7.3f}")
    bpw = f"{info['bpw']:.4f}" if info["bpw"] is not None else "-"
    lines.append(f"{info['linear_tensors']} linear weights ({info['hiq2_tensors']} HIQ2); linear-weight bpw {bpw}; "
                 f"file bpw {info['file_bpw']:.4f} ({info['file_bytes']} bytes, {info['parameters']} parameters)")
    return "\n".join(lines)
