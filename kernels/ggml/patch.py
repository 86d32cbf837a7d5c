#!/usr/bin/env python3
"""Apply the HIQ2 type family (kernels/ggml/hiq2*.{c,h}) to a pristine llama.cpp tree.

Usage: python patch.py /path/to/vendor/llama.cpp   (or: import and call apply())

Every edit is anchored on an exact text fragment of the pinned llama.cpp
(llama-cpp-python 0.3.36, llama.cpp 0c1e57098). A missing or ambiguous anchor
raises PatchError naming the file and anchor: nothing is guessed. All files
are checked before any file is written, so a failed patch leaves the tree
unchanged. Applying to an already patched tree is a no-op (the sources are
re-copied so kernel edits still reach the build).

Pure Python, stdlib only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ggml type ids of the family: HIQ2_H<H> = FIRST_ID + H (see docs/FORMAT.md).
FIRST_ID = 100
N_HIGH = range(0, 9)
TYPE_COUNT = FIRST_ID + len(N_HIGH)           # 109

MARK = "hiq2gguf"                             # appears in every inserted line/block

# (source in kernels/ggml, destination relative to the llama.cpp root)
SOURCES = [
    ("hiq2.h", "ggml/src/hiq2.h"),
    ("hiq2.c", "ggml/src/hiq2.c"),
    ("hiq2-cpu.c", "ggml/src/ggml-cpu/hiq2-cpu.c"),
]


class PatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Edit:
    anchor: str          # exact text that must occur `count` times in the pristine file
    replacement: str     # what each occurrence becomes (must contain MARK)
    count: int = 1


def _enum_lines() -> str:
    return "".join(
        f"        GGML_TYPE_HIQ2_H{h} = {FIRST_ID + h}, // {MARK}: {64} weights, {20 + 2 * h} bytes\n"
        for h in N_HIGH)


HIQ2_CASES = f"        GGML_HIQ2_CASES // {MARK}\n"
HIQ2_TYPE_LIST = ("    " + ", ".join(f"GGML_TYPE_HIQ2_H{h}" for h in N_HIGH) + f", // {MARK}\n")

EDITS: dict[str, list[Edit]] = {
    "ggml/include/ggml.h": [
        Edit("        GGML_TYPE_Q2_0    = 42,\n        GGML_TYPE_COUNT   = 43,\n",
             "        GGML_TYPE_Q2_0    = 42,\n"
             f"        // {MARK}: ids 43..99 are unused (blck_size 0, like the removed ids 31..38)\n"
             + _enum_lines()
             + f"        GGML_TYPE_COUNT   = {TYPE_COUNT}, // {MARK}: was 43\n"),
    ],
    "ggml/src/ggml.c": [
        Edit('#include "ggml-quants.h"\n',
             f'#include "ggml-quants.h"\n#include "hiq2.h" // {MARK}\n'),
        Edit("};\n\nconst struct ggml_type_traits * ggml_get_type_traits(enum ggml_type type) {\n",
             f"    GGML_HIQ2_TYPE_TRAITS_ROWS // {MARK}\n"
             "};\n\nconst struct ggml_type_traits * ggml_get_type_traits(enum ggml_type type) {\n"),
        Edit("        case GGML_TYPE_IQ4_XS:  result = quantize_iq4_xs (src + start, (char *) dst + start_row * row_size, nrows, n_per_row, imatrix); break;\n",
             "        case GGML_TYPE_IQ4_XS:  result = quantize_iq4_xs (src + start, (char *) dst + start_row * row_size, nrows, n_per_row, imatrix); break;\n"
             f"        GGML_HIQ2_CASES result = ggml_hiq2_types[ggml_hiq2_n_high(type)].quantize(src + start, (char *) dst + start_row * row_size, nrows, n_per_row, imatrix); break; // {MARK}\n"),
    ],
    "ggml/src/ggml-quants.c": [
        Edit('#include "ggml-quants.h"\n',
             f'#include "ggml-quants.h"\n#include "hiq2.h" // {MARK}\n'),
        Edit("        case GGML_TYPE_Q2_0:\n"
             "            {\n"
             "                VALIDATE_ROW_DATA_D_F16_IMPL(block_q2_0, data, nb);\n"
             "            } break;\n",
             "        case GGML_TYPE_Q2_0:\n"
             "            {\n"
             "                VALIDATE_ROW_DATA_D_F16_IMPL(block_q2_0, data, nb);\n"
             "            } break;\n"
             f"        GGML_HIQ2_CASES // {MARK}\n"
             "            {\n"
             "                if (!ggml_hiq2_types[ggml_hiq2_n_high(type)].validate(data, nbytes)) {\n"
             "                    return false;\n"
             "                }\n"
             "            } break;\n"),
    ],
    "ggml/src/ggml-cpu/ggml-cpu.c": [
        Edit('#include "quants.h"\n',
             f'#include "quants.h"\n#include "hiq2.h" // {MARK}\n'),
        Edit("    [GGML_TYPE_I32] = {\n"
             "        .from_float               = (ggml_from_float_t) ggml_cpu_fp32_to_i32,\n"
             "    },\n"
             "};\n",
             "    [GGML_TYPE_I32] = {\n"
             "        .from_float               = (ggml_from_float_t) ggml_cpu_fp32_to_i32,\n"
             "    },\n"
             f"    GGML_HIQ2_TYPE_TRAITS_CPU_ROWS // {MARK}\n"
             "};\n"),
    ],
    # HIQ2 x Q8_0 matrix products (prompt processing and token generation) go to the
    # HIQ2 GEMM when the build has one; ggml's vec_dot loop otherwise
    "ggml/src/ggml-cpu/llamafile/sgemm.cpp": [
        Edit('#include "ggml-quants.h"\n', f'#include "ggml-quants.h"\n#include "hiq2.h" // {MARK}\n'),
        Edit("    // only enable sgemm for prompt processing\n#if !defined(__MMA__)\n    if (n < 2)\n",
             f"    if (ggml_is_hiq2_type((enum ggml_type) Atype)) {{ // {MARK}\n"
             "        // every batch size, token generation (n == 1) included: the HIQ2 kernel\n"
             "        // shares each activation block between 8 rows there. The CPU backend's\n"
             "        // reference mode (test-backend-ops compares against it) takes ggml's\n"
             "        // vec_dot loop instead\n"
             "        return Ctype == GGML_TYPE_F32 && Btype == GGML_TYPE_Q8_0 && !params->use_ref &&\n"
             "               ggml_hiq2_sgemm(params->threadpool, params->ith, params->nth, m, n, k, A, lda, B, ldb, (float *) C, ldc, Atype);\n"
             "    }\n\n"
             "    // only enable sgemm for prompt processing\n#if !defined(__MMA__)\n    if (n < 2)\n"),
    ],
    # add, add1, acc, out_prod, set, get_rows, clamp: the quantized-type lists
    "ggml/src/ggml-cpu/ops.cpp": [
        Edit('#include "ops.h"\n', f'#include "ops.h"\n#include "hiq2.h" // {MARK}\n'),
        Edit("        case GGML_TYPE_Q2_0:\n", "        case GGML_TYPE_Q2_0:\n" + HIQ2_CASES, count=7),
    ],
    # llama.cpp's own quantization test: HIQ2 members are 2.5..4.5 bpw; judge them
    # by the thresholds of the other 2-bit-grid types (it already loops over all ids)
    "tests/test-quantize-fns.cpp": [
        Edit("                type == GGML_TYPE_Q2_0    ? MAX_QUANTIZATION_TOTAL_ERROR_TERNARY :\n",
             "                type == GGML_TYPE_Q2_0    ? MAX_QUANTIZATION_TOTAL_ERROR_TERNARY :\n"
             f"                (type >= GGML_TYPE_HIQ2_H0 && type <= GGML_TYPE_HIQ2_H8) ? MAX_QUANTIZATION_TOTAL_ERROR_TERNARY : // {MARK}\n"),
        Edit("                : type == GGML_TYPE_TQ1_0 || type == GGML_TYPE_TQ2_0 || type == GGML_TYPE_Q2_0\n",
             "                : type == GGML_TYPE_TQ1_0 || type == GGML_TYPE_TQ2_0 || type == GGML_TYPE_Q2_0\n"
             f"                    || (type >= GGML_TYPE_HIQ2_H0 && type <= GGML_TYPE_HIQ2_H8) // {MARK}\n"),
    ],
    # llama.cpp's op tests: the family joins the type lists its quantized-type cases
    # loop over (get_rows, set_rows, cpy, mul_mat, mul_mat_id, out_prod, ...)
    "tests/test-backend-ops.cpp": [
        Edit("    GGML_TYPE_IQ4_NL, GGML_TYPE_IQ3_S, GGML_TYPE_IQ4_XS,\n};\n\nstatic const ggml_type base_types[] = {\n",
             "    GGML_TYPE_IQ4_NL, GGML_TYPE_IQ3_S, GGML_TYPE_IQ4_XS,\n" + HIQ2_TYPE_LIST +
             "};\n\nstatic const ggml_type base_types[] = {\n"),
        Edit("    GGML_TYPE_IQ2_XXS\n};\n\nstatic const ggml_type other_types[] = {\n",
             "    GGML_TYPE_IQ2_XXS,\n" + HIQ2_TYPE_LIST + "};\n\nstatic const ggml_type other_types[] = {\n"),
        Edit("    GGML_TYPE_BF16,\n};\n\n#ifdef _MSC_VER\n",
             "    GGML_TYPE_BF16,\n" + HIQ2_TYPE_LIST + "};\n\n#ifdef _MSC_VER\n"),
    ],
    "ggml/src/CMakeLists.txt": [
        Edit("            ggml-quants.c\n            ggml-quants.h\n            gguf.cpp)\n",
             "            ggml-quants.c\n            ggml-quants.h\n"
             f"            hiq2.c # {MARK}\n            hiq2.h\n"
             "            gguf.cpp)\n"
             f"\n# {MARK}: the HIQ2 reference quantizer must be byte-identical to numpy: no FMA contraction\n"
             "if (NOT MSVC)\n"
             "    set_source_files_properties(hiq2.c ggml-cpu/hiq2-cpu.c PROPERTIES COMPILE_OPTIONS \"-ffp-contract=off\")\n"
             "endif()\n"),
    ],
    "ggml/src/ggml-cpu/CMakeLists.txt": [
        Edit("        ggml-cpu/ops.h\n        ggml-cpu/ops.cpp\n        )\n",
             "        ggml-cpu/ops.h\n        ggml-cpu/ops.cpp\n"
             f"        ggml-cpu/hiq2-cpu.c # {MARK}\n"
             "        )\n"),
    ],
}

@dataclass(frozen=True)
class SourcePatch:
    """One backend's patch: exact-anchor edits of llama.cpp files plus kernel sources
    copied in (this CPU one, and kernels/cuda/patch.py's). Its patched state is
    recognised by ``stamp_text`` in ``stamp_file``."""

    name: str                                   # in messages: "HIQ2", "HIQ2 CUDA"
    edits: dict[str, list[Edit]]
    sources: list[tuple[str, str]]              # (file beside ``here``, destination in the tree)
    here: Path
    stamp_file: str
    stamp_text: str

    def is_patched(self, root: Path) -> bool:
        p = Path(root) / self.stamp_file
        return p.exists() and self.stamp_text in p.read_text(encoding="utf-8")

    def plan(self, root: Path) -> dict[Path, str]:
        """Compute the new content of every edited file; raise before writing anything."""
        out: dict[Path, str] = {}
        problems: list[str] = []
        for rel, edits in self.edits.items():
            path = root / rel
            if not path.exists():
                problems.append(f"{rel}: file missing")
                continue
            text = path.read_text(encoding="utf-8")
            if MARK in text:
                problems.append(f"{rel}: already contains '{MARK}' edits but {self.stamp_file} is not patched "
                                "(half-patched tree? start from a pristine source)")
                continue
            for e in edits:
                n = text.count(e.anchor)
                if n != e.count:
                    first = e.anchor.strip().splitlines()[0]
                    problems.append(f"{rel}: anchor {first!r} found {n} times, expected {e.count}")
                    continue
                text = text.replace(e.anchor, e.replacement)
            out[path] = text
        if problems:
            raise PatchError(f"cannot apply the {self.name} patch to {root}:\n  " + "\n  ".join(problems))
        return out

    def copy_sources(self, root: Path) -> None:
        for src, dst in self.sources:
            s = self.here / src
            if not s.exists():
                raise PatchError(f"kernel source missing: {s}")
            d = root / dst
            # only rewrite when changed, so ninja/ccache see unchanged mtimes
            if not d.exists() or d.read_bytes() != s.read_bytes():
                shutil.copyfile(s, d)

    def write(self, root: Path, verbose: bool, tag: str) -> bool:
        """Apply to a checked tree: True if edits were made, False if it was already
        patched (the sources are copied again either way, so kernel edits reach the build)."""
        if self.is_patched(root):
            self.copy_sources(root)
            if verbose:
                print(f"[{tag}] {root}: already patched; sources refreshed")
            return False
        plan = self.plan(root)
        self.copy_sources(root)
        for path, text in plan.items():
            path.write_text(text, encoding="utf-8")
        if verbose:
            n = sum(len(v) for v in self.edits.values())
            print(f"[{tag}] {root}: applied {n} edits in {len(plan)} files, copied {len(self.sources)} sources")
        return True


PATCH = SourcePatch("HIQ2", EDITS, SOURCES, HERE, stamp_file="ggml/include/ggml.h",
                    stamp_text=f"GGML_TYPE_HIQ2_H0 = {FIRST_ID}, // {MARK}")


def is_patched(root: Path) -> bool:
    return PATCH.is_patched(root)


def apply(root: str | Path, verbose: bool = True) -> bool:
    """Patch the llama.cpp tree at `root`. Returns True if edits were made, False if already patched."""
    root = Path(root).resolve()
    if not (root / "ggml" / "include" / "ggml.h").exists():
        raise PatchError(f"{root} does not look like a llama.cpp tree (no ggml/include/ggml.h)")
    return PATCH.write(root, verbose, "patch")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="llama.cpp source root (the sdist's vendor/llama.cpp)")
    ap.add_argument("--check", action="store_true", help="only report whether the tree is patched / patchable")
    args = ap.parse_args(argv)
    root = Path(args.root)
    try:
        if args.check:
            if is_patched(root):
                print("patched")
            else:
                PATCH.plan(root.resolve())
                print("pristine (patch applies cleanly)")
            return 0
        apply(root)
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
