"""GPTQ on one real layer, judged on held-out text, in minutes.

    python tools/gptq_layer.py [--model default|qwen2.5-coder-1.5b|PATH] [--layer 2.mlp.down_proj]
                               [--types E8,H0] [--rows 256]

The layer's Hessian H = 2 X^T X / n is collected from the unquantized model's inputs to
that layer on the calibration text (convert's: 16 x 512 tokens of BoolQ's calibration
half) and on the two held-out texts (8 x 512 tokens of each). Each quantizer is then run
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

CALIB_WINDOWS, EVAL_WINDOWS, CTX = 16, 8, 512


class _Stop(Exception):
    pass


def layer_hessians(model, tokenizer, module: torch.nn.Module) -> dict[str, GPTQ]:
    """text -> a GPTQ holding the layer's Hessian on that text (the forward stops at the layer)."""
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    bos = tokenizer.bos_token_id if add_bos else None
    texts = {"calibration": (data.boolq_split("calibration"), CALIB_WINDOWS),
             "boolq": (data.held_out_text("boolq"), EVAL_WINDOWS),
             "lambada": (data.held_out_text("lambada"), EVAL_WINDOWS)}
    out = {}
    for name, (text, n) in texts.items():
        g = out[name] = GPTQ(module.weight.shape[1])

        def hook(m, inp, o, g=g):
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
        finally:
            h.remove()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layer", default="2.mlp.down_proj", help="BLOCK.MODULE inside the decoder block")
    ap.add_argument("--types", default="E8,H0", help="our members (as --ratios spells them)")
    ap.add_argument("--rows", type=int, default=256, help="rows of the weight (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    from hiq2gguf.sequential import decoder_blocks

    _, ref = resolve_model(args.model)
    model, tokenizer = model_io.load(model_io.resolve(ref))
    block, _, sub = args.layer.partition(".")
    module = decoder_blocks(model)[int(block)][1].get_submodule(sub)
    t0 = time.time()
    hs = layer_hessians(model, tokenizer, module)
    W = module.weight.detach().to(torch.float32)
    if 0 < args.rows < W.shape[0]:
        peak = torch.argsort(W.abs().amax(1), descending=True)[:min(8, args.rows)]
        rest = torch.randperm(W.shape[0])
        rest = rest[~torch.isin(rest, peak)][:args.rows - len(peak)]
        W = W[torch.cat([peak, rest])]
    print(f"{args.model} {args.layer}: weight {tuple(module.weight.shape)}, {len(W)} rows; "
          f"{hs['calibration'].n} calibration tokens for {W.shape[1]} inputs ({time.time() - t0:.0f} s)")
    Wd = W.double()
    imp = torch.diag(hs["calibration"].H).to(torch.float32).expand_as(W).contiguous()

    def errors(Q: torch.Tensor) -> list[float]:
        E = (W - Q.reshape(W.shape)).double()
        out = [float(torch.einsum("ij,jk,ik->", E, g.H, E) / torch.einsum("ij,jk,ik->", Wd, g.H, Wd))
               for g in hs.values()]
        return [float((E ** 2).sum() / (Wd ** 2).sum()), *out]

    print(f"{'type':10s} {'quantizer':15s} {'weight':>9s} {'calib':>9s} {'boolq':>9s} {'lambada':>9s} {'s':>5s}")
    for qtype in parse_ratios(args.types):
        runs = {"rtn": lambda: quantize_member(W, qtype, imp),
                "gptq": lambda: hs["calibration"].quantize_as(W, qtype, imp)}
        if isinstance(qtype, E8Type):
            def unbounded():
                g = GPTQ(W.shape[1], GPTQConfig(unit_growth=float("inf")))
                g.H, g.n = hs["calibration"].H, hs["calibration"].n
                return g.quantize_as(W, qtype, imp)
            runs["gptq-unbounded"] = unbounded
        for name, fn in runs.items():
            t1 = time.time()
            e = errors(dequantize_torch(fn()))
            print(f"{qtype.name:10s} {name:15s} " + " ".join(f"{v:9.4f}" for v in e) + f" {time.time() - t1:5.0f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
