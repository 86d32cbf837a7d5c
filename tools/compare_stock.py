#!/usr/bin/env python3
"""Our GGUFs against llama-quantize's stock types at matched bits per weight.

    python tools/compare_stock.py [--model default|qwen2.5-coder-1.5b|PATH] [--bpw 2.5,2.75,3.0]
                                  [--json OUT] [--methods rtn,gptq,hybrid] [--stock Q2_0,Q2_K,...]
                                  [--eval-windows 40] [--calib-windows 16] [--quant-windows N] [--threads 2]

One model per run (rows of several models can share one ``--json``):

* reference: an F32 GGUF of the float weights (the file llama-quantize starts from);
* stock: ``llama-quantize --imatrix`` of the patched runtime (it runs stock types
  unchanged), the importance matrix from llama-imatrix on our calibration text (the
  BoolQ calibration half, as many 512-token chunks as our calibration windows), token
  embeddings (= the tied output head) Q8_0 like ours. Each ``--stock`` entry is an
  ftype (llama-quantize's own per-tensor mixture) or ``FTYPE+PATTERN=TYPE+...``, a mix
  of ``--tensor-type`` overrides (PATTERN: a regex on tensor names). Default: Q2_0,
  Q2_K, Q3_K_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ3_XXS and three mixes aimed at 2.5,
  2.75 and 3.0 bpw (``MIXES``; a model whose linear weights all have a multiple of
  256 input columns gets k-/i-quant mixes, others Q2_0-based ones, since there
  llama-quantize replaces every 256-block type by a 32-block fallback: the ``types``
  of each row say what it stored);
* ours: one calibration, one optimized plan per budget (the ratio optimizer, one set
  of candidates for every budget so M is estimated once), then every ``--methods``
  quantizer on each plan: rows ``ours-METHOD@BUDGET``.

Every file: ``bpw`` (true bits per weight of the stored linear weights, blk.* 2-D
tensors, every byte), ``file_bpw`` (file bytes x 8 / parameters), perplexity through
llama.cpp (patched runtime) on held-out BoolQ and LAMBADA windows (the same token
windows for every file), ``minutes`` (making the file from the shared calibration:
llama-quantize, or our quantizer + writer; the shared costs are printed apart).
Rows are appended to ``--json`` as they finish; a rerun skips them.

Printed: the table; per budget, our perplexity gap to the reference divided by the
best stock gap at the same bpw; whether each of our curves lies below the stock
curve on 2.5-3.0 bpw; conversion times. The stock curve at bpw b is the lower
envelope of the stock files: the Pareto front (files no smaller file beats),
perplexity interpolated linearly in bpw between consecutive front files, held at the
last front file's perplexity above it, and undefined below the smallest stock file.
Plot: perplexity against bpw, one panel per text (``--png``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

# torch and ggml each load an OpenMP runtime into this process; spin-waiting workers of
# one starve the other (see hiq2gguf/lmeval.py): set before torch is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import llamacpp  # noqa: E402  (llama-quantize, llama-imatrix, bpw and types of a file)
from bench_models import (FETCHED, ModelFetchError, resolve_model, safetensors_copy,  # noqa: E402
                          safetensors_copy_path)
from hiq2gguf import runtime  # noqa: E402
from hiq2gguf.gguf_io import atomic_output  # noqa: E402

BENCH_VERSION = 1
TEXTS = ("boolq", "lambada")
MATCHED = (2.5, 3.0)           # the bpw range of the targets

PLAIN_STOCK = ("Q2_0", "Q2_K", "Q3_K_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS")
# --tensor-type mixes aimed at 2.5, 2.75 and 3.0 bpw of the linear weights. Most bits
# go where llama.cpp's own mixtures put them: attn_v/attn_k (small, sensitive) and
# ffn_down; the bulk (gate/up, q/o) stays at the cheapest type of the budget.
MIXES = {
    # every row a multiple of 256: k- and i-quants everywhere (Qwen2.5-1.5B: ffn_down
    # is 29 % of the linear weights, attn_k + attn_v 1.7 %, gate and up 29 % each)
    "k256": ("IQ2_XS+ffn_down=iq3_xxs+attn_k=q4_k+attn_v=q4_k",               # ~2.57
             "IQ2_S+ffn_down=iq3_s+attn_k=q4_k+attn_v=q4_k",                   # ~2.81
             "IQ3_XXS+ffn_gate=iq2_s+ffn_down=iq3_s+attn_k=q4_k+attn_v=q4_k"),  # ~3.03
    # rows of 64 x k columns (SmolLM2: 576): only 32/64-block types fit those rows,
    # Q2_0 (2.25 bpw) is the one 2-bit type; ffn_down (1536 columns) takes k-/i-quants
    "k64": ("Q2_0+attn_v=q4_0+ffn_down=iq3_xxs",                               # ~2.52
            "Q2_0+attn_k=q4_0+attn_v=q4_0+ffn_down=iq3_s",                     # ~2.69
            "Q2_0+attn_k=q4_0+attn_v=q4_0+ffn_down=q4_k"),                     # ~2.95
}
METHODS_DEFAULT = "rtn,gptq,hybrid"
TARGET_ORDER = ("hybrid", "gptq", "rtn")      # the target: hybrid beats GPTQ beats RTN
RATIOS_DEFAULT = "E8_XS,E8,E8_2K,E8_8K,H0,H1,H2,H3,H4,H6"   # the lattice members and the H members up to 4 bpw


class CompareError(ValueError):
    pass


# ---- stock files ---------------------------------------------------------------------
@dataclass(frozen=True)
class StockSpec:
    """An ftype for llama-quantize and its ``--tensor-type`` overrides."""

    ftype: str
    tensor_types: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "StockSpec":
        ftype, *overrides = [x.strip() for x in spec.split("+")]
        for o in overrides:
            pattern, _, qtype = o.partition("=")
            if not pattern or not qtype:
                raise CompareError(f"--stock {spec!r}: {o!r} is not PATTERN=TYPE")
            try:
                re.compile(pattern)
            except re.error as e:
                raise CompareError(f"--stock {spec!r}: bad pattern {pattern!r}: {e}") from None
        return cls(ftype.upper(), tuple(o.lower() for o in overrides))

    @property
    def name(self) -> str:
        return "+".join((self.ftype, *self.tensor_types))

    def file_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", self.name.lower()) + ".gguf"


def default_stock(shapes: dict[str, tuple[int, int]]) -> list[str]:
    fits256 = all(cols % 256 == 0 for _, cols in shapes.values())
    return [*PLAIN_STOCK, *MIXES["k256" if fits256 else "k64"]]


# ---- the stock curve -----------------------------------------------------------------
def stock_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """(bpw, ppl, name) of the stock files no smaller-or-equal file beats, by bpw."""
    front: list[tuple[float, float, str]] = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return front


def stock_at(front: list[tuple[float, float, str]], bpw: float) -> tuple[float, str] | None:
    """Best stock perplexity at ``bpw`` (see the module text) and how it was obtained."""
    if not front or bpw < front[0][0] - 1e-9:
        return None
    for (b0, p0, n0), (b1, p1, n1) in zip(front, front[1:]):
        if b0 - 1e-9 <= bpw <= b1:
            t = (bpw - b0) / (b1 - b0)
            return p0 + t * (p1 - p0), f"{n0}@{b0:.3f} .. {n1}@{b1:.3f}"
    b, p, n = front[-1]
    return p, f"{n}@{b:.3f}" if abs(bpw - b) < 1e-9 else f"{n}@{b:.3f} (smaller)"


def curve_at(points: list[tuple[float, float]], bpw: float) -> float | None:
    """Our piecewise-linear curve through (bpw, ppl) points; None outside their range."""
    pts = sorted(points)
    for (b0, p0), (b1, p1) in zip(pts, pts[1:]):
        if b0 <= bpw <= b1:
            return p0 + (bpw - b0) / (b1 - b0) * (p1 - p0) if b1 > b0 else min(p0, p1)
    if pts and abs(bpw - pts[0][0]) < 1e-9:
        return pts[0][1]
    return None


def below_stock(ours: list[tuple[float, float]], front: list[tuple[float, float, str]],
                lo: float, hi: float) -> tuple[bool | None, list[tuple[float, float, float]]]:
    """Does our curve lie strictly below the stock curve wherever both exist in [lo, hi]?
    Both are piecewise linear, so their breakpoints (and the range ends) decide it.
    -> (verdict, checked (bpw, ours, stock) points); verdict None when nothing overlaps."""
    xs = {lo, hi} | {b for b, _ in ours} | {b for b, _, _ in front}
    checked = []
    for x in sorted(x for x in xs if lo - 1e-9 <= x <= hi + 1e-9):
        o, s = curve_at(ours, x), stock_at(front, x)
        if o is not None and s is not None:
            checked.append((x, o, s[0]))
    if not checked:
        return None, []
    return all(o < s for _, o, s in checked), checked


# ---- the run -------------------------------------------------------------------------
class Results:
    """Rows and per-model settings/costs in ``--json``, saved after every row. Several
    runs may write one file at once (e.g. one per method on a big model): each save
    merges, under a lock, this run's rows and costs into what is on disk."""

    def __init__(self, path: Path, model: str, settings: dict):
        self.path = path
        self.model = model
        self.settings = settings
        self.costs: dict = {}
        self._added: list[dict] = []
        self.data = self._read()
        old = self.data["settings"].get(model)
        if old is not None and old != settings:
            diff = {k: (old.get(k), settings.get(k)) for k in settings if old.get(k) != settings.get(k)}
            raise CompareError(f"{path} holds {model} rows made with other settings {diff} "
                               f"(stored, now): use another --json")
        self.costs.update(self.data["costs"].get(model, {}))

    def _read(self) -> dict:
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        for k, empty in (("rows", []), ("settings", {}), ("costs", {})):
            data.setdefault(k, empty)
        return data

    def rows(self) -> list[dict]:
        return [r for r in self.data["rows"] if r["model"] == self.model]

    def has(self, name: str) -> bool:
        return any(r["name"] == name for r in self.rows())

    def all_costs(self) -> dict:
        """Costs on disk (other runs' too) with this run's."""
        return {**self.data["costs"].get(self.model, {}), **self.costs}

    def add(self, row: dict) -> None:
        self._added.append(row)
        self.save()

    def save(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            have = {(r["model"], r["name"]) for r in data["rows"]}
            data["rows"] += [r for r in self._added if (r["model"], r["name"]) not in have]
            data["settings"][self.model] = self.settings
            data["costs"].setdefault(self.model, {}).update(self.costs)
            with atomic_output(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=1))
            self.data = data


def work_dir(model_name: str) -> Path:
    """The bench cache of one model: importance matrix, stock files, calibration."""
    return runtime.cache_dir() / "bench" / f"compare-v{BENCH_VERSION}" / model_name


def imatrix_path(work: Path, calib_windows: int) -> Path:
    """llama-imatrix's file from ``calib_windows`` 512-token windows of our calibration text."""
    return work / f"imatrix-{calib_windows}.gguf"


def f32_gguf(conv, model_name: str, log, workdir: Path | None = None) -> tuple[Path, float | None]:
    """The F32 GGUF of the float weights (in ``workdir``, else shared with
    tools/bench_speed.py's cache); -> (path, seconds it took to write, None if it was there)."""
    from bench_speed import bench_dir
    from hiq2gguf.writer import write_gguf

    p = (workdir or bench_dir(model_name)) / "f32.gguf"
    if p.exists():
        return p, None
    t0 = time.monotonic()
    conv.load_weights()
    log(f"writing {p}")
    p.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(p, conv.converter, conv.model, conv.source, conv.tokenizer, {}, {}, {"bench": "f32"})
    return p, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help=f"default | {' | '.join(FETCHED)} | PATH")
    ap.add_argument("--bpw", default="2.5,2.75,3.0", help="our budgets (bits per linear weight)")
    ap.add_argument("--json", default="out/compare_stock.json", help="rows (appended as they finish)")
    ap.add_argument("--png", help="plot (default: beside --json, one per model)")
    ap.add_argument("--methods", default=METHODS_DEFAULT, help="our quantizers (rtn, gptq, lwc, adaround, hybrid)")
    ap.add_argument("--stock", help="llama-quantize ftypes and FTYPE+PATTERN=TYPE mixes "
                                    "(default: the 8 plain types and 3 mixes, see MIXES)")
    ap.add_argument("--eval-windows", type=int, default=40, help="512-token windows of each held-out text")
    ap.add_argument("--calib-windows", type=int, default=16, help="512-token calibration windows (ours and imatrix)")
    ap.add_argument("--quant-windows", type=int,
                    help="calibration windows of our block-sequential methods (GPTQ's Hessians, the "
                         "reconstruction); default --calib-windows. The importance matrix then takes as many")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimator", default="gradient", choices=["gradient", "loss"], help="ratio optimizer's M")
    ap.add_argument("--ratios", default=RATIOS_DEFAULT, help="candidate members, the same for every budget")
    ap.add_argument("--preset", default="fast", help="learned quantizers' settings (fast | paper | fast-rel)")
    ap.add_argument("--act-order", action="store_true", help="our GPTQ in activation order (gptq, hybrid)")
    ap.add_argument("--outdir", help="our GGUFs (default out/compare_stock/MODEL)")
    ap.add_argument("--workdir", help="the shared intermediate files: F32 GGUF, importance matrix, stock "
                                      "files, calibration (default: the bench cache, kept between runs)")
    ap.add_argument("--stream", action="store_true",
                    help="make ours block by block (hiq2gguf convert --stream, from a safetensors copy of "
                         "the model): for models whose weights, Fisher and candidates do not fit in memory "
                         "together (qwen2.5-coder-1.5b on 24 GB); the same files, one calibration for every budget")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (CompareError, ModelFetchError, runtime.RuntimeMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    from hiq2gguf.convert import Conversion, ConvertConfig, ppl_file
    from hiq2gguf.gptq import GPTQConfig
    from hiq2gguf.learned import PRESETS
    from hiq2gguf.plan import BudgetError, RatioConfig, check_budget, parse_ratios
    from hiq2gguf.sequential import METHODS

    try:
        budgets = sorted({float(x) for x in args.bpw.split(",") if x.strip()})
    except ValueError:
        raise CompareError(f"--bpw {args.bpw!r}: expected numbers like 2.5,2.75,3.0") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHODS]:
        raise CompareError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if args.preset not in PRESETS:
        raise CompareError(f"--preset: unknown {args.preset!r} (known: {', '.join(PRESETS)})")
    if (min(args.eval_windows, args.calib_windows, args.threads) < 1
            or (args.quant_windows is not None and args.quant_windows < 1)):
        raise CompareError("--eval-windows, --calib-windows, --quant-windows and --threads must be positive")
    # llama-imatrix sees as much of the calibration text as our quantizers do
    imatrix_chunks = max(args.calib_windows, args.quant_windows or 0)
    try:
        for b in budgets:
            check_budget(b)
        parse_ratios(args.ratios)
    except BudgetError as e:
        raise CompareError(str(e)) from None
    stock_specs = [StockSpec.parse(s) for s in args.stock.split(",") if s.strip()] if args.stock else None
    for name in ("llama-quantize", "llama-imatrix"):
        llamacpp.tool(name)
    available = llamacpp.quantize_types()

    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[compare {time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    model_name, model_ref = resolve_model(args.model, log)
    if model_ref is not None and args.model not in FETCHED:
        model_name += "-" + hashlib.sha1(str(Path(model_ref).resolve()).encode()).hexdigest()[:8]
    settings = {"eval_windows": args.eval_windows, "eval_ctx": 512, "calib_windows": args.calib_windows,
                "estimator": args.estimator, "ratios": args.ratios, "preset": args.preset,
                "imatrix_chunks": imatrix_chunks, "bench_version": BENCH_VERSION,
                **({"act_order": True} if args.act_order else {}),
                **({"quant_windows": args.quant_windows} if args.quant_windows else {})}
    results = Results(Path(args.json), model_name, settings)
    outdir = Path(args.outdir or f"out/compare_stock/{model_name}")
    workdir = Path(args.workdir) if args.workdir else None
    work = workdir or work_dir(model_name)
    work.mkdir(parents=True, exist_ok=True)

    cfg = ConvertConfig(bpw=budgets[0], method=methods[0] if methods else "gptq", preset=args.preset,
                        gptq=GPTQConfig(act_order=args.act_order),
                        evaluate=False, threads=args.threads, eval_windows=args.eval_windows,
                        calib_windows=args.calib_windows, quant_windows=args.quant_windows,
                        ratio_strategy="optimized",
                        ratio=RatioConfig(estimator=args.estimator, ratios=args.ratios))
    if (args.stream and model_ref is not None and Path(model_ref).is_file()
            and (safetensors_copy_path(model_ref) / "config.json").is_file()):
        model_ref = str(safetensors_copy_path(model_ref))    # the same model, read in seconds
    conv = Conversion(cfg, model_ref, weights=not args.stream)    # --stream: weights only if a step needs them
    log(f"{model_name}: {len(conv.shapes)} linear weights")
    windows = {t: conv.text_windows(t) for t in TEXTS}

    def measure(path: Path) -> dict:
        stats = llamacpp.file_stats(path)
        ppl = {t: ppl_file(path, w, replace(cfg, eval_windows=len(w))) for t, w in windows.items()}
        return {"bpw": stats["bpw"], "file_bpw": stats["file_bpw"], "ppl_boolq": ppl["boolq"],
                "ppl_lambada": ppl["lambada"], "types": stats["types"], "file": str(path)}

    def add(row: dict) -> None:
        results.add(row)
        log(f"{row['name']}: bpw {row['bpw']:.4f}  file_bpw {row['file_bpw']:.4f}  boolq {row['ppl_boolq']:.3f}  "
            f"lambada {row['ppl_lambada']:.3f}  {row['types']}")

    results.costs["runtime"] = str(llamacpp.tool("llama-quantize").parent)   # the build of the last run
    f32, seconds = f32_gguf(conv, model_name, log, workdir)
    if seconds is not None:
        results.costs["f32_write_minutes"] = round(seconds / 60, 2)
    # --stream: from here on a safetensors copy is read block by block; the whole model
    # leaves memory before llama.cpp maps the stock files
    stream_source = streamed_source(conv, log) if args.stream else None
    if not results.has("reference"):
        add({"model": model_name, "name": "reference", "kind": "reference", "ours": False,
             **measure(f32), "minutes": None})

    # stock: llama-quantize with an importance matrix from our calibration text
    specs = stock_specs if stock_specs is not None else [StockSpec.parse(s) for s in default_stock(conv.shapes)]
    missing = sorted({s.ftype for s in specs if s.ftype not in available})
    if missing:
        print(f"note: this llama.cpp's llama-quantize has no {', '.join(missing)} "
              f"({llamacpp.tool('llama-quantize')}); skipped", flush=True)
        results.costs["stock_missing"] = missing
    pending = [s for s in specs if s.ftype in available and not results.has(s.name)]
    if pending:
        imatrix = imatrix_path(work, imatrix_chunks)
        if not imatrix.exists():
            log(f"llama-imatrix: {imatrix_chunks} x 512 tokens of the calibration text")
            t1 = time.monotonic()
            llamacpp.imatrix(f32, imatrix, imatrix_chunks, args.threads)
            results.costs["imatrix_minutes"] = round((time.monotonic() - t1) / 60, 2)
            results.save()
        for s in pending:
            log(f"llama-quantize {s.name}")
            path = llamacpp.quantize(f32, work / f"imatrix{imatrix_chunks}-{s.file_name()}", s.ftype,
                                     args.threads, imatrix, tensor_types=s.tensor_types)
            secs = llamacpp.seconds(path)
            add({"model": model_name, "name": s.name, "kind": "stock", "ours": False, **measure(path),
                 "minutes": None if secs is None else round(secs / 60, 2),
                 "ftype": s.ftype, "tensor_types": list(s.tensor_types)})

    # ours: one calibration, one plan per budget, every method on each plan
    todo = [(m, b) for m in methods for b in budgets if not results.has(our_name(m, b))]
    if todo and args.stream:
        for m, b, path, minutes, made in ours_streamed(conv.cfg, stream_source, todo, outdir, work, results, log):
            add({"model": model_name, "name": our_name(m, b), "kind": "ours", "ours": True, **measure(path),
                 "minutes": minutes, "method": m, "budget": b, "streamed": True,
                 "solver": {k: made.get("solver", {}).get(k) for k in ("status", "gap", "seconds")},
                 "predicted_loss_increase": made.get("predicted_loss_increase")})
    elif todo:
        calib = conv.calibrate()
        results.costs["calibration_minutes"] = round(calib.seconds / 60, 2)
        plans = {}
        for b in sorted({b for _, b in todo}):
            conv.restore()
            plan, info = conv.plan(calib, b)
            plans[b] = (plan, info)
            results.costs.setdefault("plan_minutes", {})[f"{b:g}"] = round(info.get("plan_seconds", 0) / 60, 2)
            if "estimator_seconds" in info:
                results.costs["estimator_minutes"] = round(info["estimator_seconds"] / 60, 2)
            results.save()
        for m, b in todo:
            plan, info = plans[b]
            conv.cfg = replace(cfg, method=m)
            conv.restore()
            log(f"{our_name(m, b)}: quantizing ({m})")
            t1 = time.monotonic()
            packed, stock = conv.quantize(plan, calib)
            path = outdir / f"{our_name(m, b)}.gguf"
            conv.write(path, packed, stock, b)
            minutes = round((time.monotonic() - t1) / 60, 2)
            conv.restore()
            solver = info.get("solver", {})
            add({"model": model_name, "name": our_name(m, b), "kind": "ours", "ours": True, **measure(path),
                 "minutes": minutes, "method": m, "budget": b,
                 "solver": {k: solver.get(k) for k in ("status", "gap", "seconds")},
                 "predicted_loss_increase": info.get("predicted_loss_increase")})

    rows = results.rows()
    print()
    print(report(rows, results.all_costs(), model_name, settings))
    png = Path(args.png) if args.png else Path(args.json).with_name(f"{Path(args.json).stem}-{model_name}.png")
    plot(rows, png, model_name)
    print(f"wrote {args.json} ({len(rows)} rows of {model_name}) and {png}")
    return 0


def streamed_source(conv, log):
    """The model as a safetensors directory (a copy when it came as a GGUF), after
    which ``conv`` lets its weights go."""
    from hiq2gguf import model_io

    source = conv.source
    if source.gguf_path is not None:
        copy = safetensors_copy_path(source.gguf_path)
        if not (copy / "config.json").is_file():
            conv.load_weights()
            safetensors_copy(conv.model, conv.tokenizer, source.gguf_path, log)
        source = model_io.resolve(str(copy))
    conv.unload()
    return source


def ours_streamed(cfg, source, todo: list[tuple[str, float]], outdir: Path, work: Path, results: "Results", log):
    """Our files made block by block (``--stream``) from the safetensors ``source``; the
    block-streamed calibration (kept in the bench cache, keyed by source and settings)
    serves every budget. Yields (method, budget, file, minutes without the
    calibration, report)."""
    from hiq2gguf.streaming import convert_streaming

    for m, b in todo:
        log(f"{our_name(m, b)}: quantizing ({m}, block-streamed)")
        path = outdir / f"{our_name(m, b)}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        calib_dir = work / "stream-calibration"
        done_before = set(calib_dir.glob("stream-*/done.pt"))
        t1 = time.monotonic()
        report = convert_streaming(replace(cfg, method=m, bpw=b, stream=True), path, source, log,
                                   calib_dir=calib_dir)
        calib_seconds = 0.0
        if set(calib_dir.glob("stream-*/done.pt")) - done_before:    # this call calibrated
            calib_seconds = report["calibration"]["seconds"]
            results.costs["calibration_minutes"] = round(calib_seconds / 60, 2)
            results.save()
        yield m, b, path, round(max(time.monotonic() - t1 - calib_seconds, 0) / 60, 2), report


def our_name(method: str, bpw: float) -> str:
    return f"ours-{method}@{bpw:g}"


# ---- report --------------------------------------------------------------------------
def _points(rows: list[dict], text: str, kind: str, method: str | None = None):
    return [(r["bpw"], r[f"ppl_{text}"], r["name"]) for r in rows
            if r["kind"] == kind and (method is None or r.get("method") == method)]


def report(rows: list[dict], costs: dict, model: str, settings: dict) -> str:
    ref = next((r for r in rows if r["kind"] == "reference"), None)
    out = [f"{model}: perplexity through llama.cpp ({costs.get('runtime', '?')}), {settings['eval_windows']} x 512-token "
           f"windows of held-out BoolQ and LAMBADA; calibration {settings['calib_windows']} x 512 BoolQ tokens",
           "",
           f"{'name':<52} {'bpw':>6} {'file':>6} {'boolq':>9} {'lambada':>9} {'gap bq':>8} {'gap lb':>8} "
           f"{'min':>6}  stored linear types"]
    order = {"reference": 0, "stock": 1, "ours": 2}
    for r in sorted(rows, key=lambda r: (order[r["kind"]], r.get("method") or "", r["bpw"])):
        gaps = [r[f"ppl_{t}"] - ref[f"ppl_{t}"] if ref else float("nan") for t in TEXTS]
        mins = "-" if r["minutes"] is None else f"{r['minutes']:.2f}"
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        out.append(f"{r['name'] + (' *' if r['ours'] else ''):<52} {r['bpw']:6.3f} {r['file_bpw']:6.3f} "
                   f"{r['ppl_boolq']:9.3f} {r['ppl_lambada']:9.3f} {gaps[0]:8.3f} {gaps[1]:8.3f} {mins:>6}  {types}")
    out.append("(* ours; bpw: linear weights; file: whole-file bpw; gap: ppl - reference ppl; "
               "min: minutes to make the file from the shared calibration)")
    if ref is None:
        return "\n".join(out)

    methods = sorted({r["method"] for r in rows if r["kind"] == "ours"})
    out += ["", "Gap ratio at matched bpw = (ours - reference) / (stock curve - reference), stock curve: "
                "Pareto front of the stock files, ppl linear in bpw between them (target <= 0.85)"]
    for text in TEXTS:
        front = stock_front(_points(rows, text, "stock"))
        for m in methods:
            for b, p, name in sorted(_points(rows, text, "ours", m)):
                s = stock_at(front, b)
                if s is None:
                    out.append(f"  {text:<7} {name:<20} bpw {b:.4f}: no stock file this small")
                    continue
                stock_gap = s[0] - ref[f"ppl_{text}"]
                ratio = f"{(p - ref[f'ppl_{text}']) / stock_gap:6.3f}" if stock_gap > 0 else "n/a (stock <= ref)"
                out.append(f"  {text:<7} {name:<20} bpw {b:.4f}: ppl {p:9.3f}  stock {s[0]:9.3f} ({s[1]})  "
                           f"gap ratio {ratio}")
    out += ["", f"Our curve below the stock curve on {MATCHED[0]}-{MATCHED[1]} bpw (checked where both exist, "
                "at every breakpoint of either):"]
    for text in TEXTS:
        front = stock_front(_points(rows, text, "stock"))
        for m in methods:
            ours = [(b, p) for b, p, _ in _points(rows, text, "ours", m)]
            verdict, checked = below_stock(ours, front, *MATCHED)
            pts = "  ".join(f"{x:.3f}: {o:.2f} vs {s:.2f}" for x, o, s in checked)
            word = {True: "yes", False: "NO", None: "no overlap"}[verdict]
            out.append(f"  {text:<7} {m:<8} {word:<10} {pts}")
    if len(methods) > 1:
        out += ["", "Our methods at each budget, best first (target: " + " < ".join(TARGET_ORDER) + "):"]
        for text in TEXTS:
            for b in sorted({r["budget"] for r in rows if r["kind"] == "ours"}):
                at = sorted((r[f"ppl_{text}"], r["method"], r["bpw"]) for r in rows
                            if r["kind"] == "ours" and r["budget"] == b)
                ranked = [m for _, m, _ in at]
                wanted = [m for m in TARGET_ORDER if m in ranked]
                verdict = ("yes" if [m for m in ranked if m in wanted] == wanted else "NO") if len(wanted) > 1 else "-"
                out.append(f"  {text:<7} @{b:<5g} " + " < ".join(f"{m} {p:.3f} ({bpw:.3f})" for p, m, bpw in at)
                           + f"   target order: {verdict}")
    out += ["", "Conversion time (minutes):"]
    for m in methods:
        mine = sorted((r["budget"], r["minutes"]) for r in rows if r.get("method") == m)
        out.append(f"  ours {m:<8} " + "  ".join(f"@{b:g}: {t:.2f}" for b, t in mine)
                   + f"  total {sum(t for _, t in mine):.2f}")
    shared = {k: v for k, v in costs.items() if k.endswith("_minutes") and not isinstance(v, dict)}
    plan = costs.get("plan_minutes", {})
    out.append("  shared: " + ", ".join(f"{k.removesuffix('_minutes')} {v:.2f}" for k, v in shared.items())
               + ("; plan per budget " + ", ".join(f"@{b}: {v:.2f}" for b, v in plan.items()) if plan else ""))
    stock = [r for r in rows if r["kind"] == "stock" and r["minutes"] is not None]
    if stock:
        out.append(f"  llama-quantize per file: {min(r['minutes'] for r in stock):.2f} - "
                   f"{max(r['minutes'] for r in stock):.2f} (plus llama-imatrix, shared)")
    if costs.get("stock_missing"):
        out.append(f"  not in this llama.cpp: {', '.join(costs['stock_missing'])}")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, model: str) -> None:
    """Perplexity against linear-weight bpw, one panel per text."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next((r for r in rows if r["kind"] == "reference"), None)
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(13, 5.5))
    for ax, text in zip(axes, TEXTS):
        stock = _points(rows, text, "stock")
        ax.scatter([b for b, _, _ in stock], [p for _, p, _ in stock], c="gray", s=18, label="stock (llama-quantize)")
        for b, p, n in stock:
            ax.annotate(n if len(n) < 12 else n.split("+")[0] + "+mix", (b, p), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color="dimgray")
        front = stock_front(stock)
        ax.plot([b for b, _, _ in front], [p for _, p, _ in front], "--", c="gray", lw=1, label="stock front")
        for m in sorted({r["method"] for r in rows if r["kind"] == "ours"}):
            pts = sorted(_points(rows, text, "ours", m))
            ax.plot([b for b, _, _ in pts], [p for _, p, _ in pts], marker="o", label=f"ours {m}")
        if ref:
            ax.axhline(ref[f"ppl_{text}"], c="k", lw=0.8, ls=":", label="reference (F32)")
        ax.axvspan(*MATCHED, color="tab:green", alpha=0.07)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight of the linear weights")
        ax.set_ylabel(f"perplexity, held-out {text}")
        ax.set_title(f"{model}: {text}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
