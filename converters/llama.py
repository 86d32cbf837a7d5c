"""LLaMA family: Llama, SmolLM, Mistral."""

from __future__ import annotations

import gguf
import numpy as np

from converters.base import ModelConverter, register


@register("llama")
class LlamaConverter(ModelConverter):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def row_permutation(self, hf_name: str) -> np.ndarray | None:
        # HF rotates halves (i, i + d/2); GGUF llama rotates adjacent pairs
        # (2i, 2i+1), so q and k rows are interleaved per head.
        parts = hf_name.split(".")
        if len(parts) < 2 or parts[-2] not in ("q_proj", "k_proj"):
            return None
        c = self.config
        n_head = c.num_attention_heads if parts[-2] == "q_proj" else c.num_key_value_heads
        hd = self.head_dim()
        rows = np.arange(n_head * hd).reshape(n_head, 2, hd // 2)
        return rows.swapaxes(1, 2).reshape(-1)


@register("mistral")
class MistralConverter(LlamaConverter):
    """Mistral runs as llama in llama.cpp, whose llama graph has no sliding window."""

    def context_length(self) -> int:
        # Within the window, sliding-window attention is plain causal attention, so the
        # file is exact up to there; advertise that as its trained context.
        window = getattr(self.config, "sliding_window", None)
        n = self.config.max_position_embeddings
        return min(n, window) if window else n
