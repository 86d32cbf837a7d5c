"""Architecture-independent part of the Hugging Face -> GGUF mapping."""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np

_REGISTRY: dict[str, type["ModelConverter"]] = {}


class UnsupportedArchitecture(ValueError):
    pass


def register(*model_types: str) -> Callable[[type["ModelConverter"]], type["ModelConverter"]]:
    def wrap(cls: type[ModelConverter]) -> type[ModelConverter]:
        for t in model_types:
            _REGISTRY[t] = cls
        return cls
    return wrap


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def converter_for(config) -> "ModelConverter":
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r} (supported: {', '.join(supported_model_types())})")
    return cls(config)


class ModelConverter:
    """Maps one Hugging Face causal LM onto GGUF names, metadata and layouts."""

    gguf_arch: gguf.MODEL_ARCH

    # Linear weights inside transformer blocks: the tensors we quantize.
    linear_suffixes = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, config):
        self.config = config
        self.n_layers = config.num_hidden_layers
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def gguf_name(self, hf_name: str) -> str:
        name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedArchitecture(f"no GGUF name for tensor {hf_name!r} ({self.arch_name})")
        return name

    def is_linear(self, hf_name: str) -> bool:
        parts = hf_name.split(".")
        return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in self.linear_suffixes

    def block_index(self, hf_name: str) -> int | None:
        """Transformer block a tensor belongs to (None outside the blocks)."""
        parts = hf_name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    def skip(self, hf_name: str) -> bool:
        """Tensors the GGUF does not store (e.g. a tied output head, rotary caches)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return True
        return hf_name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    def row_permutation(self, hf_name: str) -> np.ndarray | None:
        """Rows to reorder between HF and GGUF layout (None: same order).

        Our format is row-wise, so a row permutation applies equally to the
        float weights and to the packed bytes.
        """
        return None

    def to_gguf_values(self, hf_name: str, arr: np.ndarray) -> np.ndarray:
        """Values of a tensor stored as F32, where GGUF's convention differs from HF's."""
        return arr

    def from_gguf_values(self, hf_name: str, arr: np.ndarray) -> np.ndarray:
        """Inverse of ``to_gguf_values`` (for reading a file back in HF terms)."""
        return arr

    # ---- hyperparameters shared by the decoder-only transformers we support ----
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def rope_parameters(self) -> dict:
        """RoPE settings of the (global) attention layers: rope_type, rope_theta, ..."""
        c = self.config
        params = dict(getattr(c, "rope_parameters", None) or {})
        if getattr(c, "rope_theta", None) is not None:
            params.setdefault("rope_theta", c.rope_theta)
        params.setdefault("rope_theta", 10000.0)
        params.setdefault("rope_type", "default")
        return params

    def check_config(self) -> None:
        """Refuse what llama.cpp's graph for this architecture would compute differently."""
        layer_types = getattr(self.config, "layer_types", None) or []
        if "sliding_attention" in layer_types:
            raise UnsupportedArchitecture(
                f"{self.config.model_type} with sliding-window attention layers: llama.cpp's "
                f"{self.arch_name} graph has no sliding window")

    def set_hparams(self, w: gguf.GGUFWriter) -> None:
        self.check_config()
        c = self.config
        w.add_context_length(self.context_length())
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(self.head_dim())
        w.add_value_length(self.head_dim())
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(self.head_dim())
        self.add_rope(w, self.rope_parameters())
        w.add_vocab_size(c.vocab_size)

    def add_rope(self, w: gguf.GGUFWriter, rope: dict) -> None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
        kind = rope["rope_type"]
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif kind != "default":
            # llama3 / yarn / longrope need frequency tables or extra keys we do not write yet
            raise UnsupportedArchitecture(f"RoPE scaling {kind!r} is not supported (supported: default, linear)")
