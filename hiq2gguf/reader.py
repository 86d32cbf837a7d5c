"""Reading a converted GGUF back into float weights in Hugging Face names and row order."""

from __future__ import annotations

import numpy as np

from hiq2gguf.formats import get_type, is_hiq2
from hiq2gguf.gguf_io import open_reader


def dequantized_state(path, converter, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """float32 weights for every HF tensor name in ``shapes`` that the file stores,
    dequantized by the numpy references (ours and gguf-py's) and un-permuted."""
    import gguf

    by_name = {t.name: t for t in open_reader(path).tensors}
    out = {}
    for hf_name, shape in shapes.items():
        if converter.skip(hf_name):
            continue
        t = by_name[converter.gguf_name(hf_name)]
        raw = np.asarray(t.data)
        if is_hiq2(t.tensor_type):
            w = get_type(int(t.tensor_type)).dequantize(raw.reshape(shape[0], -1))
        elif t.tensor_type == gguf.GGMLQuantizationType.F32:
            w = converter.from_gguf_values(hf_name, np.array(raw, dtype=np.float32).reshape(shape))
        else:
            w = np.asarray(gguf.quants.dequantize(raw, t.tensor_type)).reshape(shape)
        perm = converter.row_permutation(hf_name)
        if perm is not None:
            inv = np.empty_like(perm)
            inv[perm] = np.arange(len(perm))
            w = w[inv]
        out[hf_name] = np.ascontiguousarray(w, dtype=np.float32)
    return out
