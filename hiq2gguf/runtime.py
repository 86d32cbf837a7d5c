"""The patched llama.cpp runtime: build it, find its libraries and tools.

``build()`` downloads the pinned llama-cpp-python sdist, applies the HIQ2 type
family (kernels/ggml/patch.py) to its vendored llama.cpp, builds the shared
libraries and command-line tools with CMake + Ninja, and installs the
llama-cpp-python package (Python bindings only) into the current interpreter.
``configure_python()`` points llama_cpp at the patched libraries.

``build(cuda=True)`` (``hiq2gguf runtime build --cuda``) makes a second, separate
build with ggml's CUDA backend and our CUDA kernels (kernels/cuda) for one GPU
architecture; nvcc is needed, a GPU is not. ``build(rpc=True)`` (``--rpc``) adds
llama.cpp's RPC backend and its server (``ggml-rpc-server``) for inference split
across machines.

Layout under the cache dir ($HIQ2GGUF_CACHE or ~/.cache/hiq2gguf):
    dl/llama_cpp_python-<ver>.tar.gz          the sdist (downloaded once)
    runtime/llama.cpp-<ver>-<key>/src/        extracted + patched sdist
    runtime/llama.cpp-<ver>-<key>/build/      CMake build; bin/ has libs and tools
    runtime/llama.cpp-<ver>-<key>/build.log   full tool output
    runtime/llama.cpp-<ver>-<key>/COMPLETE    stamp, written last
    runtime-cuda/llama.cpp-<ver>-<key>/       the same for the CUDA build
    runtime-rpc/llama.cpp-<ver>-<key>/        the same for the RPC build (runtime-cuda-rpc/: both)
    runtime/llama.cpp-<ver>-<key>/build-<variant>-<vkey>/   libggml-cpu alone for another
                                              instruction set (CPU_VARIANTS), from the same src/
    cuda-extra/                               cuBLAS headers/libraries (PyPI wheel) when
                                              the CUDA toolkit has none
``key`` is a sha256 over the sdist version, kernels/ggml/* (CUDA build: and
kernels/cuda/*), the CMake arguments and the targets, so the build is redone
only when one of them changes (ccache makes a rebuild after a kernel edit cheap).

``build_cpu_variant(name)`` (``hiq2gguf runtime build --cpu-variant avx2``) compiles
only ggml-cpu again, without -march=native, for one of CPU_VARIANTS: the tests use
it to run the AVX2 and the portable code of the HIQ2 kernels on a host whose native
build only ever compiles the AVX-512 ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = REPO_ROOT / "kernels" / "ggml"
CUDA_KERNELS_DIR = REPO_ROOT / "kernels" / "cuda"

CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_BLAS=OFF",
    "-DGGML_CCACHE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # llama-cli in this llama.cpp is a client of the server library (+ web UI
    # assets); llama-completion is the classic one-shot CLI and is built instead.
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]

TARGETS = [
    "llama", "ggml", "ggml-base", "ggml-cpu",
    "llama-completion", "llama-perplexity", "llama-bench", "llama-quantize", "llama-imatrix",
    "test-quantize-fns", "test-backend-ops",
]

# tools deliberately left out, with the reason
NOT_BUILT = {
    "llama-cli": "in this llama.cpp it is a client of the server library and web UI; "
                 "use tool('llama-completion') for one-shot generation",
}

PY_DEPS = ["typing_extensions", "diskcache", "jinja2", "numpy"]

# The CUDA build: the CPU build's options with ggml's CUDA backend on, kept small
# (one architecture, no FlashAttention kernels, no NCCL, no CUDA VMM so the driver
# library is not needed at link time); no GPU is needed to compile it.
CUDA_ARCHITECTURES = os.environ.get("HIQ2GGUF_CUDA_ARCHITECTURES", "90")   # H100 / H200
CUDA_CMAKE_ARGS = [a for a in CMAKE_ARGS if a != "-DGGML_CUDA=OFF"] + [
    "-DGGML_CUDA=ON",
    f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCHITECTURES}",
    "-DGGML_CUDA_FA=OFF",
    "-DGGML_CUDA_FA_ALL_QUANTS=OFF",
    "-DGGML_CUDA_NCCL=OFF",
    "-DGGML_CUDA_NO_VMM=ON",
]
CUDA_TARGETS = ["llama", "ggml", "ggml-base", "ggml-cpu", "ggml-cuda",
                "llama-completion", "llama-perplexity", "llama-bench", "test-backend-ops"]
# cuBLAS for toolkits installed without it (as here): the PyPI wheel matching CUDA 13.0
CUBLAS_WHEEL = ("nvidia-cublas", "13.0.2.14")

# The RPC build (`runtime build --rpc`): the CPU (or CUDA) build plus llama.cpp's RPC
# backend and rpc-server, so a model of ours can be split across machines.
RPC_CMAKE_ARGS = ["-DGGML_RPC=ON"]
RPC_TARGETS = ["ggml-rpc", "ggml-rpc-server"]   # the server binary of this llama.cpp is ggml-rpc-server


@dataclass(frozen=True)
class CpuVariant:
    """libggml-cpu compiled for one x86 instruction set instead of the host's (-march=native):
    GGML_NATIVE off, the ggml ISA options in ``options`` on and every other one off (the
    ISA sets of ggml's own GGML_CPU_ALL_VARIANTS builds)."""
    name: str
    options: tuple[str, ...]       # GGML_<option>=ON
    cpu_flags: tuple[str, ...]     # /proc/cpuinfo flags a host needs to run it
    vector_width: int              # widest vector register (bits) the HIQ2 kernels may use

    def missing_on_host(self) -> list[str]:
        """What this machine lacks to run the variant ([] where it can)."""
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return [f"an x86-64 CPU (this is {platform.machine()})"]
        have = host_cpu_flags()
        return [f for f in self.cpu_flags if f not in have]


def host_cpu_flags() -> set[str]:
    """CPU feature flags of this machine as /proc/cpuinfo names them (empty where it has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# every x86 ISA option of ggml's CMake (ggml/CMakeLists.txt)
GGML_X86_ISA_OPTIONS = ("SSE42", "AVX", "AVX_VNNI", "AVX2", "BMI2", "FMA", "F16C", "AVX512", "AVX512_VBMI",
                        "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16")

CPU_VARIANTS = {v.name: v for v in (
    # ggml's "haswell": the AVX2 kernels (and BMI2 block decoding)
    CpuVariant("avx2", ("SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2"),
               ("sse4_2", "avx", "f16c", "fma", "bmi2", "avx2"), 256),
    # ggml's "x64": the x86-64 baseline (SSE2), i.e. the portable C of our kernels
    CpuVariant("generic", (), (), 128),
)}
CPU_VARIANT_TARGETS = ["ggml-cpu"]


def cpu_variant_cmake_args(name: str) -> list[str]:
    v = _cpu_variant(name)
    isa = [f"-DGGML_{o}={'ON' if o in v.options else 'OFF'}" for o in GGML_X86_ISA_OPTIONS]
    # otherwise the runtime's arguments, so ggml-base compiles identically (ccache hits)
    return [a for a in CMAKE_ARGS if a != "-DGGML_NATIVE=ON"] + ["-DGGML_NATIVE=OFF"] + isa


def _cpu_variant(name: str) -> CpuVariant:
    if name not in CPU_VARIANTS:
        raise ValueError(f"unknown CPU variant {name!r} (known: {', '.join(CPU_VARIANTS)})")
    return CPU_VARIANTS[name]


def _flavor(cuda: bool = False, rpc: bool = False) -> tuple[str, list[str], list[str]]:
    """(cache folder, CMake arguments, targets) of one kind of build; each kind has
    its own folder and key, so building one never invalidates or prunes another."""
    folder = "runtime" + ("-cuda" if cuda else "") + ("-rpc" if rpc else "")
    args = (CUDA_CMAKE_ARGS if cuda else CMAKE_ARGS) + (RPC_CMAKE_ARGS if rpc else [])
    targets = (CUDA_TARGETS if cuda else TARGETS) + (RPC_TARGETS if rpc else [])
    return folder, args, targets


class RuntimeMissing(RuntimeError):
    """The patched llama.cpp runtime is not built (or lacks what was asked for)."""

    def __init__(self, detail: str = "", message: str | None = None):
        if message is None:
            message = "the patched llama.cpp runtime is not built; run `hiq2gguf runtime build`"
            if detail:
                message += f" ({detail})"
        super().__init__(message)


class BuildError(RuntimeError):
    pass


# ---- locations -------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("HIQ2GGUF_CACHE") or "~/.cache/hiq2gguf").expanduser()


def _kernel_files() -> list[Path]:
    if not KERNELS_DIR.is_dir():
        raise BuildError(f"kernel sources not found at {KERNELS_DIR}")
    return sorted(p for p in KERNELS_DIR.iterdir()
                  if p.is_file() and p.suffix in (".c", ".h", ".py", ".cpp") and not p.name.startswith("."))


def _cuda_kernel_files() -> list[Path]:
    if not CUDA_KERNELS_DIR.is_dir():
        raise BuildError(f"CUDA kernel sources not found at {CUDA_KERNELS_DIR}")
    return sorted(p for p in CUDA_KERNELS_DIR.iterdir()
                  if p.is_file() and p.suffix in (".cuh", ".cu", ".py") and not p.name.startswith("."))


def build_key(cuda: bool = False, rpc: bool = False) -> str:
    _, cmake_args, targets = _flavor(cuda, rpc)
    h = hashlib.sha256()
    h.update(f"sdist={SDIST_NAME}=={SDIST_VERSION}\n".encode())
    for p in _kernel_files():
        h.update(f"file={p.name}\n".encode())
        h.update(p.read_bytes())
    if cuda:
        for p in _cuda_kernel_files():
            h.update(f"file=cuda/{p.name}\n".encode())
            h.update(p.read_bytes())
    h.update(("cmake=" + "\0".join(cmake_args) + "\n").encode())
    h.update(("targets=" + "\0".join(targets) + "\n").encode())
    return h.hexdigest()


def _work_dir(key: str | None = None, cuda: bool = False, rpc: bool = False) -> Path:
    key = key or build_key(cuda, rpc)
    # CUDA / RPC builds live in their own folders: pruning old CPU builds never touches them
    return cache_dir() / _flavor(cuda, rpc)[0] / f"llama.cpp-{SDIST_VERSION}-{key[:16]}"


def _stamp(work: Path) -> Path:
    return work / "COMPLETE"


def _find_built(require: bool = True, cuda: bool = False, rpc: bool = False) -> Path | None:
    """Work dir of the build matching the current sources (if complete)."""
    work = _work_dir(cuda=cuda, rpc=rpc)
    if _stamp(work).exists():
        return work
    if require:
        others = sorted(work.parent.glob("llama.cpp-*/COMPLETE"))
        detail = f"no complete build for the current kernel sources under {work.parent}"
        if others:
            detail += f"; {len(others)} build(s) for other sources exist (kernels changed since)"
        kinds = [k for k, on in (("cuda", cuda), ("rpc", rpc)) if on]
        if kinds:
            flags = " ".join(f"--{k}" for k in kinds)
            raise RuntimeMissing(message=f"the {'+'.join(kinds).upper()} build of the patched llama.cpp is "
                                         f"not built; run `hiq2gguf runtime build {flags}` ({detail})")
        raise RuntimeMissing(detail)
    return None


def lib_dir(cuda: bool = False, rpc: bool = False) -> Path:
    """Directory holding libllama.so and libggml*.so of the patched build."""
    work = _find_built(cuda=cuda, rpc=rpc)
    for d in (work / "build" / "bin", work / "build" / "lib"):
        if (d / "libllama.so").exists() or (d / "libllama.dylib").exists():
            return d
    raise RuntimeMissing(f"libllama not found in {work / 'build'}")


def source_dir() -> Path:
    """The patched llama.cpp tree of the runtime build (headers for code compiled against it)."""
    return _find_built() / "src" / "vendor" / "llama.cpp"


def tool(name: str, cuda: bool = False, rpc: bool = False) -> Path:
    """Path of a built tool, e.g. tool('llama-perplexity'), tool('rpc-server', rpc=True)."""
    work = _find_built(cuda=cuda, rpc=rpc)
    name = {"rpc-server": "ggml-rpc-server"}.get(name, name)   # its name in llama.cpp's docs
    p = work / "build" / "bin" / name
    if not p.exists() and name in NOT_BUILT:
        raise RuntimeMissing(message=f"{name} is not part of the hiq2gguf runtime: {NOT_BUILT[name]}")
    if not p.exists():
        built = sorted(x.name for x in (work / "build" / "bin").iterdir()
                       if x.is_file() and os.access(x, os.X_OK) and not x.name.endswith((".so", ".dylib")))
        raise RuntimeMissing(f"tool {name!r} is not part of the build (built: {', '.join(built)})")
    return p


def is_built(cuda: bool = False, rpc: bool = False) -> bool:
    try:
        lib_dir(cuda, rpc)
        return True
    except (RuntimeMissing, BuildError):
        return False


def configure_python() -> Path:
    """Point llama_cpp (llama-cpp-python) at the patched libraries. Call before importing llama_cpp."""
    d = lib_dir()
    if "llama_cpp" in sys.modules:
        cur = os.environ.get("LLAMA_CPP_LIB_PATH")
        if cur != str(d):
            raise RuntimeError("llama_cpp was imported before configure_python(); it may have loaded "
                               "an unpatched libllama. Call hiq2gguf.runtime.configure_python() first.")
    check_patched(d)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    return d


def check_patched(d: Path) -> None:
    """A stock ggml knows no type id >= 43 and would refuse our files with
    "invalid ggml type": make sure the library in ``d`` carries our kernels."""
    import ctypes

    try:
        lib = ctypes.CDLL(str(d / "libggml-base.so"))
        patched = hasattr(lib, "dequantize_row_hiq2_h0")
    except OSError:
        patched = False
    if not patched:
        raise RuntimeMissing(message=f"the llama.cpp libraries in {d} are not patched with the HIQ2 types "
                                     "(a stock llama.cpp reports 'invalid ggml type' for our files); "
                                     "run `hiq2gguf runtime build`")


# ---- build -----------------------------------------------------------------------
class _Log:
    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.monotonic()

    def phase(self, msg: str) -> None:
        line = f"[runtime {time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"\n==== {line}\n")

    def run(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("$ " + " ".join(str(c) for c in cmd) + "\n")
            f.flush()
            r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                               env=env, cwd=cwd)
        if r.returncode != 0:
            tail = self.tail(40)
            raise BuildError(f"command failed (exit {r.returncode}): {' '.join(str(c) for c in cmd)}\n"
                             f"--- last lines of {self.path} ---\n{tail}\n--- full log: {self.path}")

    def tail(self, n: int) -> str:
        try:
            return "\n".join(self.path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _sdist(log: _Log) -> Path:
    dl = cache_dir() / "dl"
    p = dl / SDIST_FILE
    if p.exists() and p.stat().st_size > 0:
        log.phase(f"sdist: reusing {p}")
        return p
    dl.mkdir(parents=True, exist_ok=True)
    log.phase(f"sdist: downloading {SDIST_NAME}=={SDIST_VERSION} into {dl}")
    # --no-binary for this package only: with ":all:" pip also builds the sdist's
    # build dependencies from source just to read its metadata (~4 minutes here)
    log.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_NAME,
             f"{SDIST_NAME}=={SDIST_VERSION}", "-d", dl])
    if not p.exists():
        raise BuildError(f"pip download did not produce {p}")
    return p


def _extract(sdist: Path, work: Path, log: _Log) -> Path:
    src = work / "src"
    root = src / "vendor" / "llama.cpp"
    if (root / "ggml" / "include" / "ggml.h").exists() and (work / ".extracted").exists():
        log.phase(f"extract: reusing {src}")
        return root
    log.phase(f"extract: {sdist.name} -> {src}")
    tmp = work / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp, **kw)
    top = [p for p in tmp.iterdir() if p.is_dir()]
    if len(top) != 1:
        raise BuildError(f"unexpected sdist layout in {sdist}: {[p.name for p in tmp.iterdir()]}")
    top[0].rename(src)
    shutil.rmtree(tmp, ignore_errors=True)
    (work / ".extracted").write_text(sdist.name)
    if not (root / "ggml" / "include" / "ggml.h").exists():
        raise BuildError(f"no vendor/llama.cpp in {sdist}")
    return root


def _load_patch_module(path: Path | None = None, name: str = "hiq2_ggml_patch"):
    spec = importlib.util.spec_from_file_location(name, path or KERNELS_DIR / "patch.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod          # dataclasses look the module up while executing it
    spec.loader.exec_module(mod)
    return mod


def _build_env(work: Path) -> dict:
    env = dict(os.environ)
    # relative paths in ccache keys: builds in other work dirs share the cache
    env.setdefault("CCACHE_BASEDIR", str(work))
    env.setdefault("CCACHE_NOHASHDIR", "1")
    return env


def _python_package_ok() -> bool:
    try:
        from importlib.metadata import version
        return version(SDIST_NAME) == SDIST_VERSION
    except Exception:
        return False


def install_python_package(sdist: Path | None = None, log: _Log | None = None, force: bool = False) -> None:
    """Install llama-cpp-python==SDIST_VERSION (bindings only, no llama.cpp compile) if needed."""
    if log is None:
        log = _Log(cache_dir() / "python-install.log")
        log.path.parent.mkdir(parents=True, exist_ok=True)
    if _python_package_ok() and not force:
        log.phase(f"python: {SDIST_NAME} {SDIST_VERSION} already installed")
        return
    sdist = sdist or _sdist(log)
    log.phase(f"python: installing {SDIST_NAME} {SDIST_VERSION} bindings (no llama.cpp compile)")
    env = dict(os.environ)
    env["CMAKE_ARGS"] = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
    log.run([sys.executable, "-m", "pip", "install", "--no-deps", str(sdist)], env=env)
    log.run([sys.executable, "-m", "pip", "install", *PY_DEPS])


def _cuda_extra(log: _Log) -> list[str]:
    """CMake arguments that supply cuBLAS when the CUDA toolkit lacks it (headers and
    libraries from the PyPI wheel, unpacked into the cache); [] when it has it."""
    # the toolkit's own nvcc (a wrapper script elsewhere on PATH would hide the toolkit root from CMake)
    found = [c for c in (os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc"))
             if c and Path(c).exists()]
    if not found:
        raise BuildError("nvcc not found (install the CUDA toolkit: /usr/local/cuda/bin/nvcc, $CUDACXX or on PATH)")
    nvcc = found[0]
    toolkit = Path(nvcc).resolve().parents[1]
    args = [f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    if (toolkit / "include" / "cublas_v2.h").exists():
        return args
    name, version = CUBLAS_WHEEL
    root = cache_dir() / "cuda-extra" / f"{name}-{version}"
    if not (root / ".complete").exists():
        import zipfile

        dl = cache_dir() / "dl"
        dl.mkdir(parents=True, exist_ok=True)
        log.phase(f"cuda: the toolkit at {toolkit} has no cuBLAS; fetching {name}=={version} from PyPI")
        wheels = list(dl.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not wheels:
            log.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                     f"{name}=={version}", "-d", dl])
            wheels = list(dl.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not wheels:
            raise BuildError(f"pip download did not produce a {name} {version} wheel in {dl}")
        shutil.rmtree(root, ignore_errors=True)
        (root / "include").mkdir(parents=True)
        (root / "lib").mkdir()
        with zipfile.ZipFile(wheels[0]) as z:
            for info in z.infolist():
                p = Path(info.filename)
                if "include" in p.parts and p.suffix in (".h", ".hpp"):
                    (root / "include" / p.name).write_bytes(z.read(info))
                elif "lib" in p.parts and ".so" in p.name:
                    (root / "lib" / p.name).write_bytes(z.read(info))
        for lib in ("cublas", "cublasLt"):          # the linker wants the unversioned name
            versioned = sorted((root / "lib").glob(f"lib{lib}.so.*"))
            if not versioned:
                raise BuildError(f"lib{lib}.so.* not found in {wheels[0]}")
            (root / "lib" / f"lib{lib}.so").symlink_to(versioned[0].name)
        (root / ".complete").write_text(version)
    inc = root / "include"
    return args + [f"-DCUDA_cublas_LIBRARY={root / 'lib' / 'libcublas.so'}",
                   f"-DCUDA_cublasLt_LIBRARY={root / 'lib' / 'libcublasLt.so'}",
                   f"-DCMAKE_CUDA_FLAGS=-I{inc}", f"-DCMAKE_CXX_FLAGS=-I{inc}"]


def build(force: bool = False, python_package: bool = True, jobs: int | None = None,
          cuda: bool = False, rpc: bool = False) -> Path:
    """Build (if needed) the patched runtime; returns the lib dir (build/bin).
    ``cuda``: the separate CUDA build (ggml-cuda with our kernels), see CUDA_CMAKE_ARGS.
    ``rpc``: a separate build that adds the RPC backend and rpc-server (RPC_CMAKE_ARGS)."""
    key = build_key(cuda, rpc)
    work = _work_dir(key, cuda, rpc)
    _, cmake_args, targets = _flavor(cuda, rpc)
    if _stamp(work).exists() and not force:
        print(f"[runtime] up to date: {work}", flush=True)
        if python_package:
            install_python_package(log=_Log(work / "build.log"))
        return lib_dir(cuda, rpc)

    work.mkdir(parents=True, exist_ok=True)
    _stamp(work).unlink(missing_ok=True)
    log = _Log(work / "build.log")
    log.phase(f"building patched llama.cpp ({SDIST_NAME} {SDIST_VERSION}{', CUDA' if cuda else ''}"
              f"{', RPC' if rpc else ''}) "
              f"in {work}; log: {log.path}")
    try:
        for exe in ("cmake", "ninja"):
            if shutil.which(exe) is None:
                raise BuildError(f"{exe} not found on PATH (apt-get install cmake ninja-build, or pip install {exe})")
        sdist = _sdist(log)
        root = _extract(sdist, work, log)

        log.phase("patch: applying the HIQ2 type family")
        patch = _load_patch_module()
        try:
            patch.apply(root, verbose=False)
            if cuda:
                log.phase("patch: applying the HIQ2 CUDA kernels")
                _load_patch_module(CUDA_KERNELS_DIR / "patch.py", "hiq2_cuda_patch").apply(root, verbose=False)
        except patch.PatchError as e:
            raise BuildError(str(e)) from e
        extra = _cuda_extra(log) if cuda else []

        bdir = work / "build"
        if force:
            shutil.rmtree(bdir, ignore_errors=True)
        env = _build_env(work)
        if shutil.which("ccache") is None:
            log.phase("note: ccache not found; rebuilds after kernel edits will be slower")
        log.phase("cmake: configure")
        log.run(["cmake", "-S", root, "-B", bdir, "-G", "Ninja", *cmake_args, *extra], env=env)

        jobs = jobs or os.cpu_count() or 2
        log.phase(f"cmake: build {len(targets)} targets with {jobs} jobs (this takes minutes on a few cores"
                  f"{'; the CUDA backend much longer' if cuda else ''})")
        log.run(["cmake", "--build", bdir, "-j", str(jobs), "--target", *targets], env=env)

        libd = bdir / "bin"
        if not (libd / "libllama.so").exists() and not (libd / "libllama.dylib").exists():
            raise BuildError(f"build finished but libllama is not in {libd}; see {log.path}")

        # the C build is complete: stamp it before the (network-dependent) Python install
        tmp = work / "COMPLETE.tmp"
        tmp.write_text(json.dumps({
            "key": key, "sdist": f"{SDIST_NAME}=={SDIST_VERSION}", "cmake_args": cmake_args + extra,
            "targets": targets, "cuda": cuda, "rpc": rpc, "lib_dir": str(libd), "seconds": round(time.monotonic() - log.t0, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=1))
        os.replace(tmp, _stamp(work))                 # atomic: a killed build leaves no stamp
        if python_package:
            install_python_package(sdist, log)
        log.phase(f"done: libraries and tools in {libd}")
        _prune_old_builds(work)
        return libd
    except BuildError:
        print(f"[runtime] build FAILED; full log: {log.path}", file=sys.stderr, flush=True)
        raise
    except BaseException:
        print(f"[runtime] build interrupted; log: {log.path}", file=sys.stderr, flush=True)
        raise


def _prune_old_builds(current: Path, keep: int = 1, quiet_s: float = 900.0) -> None:
    """Remove other build dirs, keeping the `keep` newest complete ones besides `current`.

    Dirs touched within the last `quiet_s` seconds are left alone (a build may be running there).
    """
    now = time.time()
    others = [p for p in current.parent.glob("llama.cpp-*") if p.is_dir() and p != current]
    complete = sorted((p for p in others if _stamp(p).exists()), key=lambda p: _stamp(p).stat().st_mtime,
                      reverse=True)
    keep_set = set(complete[:keep])
    for p in others:
        if p in keep_set:
            continue
        try:
            newest = max((q.stat().st_mtime for q in (p, p / "build.log", p / "build") if q.exists()),
                         default=0.0)
        except OSError:
            continue
        if now - newest < quiet_s:
            continue
        print(f"[runtime] removing old build {p}", flush=True)
        shutil.rmtree(p, ignore_errors=True)


# ---- CPU variants -------------------------------------------------------------------
def _cpu_variant_dir(name: str, work: Path) -> Path:
    h = hashlib.sha256(("\0".join(cpu_variant_cmake_args(name) + CPU_VARIANT_TARGETS)).encode())
    # a sibling of work/build: the same depth below CCACHE_BASEDIR (= work), so the
    # relative paths in the compile commands, and with them ccache's keys, are the
    # runtime's (ggml-base, which no ISA option touches, comes from the cache)
    return work / f"build-{name}-{h.hexdigest()[:12]}"


def build_cpu_variant(name: str, jobs: int | None = None) -> Path:
    """Build (if needed) libggml-cpu for CPU_VARIANTS[name] from the runtime's patched
    tree, so the current kernels; returns its lib dir. The runtime must be built."""
    import fcntl

    _cpu_variant(name)
    work = _find_built()                       # RuntimeMissing unless the runtime is built
    vdir = _cpu_variant_dir(name, work)
    libd = vdir / "bin"
    if _stamp(vdir).exists():
        return libd
    vdir.mkdir(parents=True, exist_ok=True)
    with open(vdir / ".lock", "w") as lock:    # one build at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamp(vdir).exists():
            return libd
        log = _Log(vdir / "build.log")
        log.phase(f"building libggml-cpu, CPU variant {name!r}, in {vdir}; log: {log.path}")
        args = cpu_variant_cmake_args(name)
        root = source_dir()
        env = _build_env(work)
        try:
            log.run(["cmake", "-S", root, "-B", vdir, "-G", "Ninja", *args], env=env)
            log.run(["cmake", "--build", vdir, "-j", str(jobs or os.cpu_count() or 2),
                     "--target", *CPU_VARIANT_TARGETS], env=env)
        except BuildError:
            print(f"[runtime] CPU variant build FAILED; full log: {log.path}", file=sys.stderr, flush=True)
            raise
        if not (libd / "libggml-cpu.so").exists():
            raise BuildError(f"build finished but libggml-cpu.so is not in {libd}; see {log.path}")
        tmp = vdir / "COMPLETE.tmp"
        tmp.write_text(json.dumps({"variant": name, "cmake_args": args, "targets": CPU_VARIANT_TARGETS,
                                   "lib_dir": str(libd), "seconds": round(time.monotonic() - log.t0, 1),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
        os.replace(tmp, _stamp(vdir))
        log.phase(f"done: {libd / 'libggml-cpu.so'}")
    return libd


# ---- CLI hooks (wired by hiq2gguf's `runtime build|path` subcommand) ---------------
def add_build_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild from scratch even if up to date")
    parser.add_argument("--no-python", action="store_true", help="do not install the llama-cpp-python bindings")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel build jobs (default: all cores)")
    parser.add_argument("--cuda", action="store_true",
                        help="the separate CUDA build (ggml-cuda + HIQ2 CUDA kernels; needs nvcc, not a GPU)")
    parser.add_argument("--rpc", action="store_true",
                        help="a separate build with llama.cpp's RPC backend and rpc-server (distributed inference)")
    parser.add_argument("--cpu-variant", action="append", choices=sorted(CPU_VARIANTS), default=[],
                        help="also build libggml-cpu for this instruction set (tests of the non-native kernels)")


def main_build(args) -> int:
    try:
        d = build(force=getattr(args, "force", False),
                  python_package=not getattr(args, "no_python", False),
                  jobs=getattr(args, "jobs", None), cuda=getattr(args, "cuda", False),
                  rpc=getattr(args, "rpc", False))
        for name in getattr(args, "cpu_variant", None) or []:
            print(build_cpu_variant(name, jobs=getattr(args, "jobs", None)))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(d)
    return 0


def main_path(args) -> int:
    """Print the lib dir, or with args.tool set, that tool's path."""
    try:
        name = getattr(args, "tool", None)
        cuda, rpc = getattr(args, "cuda", False), getattr(args, "rpc", False)
        print(tool(name, cuda, rpc) if name else lib_dir(cuda, rpc))
    except RuntimeMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m hiq2gguf.runtime [build|path [tool]]
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hiq2gguf.runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_build_arguments(sub.add_parser("build"))
    pp = sub.add_parser("path")
    pp.add_argument("tool", nargs="?")
    pp.add_argument("--cuda", action="store_true")
    pp.add_argument("--rpc", action="store_true")
    a = ap.parse_args()
    sys.exit(main_build(a) if a.cmd == "build" else main_path(a))
