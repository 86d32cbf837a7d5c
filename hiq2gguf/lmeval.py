"""lm-eval (EleutherAI's harness) offline, on our GGUF files or on the float reference.

    hiq2gguf eval out.gguf --tasks piqa,arc_easy --limit 100 --json r.json

One lm-eval model adapter (``HarnessLM``) turns lm-eval's requests into token
sequences and scores them; a *scorer* supplies next-token logits:
``LlamaCppScorer`` runs a GGUF through llama-cpp-python on the patched runtime,
``TorchScorer`` runs a Hugging Face model (the embedded default: its float
reference) in PyTorch. Tokenization follows lm-eval's Hugging Face adapter:
context and continuation are encoded together and split where the context's
tokens end, trailing spaces of the context move to the continuation, and a BOS
token is prepended when the model's tokenizer adds one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hiq2gguf.eval_tasks import DEFAULT_TASKS, write_task_yamls

BACKENDS = ("auto", "llamacpp", "torch")


# ---- scorers --------------------------------------------------------------------
class LlamaCppScorer:
    """A GGUF through llama-cpp-python (patched runtime). It decodes with its own
    batches so that llama.cpp computes output logits only for the scored positions
    (the output layer over every context token would cost more than the rest of a
    small model), and it keeps the KV cache of the prefix a request shares with the
    previous one (the choices of one question)."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int = 2):
        from hiq2gguf import llama

        self.llm = llama.load(path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads)
        self.max_length = n_ctx
        add_bos = self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.bos = self.llm.token_bos() if add_bos else None
        eos = self.llm.token_eos()
        self.prefix_token = self.bos if self.bos is not None else eos
        self._tokens: list[int] = []          # what the KV cache holds

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    def decode(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Next-token logits after each of tokens[first:] (rows first .. len-1)."""
        from llama_cpp import llama_cpp as C

        llm, ctx = self.llm, self.llm._ctx
        keep = 0
        for a, b in zip(self._tokens[:first], tokens[:first]):   # rows >= first are always decoded
            if a != b:
                break
            keep += 1
        if not ctx.kv_cache_seq_rm(-1, keep, -1):   # e.g. a sliding-window cache: start over
            keep = 0
            ctx.kv_cache_seq_rm(-1, 0, -1)
        self._tokens = list(tokens[:keep])
        n_vocab = llm.n_vocab()
        out = np.empty((len(tokens) - first, n_vocab), dtype=np.float32)
        batch = llm._batch
        for start in range(keep, len(tokens), llm.n_batch):
            chunk = tokens[start: start + llm.n_batch]
            batch.set_batch(batch=chunk, n_past=start, logits_all=False)
            for i in range(len(chunk)):
                batch.batch.logits[i] = start + i >= first
            ctx.decode(batch)
            self._tokens.extend(chunk)
            for i in range(max(0, first - start), len(chunk)):
                row = C.llama_get_logits_ith(ctx.ctx, i)
                out[start + i - first] = np.ctypeslib.as_array(row, shape=(n_vocab,))
        return out

    def generate(self, tokens: list[int], until: list[str], max_tokens: int) -> str:
        self._tokens = []                     # llama-cpp-python manages the cache from here
        self.llm.n_tokens = 0
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        out = self.llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0, stop=until or None)
        self.llm.n_tokens = 0
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        return out["choices"][0]["text"]

    def close(self) -> None:
        self.llm.close()


class TorchScorer:
    """A Hugging Face model (default: the embedded model's float reference) in PyTorch.
    Like the llama.cpp scorer, it keeps the KV cache and logits of the last sequence
    and computes only what follows the prefix a new sequence shares with it."""

    name = "torch"

    def __init__(self, model_ref: str | None, max_length: int = 1024, threads: int = 2):
        import torch

        from hiq2gguf import model_io

        torch.set_num_threads(threads)
        self.model, self.tokenizer = model_io.load(model_io.resolve(model_ref))
        self.max_length = max_length
        tok = self.tokenizer
        self.bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
        self.prefix_token = self.bos if self.bos is not None else (tok.bos_token_id or tok.eos_token_id)
        self._tokens: list[int] = []          # the cached sequence, its KV cache and logits
        self._cache = None
        self._logits = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def logits(self, tokens: list[int], first: int) -> np.ndarray:
        """Next-token logits after each of tokens[first:] (rows first .. len-1)."""
        import torch
        from transformers import DynamicCache

        keep = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)       # at least one new token: the model needs input
        try:
            if keep == 0:
                raise ValueError("nothing to reuse")
            self._cache.crop(keep)
        except Exception:                       # no shared prefix, or a cache that cannot be cropped
            keep, self._cache = 0, DynamicCache(config=self.model.config)
        with torch.no_grad():
            new = self.model(input_ids=torch.tensor([tokens[keep:]]), past_key_values=self._cache,
                             use_cache=True).logits[0].float().numpy()
        self._logits = new if keep == 0 else np.concatenate([self._logits[:keep], new])
        self._tokens = list(tokens)
        return self._logits[first:]

    def generate(self, tokens: list[int], until: list[str], max_tokens: int) -> str:
        import torch

        with torch.no_grad():
            out = self.model.generate(torch.tensor([tokens]), max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        text = self.decode(out[0, len(tokens):].tolist())
        cut = min((text.find(s) for s in until if s and s in text), default=len(text))
        return text[:cut]

    def close(self) -> None:
        pass


def _is_our_gguf(path: Path) -> bool:
    from hiq2gguf.formats import is_hiq2
    from hiq2gguf.gguf_io import open_reader

    return any(is_hiq2(t.tensor_type) for t in open_reader(path).tensors)


def make_scorer(model_ref: str | None, backend: str = "auto", n_ctx: int = 1024, threads: int = 2):
    """auto: llama.cpp for a GGUF holding HIQ2 tensors, PyTorch for everything else
    (a Hugging Face directory, a stock GGUF as transformers dequantizes it, the default model)."""
    from hiq2gguf import model_io

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    source = model_io.resolve(model_ref)
    if backend == "auto":
        backend = "llamacpp" if source.gguf_path is not None and _is_our_gguf(source.gguf_path) else "torch"
    if backend == "llamacpp":
        if source.gguf_path is None:
            raise model_io.ModelSourceError(f"{source.path}: the llama.cpp backend needs a GGUF file")
        return LlamaCppScorer(source.gguf_path, n_ctx=n_ctx, threads=threads)
    return TorchScorer(model_ref, max_length=n_ctx, threads=threads)


# ---- the lm-eval adapter ----------------------------------------------------------
def _lm_base():
    from lm_eval.api.model import LM
    return LM


def make_lm(scorer, progress: bool = True):
    """An lm_eval.api.model.LM over ``scorer`` (lm-eval imported only when needed)."""

    class HarnessLM(_lm_base()):
        def __init__(self):
            super().__init__()
            self.scorer = scorer
            self.progress = progress

        # lm-eval's HFLM convention: encode context+continuation together, split at the context
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            s = self.scorer
            head = [s.bos] if s.bos is not None else []
            if not context:
                return [s.prefix_token], s.encode(continuation)
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            whole = s.encode(context + continuation)
            ctx = s.encode(context)
            return head + ctx, whole[len(ctx):]

        def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            if not cont:
                return 0.0, True
            seq = (ctx + cont)[-(self.scorer.max_length + 1):]   # left-truncate like lm-eval
            inp = seq[:-1]
            logits = self.scorer.logits(inp, len(inp) - len(cont))
            z = logits - logits.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            target = np.asarray(cont)
            return float(logp[np.arange(len(cont)), target].sum()), bool((logits.argmax(-1) == target).all())

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [self._encode_pair(*req.args) for req in requests]
            # shared prefixes next to each other: the llama.cpp scorer reuses them
            order = sorted(range(len(pairs)), key=lambda i: pairs[i][0] + pairs[i][1])
            out: list = [None] * len(pairs)
            for i in tqdm(order, desc="loglikelihood", disable=disable_tqdm or not self.progress):
                out[i] = self._score(*pairs[i])
                self.cache_hook.add_partial("loglikelihood", requests[i].args, out[i])
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or not self.progress):
                tokens = self.scorer.encode(req.args[0])
                windows = get_rolling_token_windows(token_list=tokens, prefix_token=self.scorer.prefix_token,
                                                    max_seq_len=self.scorer.max_length, context_len=1)
                total = sum(self._score(list(c), list(t))[0] for c, t in map(make_disjoint_window, windows))
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in tqdm(requests, desc="generate_until", disable=disable_tqdm or not self.progress):
                context, gen_kwargs = req.args
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_tokens = int(gen_kwargs.get("max_gen_toks", 256))
                head = [self.scorer.bos] if self.scorer.bos is not None else []
                tokens = (head + self.scorer.encode(context))[-(self.scorer.max_length - max_tokens):]
                text = self.scorer.generate(tokens, until, max_tokens)
                out.append(text)
                self.cache_hook.add_partial("generate_until", req.args, text)
            return out

    return HarnessLM()


# ---- running --------------------------------------------------------------------
def tasks_dir() -> Path:
    from hiq2gguf.runtime import cache_dir
    return cache_dir() / "lm_eval_tasks"


def run(model_ref: str | None, tasks: list[str] = list(DEFAULT_TASKS), limit: int | None = None,
        backend: str = "auto", n_ctx: int = 1024, threads: int = 2, progress: bool = True) -> dict:
    """Evaluate; returns {"results": {task: {metric: value}}, "table": str, ...}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")        # everything is local; never ask the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torch (imported by lm-eval) and ggml each load their own OpenMP runtime; with the
    # default spin-waiting, one's idle workers starve the other's (measured here: a
    # 19-token llama.cpp decode 0.2 s alone, 10 s once torch's pool had run)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.time()
    task_dir = write_task_yamls(tasks, tasks_dir())
    scorer = make_scorer(model_ref, backend, n_ctx, threads)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        res = simple_evaluate(model=make_lm(scorer, progress), tasks=list(tasks), task_manager=manager,
                              limit=limit, bootstrap_iters=1000, log_samples=False)
    finally:
        scorer.close()
    return {
        "model": str(model_ref or "default"),
        "backend": scorer.name,
        "tasks": list(tasks),
        "limit": limit,
        "seconds": round(time.time() - t0, 1),
        "results": res["results"],
        "n_samples": res.get("n-samples"),
        "versions": res.get("versions"),
        "table": make_table(res),
    }


def write_json(report: dict, path: str | Path) -> None:
    from hiq2gguf.gguf_io import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2, default=str))
