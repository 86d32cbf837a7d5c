// HIQ2 tensor type family: ggml-cpu part (from_float for the CPU traits, the
// dot product against Q8_0 activations, and a GEMM for prompt processing).
// The E8 members (their own section below) have the dot product only: AVX2 or portable C.
//
//   sum_i w_i y_i = d/16 * sum_b dy_b * S_b,
//   S_b = sum_{i in b} (16 L_i - z) q_i = 16 * sum_{i in b} L_i q_i - z * sum_{i in b} q_i
//
// with exact integer S_b over the two 32-weight Q8_0 blocks b of each 64-weight
// HIQ2 block. Three implementations of this one product, chosen at compile time:
//   * AVX-512 (BW, VL, VBMI, BITALG, VNNI; HIQ2_AVX512): a register-tiled kernel
//     (hiq2_mm_avx512) serving vec_dot (1x1 and ggml's 2x2 nrc == 2 tiles) and the
//     GEMM behind ggml-cpu's llamafile_sgemm hook (3 rows x 4 columns);
//   * AVX2 (hiq2_mm_avx2): the same register tiling, a block is two ymm;
//   * portable code (hiq2_mm_portable; any other build: SSE-only x86, ARM, ...), its
//     integer sums with NEON on AArch64.
// Every build serves vec_dot and the GEMM of the llamafile_sgemm hook with its own
// kernel. The implementations sum in different orders; all are within float32
// rounding of the exact sum. Compiled with -ffp-contract=off like hiq2.c
// (the vector paths use explicit FMA intrinsics where they want them).

#include "hiq2.h"
#include "ggml-cpu-impl.h"   // ggml_barrier, ggml_threadpool_chunk_set/add (GEMM scheduling)

#include <assert.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__F16C__) || defined(__BMI2__) || HIQ2_AVX512
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#define HIQ2_QK8_0 32
typedef struct {
    uint16_t d;                 // fp16
    int8_t   qs[HIQ2_QK8_0];
} hiq2_block_q8_0;              // same layout as ggml's block_q8_0 (34 bytes)
_Static_assert(sizeof(hiq2_block_q8_0) == 34, "block_q8_0 layout");

// fp16 -> fp32 (exact either way)
#if defined(__F16C__)
#define hiq2_h2f(h) _cvtsh_ss(h)
#else
#define hiq2_h2f(h) ggml_hiq2_fp16_to_fp32(h)
#endif

#if defined(__GNUC__)
#define HIQ2_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HIQ2_ALWAYS_INLINE inline
#endif

#if defined(__AVX2__)
// (also in the AVX-512 build: the E8 members' kernel is AVX2 there too)
static HIQ2_ALWAYS_INLINE float hiq2_hsum_avx2(const __m256 acc) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

#endif

#if defined(__BMI2__)
// Upper 2 bits of all 64 codes as 2-bit fields in weight order (u[0]: weights
// 0..31, u[1]: 32..63; 0 for low groups), branch-free: the k-th 16-bit chunk of
// qh goes to the k-th high group (pdep). Returns the effective mask (see below).
static HIQ2_ALWAYS_INLINE unsigned hiq2_upper_fields(const int H, const uint8_t * blk, uint64_t u[2]) {
    const uint8_t * qh = blk + HIQ2_HEADER_BYTES + HIQ2_QL_BYTES;
    const unsigned em = (unsigned) _pdep_u32((1u << H) - 1u, blk[3]);
    // two direct loads of constant size (H is a constant in every instantiation);
    // no round trip through a stack buffer, no data-dependent branches
    uint64_t q0 = 0;
    uint64_t q1 = 0;
    memcpy(&q0, qh, H < 4 ? 2 * (size_t) H : 8);
    if (H > 4) {
        memcpy(&q1, qh + 8, 2 * (size_t) H - 8);
    }
    const unsigned m0 = em & 0xFu;
    const unsigned m1 = em >> 4;
    const int k0 = __builtin_popcount(m0);
    const uint64_t lanes0 = _pdep_u64(m0, 0x0001000100010001ull) * 0xFFFFull;
    const uint64_t lanes1 = _pdep_u64(m1, 0x0001000100010001ull) * 0xFFFFull;
    // chunks k0.. of qh: the 128-bit (q1:q0) >> 16 k0, k0 in 0..4 (split shifts: never by 64)
    const uint64_t src1 = ((q0 >> (8 * k0)) >> (8 * k0)) | ((q1 << (32 - 8 * k0)) << (32 - 8 * k0));
    u[0] = _pdep_u64(q0, lanes0);
    u[1] = _pdep_u64(src1, lanes1);
    return em;
}
#endif

// Upper 2 bits of all 64 codes, one byte per weight, already shifted left by 2
// (0 for low groups), as 8 little-endian uint64 (one per group). Returns the
// effective mask: the first H set bits of the block's mask (== mask for valid
// data; like the dequantizer, further set bits are treated as low groups).
static HIQ2_ALWAYS_INLINE unsigned hiq2_upper_bytes(const int H, const uint8_t * blk, uint64_t up[HIQ2_NGROUPS]) {
#if defined(__BMI2__)
    uint64_t u[2];
    const unsigned em = hiq2_upper_fields(H, blk, u);
    for (int g = 0; g < 4; ++g) {
        up[g]     = _pdep_u64((u[0] >> (16 * g)) & 0xFFFFu, 0x0C0C0C0C0C0C0C0Cull);
        up[g + 4] = _pdep_u64((u[1] >> (16 * g)) & 0xFFFFu, 0x0C0C0C0C0C0C0C0Cull);
    }
    return em;
#else
    const uint8_t * qh = blk + HIQ2_HEADER_BYTES + HIQ2_QL_BYTES;
    unsigned m  = blk[3];
    unsigned em = 0;
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        up[g] = 0;
    }
    for (int k = 0; k < H && m; ++k) {
        const int g = __builtin_ctz(m);
        m &= m - 1;
        em |= 1u << g;
        uint64_t v = 0;
        for (int j = 0; j < HIQ2_GROUP; ++j) {
            v |= (uint64_t)(((qh[2 * k + j / 4] >> (2 * (j % 4))) & 3) << 2) << (8 * j);
        }
        up[g] = v;
    }
    return em;
#endif
}

#if HIQ2_AVX512
// AVX-512 (BW, VL, VBMI, BITALG, VNNI) kernel: one 64-weight block is one zmm of
// bytes. A block is decoded once into 16 L_i (u8, <= 240) and reused for every
// column of a tile (NR rows x NC columns), and each column's activations are
// loaded once per tile and reused for every row:
//
//   S_b = sum_{i in b} (16 L_i) q_i + sum_{i in b} z (-q_i)   (two chained vpdpbusd, exact int32)
//
// (ggml's Q8_0 quants are in -127..127, so -q is exact.) The 16 int32 lanes (8 per
// Q8_0 block) are scaled by d * dy_b and accumulated in float (another summation
// order; within float32 rounding of the exact sum).

// qword lane L of a decoded block holds weights 8L..8L+7 (group L).
// Low 2 bits of weight i = 8L + j: bit 8j + 2*(L/2) of ql's qword L%2; select the
// 8 bits starting 4 below it (mod 64), which puts the field at bits 4..5.
static const uint8_t hiq2_ctrl_lo[64] __attribute__((aligned(64))) = {
    60,  4, 12, 20, 28, 36, 44, 52, 60,  4, 12, 20, 28, 36, 44, 52,
    62,  6, 14, 22, 30, 38, 46, 54, 62,  6, 14, 22, 30, 38, 46, 54,
     0,  8, 16, 24, 32, 40, 48, 56,  0,  8, 16, 24, 32, 40, 48, 56,
     2, 10, 18, 26, 34, 42, 50, 58,  2, 10, 18, 26, 34, 42, 50, 58,
};
// 16 L = 80 c of a low-group weight, looked up by vpermb from the byte holding its
// 2-bit code c at bits 4..5 (vpermb reads bits 0..5 of the index; bits 0..3 are
// other fields)
#define HIQ2_LUT_C(v) v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v
static const uint8_t hiq2_lut80[64] __attribute__((aligned(64))) = {
    HIQ2_LUT_C(0), HIQ2_LUT_C(80), HIQ2_LUT_C(160), HIQ2_LUT_C(240),
};
#undef HIQ2_LUT_C
// Upper 2 bits, per effective mask: vpmultishiftqb controls that take weight j of
// group g from the qword of qh holding its group's 16-bit chunk k (k = rank of g
// among the high groups = popcount of the mask bits below g; chunk k is bits
// 16 (k % 4) .. of qh's qword k / 4, which the decoder places in qword g): bits
// 16 (k % 4) + 2j, selected from 6 below so the field lands at bits 6..7. Low
// groups' bytes are never used (they take 80 c from hiq2_lut80). One 64-byte row
// per mask replaces computing the ranks (popcounts, widening, a permute with
// computed indices) in every block.
static uint8_t hiq2_up_ctrl[256][64] __attribute__((aligned(64)));

__attribute__((constructor)) static void hiq2_up_ctrl_init(void) {
    for (int em = 0; em < 256; ++em) {
        memset(hiq2_up_ctrl[em], 0, 64);
        for (int g = 0, k = 0; g < HIQ2_NGROUPS; ++g) {
            if (em & (1 << g)) {
                for (int j = 0; j < HIQ2_GROUP; ++j) {
                    hiq2_up_ctrl[em][8 * g + j] = (uint8_t)((16 * (k % 4) + 2 * j - 6) & 63);
                }
                ++k;
            }
        }
    }
}

// constants of the decoder, loaded once per kernel call
typedef struct {
    __m512i ctrl_lo, lut80;
} hiq2_dec_consts;

static HIQ2_ALWAYS_INLINE hiq2_dec_consts hiq2_dec_consts_load(void) {
    hiq2_dec_consts k;
    k.ctrl_lo = _mm512_load_si512((const void *) hiq2_ctrl_lo);
    k.lut80   = _mm512_load_si512((const void *) hiq2_lut80);
    return k;
}

// 16 * L_i of one block as 64 bytes in weight order, branch-free. Like the
// dequantizer, only the first H set bits of the mask count as high groups.
static HIQ2_ALWAYS_INLINE __m512i hiq2_decode16_avx512(const int H, const uint8_t * blk, const hiq2_dec_consts k) {
    const __m512i qlx = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(blk + HIQ2_HEADER_BYTES)));
    const __m512i lo  = _mm512_multishift_epi64_epi8(k.ctrl_lo, qlx);             // field at bits 4..5
    if (H == 0) {
        return _mm512_permutexvar_epi8(lo, k.lut80);                             // all groups low: 80 c
    }
    const uint8_t * qh = blk + HIQ2_HEADER_BYTES + HIQ2_QL_BYTES;
    const unsigned em  = H == HIQ2_NGROUPS ? blk[3] : (unsigned) _pdep_u32((1u << H) - 1u, blk[3]);
    const __m128i qhv  = H == HIQ2_NGROUPS ? _mm_loadu_si128((const __m128i *) qh)
                                           : _mm_maskz_loadu_epi8((__mmask16)((1u << (2 * H)) - 1u), qh);
    // qword g of src: qh's qword 0 (chunks 0..3), or qword 1 for the groups of rank >= 4
    const __m512i src  = H <= 4 ? _mm512_broadcastq_epi64(qhv)
                                : _mm512_permutexvar_epi64(_mm512_maskz_mov_epi64((__mmask8) _pdep_u32(0xF0u, em), _mm512_set1_epi64(1)),
                                                           _mm512_castsi128_si512(qhv));
    const __m512i up   = _mm512_multishift_epi64_epi8(_mm512_load_si512((const void *) hiq2_up_ctrl[em]), src);
    // c16 = (lo & 0x30) | (up & 0xC0) = 16 c for high groups; low groups: 80 c from the table
    const __m512i c16  = _mm512_ternarylogic_epi32(lo, _mm512_and_si512(up, _mm512_set1_epi8((char) 0xC0)),
                                                   _mm512_set1_epi8(0x30), 0xEC);
    const __mmask64 low = _cvtu64_mask64(~(_pdep_u64(em, 0x0101010101010101ull) * 0xFFull));
    return _mm512_mask_permutexvar_epi8(c16, low, lo, k.lut80);
}

// one column's activations for one 64-weight block: the quants of Q8_0 blocks 2ib,
// 2ib+1 as one zmm, their negation (for the zero-point term) and dy as 8 + 8 float lanes
typedef struct {
    __m512i q, nq;
    __m512  dy;
} hiq2_act;

static HIQ2_ALWAYS_INLINE hiq2_act hiq2_act_load(const hiq2_block_q8_0 * y) {
    hiq2_act a;
    a.q  = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) y[0].qs)),
                              _mm256_loadu_si256((const __m256i *) y[1].qs), 1);
    a.nq = _mm512_sub_epi8(_mm512_setzero_si512(), a.q);
    a.dy = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short) y[0].d)),
                                                   _mm_set1_epi16((short) y[1].d), 1));
    return a;
}

#define HIQ2_MM_MAX_R 8
#define HIQ2_MM_MAX_C 4
// s[c * bs + r] = row r of x . column c of the activations, r < NR, c < NC (constants).
// Activations come either packed (act[ib * NC + c], see hiq2_pack_act) or, when act is
// NULL, straight from the Q8_0 rows y (stride by).
static HIQ2_ALWAYS_INLINE void hiq2_mm_avx512(const int H, const int NR, const int NC, const int nb,
                                              float * GGML_RESTRICT s, const size_t bs,
                                              const uint8_t * GGML_RESTRICT x, const size_t bx,
                                              const hiq2_act * GGML_RESTRICT act,
                                              const uint8_t * GGML_RESTRICT y, const size_t by) {
    const size_t ts = HIQ2_TYPE_SIZE(H);
    const hiq2_dec_consts k = hiq2_dec_consts_load();
    __m512 acc[HIQ2_MM_MAX_R][HIQ2_MM_MAX_C];
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) {
            acc[r][c] = _mm512_setzero_ps();
        }
    }
    for (int ib = 0; ib < nb; ++ib) {
        hiq2_act a[HIQ2_MM_MAX_C];
        for (int c = 0; c < NC; ++c) {
            a[c] = act ? act[ib * NC + c] : hiq2_act_load((const hiq2_block_q8_0 *)(y + c * by) + 2 * ib);
        }
        for (int r = 0; r < NR; ++r) {
            const uint8_t * blk = x + r * bx + ib * ts;
            // prefetch the same block of the next row tile (a tile's rows are NR
            // interleaved streams; without this, matrices streamed from DRAM in token
            // generation spent ~20-30 % of the time waiting for weights)
            if (NR > 1) {
                _mm_prefetch((const char *)(blk + NR * bx), _MM_HINT_T0);
            }
            const __m512i L16 = hiq2_decode16_avx512(H, blk, k);
            const __m512i vz  = _mm512_set1_epi8((char) blk[2]);
            const __m512  vd  = _mm512_cvtph_ps(_mm256_set1_epi16((short) ggml_hiq2_read_u16(blk)));
            for (int c = 0; c < NC; ++c) {
                const __m512i S = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), L16, a[c].q), vz, a[c].nq);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), _mm512_mul_ps(vd, a[c].dy), acc[r][c]);
            }
        }
    }
    for (int c = 0; c < NC; ++c) {
        for (int r = 0; r < NR; ++r) {
            s[c * bs + r] = _mm512_reduce_add_ps(acc[r][c]) / 16.0f;
        }
    }
}

// act[ib * NC + c] for columns c < NC of the Q8_0 rows y (stride by), nb blocks
static HIQ2_ALWAYS_INLINE void hiq2_pack_act(const int NC, const int nb, const uint8_t * GGML_RESTRICT y, const size_t by,
                                             hiq2_act * GGML_RESTRICT act) {
    for (int ib = 0; ib < nb; ++ib) {
        for (int c = 0; c < NC; ++c) {
            act[ib * NC + c] = hiq2_act_load((const hiq2_block_q8_0 *)(y + c * by) + 2 * ib);
        }
    }
}
#else
// The kernel of the other builds, HIQ2_MM(H, NR, NC, n, s, bs, x, bx, y, by):
// s[c * bs + r] = (row r of x, stride bx bytes) . (column c of y, stride by bytes, n/32
// Q8_0 blocks) for r < NR, c < NC; NR, NC constants in 1..HIQ2_MM_MAX at every call
// site (the accumulators stay in registers), n % 64 == 0. Its GEMM tile is
// HIQ2_GEMM_TR x HIQ2_GEMM_TC.
#define HIQ2_MM_MAX 4
#if defined(__AVX2__)
// AVX2 kernel: a block is decoded once per tile row into L_i (u8, 0..15) as two ymm
// (weights 0..31: Q8_0 block 2ib, 32..63: block 2ib+1). Per Q8_0 block b, 8 int32
// lanes hold partial sums of S_b = 16 sum L q - z sum q (exact: pair sums of L q and
// of q fit in int16), scaled by d * dy_b and accumulated in float.

// L_i of one block, weights 0..31 in L[0], 32..63 in L[1]
static HIQ2_ALWAYS_INLINE void hiq2_decode_avx2(const int H, const uint8_t * blk, __m256i L[2]) {
    // byte i of a 32-weight half belongs to group i/8 of that half
    const __m256i gbit0 = _mm256_setr_epi8(1,1,1,1,1,1,1,1, 2,2,2,2,2,2,2,2, 4,4,4,4,4,4,4,4, 8,8,8,8,8,8,8,8);
    const __m256i gbit1 = _mm256_setr_epi8(16,16,16,16,16,16,16,16, 32,32,32,32,32,32,32,32,
                                           64,64,64,64,64,64,64,64, -128,-128,-128,-128,-128,-128,-128,-128);
    const __m256i m3 = _mm256_set1_epi8(3);
    // low 2 bits: weights 16s..16s+15 are bits 2s..2s+1 of ql[0..15]
    const __m128i ql  = _mm_loadu_si128((const __m128i *)(blk + HIQ2_HEADER_BYTES));
    const __m256i qlx = _mm256_set_m128i(ql, ql);
    const __m256i lo0 = _mm256_and_si256(_mm256_blend_epi32(qlx, _mm256_srli_epi16(qlx, 2), 0xF0), m3);
    const __m256i lo1 = _mm256_and_si256(_mm256_blend_epi32(_mm256_srli_epi16(qlx, 4), _mm256_srli_epi16(qlx, 6), 0xF0), m3);
    uint64_t up[HIQ2_NGROUPS];
    const unsigned em = hiq2_upper_bytes(H, blk, up);
    const __m256i up0 = _mm256_set_epi64x((long long) up[3], (long long) up[2], (long long) up[1], (long long) up[0]);
    const __m256i up1 = _mm256_set_epi64x((long long) up[7], (long long) up[6], (long long) up[5], (long long) up[4]);
    const __m256i c0  = _mm256_or_si256(lo0, up0);
    const __m256i c1  = _mm256_or_si256(lo1, up1);
    // L = c for high groups, 5c for low groups (c <= 3: no carry across bytes)
    const __m256i vm  = _mm256_set1_epi8((char) em);
    const __m256i h0  = _mm256_cmpeq_epi8(_mm256_and_si256(vm, gbit0), gbit0);
    const __m256i h1  = _mm256_cmpeq_epi8(_mm256_and_si256(vm, gbit1), gbit1);
    L[0] = _mm256_blendv_epi8(_mm256_add_epi8(c0, _mm256_slli_epi16(c0, 2)), c0, h0);
    L[1] = _mm256_blendv_epi8(_mm256_add_epi8(c1, _mm256_slli_epi16(c1, 2)), c1, h1);
}

static HIQ2_ALWAYS_INLINE void hiq2_mm_avx2(const int H, const int NR, const int NC, const int n,
                                            float * GGML_RESTRICT s, const size_t bs,
                                            const uint8_t * GGML_RESTRICT x, const size_t bx,
                                            const uint8_t * GGML_RESTRICT y, const size_t by) {
    const int nb = n / QK_HIQ2;
    const size_t ts = HIQ2_TYPE_SIZE(H);
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i s16   = _mm256_set1_epi16(16);
    __m256 acc[HIQ2_MM_MAX][HIQ2_MM_MAX];
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) {
            acc[r][c] = _mm256_setzero_ps();
        }
    }
    for (int ib = 0; ib < nb; ++ib) {
        __m256i L[HIQ2_MM_MAX][2];
        __m256i vz[HIQ2_MM_MAX];
        float   d[HIQ2_MM_MAX];
        for (int r = 0; r < NR; ++r) {
            const uint8_t * blk = x + r * bx + ib * ts;
            hiq2_decode_avx2(H, blk, L[r]);
            vz[r] = _mm256_set1_epi16((short) blk[2]);
            d[r]  = hiq2_h2f(ggml_hiq2_read_u16(blk));
        }
        for (int c = 0; c < NC; ++c) {
            const hiq2_block_q8_0 * yc = (const hiq2_block_q8_0 *)(y + c * by) + 2 * ib;
            const __m256i q0  = _mm256_loadu_si256((const __m256i *) yc[0].qs);
            const __m256i q1  = _mm256_loadu_si256((const __m256i *) yc[1].qs);
            const __m256i sq0 = _mm256_maddubs_epi16(ones8, q0);       // pair sums of q, shared by the rows
            const __m256i sq1 = _mm256_maddubs_epi16(ones8, q1);
            const float dy0 = hiq2_h2f(yc[0].d);
            const float dy1 = hiq2_h2f(yc[1].d);
            for (int r = 0; r < NR; ++r) {
                // lanes of S_b = 16 * sum L q - z * sum q (exact int32)
                const __m256i S0 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(L[r][0], q0), s16),
                                                    _mm256_madd_epi16(sq0, vz[r]));
                const __m256i S1 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(L[r][1], q1), s16),
                                                    _mm256_madd_epi16(sq1, vz[r]));
                const __m256 f0 = _mm256_mul_ps(_mm256_set1_ps(d[r] * dy0), _mm256_cvtepi32_ps(S0));
                const __m256 f1 = _mm256_mul_ps(_mm256_set1_ps(d[r] * dy1), _mm256_cvtepi32_ps(S1));
                acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_add_ps(f0, f1));
            }
        }
    }
    for (int c = 0; c < NC; ++c) {
        for (int r = 0; r < NR; ++r) {
            s[c * bs + r] = hiq2_hsum_avx2(acc[r][c]) / 16.0f;
        }
    }
}
#define HIQ2_MM      hiq2_mm_avx2
#define HIQ2_GEMM_TR 2      // 2 x 4 accumulators + 2 decoded blocks + operands ~ the 16 ymm registers
#define HIQ2_GEMM_TC 4

#else
// Portable kernel (any other build: SSE-only x86, NEON, ...): a block is decoded once
// per tile row; for each of its two Q8_0 blocks b the integer sums A_b = sum L q and
// Q_b = sum q are exact, then t = d * (dy_0 S_0 + dy_1 S_1), S_b = 16 A_b - z Q_b,
// is added to a float accumulator, one rounding per step. On AArch64 NEON computes
// the integer sums (the float steps are the same, so it gives the portable code's bits).
#if defined(__ARM_NEON) && defined(__aarch64__)
typedef struct { int8x16_t v[4]; } hiq2_block_L;          // L_i of weights 16k..16k+15 in v[k]

static HIQ2_ALWAYS_INLINE void hiq2_decode_L(const int H, const uint8_t * blk, hiq2_block_L * L) {
    uint64_t up[HIQ2_NGROUPS];
    const unsigned em = hiq2_upper_bytes(H, blk, up);
    const uint8x16_t ql = vld1q_u8(blk + HIQ2_HEADER_BYTES);
    const uint8x16_t m3 = vdupq_n_u8(3);
    const uint8x16_t vm = vdupq_n_u8((uint8_t) em);
    // low 2 bits of weights 16k..16k+15: bits 2k..2k+1 of ql[0..15]
    const uint8x16_t lo[4] = { vandq_u8(ql, m3), vandq_u8(vshrq_n_u8(ql, 2), m3),
                               vandq_u8(vshrq_n_u8(ql, 4), m3), vshrq_n_u8(ql, 6) };
    for (int k = 0; k < 4; ++k) {
        const uint8x16_t c = vorrq_u8(lo[k], vcombine_u8(vcreate_u8(up[2 * k]), vcreate_u8(up[2 * k + 1])));
        // bytes 0..7 are group 2k, bytes 8..15 group 2k+1: L = c (high) or 5c (low)
        const uint8x16_t gbit = vcombine_u8(vdup_n_u8((uint8_t)(1u << (2 * k))), vdup_n_u8((uint8_t)(1u << (2 * k + 1))));
        const uint8x16_t high = vtstq_u8(vm, gbit);
        L->v[k] = vreinterpretq_s8_u8(vbslq_u8(high, c, vmulq_u8(c, vdupq_n_u8(5))));
    }
}

// sum of L_i q_i over the 32 weights of Q8_0 block b (0, 1) of the HIQ2 block
static HIQ2_ALWAYS_INLINE int32_t hiq2_sum_Lq(const hiq2_block_L * L, const int b, const int8_t * q) {
    const int8x16_t q0 = vld1q_s8(q);
    const int8x16_t q1 = vld1q_s8(q + 16);
    const int8x16_t La = L->v[2 * b];
    const int8x16_t Lb = L->v[2 * b + 1];
    int16x8_t p = vmull_s8(vget_low_s8(La), vget_low_s8(q0));
    p = vmlal_high_s8(p, La, q0);
    p = vmlal_s8(p, vget_low_s8(Lb), vget_low_s8(q1));
    p = vmlal_high_s8(p, Lb, q1);                          // |lane| <= 4 * 15 * 128
    return vaddlvq_s16(p);
}

static HIQ2_ALWAYS_INLINE int32_t hiq2_sum_q(const int8_t * q) {
    return (int32_t) vaddlvq_s8(vld1q_s8(q)) + (int32_t) vaddlvq_s8(vld1q_s8(q + 16));
}
#else
typedef struct { uint8_t v[QK_HIQ2]; } hiq2_block_L;      // L_i, one byte per weight

static HIQ2_ALWAYS_INLINE void hiq2_decode_L(const int H, const uint8_t * blk, hiq2_block_L * L) {
    uint64_t up[HIQ2_NGROUPS];
    const unsigned em = hiq2_upper_bytes(H, blk, up);
    const uint8_t * ql = blk + HIQ2_HEADER_BYTES;
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        const int mul = ((em >> g) & 1u) ? 1 : 5;          // L = c (high group) or 5c (low group)
        for (int j = 0; j < HIQ2_GROUP; ++j) {
            const int i = g * HIQ2_GROUP + j;
            const int c = ((ql[i % HIQ2_QL_BYTES] >> (2 * (i / HIQ2_QL_BYTES))) & 3) | (int)((up[g] >> (8 * j)) & 0xFFu);
            L->v[i] = (uint8_t)(mul * c);
        }
    }
}

static HIQ2_ALWAYS_INLINE int32_t hiq2_sum_Lq(const hiq2_block_L * L, const int b, const int8_t * q) {
    int32_t a = 0;
    for (int j = 0; j < HIQ2_QK8_0; ++j) {
        a += L->v[b * HIQ2_QK8_0 + j] * q[j];
    }
    return a;
}

static HIQ2_ALWAYS_INLINE int32_t hiq2_sum_q(const int8_t * q) {
    int32_t a = 0;
    for (int j = 0; j < HIQ2_QK8_0; ++j) {
        a += q[j];
    }
    return a;
}
#endif

static HIQ2_ALWAYS_INLINE void hiq2_mm_portable(const int H, const int NR, const int NC, const int n,
                                                float * GGML_RESTRICT s, const size_t bs,
                                                const uint8_t * GGML_RESTRICT x, const size_t bx,
                                                const uint8_t * GGML_RESTRICT y, const size_t by) {
    const int nb = n / QK_HIQ2;
    const size_t ts = HIQ2_TYPE_SIZE(H);
    float acc[HIQ2_MM_MAX][HIQ2_MM_MAX];
    for (int r = 0; r < NR; ++r) {
        for (int c = 0; c < NC; ++c) {
            acc[r][c] = 0.0f;
        }
    }
    for (int ib = 0; ib < nb; ++ib) {
        int32_t sq[HIQ2_MM_MAX][2];                         // Q_b of each column, shared by the rows
        for (int c = 0; c < NC; ++c) {
            const hiq2_block_q8_0 * yc = (const hiq2_block_q8_0 *)(y + c * by) + 2 * ib;
            sq[c][0] = hiq2_sum_q(yc[0].qs);
            sq[c][1] = hiq2_sum_q(yc[1].qs);
        }
        for (int r = 0; r < NR; ++r) {
            const uint8_t * blk = x + r * bx + ib * ts;
            hiq2_block_L L;
            hiq2_decode_L(H, blk, &L);
            const int32_t z = blk[2];
            const float   d = hiq2_h2f(ggml_hiq2_read_u16(blk));
            for (int c = 0; c < NC; ++c) {
                const hiq2_block_q8_0 * yc = (const hiq2_block_q8_0 *)(y + c * by) + 2 * ib;
                const int32_t s0 = 16 * hiq2_sum_Lq(&L, 0, yc[0].qs) - z * sq[c][0];
                const int32_t s1 = 16 * hiq2_sum_Lq(&L, 1, yc[1].qs) - z * sq[c][1];
                const float p0 = hiq2_h2f(yc[0].d) * (float) s0;
                const float p1 = hiq2_h2f(yc[1].d) * (float) s1;
                const float pb = p0 + p1;
                const float t  = d * pb;
                acc[r][c] = acc[r][c] + t;
            }
        }
    }
    for (int c = 0; c < NC; ++c) {
        for (int r = 0; r < NR; ++r) {
            s[c * bs + r] = acc[r][c] / 16.0f;
        }
    }
}
#define HIQ2_MM      hiq2_mm_portable
#define HIQ2_GEMM_TR 2
#define HIQ2_GEMM_TC 4
#endif
#endif // HIQ2_AVX512

static HIQ2_ALWAYS_INLINE void hiq2_vec_dot_impl(const int H, const int n, float * GGML_RESTRICT s,
                                                 const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % QK_HIQ2 == 0);
#if HIQ2_AVX512
    hiq2_mm_avx512(H, 1, 1, n / QK_HIQ2, s, 0, (const uint8_t *) vx, 0, NULL, (const uint8_t *) vy, 0);
#else
    HIQ2_MM(H, 1, 1, n, s, 0, (const uint8_t *) vx, 0, (const uint8_t *) vy, 0);
#endif
}

void ggml_vec_dot_hiq2_q8_0(int H, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(H >= 0 && H <= HIQ2_NGROUPS);
    hiq2_vec_dot_impl(H, n, s, vx, vy);
}

// nrc == 1: *s = x . y. nrc == 2 (only requested when HIQ2_VEC_DOT_NROWS == 2):
// a 2 x 2 tile, s[c * bs + r] = (row r of x, stride bx) . (column c of y, stride by).
static HIQ2_ALWAYS_INLINE void hiq2_vec_dot_tile(const int H, const int n, float * GGML_RESTRICT s, const size_t bs,
                                                 const void * GGML_RESTRICT vx, const size_t bx,
                                                 const void * GGML_RESTRICT vy, const size_t by, const int nrc) {
    assert(nrc == 1 || nrc == 2);
#if HIQ2_AVX512
    if (nrc == 2) {
        hiq2_mm_avx512(H, 2, 2, n / QK_HIQ2, s, bs, (const uint8_t *) vx, bx, NULL, (const uint8_t *) vy, by);
        return;
    }
#else
    if (nrc == 2) {
        HIQ2_MM(H, 2, 2, n, s, bs, (const uint8_t *) vx, bx, (const uint8_t *) vy, by);
        return;
    }
#endif
    (void) bs; (void) bx; (void) by;
    hiq2_vec_dot_impl(H, n, s, vx, vy);
}

// per-type entry points: H is a compile-time constant in each instantiation
#define HIQ2_DEFINE_CPU_FNS(H) \
    void quantize_row_hiq2_h##H(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
        ggml_hiq2_quantize_row_ref(H, x, y, k); \
    } \
    void ggml_vec_dot_hiq2_h##H##_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, \
                                       const void * GGML_RESTRICT vy, size_t by, int nrc) { \
        hiq2_vec_dot_tile(H, n, s, bs, vx, bx, vy, by, nrc); \
    }
HIQ2_FOREACH(HIQ2_DEFINE_CPU_FNS)
#undef HIQ2_DEFINE_CPU_FNS


// ---- HIQ2_E8* x Q8_0 (docs/FORMAT.md, "HIQ2_E8, HIQ2_E8_2K, HIQ2_E8_8K") ----------
//   sum_i w_i y_i = d/16 * sum_b dy_b * S_b,  S_b = sum_{i in b} n_i q_i  (exact int32)
// with n_i = q_k * (+-m_i). One kernel for every member, parameterised by B (index bits
// per group) and NS (sub-scales per block): where the codes and index bits are, how long
// the block is; inlined into each member's vec_dot with B and NS constant. One dot product per call (nrows = 1 in the CPU traits) and
// no GEMM: ggml_hiq2_sgemm declines them and ggml's vec_dot loop runs them. The float steps
// are the H family's: t = d * (dy_0 S_0 + dy_1 S_1) per block (portable), or the same
// per int32 lane (AVX2); both within float32 rounding of the exact sum.
#if defined(__AVX2__)
// AVX2 (and the AVX-512 build): the 8 magnitude vectors of a block are 4 + 4 table
// loads (faster than vpgatherqq here); the signs go onto the activations (vpsignb), so
// vpmaddubsw multiplies the unsigned magnitudes (<= 9 in HIQ2_E8_8K) by signed quants
// (pairs <= 2 * 9 * 128 = 2304, no saturation) and vpmaddwd applies the 4-bit sub-scales
// (int16 lanes 0..7 of a half are one 16-weight sub-block, lanes 8..15 the next).

// Sign masks (0xFF: negative) of 4 groups in weight order, from their u16 codes (the low
// 8 bytes of codes: group g at bytes 2g, 2g+1) and magnitudes M (group g in qword g).
// Bits 1..7 of byte 2g+1 are the signs of weights 0..6; weight 7's sign makes
// #negative + parity(e) even, and parity(e) = (sum m / 2) mod 2 is the xor of bit 1 of
// the 8 (odd) magnitudes: (m - 1) / 2 mod 2 is bit 1 of m for odd m (1 -> 0, 3 -> 1,
// 5 -> 0, 7 -> 1, 9 -> 0), and sum m / 2 = 4 + sum (m - 1) / 2.
static HIQ2_ALWAYS_INLINE __m256i hiq2_e8_neg_avx2(const __m128i codes, const __m256i M) {
    const __m256i pick = _mm256_setr_epi8(1,1,1,1,1,1,1,1, 3,3,3,3,3,3,3,3, 5,5,5,5,5,5,5,5, 7,7,7,7,7,7,7,7);
    const __m256i bits = _mm256_set1_epi64x((long long) 0x0080402010080402ull);   // byte 7: not stored
    const __m256i one  = _mm256_set1_epi8(1);
    const __m256i c    = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(codes), pick);
    const __m256i n7   = _mm256_min_epu8(_mm256_and_si256(c, bits), one);        // 1: weight j < 7 negative
    // per qword, bit 0 of the byte sum: (#negative among j < 7 + parity(e)) mod 2
    const __m256i par  = _mm256_sad_epu8(_mm256_xor_si256(n7, _mm256_and_si256(_mm256_srli_epi16(M, 1), one)),
                                         _mm256_setzero_si256());
    const __m256i n8   = _mm256_or_si256(n7, _mm256_slli_epi64(_mm256_and_si256(par, _mm256_set1_epi64x(1)), 56));
    return _mm256_cmpeq_epi8(n8, one);
}

// the magnitudes of groups g0..g0+3 (codes: their u16 codes; ext: the block's extension bits)
static HIQ2_ALWAYS_INLINE __m256i hiq2_e8_mag_avx2(const int B, const uint8_t * codes, const uint32_t ext, const int g0) {
    uint64_t m[4];
    for (int g = 0; g < 4; ++g) {
        m[g] = ggml_hiq2_e8_grid[ggml_hiq2_e8_index(B, ggml_hiq2_read_u16(codes + 2 * g), ext, g0 + g)];
    }
    return _mm256_setr_epi64x((long long) m[0], (long long) m[1], (long long) m[2], (long long) m[3]);
}

static HIQ2_ALWAYS_INLINE void hiq2_e8_vec_dot(const int B, const int NS, const int n, float * GGML_RESTRICT s,
                                               const uint8_t * GGML_RESTRICT x, const uint8_t * GGML_RESTRICT y) {
    const int nb = n / QK_HIQ2;
    const hiq2_block_q8_0 * yb = (const hiq2_block_q8_0 *) y;
    const __m256i one = _mm256_set1_epi8(1);
    // from the u16 lanes [q_0, q_2, q_1, q_3] of one qword: q_0 / q_1 for the int16
    // lanes 0..7 / 8..15 of weights 0..31, q_2 / q_3 for those of weights 32..63
    const __m256i pick01 = _mm256_setr_epi8(0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1, 4,5,4,5,4,5,4,5,4,5,4,5,4,5,4,5);
    const __m256i pick23 = _mm256_setr_epi8(2,3,2,3,2,3,2,3,2,3,2,3,2,3,2,3, 6,7,6,7,6,7,6,7,6,7,6,7,6,7,6,7);
    __m256 acc = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ++ib) {
        const uint8_t * blk   = x + ib * HIQ2_E8_TYPE_SIZE(B, NS);
        const __m128i   codes = _mm_loadu_si128((const __m128i *)(blk + HIQ2_E8_CODES(NS)));
        const uint32_t  ext   = ggml_hiq2_e8_ext(B, NS, blk);
        const __m256i   M0    = hiq2_e8_mag_avx2(B, blk + HIQ2_E8_CODES(NS), ext, 0);
        const __m256i   M1    = hiq2_e8_mag_avx2(B, blk + HIQ2_E8_CODES(NS) + 8, ext, 4);
        const __m256i   q0    = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *) yb[2 * ib].qs),
                                                 _mm256_or_si256(hiq2_e8_neg_avx2(codes, M0), one));   // -q or q
        const __m256i   q1    = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *) yb[2 * ib + 1].qs),
                                                 _mm256_or_si256(hiq2_e8_neg_avx2(_mm_srli_si128(codes, 8), M1), one));
        // the nibbles q_k - 1 of the 16-weight sub-blocks 0, 1 (bits 0..7) and 2, 3 (16..23);
        // with NS = 2 the nibble of each 32-weight half serves both its sub-blocks
        const uint32_t  sb    = NS == 4 ? (uint32_t) blk[2] | ((uint32_t) blk[3] << 16)
                                        : (uint32_t) (blk[2] & 15u) * 0x11u | (uint32_t) (blk[2] >> 4) * 0x110000u;
        const uint64_t  sc    = ((sb & 0x000F000Fu) | ((uint64_t)((sb >> 4) & 0x000F000Fu) << 32)) + 0x0001000100010001ull;
        const __m256i   scv   = _mm256_set1_epi64x((long long) sc);
        const __m256i   S0    = _mm256_madd_epi16(_mm256_maddubs_epi16(M0, q0), _mm256_shuffle_epi8(scv, pick01));
        const __m256i   S1    = _mm256_madd_epi16(_mm256_maddubs_epi16(M1, q1), _mm256_shuffle_epi8(scv, pick23));
        const float d = hiq2_h2f(ggml_hiq2_read_u16(blk));
        const __m256 f0 = _mm256_mul_ps(_mm256_set1_ps(d * hiq2_h2f(yb[2 * ib].d)), _mm256_cvtepi32_ps(S0));
        const __m256 f1 = _mm256_mul_ps(_mm256_set1_ps(d * hiq2_h2f(yb[2 * ib + 1].d)), _mm256_cvtepi32_ps(S1));
        acc = _mm256_add_ps(acc, _mm256_add_ps(f0, f1));
    }
    *s = hiq2_hsum_avx2(acc) / 16.0f;
}
#else
// portable C (SSE-only x86, ARM, ...): exact integer S_b per Q8_0 block
static HIQ2_ALWAYS_INLINE void hiq2_e8_vec_dot(const int B, const int NS, const int n, float * GGML_RESTRICT s,
                                               const uint8_t * GGML_RESTRICT x, const uint8_t * GGML_RESTRICT y) {
    const int nb = n / QK_HIQ2;
    const hiq2_block_q8_0 * yb = (const hiq2_block_q8_0 *) y;
    float acc = 0.0f;
    for (int ib = 0; ib < nb; ++ib) {
        int16_t w[QK_HIQ2];                     // |n_i| <= 144: not int8
        const float d = ggml_hiq2_e8_decode_block(B, NS, x + ib * HIQ2_E8_TYPE_SIZE(B, NS), w);
        int32_t S[2] = { 0, 0 };
        for (int b = 0; b < 2; ++b) {
            for (int j = 0; j < HIQ2_QK8_0; ++j) {
                S[b] += w[b * HIQ2_QK8_0 + j] * yb[2 * ib + b].qs[j];
            }
        }
        const float p0 = hiq2_h2f(yb[2 * ib].d) * (float) S[0];
        const float p1 = hiq2_h2f(yb[2 * ib + 1].d) * (float) S[1];
        const float pb = p0 + p1;
        const float t  = d * pb;
        acc = acc + t;
    }
    *s = acc / 16.0f;
}
#endif

#define HIQ2_E8_DEFINE_CPU_FNS(sfx, SFX, ID, B, NS, A) \
    void quantize_row_hiq2_##sfx(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
        quantize_row_hiq2_##sfx##_ref(x, y, k); \
    } \
    void ggml_vec_dot_hiq2_##sfx##_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, \
                                        const void * GGML_RESTRICT vy, size_t by, int nrc) { \
        assert(nrc == 1); \
        assert(n % QK_HIQ2 == 0); \
        (void) nrc; (void) bs; (void) bx; (void) by; \
        hiq2_e8_vec_dot(B, NS, n, s, (const uint8_t *) vx, (const uint8_t *) vy); \
    }
HIQ2_E8_FOREACH(HIQ2_E8_DEFINE_CPU_FNS)
#undef HIQ2_E8_DEFINE_CPU_FNS


// ---- GEMM (llamafile_sgemm hook, see patch.py) ---------------------------------
// C[j * ldc + i] = (row i of A) . (row j of B), A: m rows of k HIQ2_H<H> blocks
// (stride lda blocks), B: n rows of 2k Q8_0 blocks (stride ldb blocks). n == 1 is
// token generation (the hook takes it too, see patch.py). The activations of a group
// of columns are unpacked once (hiq2_pack_act) and reused by every row tile:
// * prompt processing: tiles of 3 rows x 4 columns decode each weight block once
//   per 4 columns (3 x 4 accumulators + operands fit the 32 zmm registers);
// * one column: tiles of 8 rows, so the activation loads and the loop overhead
//   are shared by 8 rows and 8 independent dependency chains hide the latencies.
#if HIQ2_AVX512
#define HIQ2_GEMM_TR       3                    // tile rows
#define HIQ2_GEMM_TC       4                    // tile columns
#define HIQ2_GEMV_TR       8                    // tile rows, one column
#define HIQ2_GEMM_JOB_ROWS 48                   // rows per dynamically scheduled job (a multiple of both)
#define HIQ2_PACK_MAX_BLOCKS 256                // rows of up to 16384 weights use a packed copy of B (on the stack)

// rows r0..r1-1 of C for the NC columns at c, tiles of TR rows
static HIQ2_ALWAYS_INLINE void hiq2_gemm_cols(const int H, const int TR, const int NC, const int64_t r0, const int64_t r1,
                                              const int nb, const uint8_t * GGML_RESTRICT A, const size_t lda,
                                              const hiq2_act * GGML_RESTRICT act, const uint8_t * GGML_RESTRICT b, const size_t ldb,
                                              float * GGML_RESTRICT c, const size_t ldc) {
    int64_t i = r0;
    for (; i + TR <= r1; i += TR) {
        hiq2_mm_avx512(H, TR, NC, nb, c + i, ldc, A + i * lda, lda, act, b, ldb);
    }
    for (; i < r1; ++i) {
        hiq2_mm_avx512(H, 1, NC, nb, c + i, ldc, A + i * lda, lda, act, b, ldb);
    }
}

// rows r0..r1-1 of C, all n columns
static HIQ2_ALWAYS_INLINE void hiq2_gemm_rows(const int H, const int64_t r0, const int64_t r1,
                                              const int64_t n, const int64_t k,
                                              const uint8_t * GGML_RESTRICT A, const size_t lda,
                                              const uint8_t * GGML_RESTRICT B, const size_t ldb,
                                              float * GGML_RESTRICT C, const size_t ldc) {
    const int nb = (int) k;
    const bool packed = nb <= HIQ2_PACK_MAX_BLOCKS;
    hiq2_act act[packed ? nb * HIQ2_GEMM_TC : 1];
    int64_t j = 0;
    for (; j + HIQ2_GEMM_TC <= n; j += HIQ2_GEMM_TC) {
        const uint8_t * b = B + j * ldb;
        if (packed) {
            hiq2_pack_act(HIQ2_GEMM_TC, nb, b, ldb, act);
        }
        hiq2_gemm_cols(H, HIQ2_GEMM_TR, HIQ2_GEMM_TC, r0, r1, nb, A, lda, packed ? act : NULL, b, ldb, C + j * ldc, ldc);
    }
    for (; j < n; ++j) {
        const uint8_t * b = B + j * ldb;
        if (packed) {
            hiq2_pack_act(1, nb, b, ldb, act);
        }
        hiq2_gemm_cols(H, HIQ2_GEMV_TR, 1, r0, r1, nb, A, lda, packed ? act : NULL, b, ldb, C + j * ldc, 0);
    }
}
#else
// the other builds: tiles of HIQ2_GEMM_TR rows x HIQ2_GEMM_TC columns of HIQ2_MM,
// activations read in place
#define HIQ2_GEMM_JOB_ROWS (16 * HIQ2_GEMM_TR)  // rows per dynamically scheduled job (whole tiles)
// rows r0..r1-1 of C, all n columns
static HIQ2_ALWAYS_INLINE void hiq2_gemm_rows(const int H, const int64_t r0, const int64_t r1,
                                              const int64_t n, const int64_t k,
                                              const uint8_t * GGML_RESTRICT A, const size_t lda,
                                              const uint8_t * GGML_RESTRICT B, const size_t ldb,
                                              float * GGML_RESTRICT C, const size_t ldc) {
    const int kn = (int) k * QK_HIQ2;
    int64_t j = 0;
    for (; j + HIQ2_GEMM_TC <= n; j += HIQ2_GEMM_TC) {
        const uint8_t * b = B + j * ldb;
        float * c = C + j * ldc;
        int64_t i = r0;
        for (; i + HIQ2_GEMM_TR <= r1; i += HIQ2_GEMM_TR) {
            HIQ2_MM(H, HIQ2_GEMM_TR, HIQ2_GEMM_TC, kn, c + i, ldc, A + i * lda, lda, b, ldb);
        }
        for (; i < r1; ++i) {
            HIQ2_MM(H, 1, HIQ2_GEMM_TC, kn, c + i, ldc, A + i * lda, lda, b, ldb);
        }
    }
    for (; j < n; ++j) {
        const uint8_t * b = B + j * ldb;
        float * c = C + j * ldc;
        int64_t i = r0;
        for (; i + HIQ2_GEMM_TR <= r1; i += HIQ2_GEMM_TR) {
            HIQ2_MM(H, HIQ2_GEMM_TR, 1, kn, c + i, 0, A + i * lda, lda, b, 0);
        }
        for (; i < r1; ++i) {
            HIQ2_MM(H, 1, 1, kn, c + i, 0, A + i * lda, lda, b, 0);
        }
    }
}
#endif

static HIQ2_ALWAYS_INLINE void hiq2_gemm_impl(const int H, struct ggml_threadpool * tp, const int ith, const int nth,
                                              const int64_t m, const int64_t n, const int64_t k,
                                              const uint8_t * GGML_RESTRICT A, const size_t lda,
                                              const uint8_t * GGML_RESTRICT B, const size_t ldb,
                                              float * GGML_RESTRICT C, const size_t ldc) {
    if (tp == NULL) {
        // static split: thread ith takes a contiguous range of whole jobs
        const int64_t ntiles = (m + HIQ2_GEMM_JOB_ROWS - 1) / HIQ2_GEMM_JOB_ROWS;
        const int64_t r0 = HIQ2_GEMM_JOB_ROWS * ((ntiles * ith) / nth);
        const int64_t r1 = ith == nth - 1 ? m : HIQ2_GEMM_JOB_ROWS * ((ntiles * (ith + 1)) / nth);
        hiq2_gemm_rows(H, r0, r1, n, k, A, lda, B, ldb, C, ldc);
        return;
    }
    // dynamic: blocks of HIQ2_GEMM_JOB_ROWS rows handed out with the threadpool's
    // chunk counter (the protocol of ggml's mul_mat and llamafile's tinyBLAS), so a
    // thread that was descheduled does not hold up the others
    const int64_t njobs = (m + HIQ2_GEMM_JOB_ROWS - 1) / HIQ2_GEMM_JOB_ROWS;
    if (ith == 0) {
        ggml_threadpool_chunk_set(tp, nth);
    }
    ggml_barrier(tp);
    for (int64_t job = ith; job < njobs; job = ggml_threadpool_chunk_add(tp, 1)) {
        const int64_t r0 = job * HIQ2_GEMM_JOB_ROWS;
        const int64_t r1 = r0 + HIQ2_GEMM_JOB_ROWS < m ? r0 + HIQ2_GEMM_JOB_ROWS : m;
        hiq2_gemm_rows(H, r0, r1, n, k, A, lda, B, ldb, C, ldc);
    }
    ggml_barrier(tp);
}

#define HIQ2_DEFINE_GEMM(H) \
    static void hiq2_gemm_h##H(struct ggml_threadpool * tp, int ith, int nth, int64_t m, int64_t n, int64_t k, \
                               const uint8_t * A, size_t lda, const uint8_t * B, size_t ldb, float * C, size_t ldc) { \
        hiq2_gemm_impl(H, tp, ith, nth, m, n, k, A, lda, B, ldb, C, ldc); \
    }
HIQ2_FOREACH(HIQ2_DEFINE_GEMM)
#undef HIQ2_DEFINE_GEMM

bool ggml_hiq2_sgemm(struct ggml_threadpool * tp, int ith, int nth, int64_t m, int64_t n, int64_t k, const void * A, int64_t lda,
                     const void * B, int64_t ldb, float * C, int64_t ldc, int Atype) {
    const size_t yb = (size_t) ldb * sizeof(hiq2_block_q8_0);   // bytes per row of B
    switch (ggml_hiq2_n_high((enum ggml_type) Atype)) {        // -1 (declined) for the E8 members
#define HIQ2_GEMM_CASE(H) \
        case H: hiq2_gemm_h##H(tp, ith, nth, m, n, k, (const uint8_t *) A, (size_t) lda * HIQ2_TYPE_SIZE(H), \
                               (const uint8_t *) B, yb, C, (size_t) ldc); return true;
        HIQ2_FOREACH(HIQ2_GEMM_CASE)
#undef HIQ2_GEMM_CASE
        default: return false;
    }
}
