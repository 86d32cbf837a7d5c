#!/usr/bin/env python3
"""Peak memory of a streaming conversion (``hiq2gguf convert --stream``) against the
model's size.

    python tools/bench_streaming.py [--layers 24] [--hidden 512] [--method rtn]
                                    [--ratio-strategy fixed] [--json OUT]

Model: a randomly initialised llama (the SmolLM2 tokenizer, tied embeddings) written
as safetensors shards, one per transformer block, cached under
~/.cache/hiq2gguf/bench/stream-llama-<layers>x<hidden>/ (made without ever holding
the whole model in memory). Its full size is far above two blocks plus the
embeddings.

Measured in the same run, each in its own child process, peak resident memory
(``ru_maxrss`` of that child from ``os.wait4``):
* ``baseline``: Python with the modules a conversion imports (torch, transformers,
  gguf, safetensors, hiq2gguf), nothing loaded;
* ``streamed``: the conversion itself, ``--stream``, calibration windows and
  quantizer as given.
Printed against (a) two blocks + the embeddings, (b) the full model (float32
bytes). ``streamed - baseline`` is what the conversion adds to the interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE = ("import torch, transformers, gguf, safetensors, numpy; "
            "import transformers.models.llama.modeling_llama; "
            "import hiq2gguf.convert, hiq2gguf.streaming, hiq2gguf.sequential, hiq2gguf.plan")


def make_model(path: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> Path:
    """Random llama weights, one safetensors shard per block (+ one for the rest)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from hiq2gguf.model_io import default_model_path

    if (path / "model.safetensors.index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".make-", dir=path.parent))
    p = default_model_path()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    g = torch.Generator().manual_seed(0)
    std = 0.02
    head_dim = hidden // heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    n_files = layers + 1
    weight_map = {}

    def shard(i: int, tensors: dict) -> None:
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard(0, {"model.embed_tokens.weight": torch.randn(len(tok), hidden, generator=g) * std,
              "model.norm.weight": torch.ones(hidden)})
    for b in range(layers):
        t = {f"model.layers.{b}.{k}.weight": torch.randn(*s, generator=g) * std for k, s in shapes.items()}
        t[f"model.layers.{b}.input_layernorm.weight"] = torch.ones(hidden)
        t[f"model.layers.{b}.post_attention_layernorm.weight"] = torch.ones(hidden)
        shard(b + 1, t)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def sizes(path: Path) -> dict:
    """float32 bytes: the whole model, one block, the embeddings."""
    from safetensors import safe_open

    total, block, embed = 0, {}, 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for n in h.keys():
                shape = h.get_slice(n).get_shape()
                nbytes = 4
                for d in shape:
                    nbytes *= d
                total += nbytes
                if ".layers." in n:
                    b = int(n.split(".layers.")[1].split(".")[0])
                    block[b] = block.get(b, 0) + nbytes
                elif "embed_tokens" in n or n == "lm_head.weight":
                    embed += nbytes
    return {"full": total, "block": max(block.values()), "embeddings": embed, "blocks": len(block)}


def peak_rss(cmd: list[str], env: dict | None = None) -> tuple[int, float, int]:
    """-> (peak RSS bytes of the child, seconds, return code)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)      # its progress bars: our stderr
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.time() - t0, p.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--ratio-strategy", default="fixed")
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--calib-windows", type=int, default=2)
    ap.add_argument("--calib-ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()

    root = Path.home() / ".cache" / "hiq2gguf" / "bench" / f"stream-llama-{a.layers}x{a.hidden}x{a.intermediate}"
    t0 = time.time()
    model = make_model(root, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads)
    print(f"model {model} ({time.time() - t0:.0f} s to make or find)")
    size = sizes(model)
    two_blocks = 2 * size["block"] + size["embeddings"]

    base, _, rc = peak_rss([sys.executable, "-c", BASELINE])
    assert rc == 0, "baseline child failed"
    env = {**os.environ, "HIQ2GGUF_CACHE": str(root / "cache")}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        out = Path(tmp) / "out.gguf"
        cmd = [sys.executable, "-m", "hiq2gguf", "convert", str(model), "-o", str(out), "--stream", "--no-eval",
               "--bpw", str(a.bpw), "--method", a.method, "--ratio-strategy", a.ratio_strategy,
               "--calib-windows", str(a.calib_windows), "--calib-ctx", str(a.calib_ctx),
               "--threads", str(a.threads)]
        peak, seconds, rc = peak_rss(cmd, env)
        if rc:
            print(f"conversion failed (rc {rc})")
            return 1
        out_bytes = out.stat().st_size

    mib = 1 << 20
    rows = [
        {"what": "full model (float32)", "bytes": size["full"]},
        {"what": "two blocks + embeddings (float32)", "bytes": two_blocks},
        {"what": "baseline: python + torch + imports (peak RSS)", "bytes": base},
        {"what": "streamed conversion (peak RSS)", "bytes": peak},
        {"what": "streamed conversion - baseline", "bytes": peak - base},
    ]
    print(f"{size['blocks']} blocks of {size['block'] / mib:.1f} MiB, embeddings {size['embeddings'] / mib:.1f} MiB; "
          f"--method {a.method} --ratio-strategy {a.ratio_strategy}, {a.calib_windows}x{a.calib_ctx} calibration "
          f"tokens; conversion {seconds:.0f} s, output {out_bytes / mib:.1f} MiB")
    for r in rows:
        print(f"  {r['what']:<48} {r['bytes'] / mib:9.1f} MiB")
    added = peak - base
    print(f"conversion adds {added / mib:.0f} MiB to the interpreter: {added / two_blocks:.2f} x (two blocks + "
          f"embeddings), {added / size['full']:.2f} x the full model")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": vars(a), "seconds": seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
