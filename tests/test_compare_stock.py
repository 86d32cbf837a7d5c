"""tools/compare_stock.py and tools/llamacpp.py: the stock curve our files are measured
against, the mix syntax, and llama-quantize files read back (stored types, true bpw)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import compare_stock  # noqa: E402
import llamacpp  # noqa: E402
from compare_stock import CompareError, StockSpec, below_stock, stock_at, stock_front  # noqa: E402

# (bpw, ppl, name): C is beaten by the smaller B, so it is off the front
STOCK = [(2.3, 100.0, "A"), (2.6, 70.0, "B"), (2.8, 75.0, "C"), (3.1, 50.0, "D")]


def test_front_drops_files_a_smaller_file_beats():
    assert [n for _, _, n in stock_front(STOCK)] == ["A", "B", "D"]


def test_stock_curve_interpolates_between_front_files():
    front = stock_front(STOCK)
    ppl, how = stock_at(front, 2.85)                       # half-way from B (2.6) to D (3.1)
    assert ppl == pytest.approx(70.0 + 0.5 * (50.0 - 70.0))
    assert "B@2.600" in how and "D@3.100" in how
    assert stock_at(front, 2.6)[0] == pytest.approx(70.0)
    assert stock_at(front, 3.5)[0] == 50.0                 # above the largest: its ppl holds
    assert stock_at(front, 2.0) is None                    # below the smallest: nothing to compare


def test_below_stock_checks_every_breakpoint():
    front = stock_front(STOCK)
    # below at our own points (2.5, 3.0) but above the stock curve at B's bpw (2.6):
    # (stock 80 and 54 there) the straight line 2.5 -> 3.0 passes 2.6 at 71.4 > 70
    ours = [(2.5, 78.0), (3.0, 45.0)]
    assert stock_at(front, 2.5)[0] > 78.0 and stock_at(front, 3.0)[0] > 45.0
    verdict, checked = below_stock(ours, front, 2.5, 3.0)
    assert verdict is False
    assert any(x == pytest.approx(2.6) and o > s for x, o, s in checked)
    verdict, _ = below_stock([(2.5, 60.0), (3.0, 45.0)], front, 2.5, 3.0)
    assert verdict is True
    assert below_stock([(3.2, 10.0), (3.4, 9.0)], front, 2.5, 3.0) == (None, [])


def test_stock_spec_syntax():
    s = StockSpec.parse("iq2_xs+ffn_down=IQ3_XXS+attn_[kv]=q4_k")
    assert s.ftype == "IQ2_XS" and s.tensor_types == ("ffn_down=iq3_xxs", "attn_[kv]=q4_k")
    assert s.name == "IQ2_XS+ffn_down=iq3_xxs+attn_[kv]=q4_k"
    assert "/" not in s.file_name() and "=" not in s.file_name()
    with pytest.raises(CompareError, match="PATTERN=TYPE"):
        StockSpec.parse("Q2_K+ffn_down")
    with pytest.raises(CompareError, match="bad pattern"):
        StockSpec.parse("Q2_K+attn_[=q4_k")


def test_default_stock_follows_row_widths():
    narrow = {"a": (128, 576), "b": (576, 1536)}
    wide = {"a": (256, 1536), "b": (1536, 8960)}
    assert set(compare_stock.MIXES["k64"]) <= set(compare_stock.default_stock(narrow))
    assert set(compare_stock.MIXES["k256"]) <= set(compare_stock.default_stock(wide))
    assert {"Q2_0", "IQ2_XS", "IQ3_XXS"} <= set(compare_stock.default_stock(narrow))


def test_llama_quantize_q2_0_mix_read_back(tmp_path, tiny_llama_dir, runtime_lib):
    """Q2_0 (ggml id 42, unknown to the pinned gguf package) with one override: the file
    reads back with the stored types and the bpw their block sizes give."""
    from hiq2gguf.convert import Conversion, ConvertConfig
    from hiq2gguf.writer import write_gguf

    assert "Q2_0" in llamacpp.quantize_types()
    conv = Conversion(ConvertConfig(bpw=3.0, evaluate=False, progress=False, threads=1), str(tiny_llama_dir))
    f32 = tmp_path / "f32.gguf"
    write_gguf(f32, conv.converter, conv.model, conv.source, conv.tokenizer, {}, {}, {})
    out = llamacpp.quantize(f32, tmp_path / "q2_0.gguf", "Q2_0", 1, tensor_types=("ffn_down=q4_0",))
    stats = llamacpp.file_stats(out)
    downs = [s for n, s in conv.shapes.items() if "down_proj" in n]
    others = [s for n, s in conv.shapes.items() if "down_proj" not in n]
    assert stats["types"] == {"Q4_0": len(downs), "Q2_0": len(others)}
    bits = sum(r * c for r, c in downs) * 18 * 8 / 32 + sum(r * c for r, c in others) * 18 * 8 / 64
    assert stats["bpw"] == pytest.approx(bits / sum(r * c for r, c in conv.shapes.values()))
    assert llamacpp.seconds(out) is not None
    assert llamacpp.file_stats(out) == stats               # from the cache beside the file


def test_streamed_comparison_makes_the_in_memory_files(tmp_path, tiny_llama_dir, runtime_lib, capsys):
    """The whole benchmark on a tiny model, once in memory and once with --stream: the
    same rows, our file byte for byte the same, and a rerun skips finished rows."""
    common = ["--model", str(tiny_llama_dir), "--bpw", "2.75", "--methods", "rtn", "--stock", "Q4_0",
              "--eval-windows", "1", "--calib-windows", "2", "--threads", "1",
              "--workdir", str(tmp_path / "work")]
    rows = {}
    for mode, extra in (("memory", []), ("stream", ["--stream"])):
        out = tmp_path / mode
        assert compare_stock.main(common + extra + ["--outdir", str(out), "--json", str(out / "rows.json")]) == 0
        data = json.loads((out / "rows.json").read_text())
        rows[mode] = {r["name"]: r for r in data["rows"]}
        assert list((out).glob("rows-*.png"))
    assert set(rows["memory"]) == set(rows["stream"]) == {"reference", "Q4_0", "ours-rtn@2.75"}
    ours = {m: rows[m]["ours-rtn@2.75"] for m in rows}
    assert Path(ours["memory"]["file"]).read_bytes() == Path(ours["stream"]["file"]).read_bytes()
    assert 2.5 < ours["stream"]["bpw"] <= 2.75 + 1e-9 and ours["stream"]["streamed"]
    assert rows["stream"]["Q4_0"]["types"].get("Q4_0")
    for r in rows["stream"].values():
        assert all(1 < r[k] < 1e6 for k in ("ppl_boolq", "ppl_lambada")), r    # finite, above the floor
    capsys.readouterr()
    out = tmp_path / "stream"
    assert compare_stock.main(common + ["--stream", "--outdir", str(out), "--json", str(out / "rows.json")]) == 0
    printed = capsys.readouterr().out
    assert "quantizing" not in printed and "llama-quantize Q4_0" not in printed
    assert "ours-rtn@2.75" in printed


def test_runs_writing_one_json_keep_each_others_rows(tmp_path):
    """Two runs at once on one --json (one per method on a big model): neither loses
    the other's rows or costs, and settings that differ are refused."""
    path = tmp_path / "rows.json"
    settings = {"eval_windows": 8}
    a = compare_stock.Results(path, "m", settings)
    b = compare_stock.Results(path, "m", settings)
    a.costs["imatrix_minutes"] = 3.0
    a.add({"model": "m", "name": "reference", "ppl_boolq": 10.0})
    b.costs["calibration_minutes"] = 12.0
    b.add({"model": "m", "name": "ours-gptq@2.5", "ppl_boolq": 40.0})
    a.add({"model": "m", "name": "IQ2_S", "ppl_boolq": 30.0})
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["rows"]] == ["reference", "ours-gptq@2.5", "IQ2_S"]
    assert data["costs"]["m"] == {"imatrix_minutes": 3.0, "calibration_minutes": 12.0}
    assert a.has("ours-gptq@2.5") and b.has("reference")
    again = compare_stock.Results(path, "m", settings)
    assert again.has("IQ2_S") and again.all_costs()["calibration_minutes"] == 12.0
    with pytest.raises(CompareError, match="other settings"):
        compare_stock.Results(path, "m", {"eval_windows": 40})
