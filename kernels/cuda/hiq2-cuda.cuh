// HIQ2 tensor type family (hiq2gguf) for ggml's CUDA backend. See docs/FORMAT.md.
//
// Copied into ggml/src/ggml-cuda/ by kernels/cuda/patch.py and included by
// convert.cu (dequantize to F32/F16/BF16, contiguous and not), getrows.cu and
// mmvq.cu (the matrix-vector product against Q8_1 activations). Larger batches
// go through dequantize + cuBLAS, as for every type without MMQ kernels.
//
// Nothing here is included by the MMQ / FlashAttention template instances, so
// adding the family does not recompile them.
#pragma once

#include "common.cuh"
#include "hiq2.h"

#include <cstdint>

#define HIQ2_CUDA_QR        2   // dequantize_kernel_t: weights iqs and iqs + 32 of a block
#define VDR_HIQ2_Q8_1_MMVQ  4   // groups per vec_dot call: one Q8_1 block (32 weights)

// qk: weights per block; qi: vec_dot work units per block (8-weight groups)
#define HIQ2_CUDA_TYPE_TRAITS(H)                                          \
    template<> struct ggml_cuda_type_traits<GGML_TYPE_HIQ2_H##H> {        \
        static constexpr int qk = QK_HIQ2;                                \
        static constexpr int qr = HIQ2_CUDA_QR;                           \
        static constexpr int qi = HIQ2_NGROUPS;                           \
        static constexpr int bs = HIQ2_TYPE_SIZE(H);                      \
    };
HIQ2_FOREACH(HIQ2_CUDA_TYPE_TRAITS)
#undef HIQ2_CUDA_TYPE_TRAITS

// Blocks are 20 + 2H bytes: 2-byte aligned only, so every load is 8 or 16 bits wide.
static __device__ __forceinline__ float hiq2_cuda_scale(const uint8_t * blk) {
    return __half2float(__ushort_as_half(*(const uint16_t *) blk));
}

// Slot of group g among the high groups, and whether it is high. Like the C
// decoder, set mask bits beyond the H-th count as low (invalid data never reads
// past the block).
template <int H>
static __device__ __forceinline__ bool hiq2_cuda_is_high(const unsigned mask, const int g, int & k) {
    k = __popc(mask & ((1u << g) - 1u));
    return H > 0 && ((mask >> g) & 1u) && k < H;
}

// w_i = d * (16 L_i - z) / 16: both products are exact in float32 (11-bit d,
// 9-bit integer, a power of two), so this equals the numpy reference bit for bit.
template <int H>
static __device__ __forceinline__ float hiq2_cuda_weight(const uint8_t * blk, const int i) {
    const int      z    = blk[2];
    const unsigned mask = blk[3];
    const int      g    = i / HIQ2_GROUP;
    const int      j    = i % HIQ2_GROUP;
    int c = (blk[HIQ2_HEADER_BYTES + i % HIQ2_QL_BYTES] >> (2 * (i / HIQ2_QL_BYTES))) & 3;
    int k;
    int L;
    if (hiq2_cuda_is_high<H>(mask, g, k)) {
        c |= ((blk[HIQ2_HEADER_BYTES + HIQ2_QL_BYTES + 2 * k + j / 4] >> (2 * (j % 4))) & 3) << 2;
        L = c;
    } else {
        L = 5 * c;
    }
    return hiq2_cuda_scale(blk) * (float) (16 * L - z) * 0.0625f;
}

// dequantize_kernel_t of convert.cu / getrows.cu: block ib of the row at vx
template <int H>
static __device__ __forceinline__ void dequantize_hiq2(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    const uint8_t * blk = (const uint8_t *) vx + ib * HIQ2_TYPE_SIZE(H);
    v.x = hiq2_cuda_weight<H>(blk, iqs);
    v.y = hiq2_cuda_weight<H>(blk, iqs + QK_HIQ2 / 2);
}

// four 2-bit fields of a byte -> the low 2 bits of four bytes
static __device__ __forceinline__ int hiq2_cuda_spread2(const unsigned x) {
    return (int) ((x | (x << 6) | (x << 12) | (x << 18)) & 0x03030303u);
}

// mmvq: block kbx of the row at vbq times the Q8_1 block iqs/4 of it (bq8_1 points
// at the first of the two Q8_1 blocks under block kbx), exact integer sums:
//   S = 16 * sum L q - z * sum q,   result = d * dy * S / 16
template <int H>
static __device__ __forceinline__ float vec_dot_hiq2_q8_1(
        const void * __restrict__ vbq, const block_q8_1 * __restrict__ bq8_1, const int & kbx, const int & iqs) {
    const uint16_t * b16 = (const uint16_t *) ((const uint8_t *) vbq + kbx * HIQ2_TYPE_SIZE(H));
    const int        b   = iqs / 4;                        // Q8_1 block 0 or 1: groups 4b .. 4b+3
    const block_q8_1 * y = bq8_1 + b;
    const int      * q   = (const int *) y->qs;            // block_q8_1 is 4-byte aligned
    const unsigned mask  = b16[1] >> 8;
    const int      z     = b16[1] & 0xFF;

    // low 2 bits of weight i are bits 2 (i / 16) of ql byte i % 16: for the weights
    // 32 b + 16 s + m of this Q8_1 block, field 2 b + s of ql byte m
    unsigned ql[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        ql[t] = (unsigned) b16[2 + 2 * t] | ((unsigned) b16[3 + 2 * t] << 16);
    }
    int acc  = 0;
    int sumq = 0;
#pragma unroll
    for (int gl = 0; gl < 4; ++gl) {                       // 8 weights = 2 ints of q
        const int shift = 2 * (2 * b + gl / 2);
        int c0 = (int) ((ql[2 * (gl % 2) + 0] >> shift) & 0x03030303u);
        int c1 = (int) ((ql[2 * (gl % 2) + 1] >> shift) & 0x03030303u);
        int k;
        const bool high = hiq2_cuda_is_high<H>(mask, 4 * b + gl, k);
        if (high) {
            const unsigned up = b16[(HIQ2_HEADER_BYTES + HIQ2_QL_BYTES) / 2 + k];   // weights 0..3 | 4..7
            c0 |= hiq2_cuda_spread2(up & 0xFF) << 2;
            c1 |= hiq2_cuda_spread2(up >> 8) << 2;
        }
        const int a = ggml_cuda_dp4a(c1, q[2 * gl + 1], ggml_cuda_dp4a(c0, q[2 * gl], 0));
        acc += high ? a : 5 * a;
        sumq = ggml_cuda_dp4a(0x01010101, q[2 * gl + 1], ggml_cuda_dp4a(0x01010101, q[2 * gl], sumq));
    }
    return hiq2_cuda_scale((const uint8_t *) b16) * __low2float(y->ds) * (float) (16 * acc - z * sumq) * 0.0625f;
}

// switch cases spliced into convert.cu (contiguous / strided dequantize), mmvq.cu
#define HIQ2_CUDA_DEQUANTIZE_CONT_CASE(H) \
    case GGML_TYPE_HIQ2_H##H: return dequantize_block_cont_cuda<QK_HIQ2, HIQ2_CUDA_QR, dequantize_hiq2<H>>;
#define HIQ2_CUDA_DEQUANTIZE_CONT_CASES HIQ2_FOREACH(HIQ2_CUDA_DEQUANTIZE_CONT_CASE)
#define HIQ2_CUDA_DEQUANTIZE_NC_CASE(H) \
    case GGML_TYPE_HIQ2_H##H: return dequantize_block_cuda<QK_HIQ2, HIQ2_CUDA_QR, dequantize_hiq2<H>>;
#define HIQ2_CUDA_DEQUANTIZE_NC_CASES HIQ2_FOREACH(HIQ2_CUDA_DEQUANTIZE_NC_CASE)
#define HIQ2_CUDA_VEC_DOT_CASE(H) case GGML_TYPE_HIQ2_H##H: return vec_dot_hiq2_q8_1<H>;
#define HIQ2_CUDA_VEC_DOT_CASES HIQ2_FOREACH(HIQ2_CUDA_VEC_DOT_CASE)
