#!/usr/bin/env python3
"""Add the HIQ2 CUDA kernels (kernels/cuda/hiq2-cuda.cuh) to ggml's CUDA backend.

Usage: python patch.py /path/to/vendor/llama.cpp   (after kernels/ggml/patch.py)

What a CUDA build then runs for HIQ2 tensors: dequantization to F32/F16/BF16
(convert.cu: cuBLAS matrix products, contiguous and strided), GET_ROWS
(getrows.cu), the matrix-vector product against Q8_1 activations for batches of
up to 8 columns (mmvq.cu), and supports_op saying yes for MUL_MAT, MUL_MAT_ID
and GET_ROWS (ggml-cuda.cu). supports_op and mmvq are edited together: a type
that supports_op accepts for MUL_MAT must have an mmvq vec_dot, or small batches
abort. MMQ (the integer tile kernels) has no HIQ2 variant; ggml_cuda_should_use_mmq
says no for unknown types, so larger batches take dequantize + cuBLAS.

Same rules as kernels/ggml/patch.py (whose Edit and PatchError this reuses):
exact anchors of the pinned llama.cpp, every file checked before any is written,
idempotent. Pure Python, stdlib only.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ggml_patch():
    name = "hiq2_ggml_patch"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE.parent / "ggml" / "patch.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_g = _ggml_patch()
Edit, PatchError, MARK, N_HIGH = _g.Edit, _g.PatchError, _g.MARK, _g.N_HIGH

SOURCES = [("hiq2-cuda.cuh", "ggml/src/ggml-cuda/hiq2-cuda.cuh")]
INCLUDE = f'#include "hiq2-cuda.cuh" // {MARK}\n'


def _mmvq_switch_cases() -> str:
    """mul_mat_vec_q_switch_type: one case per member (the call names the type)."""
    args = ("(vx, vy, ids, fusion, dst, ncols_x, nrows_x, ncols_dst, stride_row_x, stride_col_y, stride_col_dst,\n"
            "                 nchannels_x, nchannels_y, nchannels_dst, stride_channel_x, stride_channel_y, stride_channel_dst,\n"
            "                 nsamples_x, nsamples_dst, stride_sample_x, stride_sample_y, stride_sample_dst, ids_stride, stream);\n")
    return "".join(f"        case GGML_TYPE_HIQ2_H{h}: // {MARK}\n"
                   f"            mul_mat_vec_q_switch_ncols_dst<GGML_TYPE_HIQ2_H{h}>\n                {args}"
                   "            break;\n" for h in N_HIGH)


def _get_rows_cases() -> str:
    return "".join(f"        case GGML_TYPE_HIQ2_H{h}: // {MARK}\n"
                   f"            get_rows_cuda_q<QK_HIQ2, HIQ2_CUDA_QR, dequantize_hiq2<{h}>>(src0_d, src1_d, dst_d,\n"
                   "                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);\n"
                   "            break;\n" for h in N_HIGH)


_CONT_Q2_0 = "        case GGML_TYPE_Q2_0:\n            return dequantize_block_cont_cuda<QK2_0, QR2_0, dequantize_q2_0>;\n"
_NC_Q2_0 = "        case GGML_TYPE_Q2_0:\n            return dequantize_block_cuda<QK2_0, QR2_0, dequantize_q2_0>;\n"
_GET_ROWS_Q2_0 = ("        case GGML_TYPE_Q2_0:\n"
                  "            get_rows_cuda_q<QK2_0, QR2_0, dequantize_q2_0>(src0_d, src1_d, dst_d,\n"
                  "                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);\n"
                  "            break;\n")
_MMVQ_DEFAULT = '        default:\n            GGML_ABORT("fatal error");\n            break;\n    }\n}\n\nvoid ggml_cuda_mul_mat_vec_q(\n'
_SUPPORTS_MUL_MAT = ("                    case GGML_TYPE_IQ4_XS:\n                    case GGML_TYPE_BF16:\n"
                     "                        return true;\n")
_SUPPORTS_GET_ROWS = ("                    case GGML_TYPE_IQ1_M:\n                    case GGML_TYPE_IQ4_XS:\n"
                      "                        return true;\n                    case GGML_TYPE_IQ4_NL:\n")

EDITS: dict[str, list[Edit]] = {
    "ggml/src/ggml-cuda/convert.cu": [
        Edit('#include "dequantize.cuh"\n', '#include "dequantize.cuh"\n' + INCLUDE),
        Edit(_CONT_Q2_0, _CONT_Q2_0 + f"        HIQ2_CUDA_DEQUANTIZE_CONT_CASES // {MARK}\n", count=3),
        Edit(_NC_Q2_0, _NC_Q2_0 + f"        HIQ2_CUDA_DEQUANTIZE_NC_CASES // {MARK}\n", count=3),
    ],
    "ggml/src/ggml-cuda/getrows.cu": [
        Edit('#include "convert.cuh"\n', '#include "convert.cuh"\n' + INCLUDE),
        Edit(_GET_ROWS_Q2_0, _GET_ROWS_Q2_0 + _get_rows_cases()),
    ],
    "ggml/src/ggml-cuda/mmvq.cu": [
        Edit('#include "vecdotq.cuh"\n', '#include "vecdotq.cuh"\n' + INCLUDE),
        Edit("        case GGML_TYPE_IQ3_S:   return vec_dot_iq3_s_q8_1;\n        default:                return nullptr;\n",
             "        case GGML_TYPE_IQ3_S:   return vec_dot_iq3_s_q8_1;\n"
             f"        HIQ2_CUDA_VEC_DOT_CASES // {MARK}\n"
             "        default:                return nullptr;\n"),
        Edit("        case GGML_TYPE_IQ4_XS:  return VDR_IQ4_XS_Q8_1_MMVQ;\n        default:                return 1;\n",
             "        case GGML_TYPE_IQ4_XS:  return VDR_IQ4_XS_Q8_1_MMVQ;\n"
             f"        GGML_HIQ2_CASES return VDR_HIQ2_Q8_1_MMVQ; // {MARK}\n"
             "        default:                return 1;\n"),
        Edit(_MMVQ_DEFAULT, _mmvq_switch_cases() + _MMVQ_DEFAULT),
    ],
    "ggml/src/ggml-cuda/ggml-cuda.cu": [
        Edit('#include "ggml-cuda/wkv.cuh"\n', '#include "ggml-cuda/wkv.cuh"\n' + f'#include "hiq2.h" // {MARK}\n'),
        Edit(_SUPPORTS_MUL_MAT, _SUPPORTS_MUL_MAT.replace(
            "                        return true;\n",
            f"                    GGML_HIQ2_CASES // {MARK}: mmvq + dequantize/cuBLAS\n                        return true;\n")),
        Edit(_SUPPORTS_GET_ROWS, _SUPPORTS_GET_ROWS.replace(
            "                        return true;\n",
            f"                    GGML_HIQ2_CASES // {MARK}\n                        return true;\n")),
    ],
}

PATCH = _g.SourcePatch("HIQ2 CUDA", EDITS, SOURCES, HERE, stamp_file="ggml/src/ggml-cuda/mmvq.cu",
                       stamp_text=INCLUDE)


def is_patched(root: Path) -> bool:
    return PATCH.is_patched(root)


def apply(root: str | Path, verbose: bool = True) -> bool:
    """Patch the (HIQ2-patched) llama.cpp tree at `root`; False if it already was."""
    root = Path(root).resolve()
    if not _g.is_patched(root):
        raise PatchError(f"{root}: apply kernels/ggml/patch.py first (the CUDA kernels need the HIQ2 types)")
    if not (root / "ggml" / "src" / "ggml-cuda").is_dir():
        raise PatchError(f"{root} has no ggml/src/ggml-cuda")
    return PATCH.write(root, verbose, "patch-cuda")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="llama.cpp source root (the sdist's vendor/llama.cpp)")
    args = ap.parse_args(argv)
    try:
        apply(Path(args.root))
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
