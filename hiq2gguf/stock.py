"""Stock llama.cpp types as candidates for the ratio optimizer (``convert --target stock``).

A file written this way holds only types every llama.cpp (Ollama, LM Studio, an
unpatched build) loads: the optimizer chooses a stock type per linear weight,
under the same exact-bits budget and the same loss model as for the HIQ2
members (plan.py).

Quantization is ggml's own: ``ggml_quantize_chunk`` of the runtime's libggml,
called through ctypes, with an importance matrix from our calibration; the
bytes go into the file unchanged and their dequantization (ggml's ``to_float``)
into the PyTorch model, so the planning perturbations Delta, the torch model and
the file agree exactly.

Importance matrix: the mean squared input activation of each column,
``E[x_j^2]`` over the calibration tokens, i.e. the diagonal of the GPTQ Hessian
``X^T X / n`` (``calibrate.collect_input_squares``). ggml's quantizers minimise
``sum_j w_j (W_ij - Q_ij)^2`` row by row with one weight per column; the
layer's output error of a row is ``Delta_i^T X^T X Delta_i``, whose diagonal
part is exactly that sum with ``w_j = (X^T X)_jj``. It is also the statistic
llama-imatrix collects, for which the ggml quantizers were tuned, so a
comparison with llama-quantize differs in the choice of types, not in the
importance statistic. (Fisher column sums ``sum_i E[g_ij^2]`` would add the
output-gradient weighting, but from 16 calibration windows they are far
noisier, and the loss weighting is already what the optimizer's M is for.)
"""

from __future__ import annotations

import ctypes
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import gguf
import numpy as np
import torch

from hiq2gguf.formats import FormatError


@dataclass(frozen=True)
class StockType:
    """One stock ggml type: the table row gguf-py and ggml agree on."""

    name: str

    @property
    def type_id(self) -> int:
        return int(gguf.GGMLQuantizationType[self.name])

    @property
    def block_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.name]][0]

    @property
    def type_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.name]][1]

    @property
    def bpw(self) -> float:
        return self.type_size * 8 / self.block_size

    def fits(self, shape: tuple[int, int]) -> bool:
        """Rows are stored in whole blocks: the row length must be a multiple of the block."""
        return shape[1] % self.block_size == 0

    def row_bytes(self, n_cols: int) -> int:
        return n_cols // self.block_size * self.type_size


# Types a stock llama.cpp has loaded for a long time (ggml ids below 30). Q1_0/Q2_0,
# TQ*, MXFP4 and NVFP4 are left out: older builds in the field do not know them;
# IQ1_S/IQ1_M are usable through --stock-types but too lossy to be a default.
STOCK_TYPES = {t.name: t for t in map(StockType, (
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "IQ1_S", "IQ1_M"))}
DEFAULT_STOCK_TYPES = tuple(n for n in STOCK_TYPES if not n.startswith("IQ1_"))


def parse_stock_types(spec: str | None) -> list[StockType]:
    """``"Q2_K,q3_k,IQ4_NL"`` -> types (default: ``DEFAULT_STOCK_TYPES``), smallest first."""
    from hiq2gguf.plan import BudgetError

    names = [x.strip().upper() for x in (spec or "").split(",") if x.strip()] or list(DEFAULT_STOCK_TYPES)
    unknown = [n for n in names if n not in STOCK_TYPES]
    if unknown:
        raise BudgetError(f"--stock-types: unknown {', '.join(unknown)} (choose from {', '.join(STOCK_TYPES)})")
    return sorted({STOCK_TYPES[n] for n in names}, key=lambda t: (t.bpw, t.name))


# ---- ggml through ctypes -----------------------------------------------------------
class _Traits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class GGML:
    """The quantization entry points of the runtime's libggml-base."""

    def __init__(self, lib_path):
        lib = ctypes.CDLL(str(lib_path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib = lib

    def quantize(self, t: StockType, w: np.ndarray, imatrix: np.ndarray | None, threads: int = 2) -> np.ndarray:
        """float32 [rows, cols] -> uint8 [rows, row bytes], in row chunks on ``threads`` threads
        (ctypes lets go of the GIL during the call)."""
        if not t.fits(w.shape):
            raise FormatError(f"{t.name} needs rows that are a multiple of {t.block_size}, got {w.shape[1]}")
        w = np.ascontiguousarray(w, dtype=np.float32)
        rows, cols = w.shape
        row_bytes = self.lib.ggml_row_size(t.type_id, cols)
        if row_bytes != t.row_bytes(cols):
            raise FormatError(f"{t.name}: ggml row size {row_bytes} != gguf-py's {t.row_bytes(cols)}")
        imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat is not None and imat.shape != (cols,):
            raise ValueError(f"importance matrix of {imat.shape} for {cols} columns")
        dst = np.zeros((rows, row_bytes), dtype=np.uint8)
        self.lib.ggml_quantize_init(t.type_id)         # lookup tables once, outside the threads
        step = max(1, -(-rows // (4 * threads)))

        def chunk(r0: int) -> None:
            n = min(step, rows - r0)
            self.lib.ggml_quantize_chunk(t.type_id, w.ctypes.data, dst.ctypes.data, r0 * cols, n, cols,
                                         None if imat is None else imat.ctypes.data)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(chunk, range(0, rows, step)))
        return dst

    def dequantize(self, t: StockType, raw: np.ndarray, cols: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        to_float = _ToFloat(self.lib.ggml_get_type_traits(t.type_id).contents.to_float)
        to_float(raw.ctypes.data, out.ctypes.data, out.size)
        return out


@lru_cache(maxsize=None)
def ggml() -> GGML:
    from hiq2gguf import runtime

    d = runtime.lib_dir()
    for name in ("libggml-base.so", "libggml-base.dylib"):
        if (d / name).exists():
            return GGML(d / name)
    raise runtime.RuntimeMissing(f"libggml-base not found in {d}")


# ---- the quantizer and its candidates ------------------------------------------------
@dataclass
class StockQuantizer:
    """ggml's quantizer of every stock type, with a per-weight importance matrix."""

    imatrix: dict[str, torch.Tensor]          # name -> E[x_j^2] per input column
    threads: int = 2

    def roundtrip(self, name: str, w: torch.Tensor, t: StockType) -> tuple[np.ndarray, torch.Tensor]:
        """-> (file bytes, their dequantized values as a tensor like ``w``)."""
        lib = ggml()
        arr = w.detach().to("cpu", torch.float32).numpy()
        imat = self.imatrix[name].detach().to("cpu", torch.float32).numpy() if name in self.imatrix else None
        raw = lib.quantize(t, arr, imat, self.threads)
        deq = torch.from_numpy(lib.dequantize(t, raw, arr.shape[1])).to(w.dtype)
        return raw, deq

    def digest(self) -> str:
        """What the quantization depends on beyond the weights (for the cache of M)."""
        h = hashlib.sha256()
        for n in sorted(self.imatrix):
            h.update(n.encode())
            h.update(self.imatrix[n].detach().to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class StockCandidate:
    """A stock type as one of the optimizer's choices (see plan.Candidate)."""

    qtype: StockType
    quantizer: StockQuantizer = field(repr=False, compare=False, hash=False)

    def bits(self, shape: tuple[int, int]) -> int:
        return shape[0] * self.qtype.row_bytes(shape[1]) * 8

    @staticmethod
    def deltas(cands: list[StockCandidate], name: str, w: torch.Tensor) -> list[torch.Tensor]:
        return [c.quantizer.roundtrip(name, w, c.qtype)[1] - w for c in cands]


def stock_candidates(shapes: dict[str, tuple[int, int]], quantizer: StockQuantizer, bpw: float,
                     types: list[StockType] | None = None, spread: float | None = 1.0):
    """Per weight: the ``types`` whose blocks fit its rows; by default only those within
    ``spread`` bits per weight of the budget, and always the cheapest fitting ones (a
    576-wide row takes nothing below 4.5 bpw). Raises BudgetError for a weight no type fits."""
    from hiq2gguf.plan import BudgetError, CandidateSet

    types = types or parse_stock_types(None)
    layers = {}
    for name, shape in shapes.items():
        fitting = [t for t in types if t.fits(shape)]
        if not fitting:
            raise BudgetError(f"{name}: rows of {shape[1]} fit none of {', '.join(t.name for t in types)}")
        chosen = fitting
        if spread is not None:
            top = min(bpw, max(t.bpw for t in fitting))
            near = [t for t in fitting if top - spread - 1e-9 <= t.bpw <= top + spread + 1e-9]
            cheapest = min(t.bpw for t in fitting)
            chosen = [t for t in fitting if t in near or t.bpw == cheapest]
        layers[name] = [StockCandidate(t, quantizer) for t in chosen]
    names = sorted({c.qtype.name for cs in layers.values() for c in cs})
    settings = {"candidates": ("stock", *names), "quantizer": f"ggml_quantize_chunk/imatrix={quantizer.digest()}"}
    return CandidateSet(layers, settings)


def quantize_linears(model, plan: dict[str, StockType], quantizer: StockQuantizer, progress: bool = True):
    """Every weight in ``plan`` -> its stock bytes (PackedTensor); the torch model gets
    exactly their dequantized values."""
    from tqdm import tqdm

    from hiq2gguf.writer import PackedTensor

    params = dict(model.named_parameters())
    packed = {}
    for name in tqdm(list(plan), desc="quantize (ggml)", unit="layer", disable=not progress):
        p, t = params[name], plan[name]
        raw, deq = quantizer.roundtrip(name, p.data, t)
        packed[name] = PackedTensor(qtype=t, raw=raw, shape=tuple(p.shape))
        with torch.no_grad():
            p.data.copy_(deq)
    return packed
