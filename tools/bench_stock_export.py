#!/usr/bin/env python3
"""`convert --target stock` against llama-quantize's own mixes at matched bits per weight.

    python tools/bench_stock_export.py [--mixes Q2_K,Q3_K_S,Q3_K_M,Q4_K_S] [--json OUT]
                                       [--windows 40] [--calib-windows 16] [--threads 2]

On the default model (SmolLM2-135M), for every llama-quantize mix:

* theirs: ``llama-quantize --imatrix`` (the mix's own per-tensor rules and its
  fallbacks for rows that are not a multiple of 256), the importance matrix from
  llama-imatrix on our calibration text (BoolQ calibration half, as many 512-token
  chunks as our calibration windows); token embeddings Q8_0 like ours;
* ours: the ratio optimizer choosing among stock types per weight
  (``--target stock``, every default stock type that fits a row as a candidate, so
  one estimate of M serves every budget), with the budget set to the bits per
  weight that llama-quantize's file spends on the linear weights.

Both files are scored by the same llama.cpp (the patched runtime through
llama-cpp-python; it runs stock types unchanged) on the same BoolQ held-out
windows (hiq2gguf/evaluate.py). "bpw" is the true bits per weight of the stored
linear weights (blk.* 2-D tensors, every byte counted). Ratios: ours / theirs,
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_speed  # noqa: E402  (the cached F32 file of the default model)
import llamacpp  # noqa: E402  (llama-quantize, llama-imatrix, bpw and types of a file)
from hiq2gguf import evaluate, runtime  # noqa: E402
from hiq2gguf.gguf_io import atomic_output  # noqa: E402
from llamacpp import linear_bpw, linear_types  # noqa: E402

BENCH_VERSION = 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_S", help="llama-quantize ftypes")
    ap.add_argument("--windows", type=int, default=evaluate.DEFAULT_WINDOWS, help="512-token BoolQ windows")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--estimator", default="gradient", choices=["gradient", "loss"])
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds for HiGHS per budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    from hiq2gguf.convert import Conversion, ConvertConfig, ppl_file
    from hiq2gguf.plan import RatioConfig
    from hiq2gguf.stock import DEFAULT_STOCK_TYPES

    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[stock {time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    try:
        llamacpp.tool("llama-quantize")
        llamacpp.tool("llama-imatrix")
    except runtime.RuntimeMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    work = runtime.cache_dir() / "bench" / f"stock-v{BENCH_VERSION}"
    work.mkdir(parents=True, exist_ok=True)
    f32 = bench_speed.Files(bench_speed.MODELS["smollm2-135m"], log).f32()
    log(f"llama-imatrix ({args.calib_windows} x 512 tokens of the calibration text)")
    imatrix = llamacpp.imatrix(f32, work / f"imatrix-{args.calib_windows}.gguf", args.calib_windows, args.threads)

    cfg = ConvertConfig(bpw=4.0, target="stock", stock_types=",".join(DEFAULT_STOCK_TYPES),
                        calib_windows=args.calib_windows, eval_windows=args.windows, threads=args.threads,
                        ratio=RatioConfig(estimator=args.estimator, time_limit=args.time_limit), progress=True)
    conv = Conversion(cfg)
    windows = conv.text_windows("boolq", args.windows)

    def ppl(path: Path) -> float:           # llama.cpp, the patched runtime
        return ppl_file(path, windows, replace(cfg, progress=False))

    f32_ppl = ppl(f32)
    log(f"F32 GGUF (llama.cpp) ppl {f32_ppl:.4f}")
    calib = conv.calibrate()

    rows = []
    for mix in [m.strip().upper() for m in args.mixes.split(",") if m.strip()]:
        theirs = llamacpp.quantize(f32, work / f"llama-quantize-{mix.lower()}.gguf", mix, args.threads, imatrix)
        bpw = linear_bpw(theirs)
        log(f"{mix}: llama-quantize linear bpw {bpw:.4f} {linear_types(theirs)}")
        conv.restore()
        plan, info = conv.plan(calib, bpw)
        packed, stock = conv.quantize(plan, calib)
        ours = work / f"ours-{mix.lower()}.gguf"
        conv.write(ours, packed, stock, bpw)
        row = {"mix": mix, "budget": bpw,
               "theirs": {"bpw": bpw, "ppl": ppl(theirs), "types": linear_types(theirs)},
               "ours": {"bpw": linear_bpw(ours), "ppl": ppl(ours),
                        "types": linear_types(ours), "solver": info["solver"]["status"],
                        "gap": info["solver"]["gap"],
                        "predicted_loss_increase": info["predicted_loss_increase"]}}
        rows.append(row)
        log(f"{mix}: theirs ppl {row['theirs']['ppl']:.4f} at {bpw:.4f} bpw; ours ppl {row['ours']['ppl']:.4f} "
            f"at {row['ours']['bpw']:.4f} bpw {row['ours']['types']}")

    print(f"\nSmolLM2-135M, BoolQ held-out, {len(windows)} x {len(windows[0])} tokens, llama.cpp "
          f"{runtime.lib_dir()}\nF32 GGUF (unquantized) ppl {f32_ppl:.4f}\n")
    hdr = f"{'mix':<8} {'theirs bpw':>10} {'theirs ppl':>10} {'ours bpw':>9} {'ours ppl':>9} {'ppl ratio':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['mix']:<8} {r['theirs']['bpw']:10.4f} {r['theirs']['ppl']:10.4f} {r['ours']['bpw']:9.4f} "
              f"{r['ours']['ppl']:9.4f} {r['ours']['ppl'] / r['theirs']['ppl']:9.4f}")
    print("(ppl ratio = ours / llama-quantize's, same run, same windows; bpw = linear weights)")
    if args.json:
        with atomic_output(args.json) as tmp:
            Path(tmp).write_text(json.dumps({"f32_ppl": f32_ppl, "calib_windows": args.calib_windows,
                                             "windows": len(windows), "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
