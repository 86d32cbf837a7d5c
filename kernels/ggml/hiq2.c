// HIQ2 tensor type family: ggml-base part (reference quantizer, dequantizer,
// row validation). See docs/FORMAT.md; hiq2gguf/formats.py is the reference
// these functions are tested against bit for bit (tests/test_c_kernels.py).
//
// Compile with -ffp-contract=off (patch.py sets it for this file). In addition
// every float step below is a separate statement with a single rounding, and
// no expression has the a*b+c shape that could be contracted into an FMA.

#include "hiq2.h"
#include "hiq2-e8grid.h"     // the HIQ2_E8* codebook: defines ggml_hiq2_e8_grid / _parity

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#define HIQ2_CHECK_ID(H) _Static_assert(GGML_TYPE_HIQ2_H##H == HIQ2_FIRST_TYPE + (H), "HIQ2 type ids must be 100+H");
HIQ2_FOREACH(HIQ2_CHECK_ID)
#undef HIQ2_CHECK_ID
_Static_assert(GGML_TYPE_HIQ2_E8 == HIQ2_E8_TYPE, "HIQ2_E8 type id must be 109");
_Static_assert(HIQ2_E8_MAX_BITS - HIQ2_E8_LOW_BITS <= 4, "E8 extension bytes: one uint32");
_Static_assert(GGML_TYPE_COUNT > HIQ2_FIRST_TYPE + HIQ2_NTYPES_ALL - 1, "GGML_TYPE_COUNT too small for HIQ2");
_Static_assert(sizeof(block_hiq2_max) == HIQ2_TYPE_SIZE(HIQ2_NGROUPS), "block_hiq2_max layout");

static inline float hiq2_clampf(float v, float lo, float hi) {
    if (!(v >= lo)) { return lo; }   // also maps NaN to lo
    if (v > hi) { return hi; }
    return v;
}

// Reference quantizer for one block of 64 floats (FORMAT.md / formats.py):
//   t = x / d + m   (m = z / 16, d the fp16 scale as float32)
static void hiq2_quantize_block_ref(const int H, const float * GGML_RESTRICT x, uint8_t * GGML_RESTRICT blk) {
    // 1. group scores and the H highest (ties: lower index first)
    float score[HIQ2_NGROUPS];
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        float s = fabsf(x[g * HIQ2_GROUP]);
        for (int j = 1; j < HIQ2_GROUP; ++j) {
            const float a = fabsf(x[g * HIQ2_GROUP + j]);
            if (a > s) { s = a; }
        }
        score[g] = s;
    }
    unsigned mask = 0;
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        int rank = 0;
        for (int h = 0; h < HIQ2_NGROUPS; ++h) {
            if (score[h] > score[g] || (score[h] == score[g] && h < g)) {
                rank++;
            }
        }
        if (rank < H) {
            mask |= 1u << g;
        }
    }

    // 2. scale
    float xmin = x[0];
    float xmax = x[0];
    for (int i = 1; i < QK_HIQ2; ++i) {
        if (x[i] < xmin) { xmin = x[i]; }
        if (x[i] > xmax) { xmax = x[i]; }
    }
    const float lo = xmin < 0.0f ? xmin : 0.0f;
    const float hi = xmax > 0.0f ? xmax : 0.0f;
    const float range = hi - lo;
    const float dr = range / 15.0f;
    const uint16_t dh = ggml_hiq2_fp32_to_fp16(dr);
    const float d = ggml_hiq2_fp16_to_fp32(dh);

    uint8_t codes[QK_HIQ2];
    uint8_t z = 0;
    if (d == 0.0f) {
        memset(codes, 0, sizeof(codes));
    } else {
        // 3. zero point
        const float nlo = -lo;
        const float a0  = nlo / d;
        const float a1  = a0 * 16.0f;
        const float a2  = a1 + 0.5f;
        const float zf  = hiq2_clampf(floorf(a2), 0.0f, 255.0f);
        z = (uint8_t) zf;
        const float m = (float) z / 16.0f;

        // 4. codes
        for (int g = 0; g < HIQ2_NGROUPS; ++g) {
            const int high = (mask >> g) & 1u;
            for (int j = 0; j < HIQ2_GROUP; ++j) {
                const int i = g * HIQ2_GROUP + j;
                const float q = x[i] / d;
                const float t = q + m;
                if (high) {
                    const float u = t + 0.5f;
                    codes[i] = (uint8_t) hiq2_clampf(floorf(u), 0.0f, 15.0f);
                } else {
                    const float u = t + 2.5f;
                    const float v = u / 5.0f;
                    codes[i] = (uint8_t) hiq2_clampf(floorf(v), 0.0f, 3.0f);
                }
            }
        }
    }

    // pack
    memset(blk, 0, HIQ2_TYPE_SIZE(H));
    blk[0] = (uint8_t)(dh & 0xff);
    blk[1] = (uint8_t)(dh >> 8);
    blk[2] = z;
    blk[3] = (uint8_t) mask;
    uint8_t * ql = blk + HIQ2_HEADER_BYTES;
    uint8_t * qh = blk + HIQ2_HEADER_BYTES + HIQ2_QL_BYTES;
    for (int i = 0; i < QK_HIQ2; ++i) {
        ql[i % HIQ2_QL_BYTES] |= (uint8_t)((codes[i] & 3) << (2 * (i / HIQ2_QL_BYTES)));
    }
    int k = 0;
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        if (!((mask >> g) & 1u)) {
            continue;
        }
        for (int j = 0; j < HIQ2_GROUP; ++j) {
            qh[2 * k + j / 4] |= (uint8_t)(((codes[g * HIQ2_GROUP + j] >> 2) & 3) << (2 * (j % 4)));
        }
        k++;
    }
}

void ggml_hiq2_quantize_row_ref(int H, const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    assert(k % QK_HIQ2 == 0);
    assert(H >= 0 && H <= HIQ2_NGROUPS);
    const int64_t nb = k / QK_HIQ2;
    uint8_t * out = (uint8_t *) y;
    for (int64_t ib = 0; ib < nb; ++ib) {
        hiq2_quantize_block_ref(H, x + ib * QK_HIQ2, out + ib * HIQ2_TYPE_SIZE(H));
    }
}

void ggml_hiq2_dequantize_row(int H, const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    assert(k % QK_HIQ2 == 0);
    const int64_t nb = k / QK_HIQ2;
    const uint8_t * in = (const uint8_t *) x;
    int16_t q[QK_HIQ2];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float d = ggml_hiq2_decode_block(H, in + ib * HIQ2_TYPE_SIZE(H), q);
        float * out = y + ib * QK_HIQ2;
        for (int i = 0; i < QK_HIQ2; ++i) {
            const float p = d * (float) q[i];   // exact: 11-bit d times 9-bit integer
            out[i] = p / 16.0f;                 // exact
        }
    }
}

size_t ggml_hiq2_quantize(int H, const float * GGML_RESTRICT src, void * GGML_RESTRICT dst,
                          int64_t nrows, int64_t n_per_row, const float * imatrix) {
    // The converter does its own importance-aware quantization (Fisher-guided
    // groups, searched scales) and only ever packs codes; inside ggml the
    // importance weights are not used and the reference algorithm applies.
    (void) imatrix;
    const size_t row_size = (size_t)(n_per_row / QK_HIQ2) * HIQ2_TYPE_SIZE(H);
    for (int64_t r = 0; r < nrows; ++r) {
        ggml_hiq2_quantize_row_ref(H, src + r * n_per_row, (uint8_t *) dst + r * row_size, n_per_row);
    }
    return (size_t) nrows * row_size;
}

static inline int hiq2_popcount8(unsigned v) {
    int n = 0;
    for (int b = 0; b < 8; ++b) { n += (v >> b) & 1u; }
    return n;
}

bool ggml_hiq2_validate_row_data(int H, const void * data, size_t nbytes) {
    const size_t ts = HIQ2_TYPE_SIZE(H);
    if (H < 0 || H > HIQ2_NGROUPS || nbytes % ts != 0) {
        fprintf(stderr, "%s: invalid size %zu for type hiq2_h%d (type size = %zu)\n", __func__, nbytes, H, ts);
        return false;
    }
    const size_t nb = nbytes / ts;
    const uint8_t * p = (const uint8_t *) data;
    for (size_t i = 0; i < nb; ++i) {
        const uint8_t * blk = p + i * ts;
        const uint16_t dh = ggml_hiq2_read_u16(blk);
        if ((dh & 0x7c00u) == 0x7c00u) {
            fprintf(stderr, "%s: hiq2_h%d: non-finite scale d (0x%04x) at block %zu\n", __func__, H, dh, i);
            return false;
        }
        if ((dh & 0x8000u) && (dh & 0x7fffu)) {
            fprintf(stderr, "%s: hiq2_h%d: negative scale d (0x%04x) at block %zu\n", __func__, H, dh, i);
            return false;
        }
        const int pc = hiq2_popcount8(blk[3]);
        if (pc != H) {
            fprintf(stderr, "%s: hiq2_h%d: mask 0x%02x has %d bits set, expected %d, at block %zu\n",
                    __func__, H, blk[3], pc, H, i);
            return false;
        }
    }
    return true;
}

// ---- HIQ2_E8* (docs/FORMAT.md, "HIQ2_E8, HIQ2_E8_2K, HIQ2_E8_8K"; formats.E8Type is
// the reference) ---------------------------------------------------------------------
// One implementation for every lattice member, parameterised by B (index bits per
// group), NS (sub-scales per block) and A (the magnitude a sub-block's max |x| maps
// to); HIQ2_E8_FOREACH gives
// each member its entry points below.

// Reference quantizer for one block of 64 floats, every float32 step of
// formats.E8Type.quantize_ref in its order (a statement per rounding, no a*b+c).
static void hiq2_e8_quantize_block_ref(const int B, const int NS, const int A, const float * GGML_RESTRICT x,
                                       uint8_t * GGML_RESTRICT blk) {
    const int SUB = HIQ2_E8_SUB(NS);
    // 1. sub-block maxima s_k = max |x| / A and d = fp16(max_k s_k)
    float s[HIQ2_E8_MAX_NSUB];
    float smax = 0.0f;
    for (int k = 0; k < NS; ++k) {
        float a = fabsf(x[k * SUB]);
        for (int i = 1; i < SUB; ++i) {
            const float v = fabsf(x[k * SUB + i]);
            if (v > a) { a = v; }
        }
        s[k] = a / (float) A;
        if (k == 0 || s[k] > smax) { smax = s[k]; }
    }
    const uint16_t dh = ggml_hiq2_fp32_to_fp16(smax);
    const float d = ggml_hiq2_fp16_to_fp32(dh);

    memset(blk, 0, HIQ2_E8_TYPE_SIZE(B, NS));
    blk[0] = (uint8_t)(dh & 0xff);
    blk[1] = (uint8_t)(dh >> 8);
    if (d == 0.0f) {
        return;                             // every q = 1 (nibble 0), index 0, no sign
    }

    // 2. sub-scales q_k = clamp(floor(s_k / d * 16 + 0.5), 1, 16)
    int q[HIQ2_E8_MAX_NSUB];
    for (int k = 0; k < NS; ++k) {
        const float a0 = s[k] / d;
        const float a1 = a0 * 16.0f;
        const float a2 = a1 + 0.5f;
        q[k] = (int) hiq2_clampf(floorf(a2), 1.0f, 16.0f);
        blk[2 + k / 2] |= (uint8_t)((q[k] - 1) << (4 * (k % 2)));
    }

    // 3. per group: a_j = |x_j| / u, u = d q / 16; the entry of least error
    const int entries = 1 << B;
    const int eb      = B - HIQ2_E8_LOW_BITS;  // index bits in the extension bytes
    uint32_t  ext     = 0;
    for (int g = 0; g < HIQ2_NGROUPS; ++g) {
        const float * xg = x + g * HIQ2_GROUP;
        const float p = d * (float) q[g * HIQ2_GROUP / SUB];
        const float u = p / 16.0f;
        float a[HIQ2_GROUP];
        unsigned neg = 0;
        int nneg = 0;
        for (int j = 0; j < HIQ2_GROUP; ++j) {
            a[j] = fabsf(xg[j]) / u;
            if (xg[j] < 0.0f) {
                neg |= 1u << j;
                nneg++;
            }
        }
        int   best     = 0;
        float best_err = 0.0f;
        for (int e = 0; e < entries; ++e) {
            const uint64_t mv = ggml_hiq2_e8_grid[e];
            float err  = 0.0f;
            float mmin = 0.0f;
            int   j    = 0;
            for (; j < HIQ2_GROUP; ++j) {
                const float m  = (float)((mv >> (8 * j)) & 0xFFu);
                const float t  = a[j] - m;
                const float t2 = t * t;
                err = err + t2;
                // the partial sums only grow (float addition of t2 >= 0 is monotone), so
                // once one reaches best_err this entry cannot win: skipping the rest gives
                // the exhaustive search's answer (8192 entries would be slow otherwise)
                if (e > 0 && err >= best_err) { break; }
                const float am = a[j] * m;
                if (j == 0 || am < mmin) { mmin = am; }
            }
            if (j < HIQ2_GROUP) {
                continue;
            }
            if ((nneg + ggml_hiq2_e8_parity[e]) & 1) {
                const float flip = mmin * 4.0f;   // the cheapest sign flip
                err = err + flip;
            }
            if (e == 0 || err < best_err) {       // the first of equal errors
                best     = e;
                best_err = err;
            }
        }
        // 4. signs of x; where the entry's parity rule is broken, flip the cheapest
        if ((nneg + ggml_hiq2_e8_parity[best]) & 1) {
            const uint64_t mv = ggml_hiq2_e8_grid[best];
            int   jmin = 0;
            float mmin = 0.0f;
            for (int j = 0; j < HIQ2_GROUP; ++j) {
                const float am = a[j] * (float)((mv >> (8 * j)) & 0xFFu);
                if (j == 0 || am < mmin) {
                    jmin = j;
                    mmin = am;
                }
            }
            neg ^= 1u << jmin;
        }
        const unsigned code = ((unsigned) best & ((1u << HIQ2_E8_LOW_BITS) - 1u)) | ((neg & 0x7Fu) << 9);
        blk[HIQ2_E8_CODES(NS) + 2 * g]     = (uint8_t)(code & 0xff);
        blk[HIQ2_E8_CODES(NS) + 2 * g + 1] = (uint8_t)(code >> 8);
        ext |= (uint32_t)((unsigned) best >> HIQ2_E8_LOW_BITS) << (eb * g);
    }
    for (int i = 0; i < eb; ++i) {
        blk[HIQ2_E8_BASE_BYTES(NS) + i] = (uint8_t)(ext >> (8 * i));
    }
}

static void hiq2_e8_quantize_row_ref(const int B, const int NS, const int A, const float * GGML_RESTRICT x,
                                     void * GGML_RESTRICT y, int64_t k) {
    assert(k % QK_HIQ2 == 0);
    const int64_t nb = k / QK_HIQ2;
    uint8_t * out = (uint8_t *) y;
    for (int64_t ib = 0; ib < nb; ++ib) {
        hiq2_e8_quantize_block_ref(B, NS, A, x + ib * QK_HIQ2, out + ib * HIQ2_E8_TYPE_SIZE(B, NS));
    }
}

static void hiq2_e8_dequantize_row(const int B, const int NS, const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    assert(k % QK_HIQ2 == 0);
    const int64_t nb = k / QK_HIQ2;
    const uint8_t * in = (const uint8_t *) x;
    int16_t n[QK_HIQ2];
    for (int64_t ib = 0; ib < nb; ++ib) {
        const float d = ggml_hiq2_e8_decode_block(B, NS, in + ib * HIQ2_E8_TYPE_SIZE(B, NS), n);
        float * out = y + ib * QK_HIQ2;
        for (int i = 0; i < QK_HIQ2; ++i) {
            const float p = d * (float) n[i];   // exact: 11-bit d times 8-bit integer
            out[i] = p / 16.0f;                 // exact
        }
    }
}

static size_t hiq2_e8_quantize(const int B, const int NS, const int A, const float * GGML_RESTRICT src, void * GGML_RESTRICT dst,
                               int64_t nrows, int64_t n_per_row, const float * imatrix) {
    (void) imatrix;                             // as for the H family (ggml_hiq2_quantize)
    const size_t row_size = (size_t)(n_per_row / QK_HIQ2) * HIQ2_E8_TYPE_SIZE(B, NS);
    for (int64_t r = 0; r < nrows; ++r) {
        hiq2_e8_quantize_row_ref(B, NS, A, src + r * n_per_row, (uint8_t *) dst + r * row_size, n_per_row);
    }
    return (size_t) nrows * row_size;
}

// valid when every d is finite and non-negative: every bit pattern of the
// sub-scales, codes and extension bytes decodes to a lattice point
static bool hiq2_e8_validate_row_data(const int B, const int NS, const char * name, const void * data, size_t nbytes) {
    const size_t ts = HIQ2_E8_TYPE_SIZE(B, NS);
    if (nbytes % ts != 0) {
        fprintf(stderr, "%s: invalid size %zu for type %s (type size = %zu)\n", __func__, nbytes, name, ts);
        return false;
    }
    const size_t nb = nbytes / ts;
    const uint8_t * p = (const uint8_t *) data;
    for (size_t i = 0; i < nb; ++i) {
        const uint16_t dh = ggml_hiq2_read_u16(p + i * ts);
        if ((dh & 0x7c00u) == 0x7c00u) {
            fprintf(stderr, "%s: %s: non-finite scale d (0x%04x) at block %zu\n", __func__, name, dh, i);
            return false;
        }
        if ((dh & 0x8000u) && (dh & 0x7fffu)) {
            fprintf(stderr, "%s: %s: negative scale d (0x%04x) at block %zu\n", __func__, name, dh, i);
            return false;
        }
    }
    return true;
}

#define HIQ2_E8_DEFINE_FNS(sfx, SFX, ID, B, NS, A) \
    _Static_assert(GGML_TYPE_HIQ2_##SFX == ID, "HIQ2_" #SFX ": ggml.h's id is the table's"); \
    void dequantize_row_hiq2_##sfx(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) { \
        hiq2_e8_dequantize_row(B, NS, x, y, k); \
    } \
    void quantize_row_hiq2_##sfx##_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
        hiq2_e8_quantize_row_ref(B, NS, A, x, y, k); \
    } \
    size_t quantize_hiq2_##sfx(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix) { \
        return hiq2_e8_quantize(B, NS, A, src, dst, nrows, n_per_row, imatrix); \
    } \
    bool validate_row_data_hiq2_##sfx(const void * data, size_t nbytes) { \
        return hiq2_e8_validate_row_data(B, NS, "hiq2_" #sfx, data, nbytes); \
    }
HIQ2_E8_FOREACH(HIQ2_E8_DEFINE_FNS)
#undef HIQ2_E8_DEFINE_FNS

// ---- per-type wrappers and the function table ---------------------------------
#define HIQ2_DEFINE_FNS(H) \
    void dequantize_row_hiq2_h##H(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) { \
        ggml_hiq2_dequantize_row(H, x, y, k); \
    } \
    void quantize_row_hiq2_h##H##_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
        ggml_hiq2_quantize_row_ref(H, x, y, k); \
    } \
    size_t quantize_hiq2_h##H(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix) { \
        return ggml_hiq2_quantize(H, src, dst, nrows, n_per_row, imatrix); \
    } \
    bool validate_row_data_hiq2_h##H(const void * data, size_t nbytes) { \
        return ggml_hiq2_validate_row_data(H, data, nbytes); \
    }
HIQ2_FOREACH(HIQ2_DEFINE_FNS)
#undef HIQ2_DEFINE_FNS

#define HIQ2_TABLE_ROW(H) \
    { GGML_TYPE_HIQ2_H##H, H, HIQ2_TYPE_SIZE(H), "hiq2_h" #H, \
      dequantize_row_hiq2_h##H, quantize_row_hiq2_h##H##_ref, quantize_hiq2_h##H, validate_row_data_hiq2_h##H },
#define HIQ2_E8_TABLE_ROW(sfx, SFX, ID, B, NS, A) \
    { GGML_TYPE_HIQ2_##SFX, -1, HIQ2_E8_TYPE_SIZE(B, NS), "hiq2_" #sfx, \
      dequantize_row_hiq2_##sfx, quantize_row_hiq2_##sfx##_ref, quantize_hiq2_##sfx, validate_row_data_hiq2_##sfx },
// indexed by type id - HIQ2_FIRST_TYPE: the E8 members' ids follow the H family's
const struct ggml_hiq2_type_fns ggml_hiq2_types[HIQ2_NTYPES_ALL] = {
    HIQ2_FOREACH(HIQ2_TABLE_ROW)
    HIQ2_E8_FOREACH(HIQ2_E8_TABLE_ROW)
};
#undef HIQ2_TABLE_ROW
#undef HIQ2_E8_TABLE_ROW
