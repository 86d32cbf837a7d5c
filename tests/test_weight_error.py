"""tools/weight_error.py: the format screening benchmark (importance-weighted error of
our members and of ggml's stock quantizers on the same weights)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import weight_error  # noqa: E402
from compare_stock import stock_front  # noqa: E402


def test_front_bpw_inverts_the_stock_curve():
    front = stock_front([(2.0, 0.10, "A"), (2.5, 0.06, "B"), (2.7, 0.07, "C"), (3.0, 0.02, "D")])
    assert [n for _, _, n in front] == ["A", "B", "D"]
    assert weight_error.front_bpw_at(front, 0.08) == pytest.approx(2.25)
    assert weight_error.front_bpw_at(front, 0.04) == pytest.approx(2.75)
    assert weight_error.front_bpw_at(front, 0.2) is None       # worse than the smallest stock file
    assert weight_error.front_bpw_at(front, 0.01) is None      # better than the largest


def test_measure_and_report_on_a_random_weight(runtime_lib):
    from hiq2gguf import formats
    from hiq2gguf.stock import parse_stock_types

    formats.register_with_gguf()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 512)) * np.exp(0.5 * rng.standard_normal(512))).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal(512)).astype(np.float32)
    stock = parse_stock_types("IQ2_XS,Q2_K,IQ3_XXS,Q4_0")
    res = weight_error.measure(w, imp, stock, weight_error.parse_ours("e8,0,2,8"), threads=2)
    assert set(res) == {"IQ2_XS", "Q2_K", "IQ3_XXS", "Q4_0", "HIQ2_E8", "HIQ2_H0", "HIQ2_H2", "HIQ2_H8"}
    err = {n: e for n, (_, e) in res.items()}
    assert res["HIQ2_H2"][0] == 3.0 and res["Q2_K"][0] == pytest.approx(2.625)
    assert err["HIQ2_H8"] < err["HIQ2_H2"] < err["HIQ2_H0"] < 0.5    # more 4-bit groups, less error
    assert err["HIQ2_E8"] < err["HIQ2_H0"]                          # the lattice at the same 2.5 bpw
    assert err["Q4_0"] < err["IQ3_XXS"] < err["IQ2_XS"]
    # a 576-wide row takes none of the 256-weight-block types
    narrow = weight_error.measure(w[:, :448].copy(), imp[:448].copy(), stock, weight_error.parse_ours("0"), threads=2)
    assert set(narrow) == {"Q4_0", "HIQ2_H0"}

    text = weight_error.report({"a": res, "b": narrow}, "random", {"HIQ2_E8", "HIQ2_H0", "HIQ2_H2", "HIQ2_H8"})
    assert "over a (the weights every type fits; left out: b)" in text
    h2 = next(line for line in text.splitlines() if line.startswith("HIQ2_H2") and "stock" not in line
              and len(line.split()) > 3)
    # ratio column = our error / the stock front's error at 3.0 bpw (IQ2_XS..IQ3_XXS line)
    front = stock_front([(b, e, n) for n, (b, e) in res.items() if not n.startswith("HIQ2")])
    from compare_stock import stock_at
    assert float(h2.split()[4]) == pytest.approx(err["HIQ2_H2"] / stock_at(front, 3.0)[0], abs=1e-3)


def test_bad_arguments_fail_before_any_work(capsys):
    assert weight_error.main(["--ours", "9"]) == 2
    assert "not one of our types" in capsys.readouterr().err
    assert weight_error.main(["--ours", "e8_3k"]) == 2
    assert "'e8_3k' is not one of our types" in capsys.readouterr().err
    assert [t.name for t in weight_error.parse_ours("e8_8k,2,E8")] == ["HIQ2_E8_8K", "HIQ2_H2", "HIQ2_E8"]
    assert weight_error.main(["--stock", "Q9_K"]) == 2
    assert "unknown Q9_K" in capsys.readouterr().err
