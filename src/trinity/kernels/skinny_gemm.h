/* Skinny fp32 GEMM pieces shared by the native CPU kernels: a few token rows against a long stream of weight
 * rows, as in decode. Each weight row is read once per pass of up to TOKS tokens, the accumulators stay in
 * registers, and the weight stream is prefetched into L2 ahead of use. */
#ifndef TRINITY_SKINNY_GEMM_H
#define TRINITY_SKINNY_GEMM_H

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* unaligned loads */

#define TOKS 8            /* token rows per pass over a weight row */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2048 /* floats: 8 KB ahead in the weight stream */
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 1 /* into L2: prefetching into L1 this far ahead measured no better than none */
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) { /* a tree, not a chain of 15 dependent adds */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* out[n] = w . x[n] for n < N: one weight row against up to TOKS token rows. N is a constant at every call site,
 * so the loops unroll and the accumulators stay in registers. One row at a time, not a tile of several: on the
 * project's EPYC, four rows read side by side streamed at 12-15 GB/s from memory, a single row at 18-20. */
static inline __attribute__((always_inline)) void dot_row(const float *w, const float *const *x, int N, int K,
                                                          float *out) {
    v16 acc[TOKS];
    for (int n = 0; n < N; n++) acc[n] = (v16){0};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __builtin_prefetch(w + k + PREFETCH_AHEAD, 0, PREFETCH_LOCALITY);
        v16 wv = *(const v16u *)(w + k);
        for (int n = 0; n < N; n++) acc[n] += wv * *(const v16u *)(x[n] + k);
    }
    for (int n = 0; n < N; n++) {
        float s = hsum(acc[n]);
        for (int kk = k; kk < K; kk++) s += w[kk] * x[n][kk];
        out[n] = s;
    }
}

/* Rows [row0, row1) of w (row stride ldw) against n token rows x[0..n): out[i * ldo + (r - row0)]. Passes of
 * TOKS tokens outside, rows inside: the pass's token rows stay in L1, and a work item's ROW_BLOCK weight rows
 * (16 rows of 2 KB at Trinity-like sizes in the MoE kernel) stay in L1/L2 from one pass to the next. (Rows outside read the tokens
 * from L2 once per row instead, and a 2048-token prefill ran 1.45x slower.) */
static void rows_times_tokens(const float *w, long ldw, int row0, int row1, const float *const *x, int n, int K,
                              float *out, long ldo) {
    float buf[TOKS];
    for (int t0 = 0; t0 < n; t0 += TOKS) {
        int N = n - t0 < TOKS ? n - t0 : TOKS;
        const float *const *xt = x + t0;
        for (int r = row0; r < row1; r++) {
            const float *wr = w + (long)r * ldw;
            switch (N) {
            case 8: dot_row(wr, xt, 8, K, buf); break;
            case 7: dot_row(wr, xt, 7, K, buf); break;
            case 6: dot_row(wr, xt, 6, K, buf); break;
            case 5: dot_row(wr, xt, 5, K, buf); break;
            case 4: dot_row(wr, xt, 4, K, buf); break;
            case 3: dot_row(wr, xt, 3, K, buf); break;
            case 2: dot_row(wr, xt, 2, K, buf); break;
            default: dot_row(wr, xt, 1, K, buf); break;
            }
            for (int i = 0; i < N; i++) out[(long)(t0 + i) * ldo + r - row0] = buf[i];
        }
    }
}

#endif
