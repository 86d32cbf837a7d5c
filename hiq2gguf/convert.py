"""The main job: calibrate, quantize every linear weight into HIQ2, write GGUF, evaluate.

    from hiq2gguf.convert import ConvertConfig, convert
    report = convert(ConvertConfig(bpw=3.0), "out.gguf")
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from hiq2gguf import data, evaluate
from hiq2gguf.formats import FormatError, HIQ2Type
from hiq2gguf.plan import BudgetError, fixed_plan, fixed_ratio_type, optimized_plan
from hiq2gguf.gguf_io import atomic_output
from hiq2gguf.quantize import dequantize_torch, quantize_rtn
from hiq2gguf.writer import PackedTensor, stock_roundtrip, write_gguf


@dataclass
class ConvertConfig:
    bpw: float                                # budget: bits per quantized linear weight
    calib_windows: int = 16                   # calibration sequences (BoolQ calibration half)
    calib_ctx: int = 512
    eval_text: str = "boolq"
    eval_windows: int = evaluate.DEFAULT_WINDOWS
    eval_ctx: int = evaluate.DEFAULT_CTX
    method: str = "gptq"                      # rtn | gptq (both on the exact HIQ2 grid)
    ratio_strategy: str = "fixed"             # fixed | optimized (per-layer ratios, gradient M)
    evaluate: bool = True                     # measure ppl: reference, torch, llama.cpp
    threads: int = 2
    progress: bool = True


def check_shapes(model, converter) -> dict[str, tuple[int, int]]:
    shapes = {}
    for name, p in model.named_parameters():
        if converter.is_linear(name):
            if p.ndim != 2 or p.shape[1] % 64:
                raise FormatError(f"{name}: shape {tuple(p.shape)} does not fit HIQ2 "
                                  f"(input columns must be a multiple of 64)")
            shapes[name] = tuple(p.shape)
    if not shapes:
        raise FormatError("no linear weights found to quantize")
    return shapes


def _log(cfg: ConvertConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


def convert(cfg: ConvertConfig, out: str | Path, model_ref: str | None = None,
            report_path: str | Path | None = None) -> dict:
    from converters import converter_for
    from hiq2gguf import model_io

    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    if not math.isfinite(cfg.bpw):
        raise BudgetError(f"--bpw must be a number, got {cfg.bpw}")
    fixed_ratio_type(cfg.bpw)               # fail on a bad budget before any heavy work
    if cfg.ratio_strategy not in ("fixed", "optimized"):
        raise ValueError(f"unknown ratio strategy {cfg.ratio_strategy!r}")
    source = model_io.resolve(model_ref)
    _log(cfg, f"loading {source.path}")
    model, tokenizer = model_io.load(source)
    converter = converter_for(model.config)
    shapes = check_shapes(model, converter)
    _log(cfg, f"{len(shapes)} linear weights, budget {cfg.bpw:g} bits per weight, "
              f"{cfg.ratio_strategy} ratios, {cfg.method}")

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    bos = tokenizer.bos_token_id if add_bos else None
    report: dict = {"model": str(source.path), "config": asdict(cfg)}

    eval_windows = None
    if cfg.evaluate:
        eval_windows = evaluate.text_windows(tokenize, cfg.eval_text, cfg.eval_ctx, cfg.eval_windows, bos)
        ref = evaluate.ppl_torch(model, eval_windows, cfg.progress, "ppl reference")
        report["ppl"] = {"reference": ref.ppl}
        _log(cfg, f"reference ppl {ref.ppl:.4f}")

    # 1. calibrate
    t0 = time.time()
    calib = data.token_windows(tokenize(data.boolq_split("calibration")), cfg.calib_ctx,
                               cfg.calib_windows, bos)
    from hiq2gguf.calibrate import collect_fisher, linear_weights
    params = linear_weights(model, converter.is_linear)
    if cfg.method == "gptq":
        fisher, hessians = collect_fisher(model, params, calib, cfg.progress, hessians=True)

        def quantize_fn(name, w, n_high):
            return hessians.pop(name).quantize(w, n_high, fisher[name])
    else:
        fisher = collect_fisher(model, params, calib, cfg.progress)

        def quantize_fn(name, w, n_high):
            return quantize_rtn(w, n_high, fisher[name])
    report["calibration"] = {"text": "boolq/calibration", "windows": len(calib),
                             "ctx": cfg.calib_ctx, "seconds": round(time.time() - t0, 1)}

    # 2. ratios per layer
    if cfg.ratio_strategy == "optimized":
        t0 = time.time()
        plan, report["solver"] = optimized_plan(model, params, fisher, cfg.bpw, calib, progress=cfg.progress)
        report["estimator"] = "gradient"
        report["plan_seconds"] = round(time.time() - t0, 1)
        s = report["solver"]
        _log(cfg, f"solver {s['method']}: {s['status']}, objective {s['objective']:.4g}, gap {s['gap']:.2g}")
    else:
        plan = fixed_plan(shapes, cfg.bpw)
        _log(cfg, f"every linear weight -> {next(iter(plan.values())).name}")
    report["ratio_strategy"] = cfg.ratio_strategy

    # 3. quantize (codes -> packed bytes; the torch model gets the exact dequantized weights)
    t0 = time.time()
    packed, stock = quantize_model(model, converter, plan, quantize_fn, cfg.progress)
    report["method"] = cfg.method
    report["quantize_seconds"] = round(time.time() - t0, 1)

    # 4. write
    write_gguf(out, converter, model, source, tokenizer, packed, stock,
               {"ratio_strategy": cfg.ratio_strategy, "bpw_budget": float(cfg.bpw)})
    report.update(size_report(out, packed))
    report["output"] = str(out)
    _log(cfg, f"wrote {out}: bpw {report['bpw']:.4f} (linear weights), file_bpw {report['file_bpw']:.4f}")

    # 5. evaluate the same windows through PyTorch (fake-quant) and llama.cpp (the file)
    if cfg.evaluate:
        report["ppl"]["torch"] = evaluate.ppl_torch(model, eval_windows, cfg.progress, "ppl torch").ppl
        from hiq2gguf import llama
        with llama.open_model(out, n_ctx=cfg.eval_ctx, logits_all=True, n_threads=cfg.threads) as llm:
            report["ppl"]["llamacpp"] = evaluate.ppl_llama(llm, eval_windows, cfg.progress).ppl
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
    return report


def quantize_model(model, converter, plan: dict[str, HIQ2Type], quantize_fn: Callable | None = None,
                   progress: bool = True) -> tuple[dict[str, PackedTensor], dict[str, object]]:
    """Quantize in place: every linear weight in ``plan`` becomes its HIQ2 codes (made by
    ``quantize_fn(name, weight, n_high)``, plain RTN by default; returned
    packed) and, in the torch model, exactly their dequantized values; embeddings (and an
    untied head) likewise go through the stock embedding type."""
    params = dict(model.named_parameters())
    packed: dict[str, PackedTensor] = {}
    for name in tqdm(list(plan), desc="quantize", unit="layer", disable=not progress):
        p, qtype = params[name], plan[name]
        codes = (quantize_fn or _plain_rtn)(name, p.data, qtype.n_high)
        packed[name] = PackedTensor(qtype=qtype, raw=qtype.pack(codes), shape=tuple(p.shape))
        with torch.no_grad():
            p.data.copy_(dequantize_torch(codes))
    stock = {}
    for name, p in params.items():
        if name.endswith("embed_tokens.weight") or (name == "lm_head.weight" and not converter.skip(name)):
            raw, deq = stock_roundtrip(p.detach().numpy())
            stock[name] = raw
            with torch.no_grad():
                p.data.copy_(torch.from_numpy(deq))
    return packed, stock


def _plain_rtn(name, w, n_high):
    return quantize_rtn(w, n_high)


def size_report(path: Path, packed: dict[str, PackedTensor]) -> dict:
    """bpw of the quantized linear weights (all bytes they occupy) and of the whole file."""
    from hiq2gguf.inspect import inspect_gguf

    info = inspect_gguf(path)
    ours = [t for t in info["tensors"] if t["ours"]]
    bits = sum(t["bytes"] * 8 for t in ours)
    elems = sum(t["elements"] for t in ours)
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
