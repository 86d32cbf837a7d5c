"""GPTQ on one real layer, judged on held-out text, in minutes.

    python tools/gptq_layer.py [--model default|qwen2.5-coder-1.5b|PATH] [--layer 2.mlp.down_proj]
                               [--types E8,H0] [--rows 256] [--calib-windows 16,64] [--damp 0.01]

The layer's Hessian H = 2 X^T X / n is collected from the unquantized model's inputs to
that layer on the calibration text (convert's: 16 x 512 tokens of BoolQ's calibration
half; ``--calib-windows 16,64`` runs GPTQ on the Hessian of each count, the first
windows of the text) and on the two held-out texts (8 x 512 tokens of each). Each quantizer is then run
on the weight (``--rows``: the rows holding its largest weights, then random ones) and
reported as

    weight error  |W - Q|^2 / |W|^2
    output error  tr((W - Q) H (W - Q)^T) / tr(W H W^T)   for H of each text

GPTQ minimizes the calibration one; the held-out ones show whether that carries over
(with fewer calibration tokens than inputs it need not: ffn_down of Qwen2.5-1.5B has
8960). ``gptq-unbounded`` is GPTQ on the lattice members without the bound on their
units (``GPTQConfig.unit_growth``). Importance (of the scale searches and groups) is the
calibration Hessian's diagonal, as llama-imatrix collects it (``weight_error.py``
uses it too; the converter uses the Fisher diagonal): the numbers compare quantizers
on one layer, not files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_models import resolve_model  # noqa: E402

from hiq2gguf import data, model_io  # noqa: E402
from hiq2gguf.formats import E8Type  # noqa: E402
from hiq2gguf.gptq import GPTQ, GPTQConfig  # noqa: E402
from hiq2gguf.plan import parse_ratios  # noqa: E402
from hiq2gguf.quantize import dequantize_torch, quantize_member  # noqa: E402

EVAL_WINDOWS, CTX = 8, 512


class _Stop(Exception):
    pass


def layer_hessians(model, tokenizer, module: torch.nn.Module, calib_windows: list[int]) -> dict[str, GPTQ]:
    """text -> a GPTQ holding the layer's Hessian on that text (the forward stops at the
    layer); the calibration text once per count of ``calib_windows`` ("calibration-16")."""
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    bos = tokenizer.bos_token_id if add_bos else None
    cols = module.weight.shape[1]
    calib = {f"calibration-{n}": GPTQ(cols) for n in calib_windows}
    texts = [(data.boolq_split("calibration"), max(calib_windows), list(zip(calib_windows, calib.values()))),
             *((data.held_out_text(t), EVAL_WINDOWS, [(EVAL_WINDOWS, GPTQ(cols))]) for t in ("boolq", "lambada"))]
    out = {**calib, "boolq": texts[1][2][0][1], "lambada": texts[2][2][0][1]}
    for text, n, takers in texts:
        seen = [0]

        def hook(m, inp, o):
            for count, g in takers:
                if seen[0] < count:
                    g.add_batch(inp[0])
            raise _Stop
        h = module.register_forward_hook(hook)
        try:
            for w in data.token_windows(tokenizer(text, add_special_tokens=False)["input_ids"], CTX, n, bos):
                try:
                    with torch.no_grad():
                        model(input_ids=torch.tensor([w]), use_cache=False)
                except _Stop:
                    pass
                seen[0] += 1
        finally:
            h.remove()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layer", default="2.mlp.down_proj", help="BLOCK.MODULE inside the decoder block")
    ap.add_argument("--types", default="E8,H0", help="our members (as --ratios spells them)")
    ap.add_argument("--rows", type=int, default=256, help="rows of the weight (0: all)")
    ap.add_argument("--calib-windows", default="16", help="calibration windows of 512 tokens, one GPTQ per count")
    ap.add_argument("--damp", type=float, default=GPTQConfig.damp, help="GPTQ's damping (of the mean diagonal)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    from hiq2gguf.sequential import decoder_blocks

    _, ref = resolve_model(args.model)
    model, tokenizer = model_io.load(model_io.resolve(ref))
    block, _, sub = args.layer.partition(".")
    module = decoder_blocks(model)[int(block)][1].get_submodule(sub)
    t0 = time.time()
    counts = sorted({int(c) for c in args.calib_windows.split(",")})
    hs = layer_hessians(model, tokenizer, module, counts)
    calib = [f"calibration-{n}" for n in counts]
    W = module.weight.detach().to(torch.float32)
    if 0 < args.rows < W.shape[0]:
        peak = torch.argsort(W.abs().amax(1), descending=True)[:min(8, args.rows)]
        rest = torch.randperm(W.shape[0])
        rest = rest[~torch.isin(rest, peak)][:args.rows - len(peak)]
        W = W[torch.cat([peak, rest])]
    print(f"{args.model} {args.layer}: weight {tuple(module.weight.shape)}, {len(W)} rows; "
          f"{', '.join(str(hs[c].n) for c in calib)} calibration tokens for {W.shape[1]} inputs "
          f"({time.time() - t0:.0f} s)")
    Wd = W.double()
    main_calib = hs[calib[0]]              # RTN's importance and the "calib" column: the fewest windows
    imp = torch.diag(main_calib.H).to(torch.float32).expand_as(W).contiguous()

    def errors(Q: torch.Tensor) -> list[float]:
        E = (W - Q.reshape(W.shape)).double()
        out = [float(torch.einsum("ij,jk,ik->", E, g.H, E) / torch.einsum("ij,jk,ik->", Wd, g.H, Wd))
               for g in (main_calib, hs["boolq"], hs["lambada"])]
        return [float((E ** 2).sum() / (Wd ** 2).sum()), *out]

    print(f"{'type':10s} {'quantizer':18s} {'weight':>9s} {'calib':>9s} {'boolq':>9s} {'lambada':>9s} {'s':>5s}")
    for qtype in parse_ratios(args.types):
        def gptq(h: GPTQ, **cfg):
            g = GPTQ(W.shape[1], GPTQConfig(damp=args.damp, **cfg))
            g.H, g.n = h.H, h.n
            return g.quantize_as(W, qtype, imp)
        runs = {"rtn": lambda: quantize_member(W, qtype, imp)}
        for c in calib:
            suffix = f"-{c.rsplit('-', 1)[1]}" if len(calib) > 1 else ""
            runs[f"gptq{suffix}"] = lambda h=hs[c]: gptq(h)
            if isinstance(qtype, E8Type):
                runs[f"gptq-unbounded{suffix}"] = lambda h=hs[c]: gptq(h, unit_growth=float("inf"))
        for name, fn in runs.items():
            t1 = time.time()
            e = errors(dequantize_torch(fn()))
            print(f"{qtype.name:10s} {name:18s} " + " ".join(f"{v:9.4f}" for v in e) + f" {time.time() - t1:5.0f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
