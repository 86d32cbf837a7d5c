#!/usr/bin/env python3
"""Speed of the HIQ2 types against stock llama.cpp types: llama-bench, pp512 and tg128.

    python tools/bench_speed.py [--threads 1,2] [--json OUT] [--models default,random]
                                [--ours HIQ2_H0,HIQ2_H2,HIQ2_H4] [--stock Q2_K,Q3_K_S,Q4_0,IQ2_XS]

Every file is run by llama-bench of the patched runtime (`hiq2gguf runtime build`),
so stock types and ours go through one binary, one build, one run. Two models:

* ``default``: SmolLM2-135M (the converter's default model). Its 576-wide rows are
  not a multiple of 256, so llama-quantize stores most stock k-/i-quant weights in
  its fallback type there (the ``bpw`` column shows what was stored);
* ``random``: a randomly initialised llama (hidden 1024, FFN 4096, 8 layers, the
  SmolLM2 tokenizer) whose dimensions are multiples of 256: every stock type
  applies to every linear weight.

Files (cached under ~/.cache/hiq2gguf/bench/<model>/):
* ours: every linear weight in one HIQ2 member, codes from the reference
  quantizer of docs/FORMAT.md (the speed of a type does not depend on the values), token embeddings Q8_0, written by the
  converter's own writer: the same layout `hiq2gguf convert` produces;
* stock: ``llama-quantize --pure`` from an F32 GGUF of the same weights, token
  embeddings (= the tied output head) Q8_0 like ours, so files differ only in the
  type of the linear weights. ``--pure`` keeps llama.cpp's per-tensor mixtures out
  (Q2_K means Q2_K everywhere; Q3_K_S means Q3_K). IQ2_XS gets an importance
  matrix from llama-imatrix on our calibration text (BoolQ calibration half).

Timing: llama-bench -p 512 -n 128, ``--reps`` repetitions, in ``--rounds`` rounds
that visit all files of a model in turn; the best sample of each (file, threads,
test) is kept (load from other processes only ever slows a run down). Ratios are to Q2_K
of the same model and threads, measured in the same run. JSON: a list of rows
{model, type, ours, bpw, threads, pp512, tg128} (tokens per second; bpw = bits
per weight of the stored linear weights, blk.* 2-D tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import llamacpp  # noqa: E402  (llama.cpp's tools: quantize, imatrix, bpw of a file)
from hiq2gguf import runtime  # noqa: E402
from hiq2gguf.formats import get_type  # noqa: E402
from hiq2gguf.gguf_io import atomic_output  # noqa: E402
from llamacpp import linear_bpw, tool  # noqa: E402

BENCH_VERSION = 1                      # bump to regenerate the cached files
PP, TG = 512, 128
BASELINE = "Q2_K"
NEEDS_IMATRIX = {"IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M"}
IMATRIX_CHUNKS = 8


TOOLS = ("llama-bench", "llama-quantize", "llama-imatrix")


def bench_dir(model: str) -> Path:
    return runtime.cache_dir() / "bench" / f"v{BENCH_VERSION}" / model


# ---- models ------------------------------------------------------------------------
@dataclass
class BenchModel:
    """A model to time; ``load`` gives (torch model, tokenizer, ModelSource)."""

    name: str

    def load(self):
        raise NotImplementedError


class DefaultModel(BenchModel):
    def load(self):
        from hiq2gguf import model_io

        source = model_io.resolve(None)
        model, tokenizer = model_io.load(source)
        return model, tokenizer, source


@dataclass
class RandomLlama(BenchModel):
    hidden: int = 1024
    intermediate: int = 4096
    layers: int = 8
    heads: int = 16
    kv_heads: int = 4
    seed: int = 0

    def load(self):
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from hiq2gguf import model_io

        # the SmolLM2 tokenizer (49152 = 192 x 256 tokens), copied from its GGUF
        p = model_io.default_model_path()
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        source = model_io.ModelSource(path=Path(self.name), name=self.name,
                                      tokenizer_kv=model_io.read_gguf_tokenizer(p))
        torch.manual_seed(self.seed)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=self.hidden,
                          intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                          num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                          max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        for name, dim in (("hidden", self.hidden), ("intermediate", self.intermediate)):
            if dim % 256:
                raise ValueError(f"random model: {name} size {dim} is not a multiple of 256")
        return LlamaForCausalLM(cfg).eval(), tokenizer, source


MODELS = {m.name: m for m in (DefaultModel("smollm2-135m"), RandomLlama("random-llama-1024x8"))}
MODEL_ALIASES = {"default": "smollm2-135m", "random": "random-llama-1024x8"}


# ---- files -------------------------------------------------------------------------
class Files:
    """The GGUF files of one model: F32 source, ours, stock (created on first use)."""

    def __init__(self, spec: BenchModel, log):
        self.spec = spec
        self.dir = bench_dir(spec.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._loaded = None

    def _model(self):
        if self._loaded is None:
            self.log(f"{self.spec.name}: loading / initialising the model")
            model, tokenizer, source = self.spec.load()
            from converters import converter_for
            self._loaded = (model, tokenizer, source, converter_for(model.config),
                            {k: v.detach().clone() for k, v in model.state_dict().items()})
        return self._loaded

    def _write(self, path: Path, packed_type: str | None) -> None:
        from hiq2gguf.convert import check_weights, quantize_model
        from hiq2gguf.writer import write_gguf

        model, tokenizer, source, converter, original = self._model()
        model.load_state_dict(original)                 # quantize_model works in place
        packed, stock = {}, {}
        if packed_type is not None:
            qtype = get_type(packed_type)
            plan = {name: qtype for name in check_weights(model, converter)}

            def reference_codes(name, w, _qtype):   # the C/numpy reference quantizer: fast
                return qtype.unpack(qtype.quantize_ref(w.numpy()))

            packed, stock = quantize_model(model, converter, plan, reference_codes, progress=False)
        write_gguf(path, converter, model, source, tokenizer, packed, stock, {"bench": "speed"})

    def f32(self) -> Path:
        p = self.dir / "f32.gguf"
        if not p.exists():
            self.log(f"{self.spec.name}: writing {p.name}")
            self._write(p, None)
        return p

    def ours(self, type_name: str) -> Path:
        p = self.dir / f"{type_name.lower()}.gguf"
        if not p.exists():
            self.log(f"{self.spec.name}: quantizing to {type_name} (reference quantizer) -> {p.name}")
            self._write(p, type_name)
        return p

    def imatrix(self, threads: int) -> Path:
        p = self.dir / "imatrix.gguf"
        if not p.exists():
            self.log(f"{self.spec.name}: llama-imatrix on the calibration text ({IMATRIX_CHUNKS} x 512 tokens)")
        return llamacpp.imatrix(self.f32(), p, IMATRIX_CHUNKS, threads)

    def stock(self, ftype: str, threads: int) -> Path:
        p = self.dir / f"{ftype.lower()}.gguf"
        if not p.exists():
            self.log(f"{self.spec.name}: llama-quantize --pure {ftype} -> {p.name}")
        return llamacpp.quantize(self.f32(), p, ftype, threads, pure=True,
                                 imatrix=self.imatrix(threads) if ftype in NEEDS_IMATRIX else None)


# ---- timing ------------------------------------------------------------------------
def llama_bench(paths: list[Path], threads: list[int], reps: int) -> list[dict]:
    out = llamacpp.run([tool("llama-bench"), *sum((["-m", p] for p in paths), []),
                "-t", ",".join(map(str, threads)), "-p", str(PP), "-n", str(TG),
                "-r", str(reps), "-o", "json"])
    return json.loads(out)


def best_samples(runs: list[dict]) -> dict[tuple[str, int, str], float]:
    """(file, threads, 'pp512'|'tg128') -> best tokens/s over every sample of every round."""
    best: dict[tuple[str, int, str], float] = {}
    for r in runs:
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        key = (str(Path(r["model_filename"]).resolve()), int(r["n_threads"]), test)
        ts = max(r.get("samples_ts") or [r["avg_ts"]])
        best[key] = max(best.get(key, 0.0), ts)
    return best


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--models", default="default,random", help="default, random (comma-separated)")
    ap.add_argument("--ours", default="HIQ2_H0,HIQ2_H2,HIQ2_H4", help="HIQ2 members to time")
    ap.add_argument("--stock", default="Q2_K,Q3_K_S,Q4_0,IQ2_XS", help="llama-quantize types to time")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all files (best sample kept)")
    args = ap.parse_args(argv)

    threads = [int(t) for t in _list(args.threads)]
    ours = [get_type(t).name for t in _list(args.ours)]
    stock = [t.upper() for t in _list(args.stock)]
    if BASELINE not in stock:
        ap.error(f"--stock must include the baseline {BASELINE}")
    try:
        specs = [MODELS[MODEL_ALIASES.get(m, m)] for m in _list(args.models)]
    except KeyError as e:
        ap.error(f"unknown model {e}; choose from {', '.join([*MODEL_ALIASES, *MODELS])}")
    try:
        for name in TOOLS:
            tool(name)
    except runtime.RuntimeMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[bench {time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    # (model, type, ours, path)
    entries: list[tuple[str, str, bool, Path]] = []
    for spec in specs:
        files = Files(spec, log)
        for t in stock:
            entries.append((spec.name, t, False, files.stock(t, max(threads))))
        for t in ours:
            entries.append((spec.name, t, True, files.ours(t)))
    bpw = {e[3]: linear_bpw(e[3]) for e in entries}

    print(f"llama-bench {tool('llama-bench')}; best of {args.rounds} x {args.reps} samples", flush=True)
    rows: list[dict] = []
    for spec in specs:                      # one model at a time: its table is printed (and saved) when done
        paths = [e[3] for e in entries if e[0] == spec.name]
        load0 = os.getloadavg()[0]
        runs: list[dict] = []
        for rnd in range(args.rounds):
            log(f"{spec.name}: round {rnd + 1}/{args.rounds}, {len(paths)} files, threads {threads} "
                f"(load average {os.getloadavg()[0]:.2f})")
            runs += llama_bench(paths, threads, args.reps)
        best = best_samples(runs)
        model_rows = []
        for model, t, is_ours, path in entries:
            if model != spec.name:
                continue
            key = str(path.resolve())
            for th in threads:
                model_rows.append({"model": model, "type": t, "ours": is_ours, "bpw": round(bpw[path], 4),
                                   "threads": th, "pp512": round(best[(key, th, f"pp{PP}")], 2),
                                   "tg128": round(best[(key, th, f"tg{TG}")], 2)})
        print(f"\n{spec.name}: load average (1 min) {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end "
              f"on {os.cpu_count()} cores")
        print_table(model_rows)
        rows += model_rows
        if args.json:
            with atomic_output(args.json) as tmp:
                Path(tmp).write_text(json.dumps(rows, indent=1))
            print(f"wrote {args.json} ({len(rows)} rows)", flush=True)
    return 0


def print_table(rows: list[dict]) -> None:
    """Rows of one model, with ratios to the baseline type at the same threads."""
    hdr = f"{'model':<20} {'type':<9} {'bpw':>6} {'thr':>3} {'pp512 t/s':>10} {'x Q2_K':>7} {'tg128 t/s':>10} {'x Q2_K':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        base = next(b for b in rows if b["type"] == BASELINE and b["threads"] == r["threads"])
        mark = "*" if r["ours"] else " "
        print(f"{r['model']:<20} {r['type']:<8}{mark} {r['bpw']:6.3f} {r['threads']:>3} "
              f"{r['pp512']:10.2f} {r['pp512'] / base['pp512']:7.3f} {r['tg128']:10.2f} {r['tg128'] / base['tg128']:7.3f}")
    print("(* = ours)", flush=True)

if __name__ == "__main__":
    sys.exit(main())
