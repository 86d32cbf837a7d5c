"""Numpy reference for the HIQ2 tensor type family (see docs/FORMAT.md).

This module is the single source of truth for the byte layout: the C kernels
in kernels/ggml, the PyTorch fake-quantization and the Triton kernels are all
tested against it bit for bit.

One class describes the family; one instance per member (H = number of
high-bit groups per 64-weight block) lives in a registry keyed by ggml type id
and by name, like gguf-py's ``quants.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

BLOCK = 64            # weights per block
GROUP = 8             # weights per channel group
N_GROUPS = BLOCK // GROUP
HEADER_BYTES = 4      # fp16 d, u8 z, u8 mask
QL_BYTES = BLOCK // 4
FIRST_TYPE_ID = 100   # well away from mainline ggml ids (which end at 42)
LOW_STEP = 5          # a low-group code c sits at level 5c of the 16-level grid


class FormatError(ValueError):
    """Data that does not fit, or does not decode as, an HIQ2 tensor."""


def pack_tensor(name: str, qtype, codes) -> np.ndarray:
    """``qtype.pack(codes)`` for a file: only valid rows (every block scale a finite
    float16), and a failure names the tensor. ``pack`` itself, like the C reference
    quantizer it matches bit for bit, stores any scale: weights too large for a float16
    one (|w| beyond ~10^5) become an inf that decodes to inf/NaN in every kernel."""
    try:
        if not np.isfinite(np.asarray(codes.d).astype(np.float16)).all():
            raise FormatError(f"{qtype.name}: weights too large for a float16 block scale "
                              f"(a block's scale exceeds {float(np.finfo(np.float16).max):.0f})")
        return qtype.pack(codes)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None


@dataclass(frozen=True)
class Codes:
    """Decoded content of an HIQ2 tensor, one entry per block (rows, nblocks).

    ``levels`` are the integer grid levels L in 0..15 of every weight (low
    groups only use multiples of 5); ``mask`` has bit g set for high group g.
    """

    d: np.ndarray       # float16 [rows, nb]
    z: np.ndarray       # uint8   [rows, nb]
    mask: np.ndarray    # uint8   [rows, nb]
    levels: np.ndarray  # uint8   [rows, nb, 64]

    def dequantize(self) -> np.ndarray:
        """w = d * (16 L - z) / 16, exact in float32 (see FORMAT.md)."""
        d = self.d.astype(np.float32)[..., None]
        q = 16 * self.levels.astype(np.int32) - self.z.astype(np.int32)[..., None]
        w = d * q.astype(np.float32) / np.float32(16)
        return w.reshape(w.shape[0], -1)


def high_group_flags(mask: np.ndarray) -> np.ndarray:
    """uint8 mask [...] -> bool [..., 8], group g high when bit g is set."""
    return ((mask[..., None] >> np.arange(N_GROUPS, dtype=np.uint8)) & 1).astype(bool)


def popcount8(mask: np.ndarray) -> np.ndarray:
    return high_group_flags(mask).sum(-1)


def _blocks_and_scales(raw: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """Row bytes [rows, nb * type_size] of any of our types -> (blocks uint8 [rows, nb,
    type_size], their fp16 scales d [rows, nb]: every member starts with it)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % qtype.type_size:
        raise FormatError(f"{qtype.name}: row bytes {raw.shape} are not a whole number of "
                          f"{qtype.type_size}-byte blocks")
    b = raw.reshape(raw.shape[0], -1, qtype.type_size)
    return b, b[..., 0:2].copy().view("<f2").reshape(b.shape[:2])


@dataclass(frozen=True)
class HIQ2Type:
    """One member of the family: blocks of 64 weights with ``n_high`` 4-bit groups."""

    n_high: int

    @property
    def type_id(self) -> int:
        return FIRST_TYPE_ID + self.n_high

    @property
    def name(self) -> str:
        return f"HIQ2_H{self.n_high}"

    block_size = BLOCK

    @property
    def type_size(self) -> int:
        return HEADER_BYTES + QL_BYTES + 2 * self.n_high

    @property
    def bpw(self) -> float:
        return self.type_size * 8 / BLOCK

    @property
    def ratio(self) -> float:
        """Fraction of channel groups stored high-bit."""
        return self.n_high / N_GROUPS

    # ---- shapes -----------------------------------------------------------
    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise FormatError(f"{self.name} stores 2-D weights, got shape {tuple(shape)}")
        if shape[1] % BLOCK:
            raise FormatError(
                f"{self.name} needs a multiple of {BLOCK} input columns, got {shape[1]} "
                f"(shape {tuple(shape)})")

    def row_bytes(self, n_cols: int) -> int:
        return n_cols // BLOCK * self.type_size

    # ---- packing ------------------------------------------------------------
    def pack(self, codes: Codes) -> np.ndarray:
        """Codes -> uint8 [rows, nblocks * type_size], the bytes the file stores."""
        rows, nb = codes.d.shape
        high = high_group_flags(codes.mask)                      # [r, nb, 8]
        if (high.sum(-1) != self.n_high).any():
            raise FormatError(f"{self.name}: every block mask needs exactly {self.n_high} bits set")
        lv = codes.levels.astype(np.uint8).reshape(rows, nb, N_GROUPS, GROUP)
        if (lv > 15).any():
            raise FormatError("levels must lie in 0..15")
        low_lv = lv[~high]
        if (low_lv % LOW_STEP).any():
            raise FormatError("low-group levels must be multiples of 5")
        c = np.where(high[..., None], lv, lv // LOW_STEP).reshape(rows, nb, BLOCK)

        out = np.zeros((rows, nb, self.type_size), dtype=np.uint8)
        out[..., 0:2] = codes.d.astype("<f2").view(np.uint8).reshape(rows, nb, 2)
        out[..., 2] = codes.z
        out[..., 3] = codes.mask
        low2 = (c & 3).reshape(rows, nb, 4, QL_BYTES)            # [.., plane s, byte]
        ql = np.zeros((rows, nb, QL_BYTES), dtype=np.uint8)
        for s in range(4):
            ql |= low2[..., s, :] << (2 * s)
        out[..., 4:20] = ql
        if self.n_high:
            # upper 2 bits of the high groups, in increasing group order
            order = np.argsort(~high, axis=-1, kind="stable")[..., : self.n_high]  # [r, nb, H]
            hc = np.take_along_axis(c.reshape(rows, nb, N_GROUPS, GROUP), order[..., None], axis=2)
            up = (hc >> 2).reshape(rows, nb, self.n_high, 2, 4)  # [.., k, byte, j%4]
            qh = np.zeros((rows, nb, self.n_high, 2), dtype=np.uint8)
            for j in range(4):
                qh |= up[..., j] << (2 * j)
            out[..., 20:] = qh.reshape(rows, nb, 2 * self.n_high)
        return out.reshape(rows, nb * self.type_size)

    def unpack(self, raw: np.ndarray) -> Codes:
        b, d = _blocks_and_scales(raw, self)
        rows, nb = d.shape
        z = b[..., 2].copy()
        mask = b[..., 3].copy()
        high = high_group_flags(mask)
        if (high.sum(-1) != self.n_high).any():
            raise FormatError(f"{self.name}: a block mask does not have {self.n_high} bits set")
        ql = b[..., 4:20]
        c = np.concatenate([(ql >> (2 * s)) & 3 for s in range(4)], axis=-1)  # [r, nb, 64]
        c = c.reshape(rows, nb, N_GROUPS, GROUP)
        if self.n_high:
            qh = b[..., 20:].reshape(rows, nb, self.n_high, 2)
            up = np.stack([(qh >> (2 * j)) & 3 for j in range(4)], axis=-1).reshape(
                rows, nb, self.n_high, GROUP)
            order = np.argsort(~high, axis=-1, kind="stable")[..., : self.n_high]
            cur = np.take_along_axis(c, order[..., None], axis=2)
            np.put_along_axis(c, order[..., None], cur | (up << 2), axis=2)
        levels = np.where(high[..., None], c, c * LOW_STEP).astype(np.uint8)
        return Codes(d=d, z=z, mask=mask, levels=levels.reshape(rows, nb, BLOCK))

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """uint8 [rows, nbytes] -> float32 [rows, cols]."""
        return self.unpack(raw).dequantize()

    # ---- reference quantizer (byte-identical to the C one) ------------------
    def quantize_ref(self, x: np.ndarray) -> np.ndarray:
        """float32 [rows, cols] -> packed bytes, by FORMAT.md's reference algorithm."""
        x = np.asarray(x, dtype=np.float32)
        self.check_shape(x.shape)
        rows = x.shape[0]
        xb = x.reshape(rows, -1, BLOCK)
        nb = xb.shape[1]
        score = np.abs(xb).reshape(rows, nb, N_GROUPS, GROUP).max(-1)
        mask = select_mask(score, self.n_high)
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = np.minimum(xb.min(-1), np.float32(0))
            hi = np.maximum(xb.max(-1), np.float32(0))
            d = ((hi - lo) / np.float32(15)).astype(np.float16)
            df = d.astype(np.float32)
            zero = df == 0
            zf = np.floor(-lo / df * np.float32(16) + np.float32(0.5))
            z = np.where(zero, 0, np.clip(zf, 0, 255)).astype(np.uint8)
            m = (z.astype(np.float32) / np.float32(16))[..., None]
            t = xb / df[..., None] + m
            lv_high = np.clip(np.floor(t + np.float32(0.5)), 0, 15)
            c_low = np.clip(np.floor((t + np.float32(2.5)) / np.float32(LOW_STEP)), 0, 3)
        high = np.repeat(high_group_flags(mask), GROUP, axis=-1)
        levels = np.where(high, lv_high, c_low * LOW_STEP)
        levels = np.where(zero[..., None], 0, levels).astype(np.uint8)
        return self.pack(Codes(d=d, z=z, mask=mask, levels=levels))


def select_mask(score: np.ndarray, n_high: int) -> np.ndarray:
    """Top-``n_high`` groups by score per block (ties: lower index) -> uint8 mask."""
    order = np.argsort(-score, axis=-1, kind="stable")[..., :n_high]
    bits = np.zeros(score.shape[:-1], dtype=np.uint8)
    for k in range(n_high):
        bits |= (np.uint8(1) << order[..., k].astype(np.uint8))
    return bits


# ---- HIQ2_E8*: the lattice-coded members (docs/FORMAT.md, "HIQ2_E8") ---------------
E8_ENTRIES = 512          # HIQ2_E8's codebook (9-bit index); larger members extend it
E8_SCALE_STEPS = 16       # sub-scale q in 1..16: the group's unit is d q / 16
E8_LOW_BITS = 9           # index bits in a group's u16 code; the rest of a larger index follows it


@functools.cache
def e8_grid(entries: int = E8_ENTRIES) -> np.ndarray:
    """A codebook: the ``entries`` vectors of odd magnitudes of smallest norm -> uint8 [n, 8].

    Order: by norm, then by the magnitudes sorted in decreasing order (lexicographically),
    then by the vector itself; so every codebook is a prefix of every larger one.
    Candidates are (1, 3, ..., top)^8: the 2048 smallest have norm at most 72, which no
    vector with a 9 (norm >= 88) reaches, the 8192 smallest at most 104, which none
    with an 11 (norm >= 128) reaches."""
    if entries > 8192:
        raise ValueError("codebooks above 8192 entries need magnitudes beyond 9")
    odd = np.arange(1, 8 if entries <= 2048 else 10, 2)
    vecs = np.stack(np.meshgrid(*[odd] * GROUP, indexing="ij"), -1).reshape(-1, GROUP)
    norm = (vecs.astype(np.int64) ** 2).sum(1)
    desc = -np.sort(-vecs, axis=1)
    keys = [vecs[:, i] for i in reversed(range(GROUP))] + [desc[:, i] for i in reversed(range(GROUP))] + [norm]
    grid = vecs[np.lexsort(keys)[:entries]].astype(np.uint8)
    grid.setflags(write=False)
    return grid


def e8_parity(grid: np.ndarray) -> np.ndarray:
    """The lattice rule: with sign bits s_j (1 = negative) a group's signed sum is a
    multiple of 4 exactly when sum(m)/2 + #negative is even; an entry's parity is
    (sum(m)/2) mod 2 -> uint8 [n]."""
    return ((grid.astype(np.int64).sum(1) // 2) & 1).astype(np.uint8)


E8_GRID = e8_grid(E8_ENTRIES)
E8_PARITY = e8_parity(E8_GRID)


@dataclass(frozen=True)
class E8Codes:
    """Decoded content of an HIQ2_E8* tensor, per block (rows, nblocks).

    ``index`` picks each group's magnitude vector in the member's codebook
    (``e8_grid(entries)``); ``negative`` is every weight's sign bit (the 8th of a group is
    implied by the lattice rule and must agree with it); ``scales`` are the sub-scales
    q in 1..16 (4 per block, or 2 for HIQ2_E8_XS: each covers 64 / n_sub weights)."""

    d: np.ndarray         # float16 [rows, nb]
    scales: np.ndarray    # uint8   [rows, nb, n_sub]
    index: np.ndarray     # uint16  [rows, nb, 8]
    negative: np.ndarray  # bool    [rows, nb, 64]
    entries: int = E8_ENTRIES

    def integers(self) -> np.ndarray:
        """q * (+-m) of every weight -> int32 [rows, nb, 64] (|.| <= 16 x 9)."""
        rows, nb = self.d.shape
        m = e8_grid(self.entries)[self.index.astype(np.int64)].astype(np.int32).reshape(rows, nb, BLOCK)
        q = np.repeat(self.scales.astype(np.int32), BLOCK // self.scales.shape[-1], axis=-1)
        return np.where(self.negative, -m, m) * q

    def dequantize(self) -> np.ndarray:
        """w = d * (q m s) / 16, exact in float32 (see FORMAT.md)."""
        d = self.d.astype(np.float32)[..., None]
        w = d * self.integers().astype(np.float32) / np.float32(16)
        return w.reshape(w.shape[0], -1)


@dataclass(frozen=True)
class E8Type:
    """HIQ2_E8*: 64-weight blocks of 8 E8-lattice codes under ``n_sub`` 4-bit sub-scales
    (4, or 2 for HIQ2_E8_XS); the codebook has 2^index_bits entries (9: HIQ2_E8, 2.5 bpw,
    HIQ2_E8_XS 2.375; 11: 2.75; 13: 3.0)."""

    type_id: int
    index_bits: int
    n_sub: int = 4

    block_size = BLOCK
    ratio = 0.0                                         # no high groups

    @property
    def entries(self) -> int:
        return 1 << self.index_bits

    @property
    def sub(self) -> int:
        """Weights per sub-scale (16, or 32 for HIQ2_E8_XS)."""
        return BLOCK // self.n_sub

    @property
    def ext_bits(self) -> int:
        """Index bits per group beyond the 9 in its u16 code (stored after the codes)."""
        return self.index_bits - E8_LOW_BITS

    @property
    def name(self) -> str:
        return ("HIQ2_E8" + ("" if self.ext_bits == 0 else f"_{self.entries // 1024}K")
                + ("" if self.n_sub == 4 else "_XS"))

    @property
    def codes_at(self) -> int:
        """Byte offset of the group codes: after fp16 d and the sub-scale nibbles."""
        return 2 + self.n_sub // 2

    @property
    def base_bytes(self) -> int:
        """The block without the extension bytes (20; HIQ2_E8_XS 19)."""
        return self.codes_at + 2 * N_GROUPS

    @property
    def type_size(self) -> int:
        return self.base_bytes + N_GROUPS * self.ext_bits // 8

    @property
    def bpw(self) -> float:
        return self.type_size * 8 / BLOCK

    @property
    def grid(self) -> np.ndarray:
        return e8_grid(self.entries)

    @property
    def ref_amax(self) -> int:
        """The reference quantizer maps a sub-block's max |x| to this magnitude: one
        below the codebook's largest (4 for HIQ2_E8)."""
        return int(self.grid.max()) - 1

    check_shape = HIQ2Type.check_shape
    row_bytes = HIQ2Type.row_bytes

    def pack(self, codes: E8Codes) -> np.ndarray:
        rows, nb = codes.d.shape
        q = codes.scales.astype(np.int64)
        if q.shape != (rows, nb, self.n_sub):
            raise FormatError(f"{self.name}: sub-scales {q.shape}, want {(rows, nb, self.n_sub)}")
        if ((q < 1) | (q > E8_SCALE_STEPS)).any():
            raise FormatError(f"{self.name}: sub-scales must lie in 1..{E8_SCALE_STEPS}")
        idx = codes.index.astype(np.int64)
        if ((idx < 0) | (idx >= self.entries)).any():
            raise FormatError(f"{self.name}: codebook indices must lie in 0..{self.entries - 1}")
        neg = codes.negative.reshape(rows, nb, N_GROUPS, GROUP).astype(np.int64)
        if ((neg.sum(-1) + e8_parity(self.grid)[idx]) & 1).any():
            raise FormatError(f"{self.name}: a group's signs break the lattice rule "
                              "(sum(m)/2 + #negative must be even)")
        out = np.zeros((rows, nb, self.type_size), dtype=np.uint8)
        out[..., 0:2] = codes.d.astype("<f2").view(np.uint8).reshape(rows, nb, 2)
        nib = (q - 1).astype(np.uint8)
        out[..., 2:self.codes_at] = nib[..., 0::2] | (nib[..., 1::2] << 4)
        low = idx & ((1 << E8_LOW_BITS) - 1)
        code = low | ((neg[..., :GROUP - 1] << np.arange(9, 16)).sum(-1))
        out[..., self.codes_at:self.base_bytes] = code.astype("<u2").view(np.uint8).reshape(rows, nb, 2 * N_GROUPS)
        if self.ext_bits:
            ext = ((idx >> E8_LOW_BITS) << (self.ext_bits * np.arange(N_GROUPS))).sum(-1)   # < 2^32
            out[..., self.base_bytes:] = ext.astype("<u4").view(np.uint8).reshape(rows, nb, 4)[
                ..., :self.type_size - self.base_bytes]
        return out.reshape(rows, nb * self.type_size)

    def unpack(self, raw: np.ndarray) -> E8Codes:
        b, d = _blocks_and_scales(raw, self)
        rows, nb = d.shape
        nib = b[..., 2:self.codes_at]
        scales = np.stack([nib & 15, nib >> 4], -1).reshape(rows, nb, self.n_sub) + 1
        code = b[..., self.codes_at:self.base_bytes].copy().view("<u2").reshape(rows, nb, N_GROUPS).astype(np.int64)
        index = code & ((1 << E8_LOW_BITS) - 1)
        if self.ext_bits:
            ext_bytes = b[..., self.base_bytes:].astype(np.int64)
            ext = (ext_bytes << (8 * np.arange(ext_bytes.shape[-1]))).sum(-1)
            index |= ((ext[..., None] >> (self.ext_bits * np.arange(N_GROUPS))) & ((1 << self.ext_bits) - 1)) \
                << E8_LOW_BITS
        signs = (code[..., None] >> np.arange(9, 16)) & 1                    # weights 0..6
        last = (signs.sum(-1) + e8_parity(self.grid)[index]) & 1             # weight 7: the rule
        negative = np.concatenate([signs, last[..., None]], -1).astype(bool).reshape(rows, nb, BLOCK)
        return E8Codes(d=d, scales=scales.astype(np.uint8), index=index.astype(np.uint16), negative=negative,
                       entries=self.entries)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        return self.unpack(raw).dequantize()

    def quantize_ref(self, x: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """float32 [rows, cols] -> packed bytes, by FORMAT.md's reference algorithm
        (every float32 operation in the order written there, as the C one does)."""
        x = np.asarray(x, dtype=np.float32)
        self.check_shape(x.shape)
        rows = x.shape[0]
        xb = x.reshape(rows, -1, BLOCK)
        nb = xb.shape[1]
        s = np.abs(xb).reshape(rows, nb, self.n_sub, self.sub).max(-1) / np.float32(self.ref_amax)
        d = s.max(-1).astype(np.float16)
        df = d.astype(np.float32)
        zero = df == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            qf = np.floor(s / df[..., None] * np.float32(16) + np.float32(0.5))
        q = np.where(zero[..., None], 1, np.clip(qf, 1, E8_SCALE_STEPS)).astype(np.uint8)
        unit = df[..., None] * q.astype(np.float32) / np.float32(16)           # [r, nb, n_sub]
        unit = np.repeat(unit, self.sub // GROUP, axis=-1)                      # per group
        g = xb.reshape(-1, GROUP)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = (np.abs(g) / unit.reshape(-1, 1)).astype(np.float32)
        neg = g < 0
        index = np.zeros(len(g), dtype=np.uint16)
        m_all = self.grid.astype(np.float32)
        parity = e8_parity(self.grid)
        for c0 in range(0, len(g), chunk):
            ac, nc = a[c0:c0 + chunk], neg[c0:c0 + chunk]
            err = np.zeros((len(ac), self.entries), dtype=np.float32)
            for j in range(GROUP):                                   # in order j = 0..7
                t = ac[:, None, j] - m_all[None, :, j]
                err = err + t * t
            flip = (ac[:, None, :] * m_all[None]).min(-1) * np.float32(4)
            bad = ((nc.sum(-1)[:, None] + parity[None]) & 1).astype(bool)
            err = np.where(bad, err + flip, err)
            index[c0:c0 + chunk] = err.argmin(-1)                    # first of equal errors
        m = m_all[index]
        bad = ((neg.sum(-1) + parity[index]) & 1).astype(bool)
        j = (a * m).argmin(-1)                                       # the cheapest sign to flip
        neg[bad, j[bad]] ^= True
        zero_g = np.repeat(zero, N_GROUPS, axis=-1).reshape(-1)
        index[zero_g] = 0
        neg[zero_g] = False
        return self.pack(E8Codes(d=d, scales=q, index=index.reshape(rows, nb, N_GROUPS),
                                 negative=neg.reshape(rows, nb, BLOCK), entries=self.entries))


E8 = E8Type(FIRST_TYPE_ID + N_GROUPS + 1, 9)           # 109
E8_2K = E8Type(E8.type_id + 1, 11)
E8_8K = E8Type(E8.type_id + 2, 13)
# below 2.5 bpw: one sub-scale per 32 weights, so that a plan at 2.5 can pay for
# larger members where they matter most (as llama-quantize's IQ2_S/IQ2_M mixes do)
E8_XS = E8Type(E8.type_id + 3, 9, n_sub=2)              # 112
E8_TYPES = (E8, E8_2K, E8_8K, E8_XS)

HIQ2_TYPES: dict[int, HIQ2Type] = {t.type_id: t for t in (HIQ2Type(h) for h in range(N_GROUPS + 1))}
# every tensor type of ours, the H family and the lattice member
ALL_TYPES: dict[int, HIQ2Type | E8Type] = {**HIQ2_TYPES, **{t.type_id: t for t in E8_TYPES}}
_BY_NAME = {t.name: t for t in ALL_TYPES.values()}


def get_type(key: int | str) -> HIQ2Type | E8Type:
    if isinstance(key, str):
        t = _BY_NAME.get(key.upper())
    else:
        t = ALL_TYPES.get(int(key))
    if t is None:
        raise FormatError(f"not an HIQ2 type: {key!r} (known: {', '.join(_BY_NAME)})")
    return t


def is_hiq2(type_id: int) -> bool:
    return int(type_id) in ALL_TYPES


def min_bpw() -> float:
    return min(t.bpw for t in ALL_TYPES.values())


def max_bpw() -> float:
    return max(t.bpw for t in ALL_TYPES.values())


def register_with_gguf() -> None:
    """Teach the gguf package our type ids, so GGUFReader/GGUFWriter handle them.

    gguf's enum stops at mainline ids; we add pseudo-members and their block
    sizes. Idempotent; this is the only place that touches gguf's tables.
    Also the mainline types the pinned gguf package lacks (MAINLINE_TYPES_MISSING_IN_GGUF),
    so files of the pinned llama.cpp's llama-quantize can be read.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT

    types = [(t.type_id, t.name, BLOCK, t.type_size) for t in ALL_TYPES.values()]
    for type_id, name, block, type_size in types + list(MAINLINE_TYPES_MISSING_IN_GGUF):
        if type_id in QT._value2member_map_:
            continue
        member = int.__new__(QT, type_id)
        member._name_ = name
        member._value_ = type_id
        QT._value2member_map_[type_id] = member
        GGML_QUANT_SIZES[member] = (block, type_size)


# (ggml id, name, block size, bytes per block) of types the pinned llama.cpp has and
# gguf 0.19.0 does not (ggml-common.h: block_q2_0 = fp16 scale + 64 x 2 bits)
MAINLINE_TYPES_MISSING_IN_GGUF = ((42, "Q2_0", 64, 2 + 64 // 4),)
