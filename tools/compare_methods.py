"""Quantizers at equal bits: RTN, GPTQ and the learned ones on one calibration.

    python tools/compare_methods.py [--model PATH] [--bpw 3.0] [--methods rtn,gptq,hybrid]
                                    [--calib-windows 16] [--eval-windows 20] [--json OUT]

Every method gets the same model, calibration windows, Fisher information and
per-layer types (one fixed member of the family for the budget), and is
measured by the perplexity of the PyTorch fake-quantized model (bit for bit
what the file stores) on the same held-out BoolQ windows, with its time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hiq2gguf import evaluate                                  # noqa: E402
from hiq2gguf.convert import Conversion, ConvertConfig, quantize_model, write_report  # noqa: E402
from hiq2gguf.learned import block_error, preset               # noqa: E402
from hiq2gguf.sequential import METHODS, block_quantize_fn     # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--methods", default="rtn,gptq,hybrid")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip the float model's perplexity")
    ap.add_argument("--first-blocks", type=int, default=0,
                    help="quick mode: quantize only the first K transformer blocks with uniform "
                         "importance (no Fisher pass) and compare the relative error of the hidden "
                         "state after block K on the held-out windows (whole, and per token) instead of perplexity")
    ap.add_argument("--type", help="quick mode: the member of every weight of those blocks (e.g. E8; "
                                   "default: the fixed ratio's member for --bpw)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    methods = a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")

    cfg = ConvertConfig(bpw=a.bpw, calib_windows=a.calib_windows, eval_windows=a.eval_windows,
                        ratio_strategy="fixed", threads=a.threads)
    conv = Conversion(cfg, a.model)
    windows = conv.text_windows(cfg.eval_text)
    if a.first_blocks:
        return first_blocks(conv, methods, windows, a)
    rows = []
    if not a.no_reference:
        rows.append({"method": "reference", "ppl": evaluate.ppl_torch(conv.model, windows, desc="ppl reference").ppl})
    calib = conv.calibrate()
    plan, _ = conv.plan(calib)
    print(f"calibration {calib.seconds:.0f} s", flush=True)
    for m in methods:
        conv.restore()
        t0 = time.time()
        fn = block_quantize_fn(m, conv.model, plan, calib.windows, calib.fisher, preset(a.preset), True)
        quantize_model(conv.model, conv.converter, plan, fn, True)
        seconds = time.time() - t0
        ppl = evaluate.ppl_torch(conv.model, windows, desc=f"ppl {m}").ppl
        rows.append({"method": m, "ppl": ppl, "quantize_seconds": round(seconds, 1),
                     "type": next(iter(plan.values())).name})
        print(json.dumps(rows[-1]), flush=True)
        if a.json:
            write_report({"model": str(conv.source.path), "bpw": a.bpw, "calib_windows": len(calib.windows),
                          "calibration_seconds": round(calib.seconds, 1), "eval_windows": len(windows),
                          "preset": a.preset, "threads": a.threads, "rows": rows}, a.json)
    print(f"{'method':10s} {'ppl':>10s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['method']:10s} {r['ppl']:10.4f} {r.get('quantize_seconds', 0):8.0f}")
    return 0


def first_blocks(conv, methods, windows, a) -> int:
    """Hidden-state error after the first K quantized blocks, per method."""
    import torch

    from hiq2gguf import data
    from hiq2gguf.plan import fixed_plan, parse_ratios
    from hiq2gguf.sequential import decoder_blocks

    k = a.first_blocks
    prefixes = [p for p, _ in decoder_blocks(conv.model)[:k]]
    plan = {n: t for n, t in fixed_plan(conv.shapes, a.bpw).items() if any(n.startswith(p) for p in prefixes)}
    if a.type:
        member = parse_ratios(a.type)[0]
        plan = {n: member for n in plan}
    calib = data.calibration_windows(conv.tokenize, conv.cfg.calib_ctx, a.calib_windows, conv.bos)

    @torch.no_grad()
    def hidden():
        return [conv.model(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states[k]
                for w in windows]

    ref = hidden()
    rows = []
    for m in methods:
        conv.restore()
        t0 = time.time()
        fn = block_quantize_fn(m, conv.model, plan, calib, None, preset(a.preset), True)
        quantize_model(conv.model, conv.converter, plan, fn, True)
        seconds = time.time() - t0
        # the whole hidden state's relative error, led by the tokens with massive activations,
        # and the mean of each token's own relative error (learned.block_error)
        hs = hidden()
        err = sum(float(((h - r) ** 2).mean() / (r ** 2).mean()) for h, r in zip(hs, ref)) / len(ref)
        per_token = sum(float(block_error(h, r, token_relative=True)) for h, r in zip(hs, ref)) / len(ref)
        rows.append({"method": m, "blocks": k, "hidden_rel_mse": err, "hidden_token_rel_mse": per_token,
                     "quantize_seconds": round(seconds, 1), "type": next(iter(plan.values())).name})
        print(json.dumps(rows[-1]), flush=True)
        if a.json:
            write_report({"model": str(conv.source.path), "bpw": a.bpw, "calib_windows": len(calib),
                          "eval_windows": len(windows), "preset": a.preset, "rows": rows}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
