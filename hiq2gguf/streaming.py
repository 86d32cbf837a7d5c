"""Streaming conversion (``convert --stream``): a Hugging Face safetensors model with
one transformer block in memory at a time.

- ``StreamedModel``: the model's skeleton on the meta device; the tensors outside
  the blocks (embeddings, final norm, head, rotary tables) are loaded once, a
  block's weights are read from the safetensors files only while that block is
  processed (``with sm.block(i):``) and dropped after.
- ``StreamedCalibration``: the Fisher diagonal and the gradient estimator's rows
  need per-sequence gradients through the whole model. Forward block by block,
  keeping only the hidden states at block boundaries (on disk, in the checkpoint
  directory); the loss gradient at the last boundary from the head; then
  backward block by block from the last, recomputing each block's forward from
  its saved input with only that block's weights loaded. Every boundary and every
  finished block is checkpointed, so a killed calibration resumes.
- Quantization: the same quantizers as the in-memory path (``sequential.py``),
  driven block by block, each block checkpointed (``resume.py``).
- Writing: tensor infos first (the sizes of our types are known from the plan),
  then the data tensor by tensor from the checkpoints (``writer.write_gguf_streaming``).

Peak memory: the embeddings (and an untied head), about two blocks of weights
(the block, its gradients or candidate perturbations), and the calibration
activations of one block boundary. Torch perplexities need the whole model, so
with ``--stream`` only the file's (llama.cpp) perplexity is measured.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hiq2gguf.formats import FormatError, HIQ2Type
from hiq2gguf.model_io import ModelSourceError


class StreamingError(ModelSourceError):
    """A source or a setting ``--stream`` cannot work with."""


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """``names`` from their safetensors files, as float32.

    Plain reads into fresh tensors, not safetensors' memory map: tensors from a
    mapping keep it alive, and the mapped pages they touched count as resident
    memory on top of the float32 copy (twice the embeddings at start-up)."""
    import json as _json
    import struct

    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    out = {}
    for path, ns in by_file.items():
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = _json.loads(f.read(header_len))
            for n in ns:
                info = header[n]
                if info["dtype"] not in _DTYPES:
                    raise StreamingError(f"{path.name}: {n} has dtype {info['dtype']} (supported: "
                                         f"{', '.join(_DTYPES)})")
                t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
                begin, end = info["data_offsets"]
                if t.numel() * t.element_size() != end - begin:
                    raise StreamingError(f"{path.name}: {n}: {end - begin} bytes for shape {info['shape']}")
                f.seek(8 + header_len + begin)
                if t.numel() and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - begin:
                    raise StreamingError(f"{path.name}: truncated at {n}")
                out[n] = t.to(torch.float32)
                if not torch.isfinite(out[n]).all():
                    raise StreamingError(f"{path.name}: {n}: the weights hold NaN or inf")
    return out


def give_freed_memory_back() -> None:
    """Allocations of 1 MiB and more get their own mappings, returned to the system
    when freed. Otherwise glibc raises its mmap threshold after the first large
    frees and serves later tensors from the heap, which it does not shrink: freed
    block weights and quantizer temporaries would stay resident (seen: +250 MiB on
    24 blocks of 44 MiB)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD
        except (OSError, AttributeError):                   # not glibc: nothing to tune
            pass


def safetensors_index(path: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """tensor name -> file and -> shape, from the safetensors headers alone."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise StreamingError(f"{path}: --stream reads safetensors weights; this directory has none")
    where, shapes = {}, {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for n in h.keys():
                where[n] = f
                shapes[n] = tuple(h.get_slice(n).get_shape())
    return where, shapes


class StreamedModel:
    """A causal LM whose blocks hold weights only inside ``with self.block(i)``."""

    def __init__(self, path: Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        from converters import converter_for
        from hiq2gguf.sequential import decoder_blocks

        self.path = Path(path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.converter = converter_for(self.config)
        self.files, self.shapes = safetensors_index(self.path)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.model.eval()
        self.blocks = decoder_blocks(self.model)
        if len(self.blocks) != self.converter.n_layers:
            raise StreamingError(f"{self.path}: {len(self.blocks)} decoder blocks, config says "
                                 f"{self.converter.n_layers}")
        names = list(self.model.state_dict())
        self.names = [n for n in names if not self.converter.skip(n)]
        missing = [n for n in self.names if n not in self.files]
        if missing:
            raise StreamingError(f"{self.path}: tensors missing from the safetensors files: {missing[:5]}")
        self.block_names = {i: [n for n in names if n.startswith(prefix)]
                            for i, (prefix, _) in enumerate(self.blocks)}
        in_blocks = {n for ns in self.block_names.values() for n in ns}
        for n, t in _read(self.files, [n for n in self.names if n not in in_blocks]).items():
            self._set(n, t)
        self._rebuild_computed_buffers()
        if getattr(self.config, "tie_word_embeddings", False) and self.model.get_output_embeddings() is not None:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def _set(self, name: str, t: torch.Tensor) -> None:
        mod_name, attr = name.rsplit(".", 1)
        mod = self.model.get_submodule(mod_name)
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t

    def _rebuild_computed_buffers(self) -> None:
        """Buffers computed at construction are not in the files: rotary frequency
        tables (the module is built again off the meta device) and Gemma3's embedding
        scale (a constant the module also keeps as a float)."""
        for name, mod in list(self.model.named_modules()):
            if not any(b.is_meta for b in mod.buffers(recurse=False)):
                continue
            if name.endswith("rotary_emb"):
                parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
                setattr(self.model.get_submodule(parent), attr, type(mod)(config=self.config))
            elif hasattr(mod, "scalar_embed_scale") and mod.embed_scale.is_meta:
                mod.embed_scale = torch.tensor(mod.scalar_embed_scale)
            else:
                raise StreamingError(f"--stream: cannot materialize buffers of {name} ({type(mod).__name__})")

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor outside the blocks (kept in memory), or read from its file."""
        if self.converter.block_index(name) is None:
            try:
                return self.model.get_parameter(name).detach()
            except AttributeError:
                return self.model.get_buffer(name)
        return _read(self.files, [name])[name]

    @contextlib.contextmanager
    def block(self, i: int):
        """Block ``i`` with its weights loaded; they are dropped on leaving."""
        names = self.block_names[i]
        for n, t in _read(self.files, names).items():
            self._set(n, t)
        try:
            yield self.blocks[i][1]
        finally:
            for n in names:
                self._set(n, torch.empty(self.shapes[n], device="meta"))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for n in self.names:
            if self.converter.is_linear(n):
                s = self.shapes[n]
                if len(s) != 2 or s[1] % 64:
                    raise FormatError(f"{n}: shape {s} does not fit HIQ2 (input columns must be a multiple of 64)")
                shapes[n] = s
        if not shapes:
            raise FormatError("no linear weights found to quantize")
        return shapes


class LazyFisher(Mapping):
    """name -> Fisher diagonal, read per block from ``fisher-NNNN.pt`` (one block cached)."""

    def __init__(self, root: Path, names: list[str], block_index):
        self.root, self.names, self.block_index = root, names, block_index
        self._cached: tuple[int, dict] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        b = self.block_index(name)
        if b is None or name not in self.names:
            raise KeyError(name)
        if self._cached is None or self._cached[0] != b:
            self._cached = (b, torch.load(self.root / f"fisher-{b:04d}.pt", weights_only=True))
        return self._cached[1][name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class StreamedCalibration:
    """Fisher diagonal and (with ``candidates``) the gradient estimator's per-sequence
    rows, block-streamed; state in ``root`` (see the module docstring).

    Files: ``h-NNNN.pt`` hidden states entering block N for every window (N = L:
    after the last block), ``back-NNNN.pt`` the loss gradient w.r.t. them and the
    rows of block N, ``fisher-NNNN.pt``, and ``done.pt`` once complete."""

    def __init__(self, sm: StreamedModel, windows: list[list[int]], root: Path, candidates=None,
                 progress: bool = True):
        self.sm, self.windows, self.root = sm, windows, root
        self.candidates, self.progress = candidates, progress
        self.n = len(sm.blocks)
        self.kept_gradient_bytes = 4 << 30      # one block's per-window gradients kept up to this
        root.mkdir(parents=True, exist_ok=True)

    def _file(self, kind: str, b: int) -> Path:
        return self.root / f"{kind}-{b:04d}.pt"

    def run(self) -> tuple[LazyFisher, np.ndarray | None, float]:
        """-> (Fisher, rows [sequences, sum of candidates] or None, seconds spent)."""
        from hiq2gguf.resume import load_torch, save_torch
        from hiq2gguf.sequential import capture_block_inputs

        names = [n for n in self.sm.linear_shapes()]
        fisher = LazyFisher(self.root, names, self.sm.converter.block_index)
        done = self.root / "done.pt"
        if done.exists():
            d = load_torch(done)
            return fisher, d["rows"], d["seconds"]
        t0 = time.time()
        if not self._file("h", 0).exists():
            inputs, self.block_kwargs = capture_block_inputs(self.sm.model, self.windows)
            save_torch(self._file("h", 0), inputs)
        else:
            _, self.block_kwargs = capture_block_inputs(self.sm.model, self.windows[:1])
        self._forward()
        self._head()
        rows = self._backward()
        seconds = time.time() - t0          # this run's share (an interrupted earlier run's is not counted)
        save_torch(done, {"rows": rows, "seconds": seconds})
        for kind in ("h", "back"):
            for f in self.root.glob(f"{kind}-*.pt"):
                f.unlink()
        return fisher, rows, seconds

    @torch.no_grad()
    def _forward(self) -> None:
        from hiq2gguf.resume import load_torch, save_torch
        from hiq2gguf.sequential import run_block

        todo = [b for b in range(self.n) if not self._file("h", b + 1).exists()]
        for b in tqdm(todo, desc="calibrate: forward", unit="block", disable=not self.progress):
            h = load_torch(self._file("h", b))
            with self.sm.block(b) as block:
                h = [run_block(block, x, self.block_kwargs[b]) for x in h]
            save_torch(self._file("h", b + 1), h)

    def _head(self) -> None:
        from hiq2gguf.resume import load_torch, save_torch

        path = self._file("back", self.n)
        if path.exists():
            return
        model = self.sm.model
        norm = model.get_decoder().norm
        head = model.get_output_embeddings()
        cap = getattr(self.sm.config, "final_logit_softcapping", None)
        grads, losses = [], []
        for x, w in zip(load_torch(self._file("h", self.n)), self.windows):
            x = x.detach().requires_grad_(True)
            logits = head(norm(x))
            if cap:
                logits = torch.tanh(logits / cap) * cap
            ids = torch.tensor([w])
            loss = model.loss_function(logits=logits, labels=ids, vocab_size=self.sm.config.vocab_size)
            loss.backward()
            grads.append(x.grad.detach())
            losses.append(float(loss.detach()))
        save_torch(path, {"dh": grads, "rows": None, "loss": losses})

    def _backward(self) -> np.ndarray | None:
        from hiq2gguf.resume import load_torch, save_torch

        conv = self.sm.converter
        todo = [b for b in reversed(range(self.n)) if not self._file("back", b).exists()]
        bar = tqdm(total=self.n, initial=self.n - len(todo), desc="calibrate: backward", unit="block",
                   disable=not self.progress)
        for b in todo:
            dh = load_torch(self._file("back", b + 1))["dh"]
            h = load_torch(self._file("h", b))
            prefix = self.sm.blocks[b][0]
            with self.sm.block(b) as block:
                lin = {prefix + n: p for n, p in block.named_parameters() if conv.is_linear(prefix + n)}
                for p in lin.values():
                    p.requires_grad_(True)
                sums = {n: torch.zeros_like(p) for n, p in lin.items()}
                # the rows need every window's gradients again once the Fisher (which the
                # candidates' deltas depend on) is known: kept when they fit, else recomputed
                keep = self.candidates is not None and \
                    len(h) * sum(p.numel() for p in lin.values()) * 4 <= self.kept_gradient_bytes
                dh_in, kept = [], []
                for x, g_out in zip(h, dh):
                    grads, g_in = self._grads(b, block, lin, x, g_out)
                    for n, g in grads.items():
                        sums[n] += g.to(torch.float32) ** 2
                    dh_in.append(g_in)
                    if keep:
                        kept.append(grads)
                fisher = {n: s / len(h) for n, s in sums.items()}
                save_torch(self._file("fisher", b), fisher)
                rows = None
                if self.candidates is not None:
                    rows = self._rows(b, block, lin, h, dh, fisher, kept if keep else None)
                del kept
                for p in lin.values():
                    p.requires_grad_(False)
                del lin, sums, fisher                  # this block's weights go with the block
            save_torch(self._file("back", b), {"dh": dh_in, "rows": rows})
            bar.update()
        bar.close()
        if self.candidates is None:
            return None
        parts = [load_torch(self._file("back", b))["rows"] for b in range(self.n)]
        return np.concatenate(parts, axis=1)

    def _grads(self, b: int, block, lin, x, g_out):
        from hiq2gguf.sequential import run_block

        x = x.detach().requires_grad_(True)
        out = run_block(block, x, self.block_kwargs[b])
        out.backward(g_out)
        grads = {}
        for n, p in lin.items():
            grads[n] = p.grad
            p.grad = None
        return grads, x.grad.detach()

    def _rows(self, b: int, block, lin, h, dh, fisher, kept: list[dict] | None = None) -> np.ndarray:
        """<g_l(s), Delta_(l,m)> for the layers of this block and their candidates,
        as ``sensitivity.GradientProjection`` computes them (Deltas rounded to bfloat16);
        each window's gradients from ``kept`` or computed again."""
        from hiq2gguf.plan import layer_deltas

        layers = self.candidates.layers
        deltas = {n: [d.to(torch.bfloat16).to(torch.float32) for d in layer_deltas(layers[n], n, p.data)]
                  for n, p in lin.items()}
        rows = []
        for s, (x, g_out) in enumerate(zip(h, dh)):
            grads = kept[s] if kept is not None else self._grads(b, block, lin, x, g_out)[0]
            rows.append([float((grads[n].to(torch.float32) * d).sum()) for n in lin for d in deltas[n]])
        return np.asarray(rows, dtype=np.float64)


# ---- the conversion ------------------------------------------------------------------
def check_streamable(cfg, source) -> None:
    if source.gguf_path is not None or not source.path.is_dir():
        raise StreamingError("--stream reads a Hugging Face safetensors directory; "
                             f"{source.path} is a GGUF file (convert it without --stream)")
    if cfg.target != "hiq2":
        raise StreamingError("--stream writes HIQ2 types only (--target stock needs the whole model)")
    if cfg.ratio_strategy == "optimized" and cfg.ratio.estimator != "gradient":
        raise StreamingError("--stream estimates M with --estimator gradient only (the loss estimator "
                             "runs thousands of whole-model passes)")
    if not cfg.checkpoints:
        raise StreamingError("--stream keeps its blocks in OUT.partial/: it cannot run with --no-checkpoints")


def convert_streaming(cfg, out: Path, source, log, calib_dir: Path | None = None) -> dict:
    """``convert.convert`` with one block in memory at a time; returns the report's
    entries (see the module docstring). The block-streamed calibration (Fisher, the
    gradient estimator's rows) goes under ``calib_dir``, OUT.partial/ by default (then
    it goes with it): files of several budgets made from one model can share it, since
    it is keyed by the source, the calibration windows and the candidate members; the
    plan of each budget is kept there too, so every method of a budget uses one plan."""
    from transformers import AutoTokenizer

    from hiq2gguf import data
    from hiq2gguf.convert import quant_windows
    from hiq2gguf.learned import preset
    from hiq2gguf.plan import fixed_plan, forced_plan, hiq2_candidates, plan_bits, solve_plan
    from hiq2gguf.resume import (BlockCheckpoints, ResumableQuantizeFn, key_of, partial_dir, plan_spelling,
                                 save_json, source_digest)
    from hiq2gguf.sequential import block_quantize_fn, block_settings

    check_streamable(cfg, source)
    give_freed_memory_back()
    root = partial_dir(out)
    sm = StreamedModel(source.path)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    conv = sm.converter
    shapes = sm.linear_shapes()
    names = list(shapes)
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    bos = tokenizer.bos_token_id if add_bos else None

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    windows = data.calibration_windows(tokenize, cfg.calib_ctx, cfg.calib_windows, bos)
    src = source_digest(source.path)
    log(f"streaming {source.path}: {len(sm.blocks)} blocks, {len(names)} linear weights")
    report: dict = {"streaming": True}

    optimized = cfg.ratio_strategy == "optimized"
    elements = sum(s[0] * s[1] for s in shapes.values())
    # the gradient estimator's rows are needed unless the budget leaves one choice
    # (e.g. 2.5 bpw: every weight H0); a calibration with rows serves too, if one is done
    needs_rows = False
    if optimized:
        sizes = hiq2_candidates(names, {}, cfg.bpw, cfg.ratio)
        needs_rows = forced_plan(names, sizes, plan_bits(shapes, sizes, cfg.bpw), cfg.bpw * elements, "") is None
    base = Path(calib_dir or root)
    with_rows = base / f"stream-{key_of(src, cfg.threads, 'calibration', windows, sizes.settings)}" if optimized else None
    use_rows = needs_rows or (with_rows is not None and (with_rows / "done.pt").exists())
    calib_root = with_rows if use_rows else base / f"stream-{key_of(src, cfg.threads, 'calibration', windows, None)}"
    fisher = LazyFisher(calib_root, names, conv.block_index)
    cset = hiq2_candidates(names, fisher, cfg.bpw, cfg.ratio) if optimized else None
    calib = StreamedCalibration(sm, windows, calib_root, cset if use_rows else None, cfg.progress)
    fisher, rows, calib_seconds = calib.run()
    report["calibration"] = {"text": "boolq/calibration", "windows": len(windows), "ctx": cfg.calib_ctx,
                             "seconds": round(calib_seconds, 1)}

    # beside the calibration: files of one budget made by different methods share the plan
    # (with a solver time limit two solves of the same M may differ, and the methods would
    # then be compared on different mixes)
    plan_path = base / f"plan-{key_of(src, cfg.threads, 'plan', windows, cfg.bpw, cfg.ratio_strategy, repr(cfg.ratio))}.json"
    if plan_path.exists():
        from hiq2gguf.formats import get_type
        saved = json.loads(plan_path.read_text())
        plan, info = {n: get_type(t) for n, t in saved["plan"]}, saved["info"]
        log(f"plan from {plan_path}")
    elif not optimized:
        plan, info = fixed_plan(shapes, cfg.bpw), {"ratio_strategy": "fixed"}
    else:
        bits = plan_bits(shapes, cset, cfg.bpw)
        info = forced_plan(names, cset, bits, cfg.bpw * elements, "gradient")
        if info is None:
            M = rows.T @ rows / len(rows)
            plan, info = solve_plan(names, cset, bits, cfg.bpw * elements, M, rows, cfg.ratio,
                                    {"estimator_seconds": round(calib_seconds, 1),
                                     "estimator_cache": {"path": str(calib_root), "resumed": False}})
        else:
            plan, info = info
        info = {"ratio_strategy": "optimized", **info}
        s = info["solver"]
        log(f"gradient estimator (block-streamed), solver {s['method']}: {s['status']}, gap {s['gap']:.2g}")
    if not plan_path.exists():
        save_json(plan_path, {"plan": plan_spelling(plan), "info": info})
    report.update(info)

    t0 = time.time()
    windows = quant_windows(cfg, windows, tokenize, bos)
    report["calibration"]["quant_windows"] = len(windows)
    fn = block_quantize_fn(cfg.method, sm.model, plan, windows, fisher, preset(cfg.preset), cfg.progress, cfg.gptq)
    key = key_of(src, cfg.threads, "streamed blocks", windows, plan_spelling(plan), *block_settings(cfg))
    store = BlockCheckpoints(root, key, len(sm.blocks))
    rfn = ResumableQuantizeFn(fn, store, plan, conv.block_index, log)
    for b in tqdm(range(len(sm.blocks)), desc="quantize (streamed)", unit="block", disable=not cfg.progress):
        if rfn.done(b):
            continue
        with sm.block(b) as block:
            params = dict(block.named_parameters())
            prefix = sm.blocks[b][0]
            for n in (n for n in names if conv.block_index(n) == b):
                rfn(n, params[n[len(prefix):]].data, plan[n])
            del params                                 # this block's weights go with the block
    report["method"] = cfg.method
    report["blocks"] = [asdict(r) for r in rfn.records]
    report["quantize_seconds"] = round(time.time() - t0, 1)

    write_streamed(out, sm, source, tokenizer, plan, rfn,
                   {"ratio_strategy": cfg.ratio_strategy, "bpw_budget": float(cfg.bpw), "target": "hiq2"})
    shutil.rmtree(root, ignore_errors=True)
    bits = sum(s[0] * plan[n].row_bytes(s[1]) * 8 for n, s in shapes.items())
    report["bpw"] = bits / sum(s[0] * s[1] for s in shapes.values())
    return report


def write_streamed(out: Path, sm: StreamedModel, source, tokenizer, plan: dict[str, HIQ2Type], rfn, extra_kv) -> None:
    import gguf

    from hiq2gguf.formats import register_with_gguf
    from hiq2gguf.writer import EMBED_TYPE, LazyTensor, write_gguf_streaming

    register_with_gguf()                    # our type ids in gguf-py's enum
    conv = sm.converter
    tensors = []
    for n in sm.names:
        perm = conv.row_permutation(n)
        shape = sm.shapes[n]

        def permuted(a, perm=perm):
            return a if perm is None else a[perm]

        if n in plan:
            b = conv.block_index(n)
            tensors.append(LazyTensor(conv.gguf_name(n), (shape[0], plan[n].row_bytes(shape[1])), np.uint8,
                                      gguf.GGMLQuantizationType(plan[n].type_id),
                                      lambda n=n, b=b, p=permuted: p(rfn.packed(b)[n][1])))
        elif n.endswith("embed_tokens.weight") or n == "lm_head.weight":
            tensors.append(LazyTensor(conv.gguf_name(n), gguf.quant_shape_to_byte_shape(shape, EMBED_TYPE),
                                      np.uint8, EMBED_TYPE,
                                      lambda n=n, p=permuted: p(quantize_rows(sm.tensor(n).numpy(), EMBED_TYPE))))
        else:
            tensors.append(LazyTensor(conv.gguf_name(n), shape, np.float32, None,
                                      lambda n=n, p=permuted: p(conv.to_gguf_values(n, sm.tensor(n).numpy()))))
    write_gguf_streaming(out, conv, source, tokenizer, tensors, extra_kv)


def quantize_rows(w: np.ndarray, qtype, rows: int = 1024) -> np.ndarray:
    """gguf-py's quantizer a slice of rows at a time (its temporaries are several times
    the input: whole, they would dominate the peak of a streamed conversion). Rows are
    quantized independently, so the bytes are the same."""
    import gguf

    out = np.empty(gguf.quant_shape_to_byte_shape(w.shape, qtype), dtype=np.uint8)
    for r in range(0, w.shape[0], rows):
        out[r:r + rows] = gguf.quants.quantize(np.ascontiguousarray(w[r:r + rows], dtype=np.float32), qtype)
    return out
