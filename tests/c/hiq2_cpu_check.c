// Drives the HIQ2 CPU kernels (kernels/ggml/hiq2.c + hiq2-cpu.c, compiled into this
// program for a target the tests cannot load with ctypes: AArch64 under qemu-user).
// tests/test_c_kernels_cross.py compiles it against the patched llama.cpp headers,
// feeds it random blocks and Q8_0 activations and compares what it prints with the
// numpy reference.
//
// stdin:  int32 type (ggml id: 100 + H, or 109..112 for the E8 members), K, rows, cols, then
//         rows x K/64 blocks of that type (W, row-major), then cols x K/32 Q8_0 blocks
//         (Y, one row per activation column)
// stdout: float32, in this order:
//         dequantize(W)                       rows x K
//         vec_dot, one call per (r, c)        cols x rows (column c of Y: c * rows + r)
//         and for the H family only (the E8 members have no 2 x 2 tile and no GEMM; the
//         program checks that ggml_hiq2_sgemm declines it):
//         vec_dot nrc == 2 tiles              the same layout, 2 x 2 per call (NaN in an odd last row/column)
//         ggml_hiq2_sgemm, nth = 1, 2, 3      cols x rows each, every thread's static share

#include "hiq2.h"
#include "ggml-cpu-impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

// The GEMM synchronises only when given a threadpool; this program passes none.
void ggml_barrier(struct ggml_threadpool * tp) { (void) tp; abort(); }
void ggml_threadpool_chunk_set(struct ggml_threadpool * tp, int value) { (void) tp; (void) value; abort(); }
int  ggml_threadpool_chunk_add(struct ggml_threadpool * tp, int value) { (void) tp; (void) value; abort(); }

typedef void (*vec_dot_fn)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
#define HIQ2_VEC_DOT_ROW(H) ggml_vec_dot_hiq2_h##H##_q8_0,
// indexed by type id - HIQ2_FIRST_TYPE, like ggml_hiq2_types
#define HIQ2_E8_VEC_DOT_ROW(sfx, SFX, ID, B, NS, A) ggml_vec_dot_hiq2_##sfx##_q8_0,
static const vec_dot_fn vec_dot[HIQ2_NTYPES_ALL] = { HIQ2_FOREACH(HIQ2_VEC_DOT_ROW) HIQ2_E8_FOREACH(HIQ2_E8_VEC_DOT_ROW) };

#define Q8_0_BYTES 34

static void read_all(void * p, size_t n) {
    if (fread(p, 1, n, stdin) != n) {
        fprintf(stderr, "hiq2_cpu_check: short input\n");
        exit(2);
    }
}

static void fill_nan(float * p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        p[i] = NAN;
    }
}

static void write_all(const float * p, size_t n) {
    if (fwrite(p, sizeof(float), n, stdout) != n) {
        exit(3);
    }
}

int main(void) {
    int32_t hdr[4];
    read_all(hdr, sizeof(hdr));
    const int type = hdr[0], K = hdr[1], rows = hdr[2], cols = hdr[3];
    if (!ggml_is_hiq2_type((enum ggml_type) type) || K <= 0 || K % QK_HIQ2 || rows <= 0 || cols <= 0) {
        fprintf(stderr, "hiq2_cpu_check: bad header %d %d %d %d\n", type, K, rows, cols);
        return 2;
    }
    const struct ggml_hiq2_type_fns * fns = ggml_hiq2_fns((enum ggml_type) type);
    const vec_dot_fn dot = vec_dot[type - HIQ2_FIRST_TYPE];
    const size_t wrow = (size_t)(K / QK_HIQ2) * fns->type_size;
    const size_t yrow = (size_t)(K / 32) * Q8_0_BYTES;
    const size_t nout = (size_t) rows * cols;
    uint8_t * W = malloc(wrow * rows);
    uint8_t * Y = malloc(yrow * cols);
    float * out = malloc(sizeof(float) * ((size_t) rows * K > nout ? (size_t) rows * K : nout));
    read_all(W, wrow * rows);
    read_all(Y, yrow * cols);

    fns->to_float(W, out, (int64_t) rows * K);
    write_all(out, (size_t) rows * K);

    for (int c = 0; c < cols; ++c) {
        for (int r = 0; r < rows; ++r) {
            dot(K, out + (size_t) c * rows + r, 0, W + r * wrow, 0, Y + c * yrow, 0, 1);
        }
    }
    write_all(out, nout);

    if (fns->n_high < 0) {                      // an E8 member: the GEMM hook must decline
        const int taken = ggml_hiq2_sgemm(NULL, 0, 1, rows, cols, K / QK_HIQ2, W, (int64_t)(wrow / fns->type_size),
                                          Y, (int64_t)(yrow / Q8_0_BYTES), out, rows, type);
        free(W);
        free(Y);
        free(out);
        if (taken) {
            fprintf(stderr, "hiq2_cpu_check: ggml_hiq2_sgemm took %s\n", fns->name);
            return 4;
        }
        return 0;
    }

    fill_nan(out, nout);
    for (int c = 0; c + 1 < cols; c += 2) {
        for (int r = 0; r + 1 < rows; r += 2) {
            dot(K, out + (size_t) c * rows + r, (size_t) rows, W + r * wrow, wrow, Y + c * yrow, yrow, 2);
        }
    }
    write_all(out, nout);

    for (int nth = 1; nth <= 3; ++nth) {
        fill_nan(out, nout);
        for (int ith = 0; ith < nth; ++ith) {
            if (!ggml_hiq2_sgemm(NULL, ith, nth, rows, cols, K / QK_HIQ2, W, (int64_t)(wrow / fns->type_size),
                                 Y, (int64_t)(yrow / Q8_0_BYTES), out, rows, type)) {
                fprintf(stderr, "hiq2_cpu_check: ggml_hiq2_sgemm declined\n");
                return 4;
            }
        }
        write_all(out, nout);
    }
    free(W);
    free(Y);
    free(out);
    return 0;
}
