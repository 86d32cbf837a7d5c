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

    def set_hparams(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError
