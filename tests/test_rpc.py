"""Distributed inference: two rpc-server processes on loopback hold the layers of one of
our GGUF files, and llama.cpp gives the same results as in a single process."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import pytest

from tests.test_cli_errors import cli


@pytest.fixture(scope="module")
def rpc_tools():
    from hiq2gguf import runtime

    try:
        return {name: runtime.tool(name, rpc=True)
                for name in ("rpc-server", "llama-completion", "llama-perplexity")}
    except runtime.RuntimeMissing as e:
        pytest.skip(f"RPC build missing: {e}")


@pytest.fixture(scope="module")
def tiny_gguf(smollm_tokenizer, tmp_path_factory, rpc_tools):
    from tests.conftest import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("rpc-llama"), smollm_tokenizer, layers=4)
    out = d / "tiny.gguf"
    r = cli("convert", d, "-o", out, "--bpw", "3.0", "--no-eval", "--calib-windows", "1",
            "--method", "rtn", "--ratio-strategy", "fixed", "-q")
    assert r.returncode == 0, r.stderr
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server exited with {proc.returncode}: {proc.stderr.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"rpc-server on port {port} did not start")


@pytest.fixture(scope="module")
def two_servers(rpc_tools):
    procs, endpoints = [], []
    try:
        for _ in range(2):
            port = _free_port()
            p = subprocess.Popen([str(rpc_tools["rpc-server"]), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            _wait_listening(port, p)
            endpoints.append(f"127.0.0.1:{port}")
        yield ",".join(endpoints)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _run(cmd: list, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# every layer on the two servers, half each; -v prints where each layer went
SPLIT = ["-ngl", "99", "--split-mode", "layer", "--tensor-split", "1,1", "--fit", "off", "-v"]


def _placement(log: str) -> tuple[dict[str, float], dict[int, str]]:
    """(MiB of weights per RPC endpoint, device of each layer) from llama.cpp's log."""
    mib = {m.group(1): float(m.group(2))
           for m in re.finditer(r"RPC\d+\[([\d.:]+)\] model buffer size\s*=\s*([\d.]+) MiB", log)}
    layers = {int(m.group(1)): m.group(2)
              for m in re.finditer(r"layer\s+(\d+) assigned to device (\w+)", log)}
    return mib, layers


def test_generation_split_across_two_servers_equals_single_process(rpc_tools, tiny_gguf, two_servers):
    base = [rpc_tools["llama-completion"], "-m", tiny_gguf, "-p", "The history of the Roman Empire",
            "-n", "24", "--temp", "0", "--seed", "0", "-t", "1", "-c", "256", "-no-cnv", "--no-warmup",
            "--no-display-prompt"]
    single = _run(base)
    split = _run(base + ["--rpc", two_servers] + SPLIT)
    mib, layers = _placement(split.stderr)
    assert set(mib) == set(two_servers.split(",")) and all(v > 0 for v in mib.values()), split.stderr[-3000:]
    assert {layers[i] for i in range(4)} == {"RPC0", "RPC1"}, layers     # transformer blocks on both
    assert single.stdout.strip() and split.stdout == single.stdout


def test_perplexity_split_equals_single_process(rpc_tools, tiny_gguf, two_servers, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 120)
    base = [rpc_tools["llama-perplexity"], "-m", tiny_gguf, "-f", text, "-c", "128", "--chunks", "3",
            "-t", "1", "-b", "128"]
    ppl = []
    for extra in ([], ["--rpc", two_servers] + SPLIT):
        r = _run(base + extra)
        m = re.search(r"Final estimate: PPL = ([\d.]+)", r.stderr + r.stdout)
        assert m, (r.stderr + r.stdout)[-2000:]
        ppl.append(float(m.group(1)))
    # the same kernels on the same machine: the split changes where layers run, not what they compute
    assert ppl[0] > 1 and ppl[1] == pytest.approx(ppl[0], rel=1e-4), ppl
