"""Triton kernels for the HIQ2 type family over the packed bytes the GGUF file stores.

``raw`` is always a uint8 tensor [rows, row_bytes]: row n holds K/64 blocks
laid out as docs/FORMAT.md says: ``20 + 2H`` bytes for HIQ2_H{H} (fp16 d, u8 z,
u8 mask, ql[16], qh[2H]), 20 + (b - 9) bytes for HIQ2_E8 / _2K / _8K (fp16 d,
4 sub-scale nibbles, 8 u16 lattice codes, then the index bits above the 9th of
a b-bit codebook index). The member is the ``qtype`` argument, a type object of
hiq2gguf.formats. Nothing is repacked for the GPU: the same bytes serve llama.cpp
and these kernels. hiq2gguf/formats.py is the reference they are tested against
(tests/test_triton_kernels.py, with ``TRITON_INTERPRET=1`` on the CPU).

- ``dequantize``: bytes -> float32 weights, bit for bit the reference values.
- ``gemv`` / ``gemm``: ``x @ W^T`` straight from the bytes, W never materialized;
  ``matmul`` picks one by the number of activation rows.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from hiq2gguf.formats import (ALL_TYPES, BLOCK, E8_LOW_BITS, E8_TYPES, GROUP, HEADER_BYTES,
                              LOW_STEP, QL_BYTES, E8Type, FormatError, HIQ2Type, e8_grid, e8_parity)

# jit code only sees globals declared constexpr
_BLOCK = tl.constexpr(BLOCK)
_QL = tl.constexpr(HEADER_BYTES)               # ql[16] follows the 4 header bytes
_QH = tl.constexpr(HEADER_BYTES + QL_BYTES)    # qh[2H] follows ql
_LOW_STEP = tl.constexpr(LOW_STEP)
_E8_LOW = tl.constexpr(E8_LOW_BITS)            # index bits in a u16 code
_E8_LOW_MASK = tl.constexpr((1 << E8_LOW_BITS) - 1)
# the largest codebook; the smaller ones are its prefixes, so one table serves every member
_E8_TABLE_ENTRIES = max(t.entries for t in E8_TYPES)

# Activation rows below which one program per (row, column tile) beats a tl.dot
# tile padded to 16 rows. A guess: not tuned on a GPU yet.
GEMV_MAX_ROWS = 8


@triton.jit
def _decode(raw, table, blk, i, valid, N_HIGH: tl.constexpr, E8: tl.constexpr,
            E8_EXT: tl.constexpr, E8_NSUB: tl.constexpr, E8_CODES: tl.constexpr, TYPE_SIZE: tl.constexpr):
    """Weights ``i`` (int32 [1, 64]) of the blocks ``blk`` (int64 [R, 1], counted from
    the start of ``raw``) -> float32 [R, 64]; ``valid`` [R, 1] masks blocks past the end.
    ``E8`` picks the lattice member with ``E8_EXT`` index bits per group beyond the
    9th and ``E8_NSUB`` sub-scales per block (``table``: ``_e8_table``), else HIQ2_H{N_HIGH}."""
    base = raw + blk * TYPE_SIZE
    d_lo = tl.load(base, mask=valid, other=0).to(tl.uint16)
    d_hi = tl.load(base + 1, mask=valid, other=0).to(tl.uint16)
    d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    if E8:
        n = _e8_integers(base, table, i, valid, E8_EXT, E8_NSUB, E8_CODES)
    else:
        n = _h_integers(base, i, valid, N_HIGH)
    # d * n is exact in float32 (11 by at most 8 significant bits) and * 1/16 is a
    # power-of-two scaling, so this is the reference value whatever the hardware
    # does (no add: no FMA).
    return d * n.to(tl.float32) * 0.0625


@triton.jit
def _h_integers(base, i, valid, N_HIGH: tl.constexpr):
    """HIQ2_H{N_HIGH}: 16 L - z of weights ``i`` (int32), L the grid level."""
    z = tl.load(base + 2, mask=valid, other=0).to(tl.int32)
    ql = tl.load(base + _QL + i % 16, mask=valid, other=0).to(tl.int32)
    low2 = (ql >> (2 * (i // 16))) & 3
    level = low2 * _LOW_STEP
    if N_HIGH > 0:
        mask = tl.load(base + 3, mask=valid, other=0).to(tl.int32)
        g = i // 8
        high = ((mask >> g) & 1) != 0
        # a high group's qh pair sits at its rank among the high groups:
        # popcount of the mask bits below g (shifted to the top of the byte)
        r = (mask << (8 - g)) & 0xFF
        r = r - ((r >> 1) & 0x55)
        r = (r & 0x33) + ((r >> 2) & 0x33)
        r = (r + (r >> 4)) & 0x0F
        qh = tl.load(base + _QH + 2 * r + (i % 8) // 4, mask=valid & high, other=0).to(tl.int32)
        up = (qh >> (2 * (i % 4))) & 3
        level = tl.where(high, low2 | (up << 2), level)
    return 16 * level - z


@triton.jit
def _e8_integers(base, table, i, valid, EXT: tl.constexpr, NSUB: tl.constexpr, CODES: tl.constexpr):
    """HIQ2_E8*: q * (+-m) of weights ``i`` (int32, |.| <= 144); ``EXT`` index bits
    per group beyond the 9 in its code (0, 2, 4), ``NSUB`` sub-scales per block (4, 2),
    ``CODES`` the byte offset of the group codes (formats.E8Type.codes_at)."""
    # sub-scale k = i / (64 / NSUB): nibble k % 2 of byte 2 + k / 2, stored as q - 1
    k = i // (_BLOCK // NSUB)
    sb = tl.load(base + 2 + k // 2, mask=valid, other=0).to(tl.int32)
    q = ((sb >> (4 * (k % 2))) & 15) + 1
    g = i // 8
    c_lo = tl.load(base + CODES + 2 * g, mask=valid, other=0).to(tl.int32)
    c_hi = tl.load(base + CODES + 2 * g + 1, mask=valid, other=0).to(tl.int32)
    code = c_lo | (c_hi << 8)
    e = code & _E8_LOW_MASK
    if EXT > 0:
        # group g's upper bits are bits EXT*g.. of the little-endian ext bytes; EXT
        # divides 8 (_member checks), so they never straddle a byte: one load per weight
        xb = tl.load(base + CODES + 2 * 8 + (EXT * g) // 8, mask=valid, other=0).to(tl.int32)
        e = e | (((xb >> ((EXT * g) % 8)) & ((1 << EXT) - 1)) << _E8_LOW)
    # one table word per codebook entry: the magnitudes and the parity in one gather
    entry = tl.load(table + e, mask=valid, other=0)
    j = i % 8
    m = 2 * ((entry >> (3 * j)) & 7) + 1
    # weight 7's sign is not stored: the lattice rule makes parity(e) + #negative even,
    # so it is the parity of the 7 stored sign bits xor the entry's parity
    s = (code >> 9) & 127
    p = s ^ (s >> 4)
    p = p ^ (p >> 2)
    p = (p ^ (p >> 1) ^ (entry >> 24)) & 1
    neg = tl.where(j == 7, p, (s >> j) & 1)
    return tl.where(neg != 0, -(q * m), q * m)


@triton.jit
def _dequantize_kernel(raw, table, out, n_blocks, N_HIGH: tl.constexpr, E8: tl.constexpr,
                       E8_EXT: tl.constexpr, E8_NSUB: tl.constexpr, E8_CODES: tl.constexpr,
                       TYPE_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
    # every block describes itself, so the tensor is one flat run of blocks
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    i = tl.arange(0, _BLOCK)[None, :]
    valid = blk < n_blocks
    w = _decode(raw, table, blk, i, valid, N_HIGH, E8, E8_EXT, E8_NSUB, E8_CODES, TYPE_SIZE)
    tl.store(out + blk * _BLOCK + i, w, mask=valid)


@triton.jit
def _gemv_kernel(x, raw, table, y, N, K, stride_xm, stride_ym, N_HIGH: tl.constexpr,
                 E8: tl.constexpr, E8_EXT: tl.constexpr, E8_NSUB: tl.constexpr, E8_CODES: tl.constexpr,
                 TYPE_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    # program (column tile, activation row): y[m, n:n+BLOCK_N]
    m = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    i = tl.arange(0, _BLOCK)[None, :]
    valid = n < N
    nb = K // _BLOCK
    acc = tl.zeros([BLOCK_N, _BLOCK], dtype=tl.float32)
    for b in range(0, nb):
        w = _decode(raw, table, n * nb + b, i, valid, N_HIGH, E8, E8_EXT, E8_NSUB, E8_CODES, TYPE_SIZE)
        xv = tl.load(x + m * stride_xm + b * _BLOCK + i).to(tl.float32)
        acc += w * xv
    out = tl.sum(acc, axis=1)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y + m * stride_ym + cols, out.to(y.dtype.element_ty), mask=cols < N)


@triton.jit
def _gemm_kernel(x, raw, table, y, M, N, K, stride_xm, stride_ym, N_HIGH: tl.constexpr,
                 E8: tl.constexpr, E8_EXT: tl.constexpr, E8_NSUB: tl.constexpr, E8_CODES: tl.constexpr,
                 TYPE_SIZE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # program (row tile, column tile): y[rm, rn], one 64-weight block of K per step
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, _BLOCK)
    nb = K // _BLOCK
    row_ok = rm[:, None] < M
    col_ok = rn[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, nb):
        xt = tl.load(x + rm[:, None] * stride_xm + b * _BLOCK + i[None, :], mask=row_ok, other=0.0)
        w = _decode(raw, table, rn[:, None] * nb + b, i[None, :], col_ok, N_HIGH, E8, E8_EXT, E8_NSUB, E8_CODES,
                    TYPE_SIZE)
        acc = tl.dot(xt, tl.trans(w).to(xt.dtype), acc, input_precision=PRECISION)
    out = y + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=row_ok & (rn[None, :] < N))


# ---- launchers ---------------------------------------------------------------
def e8_table() -> np.ndarray:
    """The largest E8 codebook as the kernels read it -> int32 [8192]: entry e holds
    (m_ej - 1) / 2 in bits 3j .. 3j+2 (the magnitudes are odd, at most 9, so 0..4)
    and its parity in bit 24, so one load gives a weight both. Every member's
    codebook is a prefix of it, so every member indexes this one table."""
    grid = e8_grid(_E8_TABLE_ENTRIES)
    half = (grid.astype(np.int32) - 1) // 2
    words = (half << (3 * np.arange(GROUP, dtype=np.int32))).sum(1, dtype=np.int32)
    return (words | (e8_parity(grid).astype(np.int32) << 24)).astype(np.int32)


@functools.cache
def _e8_table(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(e8_table()).to(device)


def _member(raw: torch.Tensor, qtype) -> tuple[int, int, torch.Tensor, dict]:
    """-> (rows N, columns K, codebook table, the kernels' type constants); the one
    place a type object becomes kernel arguments, with clear errors for bytes that
    are not rows of that type."""
    if not isinstance(qtype, (HIQ2Type, E8Type)) or ALL_TYPES.get(qtype.type_id) != qtype:
        raise FormatError(f"not an HIQ2 type: {qtype!r} (pass a type object of hiq2gguf.formats, "
                          "e.g. formats.get_type(id))")
    t = qtype
    if raw.dtype != torch.uint8 or raw.ndim != 2:
        raise FormatError(f"{t.name}: expected uint8 [rows, row_bytes], got {raw.dtype} {tuple(raw.shape)}")
    if raw.shape[1] == 0 or raw.shape[1] % t.type_size:
        raise FormatError(f"{t.name}: row bytes {raw.shape[1]} are not a whole number of "
                          f"{t.type_size}-byte blocks")
    if not raw.is_contiguous():
        raise FormatError(f"{t.name}: packed bytes must be contiguous")
    e8 = isinstance(t, E8Type)
    if e8 and (t.entries > _E8_TABLE_ENTRIES or (t.ext_bits and 8 % t.ext_bits)):
        # the table holds 8192 entries, and the decode reads a group's upper index bits
        # from one byte (see _e8_integers): a future member outside either is refused
        raise FormatError(f"{t.name}: the Triton kernels do not decode this codebook size")
    # the H decode never reads the table: any pointer will do
    table = _e8_table(raw.device) if e8 else raw
    consts = dict(N_HIGH=0 if e8 else t.n_high, E8=e8, E8_EXT=t.ext_bits if e8 else 0,
                  E8_NSUB=t.n_sub if e8 else 4, E8_CODES=t.codes_at if e8 else 0,
                  TYPE_SIZE=t.type_size)
    return raw.shape[0], raw.shape[1] // t.type_size * BLOCK, table, consts


def dequantize(raw: torch.Tensor, qtype: HIQ2Type | E8Type, blocks_per_program: int = 16) -> torch.Tensor:
    """uint8 [rows, row_bytes] of ``qtype`` -> float32 [rows, cols] on raw's device."""
    rows, cols, table, consts = _member(raw, qtype)
    out = torch.empty((rows, cols), dtype=torch.float32, device=raw.device)
    n_blocks = rows * cols // BLOCK
    if n_blocks:
        grid = (triton.cdiv(n_blocks, blocks_per_program),)
        _dequantize_kernel[grid](raw, table, out, n_blocks, **consts, BLOCKS=blocks_per_program)
    return out


def _activations(x: torch.Tensor, raw: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"activations have {x.shape[-1]} features, the weight has {k} columns")
    if x.device != raw.device:
        raise ValueError(f"activations on {x.device}, packed weight on {raw.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
    return x.reshape(-1, k).contiguous()


def gemv(x: torch.Tensor, raw: torch.Tensor, qtype: HIQ2Type | E8Type, block_n: int = 64) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N], one program per (activation row, ``block_n`` outputs)."""
    n, k, table, consts = _member(raw, qtype)
    x2 = _activations(x, raw, k)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] and n:
        grid = (triton.cdiv(n, block_n), x2.shape[0])
        _gemv_kernel[grid](x2, raw, table, y, n, k, x2.stride(0), y.stride(0), **consts,
                           BLOCK_N=block_n)
    return y.reshape(*x.shape[:-1], n)


def gemm(x: torch.Tensor, raw: torch.Tensor, qtype: HIQ2Type | E8Type, block_m: int = 64,
         block_n: int = 64, precision: str = "ieee") -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] with tl.dot tiles (block_m, block_n >= 16).

    float32 activations multiply in full float32 (``precision="ieee"``, like
    torch's default, which has TF32 off); float16/bfloat16 activations round the
    dequantized weights to their dtype and accumulate in float32.
    """
    n, k, table, consts = _member(raw, qtype)
    x2 = _activations(x, raw, k)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] and n:
        grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(n, block_n))
        _gemm_kernel[grid](x2, raw, table, y, x2.shape[0], n, k, x2.stride(0), y.stride(0), **consts,
                           BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision)
    return y.reshape(*x.shape[:-1], n)


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: HIQ2Type | E8Type) -> torch.Tensor:
    """x [..., K] @ W^T from the packed bytes: GEMV for a few activation rows, else GEMM."""
    rows = x.numel() // max(x.shape[-1], 1)
    return gemv(x, raw, qtype) if rows < GEMV_MAX_ROWS else gemm(x, raw, qtype)
