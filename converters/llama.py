"""LLaMA family (Llama, SmolLM)."""

from __future__ import annotations

import gguf
import numpy as np

from converters.base import ModelConverter, register


@register("llama")
class LlamaConverter(ModelConverter):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def set_hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(self.head_dim())
        theta = getattr(c, "rope_theta", None)
        if theta is None:
            theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        w.add_rope_freq_base(float(theta))
        w.add_vocab_size(c.vocab_size)

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

