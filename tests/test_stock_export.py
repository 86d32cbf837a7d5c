"""`convert --target stock`: the ratio optimizer picks a stock llama.cpp type per linear
weight (ggml's own quantizers through ctypes, with our importance matrix); the file
holds only stock types, stays within the budget, matches the PyTorch model bit for
bit and runs in llama.cpp."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_llama
from tests.test_cli_errors import assert_clean_failure, cli

BUDGET = 3.6
# llama.cpp rounds the activations to 8 bits (Q8_K for k- and i-quants, Q8_0 for the
# legacy types) before its dot products; PyTorch multiplies in float32. On this model
# that noise measured 2.5 % mean and 21 % max of the logits' standard deviation (the
# HIQ2 file of test_llama_runtime: 1.4 % and 9 %; these are 4 layers of mostly k-quants).
# A wrong layout, permutation or type gives errors the size of the logits themselves.
MEAN_TOL = 0.04
MAX_TOL = 0.35
# the ids an unpatched llama.cpp knows (everything but our HIQ2 family, 100..108)
STOCK_IDS = {int(t) for t in gguf.GGMLQuantizationType if int(t) < 100}


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory, smollm_tokenizer):
    """Every input width a multiple of 256: all k- and i-quants apply."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny256"), smollm_tokenizer, hidden=256, intermediate=512)


@pytest.fixture(scope="module")
def exported(tiny256, runtime_lib, tmp_path_factory):
    """The conversion's steps (to keep its PyTorch model) and the written file."""
    from hiq2gguf.convert import Conversion, ConvertConfig
    from hiq2gguf.plan import RatioConfig

    cfg = ConvertConfig(bpw=BUDGET, target="stock", calib_windows=3, calib_ctx=64, evaluate=False,
                        progress=False, ratio=RatioConfig(estimator="loss", cache=False))   # exact MILP
    conv = Conversion(cfg, str(tiny256))
    calib = conv.calibrate()
    plan, info = conv.plan(calib)
    packed, stock = conv.quantize(plan, calib)
    out = tmp_path_factory.mktemp("stock-out") / "stock.gguf"
    report = conv.write(out, packed, stock)
    return conv, calib, plan, info, report, out


def test_file_within_budget_and_only_stock_types(exported):
    from hiq2gguf.gguf_io import open_reader
    from hiq2gguf.stock import STOCK_TYPES

    conv, calib, plan, info, report, out = exported
    reader = open_reader(out)
    assert {int(t.tensor_type) for t in reader.tensors} <= STOCK_IDS
    # a plain gguf-py (our types never registered in that process) reads every tensor
    code = ("import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); "
            "print(' '.join(sorted({t.tensor_type.name for t in r.tensors})))")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {t.tensor_type.name for t in reader.tensors} >= {"F32", "Q8_0"}
    by_name = {t.name: t for t in reader.tensors}
    bits = elements = 0
    for hf_name, t in plan.items():
        tensor = by_name[conv.converter.gguf_name(hf_name)]
        assert tensor.tensor_type.name == t.name and t.name in STOCK_TYPES
        rows, cols = conv.shapes[hf_name]
        assert tensor.n_bytes == rows * cols // t.block_size * t.type_size
        bits += tensor.n_bytes * 8
        elements += rows * cols
    assert bits / elements <= BUDGET and report["bpw"] == pytest.approx(bits / elements)
    assert info["solver"]["status"] == "optimal"
    assert {t.name for t in plan.values()} <= set(info["candidates"])
    # the importance matrix is the per-column mean squared input of each weight
    assert all(calib.input_squares[n].shape == (conv.shapes[n][1],) for n in plan)
    assert all(bool((calib.input_squares[n] > 0).all()) for n in plan)


def test_torch_weights_equal_the_files(exported):
    """ggml's to_float (PyTorch model) and gguf-py's numpy dequantization (file) agree."""
    from hiq2gguf.reader import dequantized_state

    conv, _, plan, _, _, out = exported
    shapes = {n: tuple(p.shape) for n, p in conv.model.state_dict().items()}
    state = dequantized_state(out, conv.converter, shapes)
    for n in plan:
        ours = conv.model.get_parameter(n).detach().numpy()
        np.testing.assert_array_equal(ours.view(np.uint32), state[n].view(np.uint32), err_msg=n)
        assert not np.array_equal(ours, conv._float[n].numpy())       # it was quantized


def test_llama_cpp_logits_match_torch(exported, smollm_tokenizer):
    from hiq2gguf import llama

    conv, _, _, _, _, out = exported
    ids = smollm_tokenizer("The history of the Roman Empire spans many centuries and",
                           add_special_tokens=False)["input_ids"] * 4
    with torch.no_grad():
        ref = conv.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    with llama.open_model(out, n_ctx=256, logits_all=True, n_threads=2) as llm:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    diff = np.abs(got - ref) / ref.std()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (diff.mean(), diff.max())


def test_ggml_binding_matches_gguf_reference(runtime_lib):
    """Without an importance matrix ggml's legacy quantizers are the reference ones that
    gguf-py reimplements: same bytes."""
    from hiq2gguf.stock import STOCK_TYPES, ggml

    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    for name in ("Q4_0", "Q5_0", "Q8_0"):
        raw = ggml().quantize(STOCK_TYPES[name], w, None)
        np.testing.assert_array_equal(raw, gguf.quants.quantize(w, gguf.GGMLQuantizationType[name]))


def test_importance_matrix_steers_the_rounding(runtime_lib):
    """The error weighted by the importance matrix is smaller when ggml is given it."""
    from hiq2gguf.stock import STOCK_TYPES, ggml

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    imp = np.exp(3 * rng.standard_normal(512)).astype(np.float32)
    for name in ("Q3_K", "Q4_K", "IQ4_XS", "Q4_0"):
        t = STOCK_TYPES[name]
        err = {}
        for key, imatrix in (("plain", None), ("weighted", imp)):
            deq = ggml().dequantize(t, ggml().quantize(t, w, imatrix), w.shape[1])
            err[key] = float((((deq - w) ** 2) * imp).sum())
        assert err["weighted"] < 0.9 * err["plain"], (name, err)


def test_candidates_follow_row_sizes():
    """SmolLM2-135M's widths: 576-wide rows take only 32-weight-block types, 1536-wide ones all."""
    from hiq2gguf.stock import StockQuantizer, stock_candidates

    cset = stock_candidates({"q": (576, 576), "down": (576, 1536)}, StockQuantizer({}), 3.0)
    q = {c.qtype.name for c in cset.layers["q"]}
    down = {c.qtype.name for c in cset.layers["down"]}
    assert q == {"Q4_0", "IQ4_NL"}              # the cheapest that fit: nothing within 1 bpw of 3.0 does
    assert {"Q2_K", "Q3_K", "IQ3_XXS", "IQ2_XS"} <= down and "Q4_0" not in down
    assert all(2.0 <= c.qtype.bpw <= 4.0 + 1e-9 for c in cset.layers["down"])
    every = stock_candidates({"q": (576, 576)}, StockQuantizer({}), 3.0, spread=None)
    assert {c.qtype.name for c in every.layers["q"]} == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}


def test_mixed_row_sizes_plan(tmp_path, smollm_tokenizer, runtime_lib):
    """Hidden 192 (a multiple of 32 and 64, not 256): attention and gate/up weights can
    only be 32-block types, down (512 wide) any; the plan honours both and the budget."""
    from hiq2gguf.convert import ConvertConfig, convert
    from hiq2gguf.inspect import inspect_gguf
    from hiq2gguf.plan import RatioConfig

    model_dir = make_tiny_llama(tmp_path / "m", smollm_tokenizer, hidden=192, intermediate=512, heads=3,
                                kv_heads=1)
    # 192-wide weights (3/4 of the elements) cost at least Q4_0's 4.5 bits: 4.2 leaves the
    # 512-wide down projections at most 3.3 on average, below Q3_K
    cfg = ConvertConfig(bpw=4.2, target="stock", stock_types="Q2_K,Q3_K,Q4_0,Q5_0", calib_windows=2,
                        calib_ctx=64, evaluate=False, progress=False,
                        ratio=RatioConfig(estimator="loss", cache=False))
    report = convert(cfg, tmp_path / "m.gguf", str(model_dir))
    info = inspect_gguf(tmp_path / "m.gguf")
    lin = [t for t in info["tensors"] if t["linear"]]
    assert len(lin) == 14 and report["bpw"] <= 4.2 and info["bpw"] == pytest.approx(report["bpw"])
    for t in lin:
        allowed = {"Q2_K", "Q3_K", "Q4_0", "Q5_0"} if t["shape"][1] % 256 == 0 else {"Q4_0", "Q5_0"}
        assert t["type"] in allowed, t
    assert any(t["type"] == "Q2_K" for t in lin)


def test_cli_stock_errors(tmp_path, tiny_llama_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("convert", tiny_llama_dir, "-o", out_dir / "x.gguf", "--bpw", "3", "--target", "stock",
            "--stock-types", "Q2_K,Q7_K", "--no-cache")
    assert_clean_failure(r, out_dir, "Q7_K")
    r = cli("convert", tiny_llama_dir, "-o", out_dir / "x.gguf", "--bpw", "3", "--target", "stock",
            "--ratio-strategy", "fixed", "--no-cache")
    assert_clean_failure(r, out_dir, "optimizer")


def test_cli_stock_budget_infeasible(tmp_path, tiny256, runtime_lib):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("convert", tiny256, "-o", out_dir / "x.gguf", "--bpw", "4", "--target", "stock",
            "--stock-types", "Q5_0,Q8_0", "--no-eval", "--calib-windows", "1", "--no-cache", "-q")
    assert_clean_failure(r, out_dir, "infeasible", "5.5")
    r = cli("convert", tiny256, "-o", out_dir / "y.gguf", "--bpw", "5", "--target", "stock",
            "--stock-types", "Q4_K,Q6_K", "--no-eval", "--calib-windows", "1", "--no-cache",
            "--time-limit", "30", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["bpw"] <= 5
