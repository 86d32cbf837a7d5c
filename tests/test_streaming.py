"""Resumable and streaming conversion: a conversion killed with SIGKILL and rerun
writes the same bytes as one that ran through; a changed config never reuses stale
blocks; ``--stream`` (one block in memory at a time, block-streamed gradients) writes
the same file as the in-memory conversion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_llama

N_BLOCKS = 4


@pytest.fixture(scope="module")
def four_block_llama(tmp_path_factory, smollm_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama4"), smollm_tokenizer, layers=N_BLOCKS, seed=3)


def convert_cmd(model: Path, out: Path, bpw: float = 3.0, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hiq2gguf", "convert", str(model), "-o", str(out), "--bpw", str(bpw),
            "--method", "gptq", "--ratio-strategy", "fixed", "--no-eval", "--calib-windows", "3",
            "--calib-ctx", "64", "--threads", "1", *extra]


def env(tmp_path: Path) -> dict:
    return {**os.environ, "HIQ2GGUF_CACHE": str(tmp_path / "cache")}


def run(cmd: list[str], tmp_path: Path) -> str:
    r = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def run_and_kill(cmd: list[str], tmp_path: Path, until: str, skip: tuple = ()) -> None:
    """Start ``cmd`` and SIGKILL it as soon as a file matching ``until`` (and not under
    a path in ``skip``) exists in the checkpoint directory, before it finishes."""
    out = Path(cmd[cmd.index("-o") + 1])
    partial = out.with_name(out.name + ".partial")
    p = subprocess.Popen(cmd, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while not [f for f in partial.glob(until) if not any(s in f.parents for s in skip)]:
            assert p.poll() is None, f"conversion ended (rc {p.returncode}) before {until} appeared"
            assert time.time() < deadline
            time.sleep(0.01)
        assert p.poll() is None and not out.exists(), "finished before it could be killed"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def whole(four_block_llama, tmp_path_factory) -> Path:
    """An uninterrupted in-memory conversion of ``convert_cmd``'s config."""
    tmp = tmp_path_factory.mktemp("whole")
    out = tmp / "whole.gguf"
    run(convert_cmd(four_block_llama, out), tmp)
    assert not (tmp / "whole.gguf.partial").exists()        # removed once the file is written
    return out


def test_killed_conversion_resumes_to_the_same_bytes(four_block_llama, whole, tmp_path):

    out = tmp_path / "resumed.gguf"
    run_and_kill(convert_cmd(four_block_llama, out), tmp_path, "calib-*.pt")     # during planning
    # a block counts as done once the state after it is written too (resume.BlockCheckpoints)
    run_and_kill(convert_cmd(four_block_llama, out), tmp_path, "blocks-*/state.pt")
    done = len(list(tmp_path.glob("resumed.gguf.partial/blocks-*/block-*.npz")))
    assert 0 < done < N_BLOCKS
    log = run(convert_cmd(four_block_llama, out), tmp_path)
    assert "calibration from" in log and "plan from" in log
    resumed = [line for line in log.splitlines() if line.startswith("resuming:")]
    assert resumed and resumed[0].endswith(f"/{N_BLOCKS} blocks done")
    assert 0 < int(resumed[0].split()[1].split("/")[0]) < N_BLOCKS
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "resumed.gguf.partial").exists()


def test_changed_config_does_not_reuse_blocks(four_block_llama, tmp_path):
    from hiq2gguf.inspect import inspect_gguf

    out = tmp_path / "m.gguf"
    run_and_kill(convert_cmd(four_block_llama, out, 3.0), tmp_path, "blocks-*/block-0000.npz")
    stale = list(tmp_path.glob("m.gguf.partial/blocks-*"))
    assert len(stale) == 1
    # another budget: its first block is computed anew, the stale blocks are removed
    # killed once a block counts as done (its file, then the state after it)
    run_and_kill(convert_cmd(four_block_llama, out, 2.75), tmp_path, "blocks-*/state.pt", skip=(stale[0],))
    fresh = list(tmp_path.glob("m.gguf.partial/blocks-*"))
    assert len(fresh) == 1 and fresh != stale
    log = run(convert_cmd(four_block_llama, out, 2.75), tmp_path)
    assert "calibration from" in log and "resuming: " in log     # same calibration, its own blocks
    types = {t["type"] for t in inspect_gguf(out)["tensors"] if t["ours"]}
    assert types == {"HIQ2_H1"}                                  # 2.75 bpw: the fixed plan's member
    whole = tmp_path / "whole.gguf"
    run(convert_cmd(four_block_llama, whole, 2.75), tmp_path)
    assert out.read_bytes() == whole.read_bytes()


def test_streamed_model_holds_one_block(four_block_llama):
    from hiq2gguf.streaming import StreamedModel

    sm = StreamedModel(four_block_llama)
    loaded = lambda: [i for i, (_, blk) in enumerate(sm.blocks)  # noqa: E731
                      if any(not p.is_meta for p in blk.parameters())]
    assert loaded() == []
    assert not sm.model.get_input_embeddings().weight.is_meta
    assert sm.model.get_output_embeddings().weight is sm.model.get_input_embeddings().weight   # tied
    with sm.block(2) as blk:
        assert loaded() == [2] and blk is sm.blocks[2][1]
        assert all(p.dtype == torch.float32 for p in blk.parameters())
    assert loaded() == []


def test_block_streamed_gradients_match_whole_model(four_block_llama, smollm_tokenizer, tmp_path):
    """Fisher and the gradient estimator's rows from the block-by-block backward equal
    those of one backward through the whole model."""
    from converters import converter_for
    from hiq2gguf import model_io
    from hiq2gguf.calibrate import collect_fisher, linear_weights
    from hiq2gguf.plan import RatioConfig, hiq2_candidates, perturbations
    from hiq2gguf.sensitivity import GradientProjection
    from hiq2gguf.streaming import StreamedCalibration, StreamedModel

    torch.set_num_threads(1)
    ids = smollm_tokenizer("The quick brown fox jumps over the lazy dog. " * 30, add_special_tokens=False)["input_ids"]
    windows = [ids[:48], ids[48:96], ids[96:144]]
    model, _ = model_io.load(model_io.resolve(str(four_block_llama)))
    conv = converter_for(model.config)
    params = linear_weights(model, conv.is_linear)
    fisher = collect_fisher(model, params, windows, progress=False)
    cset = hiq2_candidates(list(params), fisher, 3.0, RatioConfig(ratios="H0,H2,H4"))
    rows = GradientProjection(model, params, perturbations(params, cset.layers, False))
    rows.estimate(windows)

    sm = StreamedModel(four_block_llama)
    streamed = StreamedCalibration(sm, windows, tmp_path / "calib", None, progress=False)
    s_fisher, _, _ = streamed.run()
    s_cset = hiq2_candidates(list(params), s_fisher, 3.0, RatioConfig(ratios="H0,H2,H4"))
    _, s_rows, _ = StreamedCalibration(sm, windows, tmp_path / "calib2", s_cset, progress=False).run()
    recomputing = StreamedCalibration(sm, windows, tmp_path / "calib3", s_cset, progress=False)
    recomputing.kept_gradient_bytes = 0            # gradients computed again instead of kept
    _, r_rows, _ = recomputing.run()
    np.testing.assert_array_equal(r_rows, s_rows)
    assert list(s_fisher) == list(params)
    for n in params:
        torch.testing.assert_close(s_fisher[n], fisher[n], rtol=1e-5, atol=1e-12)
        assert float(fisher[n].sum()) > 0
    P = np.stack(rows.rows)
    assert s_rows.shape == P.shape == (3, 3 * len(params))
    np.testing.assert_allclose(s_rows, P, rtol=1e-4, atol=1e-6 * np.abs(P).max())
    # only the Fisher files are left once a calibration is complete
    assert {f.name.split("-")[0] for f in (tmp_path / "calib").iterdir()} == {"fisher", "done.pt"}


def test_streamed_conversion_equals_in_memory(four_block_llama, whole, tmp_path):
    out = tmp_path / "streamed.gguf"
    log = run(convert_cmd(four_block_llama, out, 3.0, "--stream"), tmp_path)
    assert "streaming" in log
    assert out.read_bytes() == whole.read_bytes()


def test_streamed_optimized_plan_equals_in_memory(four_block_llama, tmp_path, monkeypatch):
    from hiq2gguf.convert import ConvertConfig, convert
    from hiq2gguf.plan import RatioConfig

    monkeypatch.setenv("HIQ2GGUF_CACHE", str(tmp_path / "cache"))
    cfg = dict(bpw=2.9, calib_windows=3, calib_ctx=64, method="rtn", evaluate=False, progress=False, threads=1,
               ratio=RatioConfig(ratios="H0,H2,H4", cache=False))
    mem = convert(ConvertConfig(**cfg), tmp_path / "mem.gguf", str(four_block_llama))
    streamed = convert(ConvertConfig(**cfg, stream=True), tmp_path / "streamed.gguf", str(four_block_llama))
    assert streamed["solver"]["status"] == mem["solver"]["status"] == "optimal"
    assert [t["type"] for t in streamed["tensors"]] == [t["type"] for t in mem["tensors"]]
    assert len({t["type"] for t in mem["tensors"] if t["ratio"] is not None}) > 1    # a real mix
    assert streamed["bpw"] == pytest.approx(mem["bpw"]) and streamed["bpw"] <= 2.9
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()


def test_killed_streamed_conversion_resumes(four_block_llama, whole, tmp_path):
    out = tmp_path / "s.gguf"
    cmd = convert_cmd(four_block_llama, out, 3.0, "--stream")
    run_and_kill(cmd, tmp_path, "stream-*/back-0002.pt")        # in the block-streamed backward
    run_and_kill(cmd, tmp_path, "blocks-*/block-0001.npz")
    log = run(cmd, tmp_path)
    assert any(line.startswith("resuming: ") for line in log.splitlines())
    assert out.read_bytes() == whole.read_bytes()


def test_stream_refuses_what_it_cannot_do(tmp_path):
    from hiq2gguf.model_io import default_model_path

    r = subprocess.run([sys.executable, "-m", "hiq2gguf", "convert", str(default_model_path()), "-o",
                        str(tmp_path / "x.gguf"), "--bpw", "3", "--stream", "--no-eval"],
                       env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "safetensors directory" in r.stderr


def test_reads_safetensors_without_a_memory_map(tmp_path):
    from safetensors.torch import save_file

    from hiq2gguf.streaming import StreamingError, _read, safetensors_index

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(64, generator=g).to(torch.bfloat16),
               "c": torch.randn(3, 2, generator=g).to(torch.float16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    files, shapes = safetensors_index(tmp_path)
    assert shapes == {"a": (5, 7), "b": (64,), "c": (3, 2)}
    got = _read(files, ["c", "a", "b"])
    for n, t in tensors.items():
        assert got[n].dtype == torch.float32 and torch.equal(got[n], t.to(torch.float32))
    maps = Path("/proc/self/maps").read_text()
    assert "x.safetensors" not in maps
    tensors["a"][2, 3] = float("nan")
    save_file(tensors, str(tmp_path / "x.safetensors"))
    assert torch.equal(_read(files, ["b"])["b"], tensors["b"].to(torch.float32))
    with pytest.raises(StreamingError, match="x.safetensors: a: the weights hold NaN or inf"):
        _read(files, ["a"])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "gemma3_text"])
def test_streamed_equals_in_memory_on_other_architectures(arch, smollm_tokenizer, tmp_path, monkeypatch):
    """Biases (qwen2), q/k norms (qwen3), untied heads, sliding windows (gemma3): the
    block-streamed conversion reads and writes them like the in-memory one, byte for byte."""
    from hiq2gguf.convert import ConvertConfig, convert
    from hiq2gguf.plan import RatioConfig
    from tests.test_architectures import ARCHITECTURES, make_tiny_model

    monkeypatch.setenv("HIQ2GGUF_CACHE", str(tmp_path / "cache"))
    d = make_tiny_model(tmp_path / arch, smollm_tokenizer, ARCHITECTURES[arch], seed=1)
    cfg = dict(bpw=2.9, calib_windows=2, calib_ctx=64, method="gptq", evaluate=False, progress=False, threads=1,
               ratio=RatioConfig(ratios="H0,H2,H4", cache=False))
    mem = convert(ConvertConfig(**cfg), tmp_path / "mem.gguf", str(d))
    streamed = convert(ConvertConfig(**cfg, stream=True), tmp_path / "streamed.gguf", str(d))
    assert [t["type"] for t in streamed["tensors"]] == [t["type"] for t in mem["tensors"]]
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()


def test_budgets_share_one_streamed_calibration(four_block_llama, tmp_path, monkeypatch):
    """compare_stock --stream: with ``calib_dir`` the second budget finds the block-streamed
    calibration done (no block runs again) and its file equals a conversion of its own."""
    from dataclasses import replace

    from hiq2gguf import model_io
    from hiq2gguf.convert import ConvertConfig, convert
    from hiq2gguf.plan import RatioConfig
    from hiq2gguf.streaming import StreamedCalibration, convert_streaming

    monkeypatch.setenv("HIQ2GGUF_CACHE", str(tmp_path / "cache"))
    cfg = ConvertConfig(bpw=2.75, calib_windows=3, calib_ctx=64, method="rtn", evaluate=False, progress=False,
                        threads=1, stream=True, ratio=RatioConfig(ratios="H0,H2,H4", cache=False))
    source = model_io.resolve(str(four_block_llama))
    shared = tmp_path / "calib"
    convert_streaming(cfg, tmp_path / "a.gguf", source, print, calib_dir=shared)
    assert len(list(shared.glob("stream-*/done.pt"))) == 1
    calls = []
    monkeypatch.setattr(StreamedCalibration, "_forward", lambda self: calls.append("forward"))
    b = convert_streaming(replace(cfg, bpw=3.0), tmp_path / "b.gguf", source, print, calib_dir=shared)
    assert calls == [] and b["bpw"] <= 3.0
    monkeypatch.undo()
    monkeypatch.setenv("HIQ2GGUF_CACHE", str(tmp_path / "cache2"))
    convert(replace(cfg, bpw=3.0), tmp_path / "own.gguf", str(four_block_llama))
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "own.gguf").read_bytes()
    # one plan per budget, kept beside the calibration: another method at 3.0 solves nothing
    assert len(list(shared.glob("plan-*.json"))) == 2
    monkeypatch.setattr("hiq2gguf.plan.solve_plan", lambda *a, **k: pytest.fail("solved the plan again"))
    c = convert_streaming(replace(cfg, bpw=3.0, method="gptq"), tmp_path / "c.gguf", source, print,
                          calib_dir=shared)
    from hiq2gguf.inspect import inspect_gguf
    types = {p: [t["type"] for t in inspect_gguf(tmp_path / p)["tensors"]] for p in ("b.gguf", "c.gguf")}
    assert types["b.gguf"] == types["c.gguf"] and c["solver"] == b["solver"]


def test_safetensors_copy_of_a_gguf_streams_the_same_weights(tmp_path, monkeypatch):
    """tools/bench_models.safetensors_copy: the HF directory --stream reads, made from a
    GGUF source, holds exactly the weights the loader gave, and is made once."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_models import safetensors_copy
    from hiq2gguf import model_io
    from hiq2gguf.streaming import StreamedModel

    gguf = tmp_path / "m.gguf"
    gguf.symlink_to(model_io.default_model_path())
    model, tok = model_io.load(model_io.resolve(str(gguf)))
    out = safetensors_copy(model, tok, gguf, print)
    assert out == tmp_path / "m.hf" and not (tmp_path / "m.hf.tmp").exists()
    sm = StreamedModel(out)
    params = dict(model.named_parameters())
    assert torch.equal(sm.tensor("model.embed_tokens.weight"), params["model.embed_tokens.weight"])
    with sm.block(3) as block:
        for n, p in block.named_parameters():
            assert torch.equal(p, params[f"model.layers.3.{n}"]), n
    mtime = (out / "config.json").stat().st_mtime
    assert safetensors_copy(None, None, gguf, print) == out and (out / "config.json").stat().st_mtime == mtime


def test_forced_budget_streams_without_the_estimator(four_block_llama, tmp_path, monkeypatch):
    """At a budget that leaves one choice (2.5 bpw: every weight H0) the block-streamed
    calibration computes the Fisher only (no candidate rows), and the file is the
    in-memory conversion's."""
    from hiq2gguf.convert import ConvertConfig, convert
    from hiq2gguf.plan import RatioConfig
    from hiq2gguf.streaming import StreamedCalibration

    monkeypatch.setenv("HIQ2GGUF_CACHE", str(tmp_path / "cache"))
    cfg = dict(bpw=2.5, calib_windows=3, calib_ctx=64, method="gptq", evaluate=False, progress=False, threads=1,
               ratio=RatioConfig(ratios="H0,H2,H4", cache=False))
    rows_asked = []
    real_rows = StreamedCalibration._rows
    monkeypatch.setattr(StreamedCalibration, "_rows", lambda self, *a: rows_asked.append(1) or real_rows(self, *a))
    streamed = convert(ConvertConfig(**cfg, stream=True), tmp_path / "streamed.gguf", str(four_block_llama))
    assert rows_asked == [] and streamed["solver"]["method"] == "forced"
    assert {t["type"] for t in streamed["tensors"] if t["ratio"] is not None} == {"HIQ2_H0"}
    convert(ConvertConfig(**cfg), tmp_path / "mem.gguf", str(four_block_llama))
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()


def test_quant_windows_feed_gptq_in_both_paths(four_block_llama, tmp_path, monkeypatch):
    """``quant_windows``: GPTQ's Hessians come from more calibration windows than the
    Fisher's, in memory and block-streamed alike (equal files), and they change its codes."""
    from hiq2gguf.convert import ConvertConfig, convert
    from hiq2gguf.plan import RatioConfig

    monkeypatch.setenv("HIQ2GGUF_CACHE", str(tmp_path / "cache"))
    cfg = dict(bpw=2.5, calib_windows=2, calib_ctx=64, method="gptq", evaluate=False, progress=False, threads=1,
               ratio=RatioConfig(ratios="H0,H2,H4", cache=False))
    mem = convert(ConvertConfig(**cfg, quant_windows=5), tmp_path / "mem.gguf", str(four_block_llama))
    streamed = convert(ConvertConfig(**cfg, quant_windows=5, stream=True), tmp_path / "streamed.gguf",
                       str(four_block_llama))
    assert mem["calibration"]["windows"] == 2 and mem["calibration"]["quant_windows"] == 5
    assert streamed["calibration"]["quant_windows"] == 5
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()
    convert(ConvertConfig(**cfg), tmp_path / "fisher_windows.gguf", str(four_block_llama))
    assert (tmp_path / "fisher_windows.gguf").read_bytes() != (tmp_path / "mem.gguf").read_bytes()
