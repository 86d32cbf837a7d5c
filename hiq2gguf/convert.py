"""The main job: calibrate, quantize every linear weight into HIQ2, write GGUF, evaluate.

    from hiq2gguf.convert import ConvertConfig, convert
    report = convert(ConvertConfig(bpw=3.0), "out.gguf")
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from hiq2gguf import data, evaluate
from hiq2gguf.formats import FormatError, HIQ2Type, pack_tensor
from hiq2gguf.plan import BudgetError, RatioConfig, check_budget, fixed_plan, optimized_plan, parse_ratios
from hiq2gguf.gguf_io import atomic_output
from hiq2gguf.model_io import ModelSourceError
from hiq2gguf.gptq import GPTQConfig
from hiq2gguf.quantize import dequantize_torch, quantize_member
from hiq2gguf.writer import PackedTensor, stock_roundtrip, write_gguf


@dataclass
class ConvertConfig:
    bpw: float                                # budget: bits per quantized linear weight
    calib_windows: int = 16                   # calibration sequences (BoolQ calibration half)
    # sequences the block-sequential methods calibrate on (GPTQ's Hessians, the reconstruction
    # targets); None: the calibration's. GPTQ's Hessian of a layer with n inputs wants well
    # over n tokens, more than the Fisher and the plan need (tools/gptq_layer.py)
    quant_windows: int | None = None
    calib_ctx: int = 512
    eval_text: str = "boolq"
    eval_windows: int = evaluate.DEFAULT_WINDOWS
    eval_ctx: int = evaluate.DEFAULT_CTX
    # rtn | gptq | lwc | adaround | hybrid | hybrid-lwc (sequential.METHODS); hybrid beat gptq on
    # whole-model perplexity wherever the plan has high-impact groups (README, compare_stock)
    method: str = "hybrid"
    preset: str = "fast"                      # reconstruction settings: fast (CPU) | paper (learned.PRESETS)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)     # GPTQ's damping and activation order
    ratio_strategy: str = "optimized"         # optimized (per-layer ratios, see plan.py) | fixed
    ratio: RatioConfig = field(default_factory=RatioConfig)
    target: str = "hiq2"                      # hiq2 | stock (stock llama.cpp types only, stock.py)
    stock_types: str | None = None            # target stock: allowed types, e.g. "Q2_K,Q3_K,IQ4_NL"
    evaluate: bool = True                     # measure ppl: reference, torch, llama.cpp
    threads: int = 2
    progress: bool = True
    checkpoints: bool = True                  # per-block checkpoints in OUT.partial/: a rerun resumes (resume.py)
    stream: bool = False                      # one block in memory at a time (safetensors source; streaming.py)


def check_weights(model, converter) -> dict[str, tuple[int, int]]:
    """The linear weights' shapes, once every weight is finite and every linear one fits."""
    shapes = {}
    for name, p in model.named_parameters():
        if p.device.type != "meta" and not torch.isfinite(p).all():
            raise ModelSourceError(f"{name}: the weights hold NaN or inf")
        if converter.is_linear(name):
            if p.ndim != 2 or p.shape[1] % 64:
                raise FormatError(f"{name}: shape {tuple(p.shape)} does not fit HIQ2 "
                                  f"(input columns must be a multiple of 64)")
            shapes[name] = tuple(p.shape)
    if not shapes:
        raise FormatError("no linear weights found to quantize")
    return shapes


def quant_windows(cfg: ConvertConfig, calib_windows: list[list[int]], tokenize, bos: int | None
                  ) -> list[list[int]]:
    """The windows the block-sequential methods calibrate on (``ConvertConfig.quant_windows``):
    the calibration's, or that many of the same text."""
    n = cfg.quant_windows
    if n is None or n == len(calib_windows):
        return calib_windows
    return data.calibration_windows(tokenize, cfg.calib_ctx, n, bos)


@dataclass
class Calibration:
    windows: list[list[int]]
    fisher: dict[str, torch.Tensor]
    seconds: float
    input_squares: dict[str, torch.Tensor] | None = None   # target stock: ggml's importance matrix


class Conversion:
    """One model on its way into a GGUF, step by step: ``calibrate``, ``plan``,
    ``quantize``, ``write``. ``convert`` runs them once; ``tools/ablation.py`` plans,
    quantizes and writes several files from one calibration (``restore`` puts the
    float weights back in between)."""

    def __init__(self, cfg: ConvertConfig, model_ref: str | None = None, weights: bool = True):
        """``weights=False``: shapes, tokenizer and config only (the block-streamed path
        reads weights itself); ``load_weights`` brings them in when a step needs them."""
        from converters import converter_for
        from hiq2gguf import model_io

        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.source = model_io.resolve(model_ref)
        _log(cfg, f"loading {self.source.path}" + ("" if weights else " (shapes only)"))
        self.model, self.tokenizer = model_io.load(self.source, weights)
        self.converter = converter_for(self.model.config)
        self.shapes = check_weights(self.model, self.converter)
        add_bos = bool(getattr(self.tokenizer, "add_bos_token", False))
        self.bos = self.tokenizer.bos_token_id if add_bos else None
        self._float = self._float_copy() if weights else {}
        self.checkpoints: Path | None = None    # OUT.partial/ when resumable (``convert``)

    def load_weights(self) -> None:
        """The weights (and their float copy), if this conversion was made without them."""
        from hiq2gguf import model_io

        if self.model is not None and not next(self.model.parameters()).is_meta:
            return
        _log(self.cfg, f"loading the weights of {self.source.path}")
        self.model, _ = model_io.load(self.source)
        self._float = self._float_copy()

    def _float_copy(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def cache_key(self, *parts) -> str:
        """Hash of the source weights and ``parts`` (settings a cached result depends on)."""
        from hiq2gguf.resume import key_of, source_digest

        return key_of(source_digest(self.source.path), self.cfg.threads, *parts)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_windows(self, text: str, n_windows: int | None = None) -> list[list[int]]:
        return evaluate.text_windows(self.tokenize, text, self.cfg.eval_ctx,
                                     n_windows or self.cfg.eval_windows, self.bos)

    def restore(self) -> None:
        """Float weights back into the model (after ``quantize``)."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.data.copy_(self._float[n])

    def unload(self) -> None:
        """Let the weights and their float copy go (a caller that goes on with the
        block-streamed path keeps only the tokenizer, the shapes and the config)."""
        import gc

        self.model, self._float = None, {}
        gc.collect()

    def calibrate(self) -> Calibration:
        from hiq2gguf.resume import load_torch, save_torch

        cfg = self.cfg
        path = None
        if self.checkpoints is not None:
            key = self.cache_key("calibration", cfg.calib_windows, cfg.calib_ctx, cfg.target)
            path = self.checkpoints / f"calib-{key}.pt"
            if path.exists():
                _log(cfg, f"calibration from {path}")
                return Calibration(**load_torch(path))
        calib = self._calibrate()
        if path is not None:
            save_torch(path, dict(vars(calib)))
        return calib

    def _calibrate(self) -> Calibration:
        from hiq2gguf.calibrate import collect_fisher, linear_weights

        cfg, t0 = self.cfg, time.time()
        windows = data.calibration_windows(self.tokenize, cfg.calib_ctx, cfg.calib_windows, self.bos)
        params = linear_weights(self.model, self.converter.is_linear)
        fisher = collect_fisher(self.model, params, windows, cfg.progress)
        squares = None
        if cfg.target == "stock":
            from hiq2gguf.calibrate import collect_input_squares
            squares = collect_input_squares(self.model, params, windows, cfg.progress)
        return Calibration(windows, fisher, time.time() - t0, squares)

    def stock_quantizer(self, calib: Calibration):
        from hiq2gguf.stock import StockQuantizer

        return StockQuantizer(calib.input_squares, self.cfg.threads)

    def plan(self, calib: Calibration, bpw: float | None = None,
             strategy: str | None = None, ratio: RatioConfig | None = None) -> tuple[dict[str, HIQ2Type], dict]:
        from hiq2gguf.calibrate import linear_weights

        bpw = self.cfg.bpw if bpw is None else bpw
        strategy = strategy or self.cfg.ratio_strategy
        candidates = None
        if self.cfg.target == "stock":
            from hiq2gguf.stock import parse_stock_types, stock_candidates

            if strategy == "fixed":
                raise BudgetError("--target stock chooses types with the optimizer; for one type everywhere "
                                  "use llama-quantize")
            candidates = stock_candidates(self.shapes, self.stock_quantizer(calib), bpw,
                                          parse_stock_types(self.cfg.stock_types),
                                          spread=None if self.cfg.stock_types else 1.0)
        if strategy == "fixed":
            plan = fixed_plan(self.shapes, bpw)
            _log(self.cfg, f"every linear weight -> {next(iter(plan.values())).name}")
            return plan, {"ratio_strategy": "fixed"}
        t0 = time.time()
        params = linear_weights(self.model, self.converter.is_linear)
        plan, info = optimized_plan(self.model, params, calib.fisher, bpw, calib.windows,
                                    self.converter.block_index, ratio or self.cfg.ratio, self.cfg.progress,
                                    candidates=candidates)
        s = info["solver"]
        objective = "-" if s["objective"] is None else f"{s['objective']:.4g}"
        _log(self.cfg, f"{info['estimator']} estimator, solver {s['method']}: {s['status']}, "
                       f"objective {objective}, gap {s['gap']:.2g}, {s['seconds']:.1f} s")
        return plan, {"ratio_strategy": "optimized", **info, "plan_seconds": round(time.time() - t0, 1)}

    def quant_windows(self, calib: Calibration) -> list[list[int]]:
        """``quant_windows`` of this conversion, tokenized once (the quantizers and their
        checkpoint key both ask)."""
        cached = getattr(self, "_quant_windows", None)
        if cached is None or cached[0] is not calib:
            self._quant_windows = cached = (calib, quant_windows(self.cfg, calib.windows, self.tokenize, self.bos))
        return cached[1]

    def quantize_fn(self, calib: Calibration, plan: dict[str, HIQ2Type]) -> Callable:
        """RTN layer by layer; GPTQ and the learned quantizers block by block on the
        ``quant_windows`` (hiq2gguf/sequential.py)."""
        from hiq2gguf.learned import preset
        from hiq2gguf.sequential import block_quantize_fn

        return block_quantize_fn(self.cfg.method, self.model, plan, self.quant_windows(calib), calib.fisher,
                                 preset(self.cfg.preset), self.cfg.progress, self.cfg.gptq)

    def quantize(self, plan: dict[str, HIQ2Type], calib: Calibration):
        """Codes -> packed bytes; the torch model gets exactly the dequantized weights."""
        if self.cfg.target == "stock":                  # ggml's quantizers, one layer at a time
            from hiq2gguf.stock import quantize_linears

            self.block_records = []
            packed = quantize_linears(self.model, plan, self.stock_quantizer(calib), self.cfg.progress)
            return packed, quantize_embeddings(self.model, self.converter)
        fn = self.quantize_fn(calib, plan)
        if self.checkpoints is not None:
            from hiq2gguf.sequential import block_settings
            from hiq2gguf.resume import BlockCheckpoints, ResumableQuantizeFn, plan_spelling

            key = self.cache_key("blocks", self.quant_windows(calib), plan_spelling(plan), *block_settings(self.cfg))
            store = BlockCheckpoints(self.checkpoints, key, self.converter.n_layers)
            fn = ResumableQuantizeFn(fn, store, plan, self.converter.block_index, lambda m: _log(self.cfg, m))
        out = quantize_model(self.model, self.converter, plan, fn, self.cfg.progress)
        self.block_records = [asdict(r) for r in getattr(fn, "records", [])]   # block-sequential methods
        return out

    def cached_plan(self, calib: Calibration) -> tuple[dict[str, HIQ2Type], dict]:
        """``plan`` with the default settings, kept in the checkpoint directory: a resumed
        run must not solve again (a solver stopped by its time limit may choose differently)."""
        if self.checkpoints is None:
            return self.plan(calib)
        from hiq2gguf.formats import get_type
        from hiq2gguf.resume import save_json

        cfg = self.cfg
        key = self.cache_key("plan", calib.windows, cfg.bpw, cfg.ratio_strategy, repr(cfg.ratio), cfg.target,
                             cfg.stock_types)
        path = self.checkpoints / f"plan-{key}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if cfg.target == "stock":
                from hiq2gguf.stock import STOCK_TYPES
                types = {n: STOCK_TYPES[t] for n, t in saved["plan"]}
            else:
                types = {n: get_type(t) for n, t in saved["plan"]}
            _log(cfg, f"plan from {path}")
            return types, saved["info"]
        plan, info = self.plan(calib)
        save_json(path, {"plan": [[n, t.name] for n, t in plan.items()], "info": info})
        return plan, info

    def write(self, out: Path, packed, stock, bpw: float | None = None) -> dict:
        bpw = self.cfg.bpw if bpw is None else bpw
        write_gguf(out, self.converter, self.model, self.source, self.tokenizer, packed, stock,
                   {"ratio_strategy": self.cfg.ratio_strategy, "bpw_budget": float(bpw),
                    "target": self.cfg.target})
        return size_report(out, packed)


def _log(cfg: ConvertConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


def convert(cfg: ConvertConfig, out: str | Path, model_ref: str | None = None,
            report_path: str | Path | None = None) -> dict:
    t_start = time.time()
    out = Path(out)
    if not math.isfinite(cfg.bpw):
        raise BudgetError(f"--bpw must be a number, got {cfg.bpw}")
    if cfg.target not in ("hiq2", "stock"):
        raise ValueError(f"unknown target {cfg.target!r} (hiq2 | stock)")
    if cfg.calib_windows < 1 or (cfg.quant_windows is not None and cfg.quant_windows < 1):
        raise ValueError(f"--calib-windows ({cfg.calib_windows}) and --quant-windows ({cfg.quant_windows}) "
                         "must be positive")
    if cfg.target == "stock":               # fail on bad input before any heavy work
        from hiq2gguf.stock import parse_stock_types
        parse_stock_types(cfg.stock_types)
        if cfg.ratio_strategy == "fixed":
            raise BudgetError("--target stock chooses types with the optimizer: use --ratio-strategy optimized")
        if cfg.bpw <= 0:
            raise BudgetError(f"--bpw must be positive, got {cfg.bpw:g}")
    else:
        check_budget(cfg.bpw)               # fail on a bad budget before any heavy work
    if cfg.ratio_strategy not in ("fixed", "optimized"):
        raise ValueError(f"unknown ratio strategy {cfg.ratio_strategy!r}")
    if cfg.ratio_strategy == "optimized" and cfg.ratio.ratios:
        parse_ratios(cfg.ratio.ratios)
    from hiq2gguf.optimize import InfeasibleBudget
    from hiq2gguf.resume import partial_dir

    fresh = not partial_dir(out).exists()
    try:
        if cfg.stream:
            return convert_streamed(cfg, out, model_ref, report_path, t_start)
        return convert_in_memory(cfg, out, model_ref, report_path, t_start)
    except (BudgetError, InfeasibleBudget):   # bad input found late (after calibration): not worth resuming
        if fresh:
            import shutil
            shutil.rmtree(partial_dir(out), ignore_errors=True)
        raise


def convert_in_memory(cfg: ConvertConfig, out: Path, model_ref: str | None, report_path, t_start: float) -> dict:
    conv = Conversion(cfg, model_ref)
    if cfg.checkpoints:
        from hiq2gguf.resume import partial_dir
        conv.checkpoints = partial_dir(out)
    _log(cfg, f"{len(conv.shapes)} linear weights, budget {cfg.bpw:g} bits per weight, "
              + ("stock llama.cpp types (ggml quantizers)" if cfg.target == "stock"
                 else f"{cfg.ratio_strategy} ratios, {cfg.method}"))
    report: dict = {"model": str(conv.source.path), "config": asdict(cfg)}

    eval_windows = None
    if cfg.evaluate:
        eval_windows = conv.text_windows(cfg.eval_text)
        ref = evaluate.ppl_torch(conv.model, eval_windows, cfg.progress, "ppl reference")
        report["ppl"] = {"reference": ref.ppl}
        _log(cfg, f"reference ppl {ref.ppl:.4f}")

    calib = conv.calibrate()
    report["calibration"] = {"text": "boolq/calibration", "windows": len(calib.windows),
                             "quant_windows": len(conv.quant_windows(calib)),
                             "ctx": cfg.calib_ctx, "seconds": round(calib.seconds, 1)}
    plan, info = conv.cached_plan(calib)
    report.update(info)

    t0 = time.time()
    packed, stock = conv.quantize(plan, calib)
    report["method"] = "ggml" if cfg.target == "stock" else cfg.method
    report["blocks"] = conv.block_records
    report["quantize_seconds"] = round(time.time() - t0, 1)

    report.update(conv.write(out, packed, stock))
    if conv.checkpoints is not None:        # the file is complete: its checkpoints are done with
        import shutil
        shutil.rmtree(conv.checkpoints, ignore_errors=True)
    report["output"] = str(out)
    _log(cfg, f"wrote {out}: bpw {report['bpw']:.4f} (linear weights), file_bpw {report['file_bpw']:.4f}")

    # the same windows through PyTorch (fake-quant) and llama.cpp (the file)
    if cfg.evaluate:
        # with a GPU and Triton the linears multiply from the packed bytes (kernels/triton)
        packed_model = evaluate.gpu_packed_model(conv.model, packed) if cfg.target == "hiq2" else None
        torch_model = packed_model or conv.model
        report["ppl"]["torch"] = evaluate.ppl_torch(torch_model, eval_windows, cfg.progress, "ppl torch").ppl
        report["ppl"]["torch_device"] = str(next(torch_model.parameters()).device)
        report["ppl"]["llamacpp"] = ppl_file(out, eval_windows, cfg)
        report["ppl"]["text"] = cfg.eval_text
        report["ppl"]["windows"] = len(eval_windows)
        report["ppl"]["ctx"] = cfg.eval_ctx
        report["ppl"]["torch_vs_llamacpp_rel_diff"] = (
            abs(report["ppl"]["torch"] - report["ppl"]["llamacpp"]) / report["ppl"]["torch"])
        p = report["ppl"]
        _log(cfg, f"ppl on held-out {cfg.eval_text}: reference {p['reference']:.4f}  "
                  f"torch {p['torch']:.4f}  llama.cpp {p['llamacpp']:.4f}")
    report["seconds"] = round(time.time() - t_start, 1)
    if report_path:
        write_report(report, report_path)
        if cfg.target == "hiq2":
            plot_ratios(report, Path(report_path).with_suffix(".png"))
    return report


def convert_streamed(cfg: ConvertConfig, out: Path, model_ref: str | None, report_path, t_start: float) -> dict:
    """``convert`` with ``--stream``: one transformer block in memory at a time
    (hiq2gguf/streaming.py). The float and fake-quantized torch models are never
    whole in memory, so only the file's perplexity (llama.cpp) is measured."""
    from transformers import AutoTokenizer

    from hiq2gguf import model_io
    from hiq2gguf.inspect import inspect_gguf
    from hiq2gguf.streaming import check_streamable, convert_streaming

    torch.set_num_threads(cfg.threads)
    source = model_io.resolve(model_ref)
    check_streamable(cfg, source)
    report: dict = {"model": str(source.path), "config": asdict(cfg)}
    report.update(convert_streaming(cfg, out, source, lambda m: _log(cfg, m)))
    info = inspect_gguf(out)
    report.update(file_bpw=info["file_bytes"] * 8 / info["parameters"], file_bytes=info["file_bytes"],
                  parameters=info["parameters"], output=str(out),
                  tensors=[{"name": t["name"], "type": t["type"], "ratio": t["ratio"], "bpw": t["bpw"]}
                           for t in info["tensors"]])
    _log(cfg, f"wrote {out}: bpw {report['bpw']:.4f} (linear weights), file_bpw {report['file_bpw']:.4f}")
    if cfg.evaluate:
        tok = AutoTokenizer.from_pretrained(source.path)
        bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
        windows = evaluate.text_windows(lambda t: tok(t, add_special_tokens=False)["input_ids"], cfg.eval_text,
                                        cfg.eval_ctx, cfg.eval_windows, bos)
        report["ppl"] = {"llamacpp": ppl_file(out, windows, cfg), "text": cfg.eval_text,
                         "windows": len(windows), "ctx": cfg.eval_ctx}
        _log(cfg, f"ppl on held-out {cfg.eval_text}: llama.cpp {report['ppl']['llamacpp']:.4f}")
    report["seconds"] = round(time.time() - t_start, 1)
    if report_path:
        write_report(report, report_path)
        plot_ratios(report, Path(report_path).with_suffix(".png"))
    return report


def ppl_file(path: Path, windows: list[list[int]], cfg: ConvertConfig) -> float:
    from hiq2gguf import llama

    with llama.open_model(path, n_ctx=cfg.eval_ctx, logits_all=True, n_threads=cfg.threads) as llm:
        return evaluate.ppl_llama(llm, windows, cfg.progress).ppl


def quantize_model(model, converter, plan: dict[str, HIQ2Type], quantize_fn: Callable | None = None,
                   progress: bool = True) -> tuple[dict[str, PackedTensor], dict[str, object]]:
    """Quantize in place: every linear weight in ``plan`` becomes its HIQ2 codes (made by
    ``quantize_fn(name, weight, qtype)``, plain RTN by default; returned
    packed) and, in the torch model, exactly their dequantized values; embeddings (and an
    untied head) likewise go through the stock embedding type."""
    params = dict(model.named_parameters())
    packed: dict[str, PackedTensor] = {}
    for name in tqdm(list(plan), desc="quantize", unit="layer", disable=not progress):
        p, qtype = params[name], plan[name]
        codes = (quantize_fn or _plain_rtn)(name, p.data, qtype)
        packed[name] = PackedTensor(qtype=qtype, raw=pack_tensor(name, qtype, codes), shape=tuple(p.shape))
        with torch.no_grad():
            p.data.copy_(dequantize_torch(codes))
    return packed, quantize_embeddings(model, converter)


def quantize_embeddings(model, converter) -> dict[str, object]:
    """Embeddings (and an untied head) -> stock Q8_0 bytes; the torch model gets their
    dequantized values."""
    stock = {}
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight") or (name == "lm_head.weight" and not converter.skip(name)):
            raw, deq = stock_roundtrip(p.detach().numpy())
            stock[name] = raw
            with torch.no_grad():
                p.data.copy_(torch.from_numpy(deq))
    return stock


def _plain_rtn(name, w, qtype):
    return quantize_member(w, qtype)


def size_report(path: Path, packed: dict[str, PackedTensor]) -> dict:
    """bpw of the quantized linear weights (all bytes they occupy: written unchanged)
    and of the whole file."""
    from hiq2gguf.inspect import inspect_gguf

    info = inspect_gguf(path)
    bits = sum(t.raw.nbytes * 8 for t in packed.values())
    elems = sum(t.shape[0] * t.shape[1] for t in packed.values())
    return {
        "bpw": bits / elems,
        "file_bpw": info["file_bytes"] * 8 / info["parameters"],
        "file_bytes": info["file_bytes"],
        "parameters": info["parameters"],
        "tensors": [{"name": t["name"], "type": t["type"], "ratio": t["ratio"], "bpw": t["bpw"]}
                    for t in info["tensors"]],
    }


def write_report(report: dict, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))


def plot_ratios(report: dict, path: Path) -> None:
    """PNG: ratio of high groups per transformer block, one line per projection type."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for t in report["tensors"]:
        if t["ratio"] is None:
            continue
        parts = t["name"].split(".")           # blk.N.attn_q.weight
        if len(parts) < 3 or parts[0] != "blk":
            continue
        series.setdefault(parts[2], []).append((int(parts[1]), t["ratio"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("ratio of 4-bit channel groups")
    solver = report.get("solver", {})
    ax.set_title(f"{report.get('ratio_strategy', '')} ratios, {report.get('estimator', '')} estimator, "
                 f"bpw {report['bpw']:.3f} (budget {report['config']['bpw']:g})"
                 + (f", {solver['status']}" if solver else ""))
    ax.legend(ncol=4, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
