"""Gemma 3 (text model, Hugging Face ``gemma3_text``).

What differs from the llama family:
- RMS norms: HF scales by (1 + w), llama.cpp by w, so every stored norm weight is w + 1.
- Token embeddings are scaled by sqrt(hidden_size) at run time in both, so they are stored as is.
- Sliding-window (local) and global attention layers, each with its own RoPE base.
- Attention scale: llama.cpp uses 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the
  62-layer 27B); HF uses query_pre_attn_scalar**-0.5. They must agree.
- Extra post-attention / post-feed-forward norms and per-head q/k norms, mapped by name.
"""

from __future__ import annotations

import gguf
import numpy as np

from converters.base import ModelConverter, UnsupportedArchitecture, register


@register("gemma3_text")
class Gemma3Converter(ModelConverter):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3

    def rope_parameters(self, layer_type: str = "full_attention") -> dict:
        params = dict((getattr(self.config, "rope_parameters", None) or {}).get(layer_type) or {})
        params.setdefault("rope_theta", 1_000_000.0 if layer_type == "full_attention" else 10_000.0)
        params.setdefault("rope_type", "default")
        return params

    def check_config(self) -> None:
        c = self.config
        llama_cpp_scalar = (c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62
                            else self.head_dim())
        if float(c.query_pre_attn_scalar) != float(llama_cpp_scalar):
            raise UnsupportedArchitecture(
                f"gemma3: query_pre_attn_scalar {c.query_pre_attn_scalar} differs from the attention "
                f"scale llama.cpp uses for this model (1/sqrt({llama_cpp_scalar}))")
        if getattr(c, "attn_logit_softcapping", None):
            raise UnsupportedArchitecture("gemma3: attention logit soft-capping is not in llama.cpp's graph")
        if getattr(c, "use_bidirectional_attention", False):
            raise UnsupportedArchitecture("gemma3: bidirectional attention (embedding models) is not supported")
        if c.hidden_activation != "gelu_pytorch_tanh":
            raise UnsupportedArchitecture(f"gemma3: activation {c.hidden_activation!r} "
                                          "(llama.cpp computes tanh-approximated GELU)")
        local = self.rope_parameters("sliding_attention")
        if local["rope_type"] != "default":
            raise UnsupportedArchitecture(f"gemma3: RoPE scaling {local['rope_type']!r} on sliding layers")

    def set_hparams(self, w: gguf.GGUFWriter) -> None:
        super().set_hparams(w)
        c = self.config
        is_swa = [t == "sliding_attention" for t in c.layer_types]
        if c.sliding_window and any(is_swa):
            w.add_sliding_window(int(c.sliding_window))
            w.add_sliding_window_pattern(is_swa)
            w.add_rope_freq_base_swa(float(self.rope_parameters("sliding_attention")["rope_theta"]))
        if getattr(c, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))

    @staticmethod
    def _is_norm(hf_name: str) -> bool:
        return hf_name.endswith("norm.weight")

    def to_gguf_values(self, hf_name: str, arr: np.ndarray) -> np.ndarray:
        return arr + np.float32(1.0) if self._is_norm(hf_name) else arr

    def from_gguf_values(self, hf_name: str, arr: np.ndarray) -> np.ndarray:
        return arr - np.float32(1.0) if self._is_norm(hf_name) else arr
