"""How well each tensor type stores real weights, in minutes instead of hours.

    python tools/weight_error.py [--model default|qwen2.5-coder-1.5b|PATH]
                                 [--weights 3.attn_q,14.attn_v,14.ffn_down] [--rows 512]

For a few linear weights of the model: the importance-weighted relative error

    e = sum_ij imp_j (W_ij - Q_ij)^2 / sum_ij imp_j W_ij^2

of every HIQ2 member (our RTN with its importance-weighted range search) and of
the stock llama.cpp types (ggml's own quantizers, called through the patched
runtime), with the same importance ``imp_j`` for both: the diagonal of the layer
Hessian as llama-imatrix collects it on our calibration text (compare_stock's).
Both sides round to nearest with a searched grid from the same statistic, so the
table compares the formats, not the quantizers (GPTQ / AdaRound improve ours and
would improve stock types alike). ``e`` is what the layer's output error would be
if the inputs were uncorrelated; it tracks perplexity closely within one family of
types and is a screening measure across families, not a substitute for
compare_stock.

The report gives, for each of our members, the stock Pareto front's error at the
same bpw (linear between stock points) and the ratio ours / stock, and the
extra bpw the stock front needs to reach our error (negative: stock reaches it
with fewer bits). Both are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamacpp  # noqa: E402
from format_lab import parse_layouts  # noqa: E402
from bench_speed import bench_dir  # noqa: E402
from bench_models import resolve_model  # noqa: E402
from compare_stock import f32_gguf, imatrix_path, stock_at, stock_front, work_dir  # noqa: E402

from hiq2gguf import formats  # noqa: E402
from hiq2gguf.quantize import dequantize_torch, quantize_member  # noqa: E402
from hiq2gguf.stock import StockType, ggml, parse_stock_types  # noqa: E402

STOCK_DEFAULT = "IQ2_XXS,IQ2_XS,IQ2_S,Q2_K,IQ3_XXS,IQ3_S,Q3_K,IQ4_NL,Q4_0"
OURS_DEFAULT = "e8,e8_2k,e8_8k,0,1,2,3,4,6"
CALIB_WINDOWS = 16        # compare_stock's default: its importance matrix is the one used


class WeightErrorError(ValueError):
    pass


def relative_error(w: np.ndarray, q: np.ndarray, imp: np.ndarray) -> float:
    return float(((w - q) ** 2 * imp).sum() / (w ** 2 * imp).sum())


def front_bpw_at(front: list[tuple[float, float, str]], err: float) -> float | None:
    """The bpw at which the stock front (compare_stock.stock_front, linear between its
    points like compare_stock.stock_at) reaches ``err``; None outside it."""
    for (b0, e0, _), (b1, e1, _) in zip(front, front[1:]):
        if e1 <= err <= e0:
            return b0 + (e0 - err) / (e0 - e1) * (b1 - b0)
    return None


def load_inputs(model: str, names: list[str], rows: int, threads: int, log):
    """-> {gguf weight name: (float32 weight [rows, cols], importance [cols])} from the
    F32 GGUF and the llama-imatrix file compare_stock makes (made here if missing)."""
    import gguf

    from hiq2gguf.convert import Conversion, ConvertConfig

    model_name, ref = resolve_model(model, log)
    f32 = bench_dir(model_name) / "f32.gguf"
    if not f32.exists():                            # compare_stock's, shared with bench_speed
        f32, _ = f32_gguf(Conversion(ConvertConfig(evaluate=False), ref, weights=False), model_name, log)
    imatrix = imatrix_path(work_dir(model_name), CALIB_WINDOWS)
    if not imatrix.exists():
        log(f"llama-imatrix: {CALIB_WINDOWS} x 512 tokens of the calibration text -> {imatrix}")
        imatrix.parent.mkdir(parents=True, exist_ok=True)
        llamacpp.imatrix(f32, imatrix, CALIB_WINDOWS, threads)
    im = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(imatrix).tensors}
    tensors = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    out = {}
    for n in names:
        if n not in tensors:
            known = sorted(k for k in tensors if k.startswith("blk.0."))
            raise WeightErrorError(f"{n}: no such tensor in {f32} (block 0 has {', '.join(known)})")
        if n + ".in_sum2" not in im:
            raise WeightErrorError(f"{n}: not in the importance matrix {imatrix}")
        w = np.array(tensors[n].data, dtype=np.float32)
        w = w.reshape(-1, w.shape[-1])[:rows]
        imp = im[n + ".in_sum2"] / im[n + ".counts"][0]
        out[n] = (np.ascontiguousarray(w), imp.astype(np.float32))
    return model_name, out


def parse_ours(spec: str) -> list:
    """``"e8,e8_8k,0,2"`` -> our types (H members by their number of high groups, the
    lattice members by name without ``HIQ2_``)."""
    out = []
    for item in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if item.isdigit() and 0 <= int(item) <= formats.N_GROUPS:
            out.append(formats.get_type(int(item) + formats.FIRST_TYPE_ID))
        elif item.startswith("e8"):
            try:
                out.append(formats.get_type("HIQ2_" + item))
            except formats.FormatError:
                raise WeightErrorError(f"--ours: {item!r} is not one of our types") from None
        else:
            raise WeightErrorError(f"--ours: {item!r} is not one of our types (0..{formats.N_GROUPS}, "
                                   f"{', '.join(t.name[5:].lower() for t in formats.E8_TYPES)})")
    return out


def measure(w: np.ndarray, imp: np.ndarray, stock: list[StockType], ours: list, threads: int,
            lab: list | None = None) -> dict:
    """-> {type name: (bpw, error)} for one weight; stock types its rows do not fit are left out.
    ``lab``: candidate layouts of tools/format_lab.py, measured like our members."""
    res = {}
    lib = ggml()
    for t in stock:
        if not t.fits(w.shape):
            continue
        raw = lib.quantize(t, w, imp, threads)
        res[t.name] = (t.bpw, relative_error(w, lib.dequantize(t, raw, w.shape[1]), imp))
    wt = torch.from_numpy(w)
    it = torch.from_numpy(imp).expand_as(wt).contiguous()
    for qt in ours:
        q = dequantize_torch(quantize_member(wt, qt, it)).numpy()
        res[qt.name] = (qt.bpw, relative_error(w, q, imp))
    for lay in lab or []:
        res[lay.name] = (lay.bpw, relative_error(w, lay.quantize(wt, torch.from_numpy(imp)).numpy(), imp))
    return res


def report(per_weight: dict[str, dict], model: str, ours: set[str]) -> str:
    types = {n: b for r in per_weight.values() for n, (b, _) in r.items()}
    # the summary is over the weights every type fits (576-wide rows take no 256-block type)
    common = [w for w, r in per_weight.items() if set(r) == set(types)]
    if not common:
        raise WeightErrorError("no weight fits every type: choose --weights with wider rows or fewer --stock")
    # geometric mean over the weights: each weight counts alike whatever its scale. A type
    # that stores some weight exactly (Qwen's source file is Q4_K_M: Q4_K is exact on
    # its Q4_K weights) has no place on a log scale and is left out.
    mean = {n: (b, math.exp(np.mean([math.log(per_weight[w][n][1]) for w in common])))
            for n, b in types.items() if all(per_weight[w][n][1] > 0 for w in common)}
    out = [f"importance-weighted relative error on {model}, geometric mean over {', '.join(common)}"
           + (f" (the weights every type fits; left out: {', '.join(w for w in per_weight if w not in common)})"
              if len(common) < len(per_weight) else "") + ":"]
    out.append(f"{'type':10s} {'bpw':>7s} {'error':>9s}")
    for n, (b, e) in sorted(mean.items(), key=lambda kv: kv[1][0]):
        out.append(f"{n:10s} {b:7.4f} {e:9.5f}")
    front = stock_front([(b, e, n) for n, (b, e) in mean.items() if n not in ours])
    out += ["", "stock Pareto front: " + ", ".join(f"{n}@{b:.3f} {e:.4f}" for b, e, n in front),
            f"{'ours':10s} {'bpw':>7s} {'error':>9s} {'stock@bpw':>9s} {'ratio':>7s} {'stock bpw for our error':>24s}"]
    for n, (b, e) in sorted(mean.items(), key=lambda kv: kv[1][0]):
        if n not in ours:
            continue
        s = stock_at(front, b)
        s = None if s is None else s[0]
        sb = front_bpw_at(front, e)
        out.append(f"{n:10s} {b:7.4f} {e:9.5f} {'-' if s is None else f'{s:9.5f}':>9s} "
                   f"{'-' if s is None else f'{e / s:7.3f}':>7s} "
                   f"{'-' if sb is None else f'{sb:.3f} ({sb - b:+.3f})':>24s}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--weights", default="3.attn_q,3.ffn_up,14.attn_v,14.ffn_down,20.ffn_gate",
                    help="BLOCK.KIND[,...] (GGUF names without blk. and .weight)")
    ap.add_argument("--rows", type=int, default=512, help="first rows of each weight (0: all)")
    ap.add_argument("--stock", default=STOCK_DEFAULT)
    ap.add_argument("--ours", default=OURS_DEFAULT,
                    help="our types: H members by number of high groups, e8, e8_2k, e8_8k")
    ap.add_argument("--lab", help="candidate layouts of tools/format_lab.py to measure too (names, or all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the per-weight results here")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[weight_error {time.monotonic() - t0:5.0f}s] {msg}", flush=True)

    try:
        names = [f"blk.{s.strip()}.weight" for s in args.weights.split(",") if s.strip()]
        ours = parse_ours(args.ours)
        stock = parse_stock_types(args.stock)      # an unknown name fails here, before any work
        lab = parse_layouts(args.lab)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    formats.register_with_gguf()
    torch.set_num_threads(args.threads)
    try:
        model_name, inputs = load_inputs(args.model, names, args.rows or 1 << 62, args.threads, log)
    except WeightErrorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    per_weight = {}
    for n, (w, imp) in inputs.items():
        per_weight[n] = measure(w, imp, stock, ours, args.threads, lab)
        log(f"{n} {tuple(w.shape)}: " + "  ".join(f"{k} {e:.4f}" for k, (_, e) in per_weight[n].items()))
    ours_names = {t.name for t in ours} | {lay.name for lay in lab}
    print(report(per_weight, model_name, ours_names))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_name, "rows": args.rows, "weights": {
            n: {k: {"bpw": b, "error": e} for k, (b, e) in r.items()} for n, r in per_weight.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
