"""Perplexity on held-out text, with the same token windows for every backend.

Windows follow llama-perplexity: consecutive ``n_ctx``-token windows, the first
token replaced by BOS when the model adds one, and only the second half of each
window scored (every scored token has at least n_ctx/2 tokens of context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hiq2gguf import data

DEFAULT_CTX = 512
DEFAULT_WINDOWS = 40   # 40 x 512 = 20,480 tokens


@dataclass
class PPL:
    ppl: float
    n_tokens: int        # scored tokens
    n_windows: int

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "scored_tokens": self.n_tokens, "windows": self.n_windows}


def _nll_second_half(logits: np.ndarray, window: list[int]) -> tuple[float, int]:
    n = len(window)
    first = n // 2
    lg = torch.from_numpy(np.asarray(logits[first:n - 1], dtype=np.float32))
    target = torch.tensor(window[first + 1:n])
    nll = torch.nn.functional.cross_entropy(lg, target, reduction="sum")
    return float(nll), n - 1 - first


def _finish(total: float, count: int, n_windows: int) -> PPL:
    return PPL(ppl=math.exp(total / count), n_tokens=count, n_windows=n_windows)


@torch.no_grad()
def ppl_torch(model, windows: list[list[int]], progress: bool = True, desc: str = "ppl torch") -> PPL:
    """On the device the model's parameters are on (the CPU unless moved)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in tqdm(windows, desc=desc, unit="win", disable=not progress):
        logits = model(input_ids=torch.tensor([w], device=device)).logits[0].float().cpu().numpy()
        nll, n = _nll_second_half(logits, w)
        total += nll
        count += n
    return _finish(total, count, len(windows))


def gpu_packed_model(model, packed: dict):
    """With CUDA and Triton present: ``model`` moved to the GPU, its quantized linears
    replaced (in place) by ``HIQ2Linear`` layers that multiply from the packed bytes
    with the Triton kernels. Otherwise None, and the caller evaluates the
    fake-quantized model on the CPU as before."""
    from hiq2gguf.quantize import triton_kernels

    if not torch.cuda.is_available() or triton_kernels() is None:
        return None
    from hiq2gguf.packed_linear import use_packed_linears
    return use_packed_linears(model, packed).to("cuda")


def ppl_llama(llm, windows: list[list[int]], progress: bool = True, desc: str = "ppl llama.cpp") -> PPL:
    """``llm``: a llama_cpp.Llama created with logits_all=True and n_ctx >= window."""
    total, count = 0.0, 0
    for w in tqdm(windows, desc=desc, unit="win", disable=not progress):
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)])
        nll, n = _nll_second_half(logits, w)
        total += nll
        count += n
    return _finish(total, count, len(windows))


def text_windows(tokenize, text_name: str, n_ctx: int = DEFAULT_CTX,
                 n_windows: int | None = DEFAULT_WINDOWS, bos: int | None = None) -> list[list[int]]:
    """``tokenize``: str -> list[int] without special tokens."""
    return data.token_windows(tokenize(data.held_out_text(text_name)), n_ctx, n_windows, bos)
