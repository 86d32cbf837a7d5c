"""End to end on a tiny llama: `convert` with per-layer ratios writes a file within the
budget, a report with the solver's facts, and the plot beside it."""

import json

import pytest

from hiq2gguf.convert import ConvertConfig, convert
from hiq2gguf.inspect import inspect_gguf
from hiq2gguf.plan import RatioConfig


@pytest.mark.parametrize("estimator,bpw", [("loss", 3.0), ("gradient", 2.8)])
def test_optimized_convert_holds_budget(tiny_llama_dir, tmp_path, monkeypatch, estimator, bpw):
    monkeypatch.setenv("HIQ2GGUF_CACHE", str(tmp_path / "cache"))
    cfg = ConvertConfig(bpw=bpw, calib_windows=3, calib_ctx=64, method="rtn", evaluate=False, progress=False,
                        ratio=RatioConfig(estimator=estimator, ratios="H0,H2,H4"))
    out, rep = tmp_path / "m.gguf", tmp_path / "m.json"
    report = convert(cfg, out, str(tiny_llama_dir), rep)
    info = inspect_gguf(out)
    ours = [t for t in info["tensors"] if t["ours"]]
    file_bpw = sum(t["bytes"] * 8 for t in ours) / sum(t["elements"] for t in ours)
    assert file_bpw <= bpw and report["bpw"] == pytest.approx(file_bpw)
    assert {t["type"] for t in ours} <= {"HIQ2_H0", "HIQ2_H2", "HIQ2_H4"}
    saved = json.loads(rep.read_text())
    assert saved["estimator"] == estimator and saved["ratio_strategy"] == "optimized"
    assert set(saved["solver"]) >= {"name", "status", "objective", "gap", "seconds"}
    assert saved["solver"]["status"] == "optimal"
    assert rep.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the estimate of M is cached: a second run reuses it
    again = convert(cfg, tmp_path / "m2.gguf", str(tiny_llama_dir))
    assert again["estimator_cache"]["resumed"] and out.read_bytes() == (tmp_path / "m2.gguf").read_bytes()
