"""Hugging Face -> GGUF mapping, one small registered class per architecture.

Like llama.cpp's convert_hf_to_gguf.py: ``@register("llama", ...)`` binds a
class to Hugging Face ``model_type`` values; a subclass overrides only what
differs from its parent.
"""

from converters.base import (ModelConverter, UnsupportedArchitecture, converter_for,
                             register, supported_model_types)
from converters import gemma, llama, qwen  # noqa: F401  (register their architectures)

__all__ = ["ModelConverter", "UnsupportedArchitecture", "converter_for", "register",
           "supported_model_types"]
