"""hiq2gguf: Hugging Face LLM -> GGUF with layer-wise high-impact channel groups (HIQ2 types)."""

__version__ = "0.1.0"
