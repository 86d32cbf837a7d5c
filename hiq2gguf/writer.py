"""Writing a converted model as GGUF: metadata, tokenizer and tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from hiq2gguf import __version__
from hiq2gguf.formats import HIQ2Type, register_with_gguf
from hiq2gguf.gguf_io import atomic_output

# Embeddings (and an untied output head) are stored in this stock type: 8-bit
# blocks of 32 fit every width, including 576, and cost 8.5 bits per weight.
EMBED_TYPE = gguf.GGMLQuantizationType.Q8_0


@dataclass
class PackedTensor:
    """A weight in HF row order, already packed into one of our types (or, with
    ``--target stock``, a stock ggml type: stock.StockType)."""

    qtype: HIQ2Type
    raw: np.ndarray       # uint8 [rows, row_bytes]
    shape: tuple[int, int]


def stock_roundtrip(w: np.ndarray, qtype=EMBED_TYPE) -> tuple[np.ndarray, np.ndarray]:
    """-> (packed bytes, dequantized float32) for a stock ggml type (gguf-py reference)."""
    raw = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    return raw, gguf.quants.dequantize(raw, qtype).astype(np.float32)


def _copy_field(w: gguf.GGUFWriter, key: str, field) -> None:
    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        w.add_key_value(key, field.contents(), types[0], sub_type=types[-1])
    else:
        w.add_key_value(key, field.contents(), types[0])


def write_tokenizer(w: gguf.GGUFWriter, tokenizer_kv: dict, hf_dir: Path | None, tokenizer) -> None:
    """Copy a source GGUF's tokenizer fields, or build them from a HF tokenizer."""
    if tokenizer_kv:
        for key, field in tokenizer_kv.items():
            _copy_field(w, key, field)
        return
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
    types = [gguf.TokenType.CONTROL if i in special or i in added else gguf.TokenType.NORMAL
             for i in range(n)]
    tj = json.loads(Path(hf_dir, "tokenizer.json").read_text()) if hf_dir else {}
    merges = tj.get("model", {}).get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_token_id),
                        (w.add_eos_token_id, tokenizer.eos_token_id),
                        (w.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


def _writer_with_metadata(tmp: Path, converter, source, tokenizer, extra_kv: dict) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(tmp, converter.arch_name)
    w.add_name(source.name or "model")
    w.add_string("hiq2gguf.version", __version__)
    for k, v in extra_kv.items():
        if isinstance(v, float):
            w.add_float32(f"hiq2gguf.{k}", v)
        else:
            w.add_string(f"hiq2gguf.{k}", str(v))
    converter.set_hparams(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(w, source.tokenizer_kv, None if source.gguf_path else source.path, tokenizer)
    return w


def write_gguf(path: Path, converter, model, source, tokenizer, packed: dict[str, PackedTensor],
               stock: dict[str, np.ndarray], extra_kv: dict[str, object]) -> None:
    """Write atomically: ``packed`` linear weights, ``stock`` Q8_0 bytes, the rest F32."""
    register_with_gguf()
    with atomic_output(path) as tmp:
        w = _writer_with_metadata(tmp, converter, source, tokenizer, extra_kv)
        for hf_name, p in model.state_dict().items():
            if converter.skip(hf_name):
                continue
            name = converter.gguf_name(hf_name)
            perm = converter.row_permutation(hf_name)
            if hf_name in packed:
                t = packed[hf_name]
                raw = t.raw if perm is None else t.raw[perm]
                w.add_tensor(name, np.ascontiguousarray(raw), raw_shape=raw.shape,
                             raw_dtype=gguf.GGMLQuantizationType(t.qtype.type_id))
            elif hf_name in stock:
                raw = stock[hf_name] if perm is None else stock[hf_name][perm]
                w.add_tensor(name, np.ascontiguousarray(raw), raw_shape=raw.shape, raw_dtype=EMBED_TYPE)
            else:
                arr = converter.to_gguf_values(hf_name, p.detach().to("cpu").float().numpy())
                if perm is not None:
                    arr = arr[perm]
                w.add_tensor(name, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()


@dataclass
class LazyTensor:
    """A tensor of the file whose size is known before its data exists: ``load()``
    gives the array (F32 values, or packed bytes of ``raw_dtype``) when it is written."""

    name: str                             # GGUF name
    shape: tuple[int, ...]                # of the array ``load`` returns (bytes for a packed type)
    dtype: np.dtype
    raw_dtype: gguf.GGMLQuantizationType | None
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def write_gguf_streaming(path: Path, converter, source, tokenizer, tensors: list[LazyTensor],
                         extra_kv: dict[str, object]) -> None:
    """``write_gguf``'s layout, written tensor by tensor: the tensor infos first (their
    sizes are known), then each tensor's data as ``load`` makes it. Same bytes as
    ``write_gguf`` for the same tensors; atomic."""
    register_with_gguf()
    with atomic_output(path) as tmp:
        w = _writer_with_metadata(tmp, converter, source, tokenizer, extra_kv)
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), t.nbytes, raw_dtype=t.raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            arr = np.ascontiguousarray(t.load())
            if arr.shape != tuple(t.shape) or arr.dtype != t.dtype:
                raise ValueError(f"{t.name}: got {arr.dtype} {arr.shape}, announced {t.dtype} {t.shape}")
            w.write_tensor_data(arr)
        w.close()
