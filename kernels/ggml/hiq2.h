// HIQ2 tensor type family for ggml (hiq2gguf). See docs/FORMAT.md.
//
// One generic implementation parameterised by H (number of 4-bit "high"
// channel groups per 64-weight block); every family member is one row of
// HIQ2_FOREACH below and one row of the function table in hiq2.c. The lattice
// members HIQ2_E8, HIQ2_E8_2K, HIQ2_E8_8K, HIQ2_E8_XS (ids 109..112, their own block
// layout) are likewise one generic implementation parameterised by the index bits
// and the number of sub-scales, one
// row each of HIQ2_E8_FOREACH, of that table and of the type-traits rows below;
// they are not in HIQ2_FOREACH, which lists the H family only (and is what the
// CUDA kernels, kernels/cuda, implement).
//
// This header is copied into ggml/src/ by kernels/ggml/patch.py and included
// by ggml.c, ggml-quants.c, ggml-cpu/ggml-cpu.c, ggml-cpu/ops.cpp.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QK_HIQ2           64                        // weights per block
#define HIQ2_GROUP        8                         // weights per channel group
#define HIQ2_NGROUPS      (QK_HIQ2 / HIQ2_GROUP)    // 8 groups per block
#define HIQ2_QL_BYTES     (QK_HIQ2 / 4)             // 16 bytes of low 2-bit planes
#define HIQ2_HEADER_BYTES 4                         // fp16 d, u8 z, u8 mask
#define HIQ2_TYPE_SIZE(H) (HIQ2_HEADER_BYTES + HIQ2_QL_BYTES + 2 * (H))
#define HIQ2_FIRST_TYPE   100                       // ggml type id of HIQ2_H0
#define HIQ2_NTYPES       9                         // H = 0..8
#define HIQ2_E8_TYPE      (HIQ2_FIRST_TYPE + HIQ2_NTYPES)  // ggml type id of HIQ2_E8: 109
#define HIQ2_E8_NTYPES    4                         // HIQ2_E8, HIQ2_E8_2K, HIQ2_E8_8K, HIQ2_E8_XS
#define HIQ2_NTYPES_ALL   (HIQ2_NTYPES + HIQ2_E8_NTYPES)  // every type of ours: the H family and the E8 members

// The family: X(H) for every member. Adding/removing a member = edit this list
// (and patch.py's list of enum ids, which is generated from the same range).
#define HIQ2_FOREACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)

// The lattice members: X(suffix, SUFFIX, ID, B, NS, A) with ggml id ID, B index bits per
// group (a 2^B-entry codebook), NS 4-bit sub-scales per block (4, or 2 for HIQ2_E8_XS;
// HIQ2_E8_TYPE_SIZE(B, NS) bytes per block) and A the magnitude the reference quantizer
// maps a sub-block's max |x| to (the codebook's largest magnitude less one). Adding a
// member = one row here (and in patch.py).
#define HIQ2_E8_FOREACH(X) X(e8, E8, 109, 9, 4, 4) X(e8_2k, E8_2K, 110, 11, 4, 6) X(e8_8k, E8_8K, 111, 13, 4, 8) X(e8_xs, E8_XS, 112, 9, 2, 4)

// Generic block layout; the per-H block is a prefix of this struct
// (qh holds 2H meaningful bytes). Byte offsets: d 0, z 2, mask 3, ql 4, qh 20.
typedef struct {
    uint16_t d;                      // fp16 scale bits, d >= 0, finite
    uint8_t  z;                      // zero point in units of d/16
    uint8_t  mask;                   // bit g => group g is high; popcount == H
    uint8_t  ql[HIQ2_QL_BYTES];      // low 2 bits of every code
    uint8_t  qh[2 * HIQ2_NGROUPS];   // upper 2 bits of the codes of high groups
} block_hiq2_max;

// Blocks are addressed by type_size = HIQ2_TYPE_SIZE(H) (no padding), never
// by sizeof(block_hiq2_max).

// ---- shared inline helpers (valid C and C++) ----------------------------------
// fp16 bits -> float32, exact (incl. subnormals, inf, nan).
static inline float ggml_hiq2_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e    = (h >> 10) & 0x1fu;
    const uint32_t m    = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (e == 0) {
        // subnormal or zero: m * 2^-24, exact in float32
        const float f = (float) m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (e == 31) {
        v.u = sign | 0x7f800000u | (m << 13);
    } else {
        v.u = sign | ((e + 112u) << 23) | (m << 13);
    }
    return v.f;
}

// float32 -> fp16 bits, round to nearest even, overflow -> inf (as numpy's astype(float16)).
static inline uint16_t ggml_hiq2_fp32_to_fp16(float f) {
    union { float f; uint32_t u; } v;
    v.f = f;
    const uint32_t sign = (v.u >> 16) & 0x8000u;
    const uint32_t x    = v.u & 0x7fffffffu;
    if (x >= 0x7f800000u) {                      // inf / nan
        return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
    }
    if (x >= 0x477ff000u) {                      // >= 65520 rounds to inf
        return (uint16_t)(sign | 0x7c00u);
    }
    if (x >= 0x38800000u) {                      // normal half
        uint32_t h = (((x >> 23) - 112u) << 10) | ((x & 0x7fffffu) >> 13);
        const uint32_t rem = x & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
            h += 1u;                             // carry into the exponent is correct
        }
        return (uint16_t)(sign | h);
    }
    // subnormal half (or zero): round m * 2^(E-150) to a multiple of 2^-24
    const uint32_t E = x >> 23;
    if (E == 0) {
        return (uint16_t) sign;                  // float32 subnormal: far below 2^-25
    }
    const uint32_t shift = 126u - E;             // >= 14
    if (shift > 24u) {
        return (uint16_t) sign;                  // < 2^-25 (== 2^-25 ties to even 0)
    }
    const uint32_t m    = (x & 0x7fffffu) | 0x800000u;
    uint32_t       h    = m >> shift;
    const uint32_t rem  = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) {
        h += 1u;
    }
    return (uint16_t)(sign | h);
}

static inline uint16_t ggml_hiq2_read_u16(const uint8_t * p) {
    return (uint16_t)(p[0] | ((uint16_t) p[1] << 8));
}

// Decode one block (H high groups) into q[i] = 16 L_i - z (in -255..240).
// Returns the block scale d. A mask with more than H bits set (invalid data)
// never reads past the block: groups beyond the H-th set bit decode as low.
static inline float ggml_hiq2_decode_block(int H, const uint8_t * blk, int16_t * q) {
    const float    d    = ggml_hiq2_fp16_to_fp32(ggml_hiq2_read_u16(blk));
    const int      z    = blk[2];
    const unsigned mask = blk[3];
    const uint8_t * ql  = blk + HIQ2_HEADER_BYTES;
    const uint8_t * qh  = blk + HIQ2_HEADER_BYTES + HIQ2_QL_BYTES;
    int k = 0;
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        const int high = ((mask >> g) & 1u) && k < H;
        for (int j = 0; j < HIQ2_GROUP; ++j) {
            const int i = g * HIQ2_GROUP + j;
            int c = (ql[i % HIQ2_QL_BYTES] >> (2 * (i / HIQ2_QL_BYTES))) & 3;
            int L;
            if (high) {
                c |= ((qh[2 * k + j / 4] >> (2 * (j % 4))) & 3) << 2;
                L = c;
            } else {
                L = 5 * c;
            }
            q[i] = (int16_t)(16 * L - z);
        }
        k += high;
    }
    return d;
}

// ---- HIQ2_E8* (docs/FORMAT.md, "HIQ2_E8, HIQ2_E8_2K, HIQ2_E8_8K") -------------
// Block of 64 weights, 18 + NS/2 + (B - 9) bytes: fp16 d (bytes 0..1), NS 4-bit
// sub-scales q_k - 1 (sub-block k = weights 64/NS k .. in byte 2 + k/2, bits 4 (k%2)..),
// 8 little-endian u16 codes (bytes 2 + NS/2 + 2g): bits 0..8 the low 9 bits of the index e
// into the codebook, bits 9..15 the signs of weights 0..6 of group g; then B - 9 bytes
// (none for HIQ2_E8) whose little-endian integer holds group g's upper index bits at
// bits (B-9) g ..; weight 7's sign makes parity(e) + #negative even.
// w_i = d * n_i / 16, n_i = q_k * (+-m_i), |n_i| <= 16 * 9 = 144.
#define HIQ2_E8_LOW_BITS   9                        // index bits in a group's u16 code
#define HIQ2_E8_MAX_BITS   13                       // the largest member's (HIQ2_E8_8K)
#define HIQ2_E8_MAX_ENTRIES (1 << HIQ2_E8_MAX_BITS) // 8192: the one table all members index
#define HIQ2_E8_MAX_NSUB   4                        // sub-scales per block: 4, or 2 (HIQ2_E8_XS)
#define HIQ2_E8_SUB(NS)        (QK_HIQ2 / (NS))     // weights per sub-scale: 16 or 32
#define HIQ2_E8_CODES(NS)      (2 + (NS) / 2)       // byte offset of the group codes
#define HIQ2_E8_BASE_BYTES(NS) (HIQ2_E8_CODES(NS) + 2 * HIQ2_NGROUPS)   // the block without the extension bytes
#define HIQ2_E8_TYPE_SIZE(B, NS) (HIQ2_E8_BASE_BYTES(NS) + (B) - HIQ2_E8_LOW_BITS)   // 8 groups x (B - 9) bits

// The codebook (hiq2-e8grid.h, generated from hiq2gguf.formats.e8_grid(8192); defined
// in hiq2.c): entry e's magnitudes m_0..m_7 in bytes 0..7 of ggml_hiq2_e8_grid[e], and
// its parity (sum_j m_j / 2) mod 2. Each member's codebook is a prefix of it (its
// first 2^B entries), so one table serves them all.
GGML_API const uint64_t ggml_hiq2_e8_grid[HIQ2_E8_MAX_ENTRIES];
GGML_API const uint8_t  ggml_hiq2_e8_parity[HIQ2_E8_MAX_ENTRIES];

// The extension bytes of a block as one integer (0 for HIQ2_E8; at most 32 bits).
static inline uint32_t ggml_hiq2_e8_ext(int B, int NS, const uint8_t * blk) {
    uint32_t ext = 0;
    for (int i = 0; i < B - HIQ2_E8_LOW_BITS; ++i) {
        ext |= (uint32_t) blk[HIQ2_E8_BASE_BYTES(NS) + i] << (8 * i);
    }
    return ext;
}

// Group g's codebook index from its u16 code and the block's extension integer.
static inline unsigned ggml_hiq2_e8_index(int B, unsigned code, uint32_t ext, int g) {
    const int eb = B - HIQ2_E8_LOW_BITS;
    const unsigned hi = (unsigned)(ext >> (eb * g)) & ((1u << eb) - 1u);
    return (code & ((1u << HIQ2_E8_LOW_BITS) - 1u)) | (hi << HIQ2_E8_LOW_BITS);
}

// The 8 sign bits of a group (bit j = 1: weight j negative) from its u16 code and
// index: the 7 stored ones and the implied one of weight 7 (the lattice rule).
static inline unsigned ggml_hiq2_e8_signs(unsigned code, unsigned index) {
    const unsigned s = (code >> 9) & 0x7Fu;
    unsigned n = s;
    n ^= n >> 4; n ^= n >> 2; n ^= n >> 1;           // bit 0: popcount(s) mod 2
    return s | (((n ^ ggml_hiq2_e8_parity[index]) & 1u) << 7);
}

// Decode one block of the member with B index bits and NS sub-scales into
// n[i] = q_k * (+-m_i) (in -144..144: int16). Returns d. Every bit pattern decodes.
static inline float ggml_hiq2_e8_decode_block(int B, int NS, const uint8_t * blk, int16_t * n) {
    const float d = ggml_hiq2_fp16_to_fp32(ggml_hiq2_read_u16(blk));
    const uint32_t ext = ggml_hiq2_e8_ext(B, NS, blk);
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        const unsigned code  = ggml_hiq2_read_u16(blk + HIQ2_E8_CODES(NS) + 2 * g);
        const unsigned index = ggml_hiq2_e8_index(B, code, ext, g);
        const unsigned signs = ggml_hiq2_e8_signs(code, index);
        const uint64_t m     = ggml_hiq2_e8_grid[index];
        const int      k     = g * HIQ2_GROUP / HIQ2_E8_SUB(NS);
        const int      q     = ((blk[2 + k / 2] >> (4 * (k % 2))) & 15) + 1;
        for (int j = 0; j < HIQ2_GROUP; ++j) {
            const int v = q * (int)((m >> (8 * j)) & 0xFFu);
            n[g * HIQ2_GROUP + j] = (int16_t)(((signs >> j) & 1u) ? -v : v);
        }
    }
    return d;
}

// ---- per-type entry points (ggml signatures) ---------------------------------
#define HIQ2_DECLARE_FNS(H) \
    GGML_API void   dequantize_row_hiq2_h##H(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k); \
    GGML_API void   quantize_row_hiq2_h##H##_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k); \
    GGML_API size_t quantize_hiq2_h##H(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix); \
    GGML_API bool   validate_row_data_hiq2_h##H(const void * data, size_t nbytes);
HIQ2_FOREACH(HIQ2_DECLARE_FNS)
#undef HIQ2_DECLARE_FNS
#define HIQ2_E8_DECLARE_FNS(sfx, SFX, ID, B, NS, A) \
    GGML_API void   dequantize_row_hiq2_##sfx(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k); \
    GGML_API void   quantize_row_hiq2_##sfx##_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k); \
    GGML_API size_t quantize_hiq2_##sfx(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix); \
    GGML_API bool   validate_row_data_hiq2_##sfx(const void * data, size_t nbytes);
HIQ2_E8_FOREACH(HIQ2_E8_DECLARE_FNS)
#undef HIQ2_E8_DECLARE_FNS

// ---- generic entry points (H given at run time) ------------------------------
GGML_API void   ggml_hiq2_dequantize_row(int H, const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void   ggml_hiq2_quantize_row_ref(int H, const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
GGML_API bool   ggml_hiq2_validate_row_data(int H, const void * data, size_t nbytes);
GGML_API size_t ggml_hiq2_quantize(int H, const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);

// type id -> H, or -1 when the type is not an HIQ2 type
static inline int ggml_hiq2_n_high(enum ggml_type type) {
    const int t = (int) type - HIQ2_FIRST_TYPE;
    return (t >= 0 && t < HIQ2_NTYPES) ? t : -1;
}
// any type of ours (the H family or an E8 member)
static inline bool ggml_is_hiq2_type(enum ggml_type type) {
    return (int) type >= HIQ2_FIRST_TYPE && (int) type < HIQ2_FIRST_TYPE + HIQ2_NTYPES_ALL;
}

// ---- CPU backend entry points (defined in ggml-cpu/hiq2-cpu.c) -------------
// The AVX-512 kernel (hiq2-cpu.c) computes 2 rows x 2 columns per vec_dot call
// (ggml's nrows == 2 convention); other builds do one dot product per call.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__) && \
    defined(__AVX512BITALG__) && defined(__AVX512VNNI__) && defined(__BMI2__) && defined(__F16C__)
#define HIQ2_AVX512 1
#define HIQ2_VEC_DOT_NROWS 2
#else
#define HIQ2_AVX512 0
#define HIQ2_VEC_DOT_NROWS 1
#endif

#define HIQ2_DECLARE_CPU_FNS(H) \
    void quantize_row_hiq2_h##H(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k); \
    void ggml_vec_dot_hiq2_h##H##_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
HIQ2_FOREACH(HIQ2_DECLARE_CPU_FNS)
#undef HIQ2_DECLARE_CPU_FNS
// HIQ2_E8*: one dot product per call (nrc == 1; their CPU traits rows say nrows = 1)
#define HIQ2_E8_DECLARE_CPU_FNS(sfx, SFX, ID, B, NS, A) \
    void quantize_row_hiq2_##sfx(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k); \
    void ggml_vec_dot_hiq2_##sfx##_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
HIQ2_E8_FOREACH(HIQ2_E8_DECLARE_CPU_FNS)
#undef HIQ2_E8_DECLARE_CPU_FNS
// GEMM for ggml-cpu's llamafile_sgemm hook (patch.py), called by each of the nth
// threads: C[j*ldc + i] = A row i . B row j for i < m, j < n; A: HIQ2 type Atype,
// k blocks per row, row stride lda blocks; B: Q8_0, row stride ldb blocks; C: float,
// column stride ldc. tp: the compute threadpool (work handed out dynamically; every
// one of the nth threads must call, there are barriers), or NULL: thread ith does a
// static share and nothing is synchronised. Returns false (nothing done) where this
// build has no GEMM kernel, and for the E8 members (no GEMM: ggml's vec_dot loop runs them).
struct ggml_threadpool;
bool ggml_hiq2_sgemm(struct ggml_threadpool * tp, int ith, int nth, int64_t m, int64_t n, int64_t k, const void * A, int64_t lda,
                     const void * B, int64_t ldb, float * C, int64_t ldc, int Atype);
// generic: x has n/64 HIQ2_H<H> blocks, y has n/32 Q8_0 blocks
void ggml_vec_dot_hiq2_q8_0(int H, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy);

// One row of function pointers per type of ours (defined in hiq2.c), indexed by
// type id - HIQ2_FIRST_TYPE: the H family, then the E8 members.
struct ggml_hiq2_type_fns {
    enum ggml_type type;
    int            n_high;       // H; -1 for the E8 members
    size_t         type_size;
    const char   * name;
    void   (*to_float)(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
    void   (*from_float_ref)(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
    size_t (*quantize)(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
    bool   (*validate)(const void * data, size_t nbytes);
};
GGML_API const struct ggml_hiq2_type_fns ggml_hiq2_types[HIQ2_NTYPES_ALL];

// the row of a type of ours (ggml_is_hiq2_type(type) must hold)
static inline const struct ggml_hiq2_type_fns * ggml_hiq2_fns(enum ggml_type type) {
    return &ggml_hiq2_types[(int) type - HIQ2_FIRST_TYPE];
}

// ---- rows/cases spliced into ggml by patch.py --------------------------------
// ggml.c: type_traits[] rows
#define GGML_HIQ2_TYPE_TRAITS_ROW(H) \
    [GGML_TYPE_HIQ2_H##H] = { \
        .type_name      = "hiq2_h" #H, \
        .blck_size      = QK_HIQ2, \
        .type_size      = HIQ2_TYPE_SIZE(H), \
        .is_quantized   = true, \
        .to_float       = (ggml_to_float_t) dequantize_row_hiq2_h##H, \
        .from_float_ref = (ggml_from_float_t) quantize_row_hiq2_h##H##_ref, \
    },
#define GGML_HIQ2_E8_TYPE_TRAITS_ROW(sfx, SFX, ID, B, NS, A) \
    [GGML_TYPE_HIQ2_##SFX] = { \
        .type_name      = "hiq2_" #sfx, \
        .blck_size      = QK_HIQ2, \
        .type_size      = HIQ2_E8_TYPE_SIZE(B, NS), \
        .is_quantized   = true, \
        .to_float       = (ggml_to_float_t) dequantize_row_hiq2_##sfx, \
        .from_float_ref = (ggml_from_float_t) quantize_row_hiq2_##sfx##_ref, \
    },
#define GGML_HIQ2_TYPE_TRAITS_ROWS HIQ2_FOREACH(GGML_HIQ2_TYPE_TRAITS_ROW) HIQ2_E8_FOREACH(GGML_HIQ2_E8_TYPE_TRAITS_ROW)

// ggml-cpu/ggml-cpu.c: type_traits_cpu[] rows
#define GGML_HIQ2_TYPE_TRAITS_CPU_ROW(H) \
    [GGML_TYPE_HIQ2_H##H] = { \
        .from_float   = quantize_row_hiq2_h##H, \
        .vec_dot      = ggml_vec_dot_hiq2_h##H##_q8_0, \
        .vec_dot_type = GGML_TYPE_Q8_0, \
        .nrows        = HIQ2_VEC_DOT_NROWS, \
    },
#define GGML_HIQ2_E8_TYPE_TRAITS_CPU_ROW(sfx, SFX, ID, B, NS, A) \
    [GGML_TYPE_HIQ2_##SFX] = { \
        .from_float   = quantize_row_hiq2_##sfx, \
        .vec_dot      = ggml_vec_dot_hiq2_##sfx##_q8_0, \
        .vec_dot_type = GGML_TYPE_Q8_0, \
        .nrows        = 1, \
    },
#define GGML_HIQ2_TYPE_TRAITS_CPU_ROWS HIQ2_FOREACH(GGML_HIQ2_TYPE_TRAITS_CPU_ROW) HIQ2_E8_FOREACH(GGML_HIQ2_E8_TYPE_TRAITS_CPU_ROW)

// switch cases. GGML_HIQ2_CASES: the H family (ggml-cuda.cu and mmvq.cu use it: the
// CUDA kernels implement these only, so the CUDA backend reports the E8 members
// unsupported and the scheduler runs them on the CPU). GGML_HIQ2_ALL_CASES: every type of ours
// (ggml.c, ggml-quants.c, ggml-cpu/ops.cpp).
#define GGML_HIQ2_CASE(H) case GGML_TYPE_HIQ2_H##H:
#define GGML_HIQ2_CASES HIQ2_FOREACH(GGML_HIQ2_CASE)
#define GGML_HIQ2_E8_CASE(sfx, SFX, ID, B, NS, A) case GGML_TYPE_HIQ2_##SFX:
#define GGML_HIQ2_ALL_CASES GGML_HIQ2_CASES HIQ2_E8_FOREACH(GGML_HIQ2_E8_CASE)

#ifdef __cplusplus
}
#endif
