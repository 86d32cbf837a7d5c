// HIQ2 tensor type family: ggml-cpu part (from_float for the CPU traits and the
// dot product against Q8_0 activations).
//
//   sum_i w_i y_i = d/16 * sum_b dy_b * S_b,
//   S_b = sum_{i in b} (16 L_i - z) q_i = 16 * sum_{i in b} L_i q_i - z * sum_{i in b} q_i
//
// with exact integer S_b over the two 32-weight Q8_0 blocks b of each 64-weight
// HIQ2 block. The AVX2 path accumulates 8 float lanes (a different summation
// order than the portable path; both are within float32 rounding of the exact sum).
// Compiled with -ffp-contract=off like hiq2.c.

#include "hiq2.h"

#include <assert.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__F16C__) || defined(__BMI2__)
#include <immintrin.h>
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

#if defined(__BMI2__)
// Upper 2 bits of all 64 codes as 2-bit fields in weight order (u[0]: weights
// 0..31, u[1]: 32..63; 0 for low groups), branch-free: the k-th 16-bit chunk of
// qh goes to the k-th high group (pdep). Returns the effective mask (see below).
static HIQ2_ALWAYS_INLINE unsigned hiq2_upper_fields(const int H, const uint8_t * blk, uint64_t u[2]) {
    const uint8_t * qh = blk + HIQ2_HEADER_BYTES + HIQ2_QL_BYTES;
    const unsigned em = (unsigned) _pdep_u32((1u << H) - 1u, blk[3]);
    uint64_t qa[2] = {0, 0};
    memcpy(qa, qh, 2 * (size_t) H);
    const unsigned m0 = em & 0xFu;
    const unsigned m1 = em >> 4;
    const int k0 = __builtin_popcount(m0);
    const uint64_t lanes0 = _pdep_u64(m0, 0x0001000100010001ull) * 0xFFFFull;
    const uint64_t lanes1 = _pdep_u64(m1, 0x0001000100010001ull) * 0xFFFFull;
    const uint64_t src1 = k0 == 0 ? qa[0]
                        : k0 == 4 ? qa[1]
                        : (qa[0] >> (16 * k0)) | (qa[1] << (64 - 16 * k0));
    u[0] = _pdep_u64(qa[0], lanes0);
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

static HIQ2_ALWAYS_INLINE void hiq2_vec_dot_impl(const int H, const int n, float * GGML_RESTRICT s,
                                                 const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % QK_HIQ2 == 0);
    const int nb = n / QK_HIQ2;
    const size_t ts = HIQ2_TYPE_SIZE(H);
    const uint8_t * x = (const uint8_t *) vx;
    const hiq2_block_q8_0 * y = (const hiq2_block_q8_0 *) vy;

    float sumf = 0.0f;
#if defined(__AVX2__)
    // byte i of a 32-weight half belongs to group i/8 of that half
    const __m256i gbit0 = _mm256_setr_epi8(1,1,1,1,1,1,1,1, 2,2,2,2,2,2,2,2, 4,4,4,4,4,4,4,4, 8,8,8,8,8,8,8,8);
    const __m256i gbit1 = _mm256_setr_epi8(16,16,16,16,16,16,16,16, 32,32,32,32,32,32,32,32,
                                           64,64,64,64,64,64,64,64, -128,-128,-128,-128,-128,-128,-128,-128);
    const __m256i m3    = _mm256_set1_epi8(3);
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i s16   = _mm256_set1_epi16(16);
    __m256 acc = _mm256_setzero_ps();
#if defined(__BMI2__) && defined(__AVX512VBMI__) && defined(__AVX512VL__)
    // qword lane L, byte j: 8 bits starting at bit 16L + 2j - 2 (mod 64) -> field at bits 2..3
    const __m256i ushift = _mm256_setr_epi8(62, 0, 2, 4, 6, 8, 10, 12,  14, 16, 18, 20, 22, 24, 26, 28,
                                            30, 32, 34, 36, 38, 40, 42, 44,  46, 48, 50, 52, 54, 56, 58, 60);
    const __m256i m12 = _mm256_set1_epi8(0x0C);
#endif
#endif
    for (int ib = 0; ib < nb; ++ib) {
        const uint8_t * blk = x + ib * ts;
        const hiq2_block_q8_0 * y0 = y + 2 * ib;
        const hiq2_block_q8_0 * y1 = y0 + 1;
#if defined(__AVX2__)
        // low 2 bits: weights 16s..16s+15 are bits 2s..2s+1 of ql[0..15]
        const __m128i ql  = _mm_loadu_si128((const __m128i *)(blk + HIQ2_HEADER_BYTES));
        const __m256i qlx = _mm256_set_m128i(ql, ql);
        const __m256i lo0 = _mm256_and_si256(_mm256_blend_epi32(qlx, _mm256_srli_epi16(qlx, 2), 0xF0), m3);
        const __m256i lo1 = _mm256_and_si256(_mm256_blend_epi32(_mm256_srli_epi16(qlx, 4), _mm256_srli_epi16(qlx, 6), 0xF0), m3);
#if defined(__BMI2__) && defined(__AVX512VBMI__) && defined(__AVX512VL__)
        // byte i of a half <- its 2-bit field, placed at bits 2..3 (rotate-select, then mask)
        uint64_t u[2];
        const unsigned em = hiq2_upper_fields(H, blk, u);
        const __m256i up0 = _mm256_and_si256(_mm256_multishift_epi64_epi8(ushift, _mm256_set1_epi64x((long long) u[0])), m12);
        const __m256i up1 = _mm256_and_si256(_mm256_multishift_epi64_epi8(ushift, _mm256_set1_epi64x((long long) u[1])), m12);
#else
        uint64_t up[HIQ2_NGROUPS];
        const unsigned em = hiq2_upper_bytes(H, blk, up);
        const __m256i up0 = _mm256_set_epi64x((long long) up[3], (long long) up[2], (long long) up[1], (long long) up[0]);
        const __m256i up1 = _mm256_set_epi64x((long long) up[7], (long long) up[6], (long long) up[5], (long long) up[4]);
#endif
        const __m256i c0  = _mm256_or_si256(lo0, up0);
        const __m256i c1  = _mm256_or_si256(lo1, up1);
        // L = c for high groups, 5c for low groups
        const __m256i vm  = _mm256_set1_epi8((char) em);
        const __m256i h0  = _mm256_cmpeq_epi8(_mm256_and_si256(vm, gbit0), gbit0);
        const __m256i h1  = _mm256_cmpeq_epi8(_mm256_and_si256(vm, gbit1), gbit1);
        const __m256i L0  = _mm256_blendv_epi8(_mm256_add_epi8(c0, _mm256_slli_epi16(c0, 2)), c0, h0);
        const __m256i L1  = _mm256_blendv_epi8(_mm256_add_epi8(c1, _mm256_slli_epi16(c1, 2)), c1, h1);

        const __m256i q0 = _mm256_loadu_si256((const __m256i *) y0->qs);
        const __m256i q1 = _mm256_loadu_si256((const __m256i *) y1->qs);
        // L in 0..15 (u8) times q (s8): pair sums fit in int16; then 8 int32 lanes per half
        // lanes of S_b = 16 * sum L q - z * sum q (exact int32)
        const __m256i vz  = _mm256_set1_epi16((short) blk[2]);
        const __m256i S0  = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(L0, q0), s16),
                                             _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q0), vz));
        const __m256i S1  = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(L1, q1), s16),
                                             _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q1), vz));
        const float d  = hiq2_h2f(ggml_hiq2_read_u16(blk));
        const __m256 f0 = _mm256_mul_ps(_mm256_set1_ps(d * hiq2_h2f(y0->d)), _mm256_cvtepi32_ps(S0));
        const __m256 f1 = _mm256_mul_ps(_mm256_set1_ps(d * hiq2_h2f(y1->d)), _mm256_cvtepi32_ps(S1));
        acc = _mm256_add_ps(acc, _mm256_add_ps(f0, f1));
#else
        uint64_t up[HIQ2_NGROUPS];
        const unsigned em = hiq2_upper_bytes(H, blk, up);
        const int z = blk[2];
        const uint8_t * ql = blk + HIQ2_HEADER_BYTES;
        const uint8_t * upb = (const uint8_t *) up;   // little-endian byte order
        int32_t acc[2] = {0, 0};
        int32_t sq[2]  = {0, 0};
        for (int g = 0; g < HIQ2_NGROUPS; ++g) {
            const int mul = ((em >> g) & 1u) ? 1 : 5;
            const int8_t * q = (g < 4 ? y0 : y1)->qs + (g % 4) * HIQ2_GROUP;
            int32_t a = 0;
            int32_t b = 0;
            for (int j = 0; j < HIQ2_GROUP; ++j) {
                const int i = g * HIQ2_GROUP + j;
                const int c = ((ql[i % HIQ2_QL_BYTES] >> (2 * (i / HIQ2_QL_BYTES))) & 3) | upb[i];
                a += c * q[j];
                b += q[j];
            }
            acc[g / 4] += mul * a;
            sq[g / 4]  += b;
        }
        const int32_t s0 = 16 * acc[0] - z * sq[0];
        const int32_t s1 = 16 * acc[1] - z * sq[1];
        const float d  = hiq2_h2f(ggml_hiq2_read_u16(blk));
        const float p0 = hiq2_h2f(y0->d) * (float) s0;
        const float p1 = hiq2_h2f(y1->d) * (float) s1;
        const float pb = p0 + p1;
        const float t  = d * pb;
        sumf = sumf + t;
#endif
    }
#if defined(__AVX2__)
    {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        sumf = _mm_cvtss_f32(v);
    }
#endif
    *s = sumf / 16.0f;
}

void ggml_vec_dot_hiq2_q8_0(int H, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(H >= 0 && H <= HIQ2_NGROUPS);
    hiq2_vec_dot_impl(H, n, s, vx, vy);
}

// per-type entry points: H is a compile-time constant in each instantiation
#define HIQ2_DEFINE_CPU_FNS(H) \
    void quantize_row_hiq2_h##H(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
        ggml_hiq2_quantize_row_ref(H, x, y, k); \
    } \
    void ggml_vec_dot_hiq2_h##H##_q8_0(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, \
                                       const void * GGML_RESTRICT vy, size_t by, int nrc) { \
        assert(nrc == 1); \
        (void) bs; (void) bx; (void) by; (void) nrc; \
        hiq2_vec_dot_impl(H, n, s, vx, vy); \
    }
HIQ2_FOREACH(HIQ2_DEFINE_CPU_FNS)
#undef HIQ2_DEFINE_CPU_FNS
