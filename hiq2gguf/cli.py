"""Command line: hiq2gguf convert | run | ppl | eval | inspect | runtime."""

from __future__ import annotations

import argparse
import json
import sys


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return n


def _convert(a) -> int:
    from hiq2gguf.convert import ConvertConfig, convert
    from hiq2gguf.gptq import GPTQConfig
    from hiq2gguf.plan import RatioConfig

    ratio = RatioConfig(estimator=a.estimator, ratios=a.ratios, solver=a.solver, time_limit=a.time_limit,
                        cache=not a.no_cache)
    cfg = ConvertConfig(bpw=a.bpw, method=a.method or ConvertConfig.method, preset=a.preset,
                        gptq=GPTQConfig(act_order=a.act_order),
                        ratio_strategy=a.ratio_strategy, ratio=ratio,
                        target=a.target, stock_types=a.stock_types,
                        calib_windows=a.calib_windows, quant_windows=a.quant_windows, calib_ctx=a.calib_ctx,
                        eval_text=a.eval_text,
                        eval_windows=a.eval_windows, evaluate=not a.no_eval, threads=a.threads,
                        progress=not a.quiet, checkpoints=not a.no_checkpoints, stream=a.stream)
    report = convert(cfg, a.output, a.model, a.report)
    if a.quiet:
        print(json.dumps({k: report[k] for k in ("bpw", "file_bpw") if k in report}))
    return 0


def _run(a) -> int:
    from hiq2gguf import llama

    with llama.open_model(a.gguf, n_ctx=a.ctx, n_threads=a.threads, seed=a.seed) as llm:
        if a.chat:
            out = llm.create_chat_completion(messages=[{"role": "user", "content": a.prompt}],
                                             max_tokens=a.n, temperature=a.temp)
            text = out["choices"][0]["message"]["content"]
            print(text)
        else:
            out = llm.create_completion(a.prompt, max_tokens=a.n, temperature=a.temp,
                                        repeat_penalty=a.repeat_penalty)
            print(a.prompt + out["choices"][0]["text"])
    return 0


def _ppl(a) -> int:
    from hiq2gguf import evaluate, llama

    with llama.open_model(a.gguf, n_ctx=a.ctx, logits_all=True, n_threads=a.threads) as llm:
        add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
        bos = llm.token_bos() if add_bos else None

        def tokenize(text: str) -> list[int]:
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

        windows = evaluate.text_windows(tokenize, a.text, a.ctx, a.windows, bos)
        r = evaluate.ppl_llama(llm, windows, progress=not a.quiet)
    result = {"gguf": a.gguf, "text": a.text, **r.as_dict()}
    print(json.dumps(result) if a.json else
          f"ppl {r.ppl:.4f} on {a.text} ({r.n_windows} windows of {a.ctx}, {r.n_tokens} scored tokens)")
    return 0


def _inspect(a) -> int:
    from hiq2gguf.inspect import format_table, inspect_gguf

    info = inspect_gguf(a.gguf)
    print(json.dumps(info, indent=2) if a.json else format_table(info))
    return 0


def _eval(a) -> int:
    from hiq2gguf import lmeval
    from hiq2gguf.eval_tasks import parse_tasks

    report = lmeval.run(a.model, parse_tasks(a.tasks), limit=a.limit, backend=a.backend, n_ctx=a.ctx,
                        threads=a.threads, progress=not a.quiet)
    print(report["table"])
    print(f"{report['backend']}, {report['seconds']:.0f} s")
    if a.json:
        lmeval.write_json(report, a.json)
    return 0


def _runtime(a) -> int:
    from hiq2gguf import runtime

    if a.action == "build":
        return runtime.main_build(a) or 0
    return runtime.main_path(a) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hiq2gguf", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="quantize a model into an HIQ2 GGUF")
    c.add_argument("model", nargs="?", default=None,
                   help="HF model directory or GGUF file (default: embedded SmolLM2-135M)")
    c.add_argument("-o", "--output", required=True, help="output .gguf")
    c.add_argument("--bpw", type=float, required=True,
                   help="budget in bits per quantized linear weight (never exceeded)")
    c.add_argument("--report", help="write a JSON report here")
    c.add_argument("--target", choices=["hiq2", "stock"], default="hiq2",
                   help="hiq2: our types (patched llama.cpp); stock: the optimizer picks a stock llama.cpp "
                        "type per weight (any llama.cpp loads the file)")
    c.add_argument("--stock-types", help="--target stock: allowed types, e.g. Q2_K,Q3_K,Q4_K,Q4_0,IQ4_NL "
                                         "(default: k-, legacy and IQ2..IQ4 types within 1 bpw of --bpw)")
    c.add_argument("--method", choices=["rtn", "gptq", "lwc", "adaround", "hybrid", "hybrid-lwc"],
                   help="quantizer on the HIQ2 grid: rtn layer by layer; the others block by block "
                        "on the calibration text. hybrid: GPTQ, then learned rounding of the "
                        "high-impact groups; hybrid-lwc: learned clipping, then learned rounding "
                        "(default: ConvertConfig.method, hybrid)")
    c.add_argument("--act-order", action="store_true",
                   help="GPTQ (gptq, hybrid) in activation order: most active inputs first (gptq.GPTQConfig)")
    c.add_argument("--preset", choices=["fast", "paper", "fast-rel"], default="fast",
                   help="reconstruction training of lwc/adaround/hybrid: fast (minutes on a CPU), "
                        "paper (5,000 AdaRound steps, for a GPU), or fast-rel (fast with the per-token "
                        "relative error, learned.block_error)")
    c.add_argument("--ratio-strategy", choices=["optimized", "fixed"], default="optimized",
                   help="per-layer ratios from the quadratic loss model solved by HiGHS (default), "
                        "or one high-group ratio for all layers")
    c.add_argument("--estimator", choices=["gradient", "loss"], default="gradient",
                   help="sensitivity matrix M: gradient projection (default, cheap) or the "
                        "paper's loss differences (thousands of forward passes)")
    c.add_argument("--ratios", help="candidate members for the optimizer, e.g. E8,E8_8K,H0,H2,H4 or "
                                    "0,0.25,0.5 (default: every member within 1 bpw of --bpw)")
    c.add_argument("--solver", choices=["auto", "linearized", "outer"], default="auto",
                   help="exact MILP with linearized products, or outer approximation (dense M)")
    c.add_argument("--time-limit", type=float, default=300.0,
                   help="seconds for HiGHS; then the best choice found and its gap are used")
    c.add_argument("--no-cache", action="store_true", help="do not keep or reuse the estimate of M")
    c.add_argument("--calib-windows", type=_positive, default=16, help="calibration sequences")
    c.add_argument("--quant-windows", type=_positive,
                   help="calibration sequences of gptq and the learned methods (GPTQ's Hessians, the "
                        "block reconstruction); default --calib-windows")
    c.add_argument("--calib-ctx", type=_positive, default=512, help="tokens per calibration sequence")
    c.add_argument("--no-checkpoints", action="store_true",
                   help="keep no per-block checkpoints in OUT.partial/ (by default a killed conversion "
                        "resumes where it stopped when rerun)")
    c.add_argument("--stream", action="store_true",
                   help="Hugging Face safetensors model: read and quantize one transformer block at a time "
                        "(peak memory ~ embeddings + two blocks); only the file's perplexity is measured")
    c.add_argument("--eval-text", default="boolq", help="boolq | lambada | FILE")
    c.add_argument("--eval-windows", type=_positive, default=40, help="512-token held-out windows")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=_convert)

    r = sub.add_parser("run", help="generate text with llama.cpp (patched runtime)")
    r.add_argument("gguf")
    r.add_argument("-p", "--prompt", required=True)
    r.add_argument("-n", type=int, default=64, help="tokens to generate")
    r.add_argument("--temp", type=float, default=0.0)
    r.add_argument("--repeat-penalty", type=float, default=1.1)
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    r.add_argument("--ctx", type=int, default=2048)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2)
    r.set_defaults(func=_run)

    q = sub.add_parser("ppl", help="perplexity through llama.cpp on held-out text")
    q.add_argument("gguf")
    q.add_argument("--text", default="boolq", help="boolq | lambada | FILE")
    q.add_argument("--ctx", type=int, default=512)
    q.add_argument("--windows", type=int, default=40)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--json", action="store_true")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_ppl)

    i = sub.add_parser("inspect", help="per-tensor type, shape, ratio and bits per weight")
    i.add_argument("gguf")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("eval", help="zero-shot tasks with lm-eval, offline (our GGUF or the reference)")
    e.add_argument("model", nargs="?", default=None,
                   help="our GGUF (scored by llama.cpp) or a HF directory / stock GGUF / the embedded "
                        "default (scored in PyTorch, float)")
    e.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada",
                   help="comma-separated: piqa, arc_easy, arc_challenge, hellaswag, winogrande, lambada")
    e.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    e.add_argument("--json", help="write the results here")
    e.add_argument("--backend", choices=["auto", "llamacpp", "torch"], default="auto")
    e.add_argument("--ctx", type=int, default=1024, help="longest scored sequence in tokens")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_eval)

    rt = sub.add_parser("runtime", help="build or locate the patched llama.cpp")
    rt.add_argument("action", choices=["build", "path"])
    rt.add_argument("--force", action="store_true", help="rebuild even if cached")
    rt.add_argument("--cuda", action="store_true",
                    help="the separate CUDA build (HIQ2 CUDA kernels; needs nvcc, not a GPU)")
    rt.add_argument("--rpc", action="store_true",
                    help="a separate build with llama.cpp's RPC backend and rpc-server (distributed inference)")
    from hiq2gguf.runtime import CPU_VARIANTS   # stdlib only: cheap to import here

    rt.add_argument("--cpu-variant", action="append", choices=sorted(CPU_VARIANTS), default=[],
                    help="also build libggml-cpu for this instruction set (tests of the non-native kernels)")
    rt.set_defaults(func=_runtime)
    return p


def _known_errors() -> tuple[type[BaseException], ...]:
    from converters import UnsupportedArchitecture
    from hiq2gguf.plan import BudgetError
    from hiq2gguf.data import DataMissing
    from hiq2gguf.formats import FormatError
    from hiq2gguf.gguf_io import CorruptGGUF
    from hiq2gguf.model_io import ModelSourceError
    from hiq2gguf.runtime import RuntimeMissing
    from hiq2gguf.optimize import InfeasibleBudget

    return (UnsupportedArchitecture, InfeasibleBudget, BudgetError, DataMissing, FormatError, CorruptGGUF,
            ModelSourceError, RuntimeMissing, FileNotFoundError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _known_errors() as e:
        print(f"hiq2gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hiq2gguf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
