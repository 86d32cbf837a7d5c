"""Qwen2 and Qwen3.

Both rotate halves of each head like Hugging Face (NEOX RoPE in llama.cpp), so
q and k keep their row order. Qwen2's q/k/v biases and Qwen3's per-head q/k
RMS norms map onto GGUF names by gguf-py's tensor map and are stored as F32.
"""

from __future__ import annotations

import gguf

from converters.base import ModelConverter, register


@register("qwen2")
class Qwen2Converter(ModelConverter):
    gguf_arch = gguf.MODEL_ARCH.QWEN2


@register("qwen3")
class Qwen3Converter(ModelConverter):
    gguf_arch = gguf.MODEL_ARCH.QWEN3
