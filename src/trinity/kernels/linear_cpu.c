/* y = x @ W.T for a few rows on the CPU, fp32 or bf16 weights (batch-1 and small-batch decode): built and loaded by
 * kernels/native.py; the reference it must equal is F.linear (kernels/linear.py).
 *
 * Why: with one or two rows neither BLAS reached the memory bandwidth on the project's 2-core EPYC (figures:
 * benchmarks/README.md). Here the weight is split into blocks of rows across the threads and each row streams
 * once against all (up to TOKS) token rows. */
#include "skinny_gemm.h"

#define LINEAR_ROW_BLOCK 64
#define LINEAR_MAX_ROWS 64 /* rows per call of rows_times_tokens (which makes passes of TOKS) */

/* x: [n, K]; w: [N, K], fp32 or (weight_bf16) bf16; out: [n, N]. Any n; meant for n <= TOKS, where each weight
 * row is read once. */
void trinity_linear(const float *x, const void *w, int weight_bf16, float *out, int n, int K, int N,
                    int num_threads) {
    long blocks = (N + LINEAR_ROW_BLOCK - 1) / LINEAR_ROW_BLOCK;
    for (int c0 = 0; c0 < n; c0 += LINEAR_MAX_ROWS) {
        int m = n - c0 < LINEAR_MAX_ROWS ? n - c0 : LINEAR_MAX_ROWS;
        const float *xr[LINEAR_MAX_ROWS];
        for (int i = 0; i < m; i++) xr[i] = x + (long)(c0 + i) * K;
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (long b = 0; b < blocks; b++) {
            int r0 = (int)(b * LINEAR_ROW_BLOCK), r1 = r0 + LINEAR_ROW_BLOCK < N ? r0 + LINEAR_ROW_BLOCK : N;
            rows_times_tokens(w, weight_bf16, K, r0, r1, xr, m, K, out + (long)c0 * N + r0, N);
        }
    }
}
