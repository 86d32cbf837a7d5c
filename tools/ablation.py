"""Ablation of the ratio optimizer: fixed ratio vs optimized (both estimators of M).

    python tools/ablation.py [--bpw 2.5,2.75,3.0] [--json OUT] [--model PATH]

One calibration of the default model is shared by every file; for each budget it
writes the fixed-ratio file and one optimized file per estimator, and measures each
through llama.cpp (patched runtime) on held-out BoolQ and LAMBADA text. The
candidate set is the same at every budget (``--ratios``), so each estimator's M is
computed once (and cached: a killed run resumes; rows already in ``--json`` are
kept). Printed: a table, predicted vs measured loss increase (measured = log of the
file's BoolQ perplexity over the float model's), and each estimator's cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hiq2gguf import evaluate  # noqa: E402
from hiq2gguf.convert import Conversion, ConvertConfig, ppl_file, write_report  # noqa: E402
from hiq2gguf.plan import RatioConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpw", default="2.5,2.75,3.0")
    ap.add_argument("--json", default="out/ablation.json")
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M")
    ap.add_argument("--ratios", default="H0,H1,H2,H3,H4,H6", help="candidate members, same for every budget")
    ap.add_argument("--estimators", default="gradient,loss")
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--outdir", default="out/ablation")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    budgets = [float(x) for x in a.bpw.split(",")]
    estimators = [x for x in a.estimators.split(",") if x]
    out_json, outdir = Path(a.json), Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out_json.read_text()) if out_json.exists() else {}
    rows = saved.get("rows", [])
    done = {r["name"] for r in rows}

    cfg = ConvertConfig(bpw=min(budgets), method=a.method, evaluate=False, threads=a.threads,
                        eval_windows=a.eval_windows)
    conv = Conversion(cfg, a.model)
    texts = {"boolq": conv.text_windows("boolq"), "lambada": conv.text_windows("lambada")}
    t0 = time.time()
    reference = saved.get("reference") or {
        t: evaluate.ppl_torch(conv.model, w, True, f"ppl reference {t}").ppl for t, w in texts.items()}
    print(f"reference: boolq {reference['boolq']:.4f}  lambada {reference['lambada']:.4f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    calib = conv.calibrate()
    # plan digest -> measurements: identical plans (e.g. forced at the smallest budget) are measured once
    measured = ("bpw", "file_bpw", "file", "ppl_boolq", "ppl_lambada", "minutes")
    evaluated: dict[str, dict] = {r["digest"]: {k: r[k] for k in measured} for r in rows}

    def save():
        write_report({"reference": reference, "rows": rows}, out_json)

    # fixed rows first, then one estimator at a time (each computes its M once)
    runs = [("fixed", None, b) for b in budgets] + [("optimized", e, b) for e in estimators for b in budgets]
    for strategy, estimator, bpw in runs:
        name = f"{strategy}-{estimator}-{bpw:g}" if estimator else f"fixed-{bpw:g}"
        if name in done:
            continue
        ratio = RatioConfig(estimator=estimator or "gradient", ratios=a.ratios)
        plan, info = conv.plan(calib, bpw, strategy, ratio)
        digest = hashlib.sha256(repr(sorted((n, t.name) for n, t in plan.items())).encode()).hexdigest()
        if digest not in evaluated:
            t1 = time.time()
            packed, stock = conv.quantize(plan, calib)
            path = outdir / f"{name}.gguf"
            size = conv.write(path, packed, stock, bpw)
            conv.restore()
            ppl = {t: ppl_file(path, w, replace(cfg, eval_windows=len(w))) for t, w in texts.items()}
            evaluated[digest] = {"bpw": size["bpw"], "file_bpw": size["file_bpw"], "file": str(path),
                                 "ppl_boolq": ppl["boolq"], "ppl_lambada": ppl["lambada"],
                                 "minutes": round((time.time() - t1) / 60, 2)}
        m = evaluated[digest]
        row = {"name": name, "strategy": strategy, "estimator": estimator, "budget": bpw, **m,
               "same_plan_as_fixed": strategy != "fixed" and digest == _fixed_digest(evaluated, rows, bpw),
               "measured_loss_increase": math.log(m["ppl_boolq"] / reference["boolq"])}
        if strategy == "optimized":
            row.update(predicted_loss_increase=info["predicted_loss_increase"],
                       predicted_loss_increase_fixed=info["predicted_loss_increase_fixed"],
                       solver=info["solver"], estimator_minutes=round(info["estimator_seconds"] / 60, 2),
                       estimator_resumed=info["estimator_cache"]["resumed"])
        row["digest"] = digest
        rows.append(row)
        save()
        print(_fmt(row), flush=True)
    print()
    print(table(rows, reference))
    return 0


def _fixed_digest(evaluated, rows, bpw):
    for r in rows:
        if r["strategy"] == "fixed" and r["budget"] == bpw:
            return r["digest"]
    return None


def _fmt(r: dict) -> str:
    pred = r.get("predicted_loss_increase")
    return (f"{r['name']:<24} bpw {r['bpw']:.4f}  boolq {r['ppl_boolq']:8.3f}  lambada {r['ppl_lambada']:8.3f}  "
            f"dL measured {r['measured_loss_increase']:.4f}"
            + (f"  predicted {pred:.4f}" if pred is not None else ""))


def table(rows: list[dict], reference: dict) -> str:
    lines = [f"reference (float): boolq {reference['boolq']:.3f}  lambada {reference['lambada']:.3f}", "",
             f"{'budget':>6} {'strategy':<10} {'estimator':<9} {'bpw':>7} {'ppl boolq':>10} {'ppl lambada':>12} "
             f"{'dL meas':>8} {'dL pred':>8} {'M min':>6}"]
    for r in sorted(rows, key=lambda r: (r["budget"], r["strategy"] != "fixed", r["estimator"] or "")):
        pred = r.get("predicted_loss_increase")
        lines.append(f"{r['budget']:>6g} {r['strategy']:<10} {r['estimator'] or '-':<9} {r['bpw']:7.4f} "
                     f"{r['ppl_boolq']:10.3f} {r['ppl_lambada']:12.3f} {r['measured_loss_increase']:8.4f} "
                     + (f"{pred:8.4f}" if pred is not None else f"{'-':>8}")
                     + (f" {r['estimator_minutes']:6.1f}" if 'estimator_minutes' in r else f" {'-':>6}"))
    costs = {}
    for r in rows:
        if r.get("estimator"):       # the cached M keeps the minutes its computation took
            costs[r["estimator"]] = max(costs.get(r["estimator"], 0.0), r["estimator_minutes"])
    if costs:
        lines.append("")
        lines.append("estimator cost (first computation of M, minutes): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
        if "gradient" in costs and "loss" in costs and costs["loss"] > 0:
            lines.append(f"gradient / loss cost ratio: {costs['gradient'] / costs['loss']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
