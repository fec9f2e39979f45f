/* Routed experts of one MoE layer on the CPU, fp32: SwiGLU experts over tokens grouped by expert, and the
 * weighted combine. Built at first use by kernels/native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes; kernels/moe.py holds the pure-torch reference it must equal.
 *
 * Why: a decode batch gives each expert a handful of tokens, so every expert product is a skinny GEMM
 * ([2I, H] x [H, n] with n around 4). The BLAS ran those at a third of the memory bandwidth on the project's
 * 2-core EPYC. Here each block of weight rows is read once and multiplied with up to four token rows held in
 * registers, so the work streams the expert weights at close to the bandwidth.
 *
 * Phases, each split across threads, separated by the implicit barrier of `omp for`:
 *   1. act[a, j] = silu(x[t_a] . gate_e[j]) * (x[t_a] . up_e[j])   for every assignment a of expert e
 *   2. ys[a, h]  = act[a] . down_e[h]
 *   3. out[t]    = sum_c weight[t, c] * ys[position[t, c]]          (in choice order: deterministic)
 */
#include <math.h>
#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* unaligned loads */

#define TOKS 8            /* token rows per pass over a weight row */
#define ROW_BLOCK 16      /* weight rows per work item */
#define CHUNK 64          /* tokens of one expert taken together: each weight row is read once per chunk */
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
 * (16 rows of 2 KB at Trinity-like sizes) stay in L1/L2 from one pass to the next. (Rows outside read the tokens
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

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* x: [T, H]; token_of: [A] token of each assignment, grouped by expert; offsets: [E + 1] start of each expert's
 * group in token_of; gate_up: [E, 2I, H] (gate rows, then up rows); down: [E, H, I]; weights: [T, k];
 * position: [T, k] index into the grouped assignments of token t's c-th choice; act: [A, I] and ys: [A, H]
 * scratch; out: [T, H]. */
void trinity_moe_experts_f32(const float *x, const int64_t *token_of, const int64_t *offsets, const float *gate_up,
                             const float *down, const float *weights, const int64_t *position, float *act, float *ys,
                             float *out, int T, int H, int I, int E, int k, int num_threads) {
    int blocks_i = (I + ROW_BLOCK - 1) / ROW_BLOCK, blocks_h = (H + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel num_threads(num_threads)
    {
        /* phase 1: gate/up and SwiGLU. Items interleaved (static, 1) so that busy and idle experts are shared. */
#pragma omp for schedule(static, 1)
        for (long item = 0; item < (long)E * blocks_i; item++) {
            int e = (int)(item / blocks_i), j0 = (int)(item % blocks_i) * ROW_BLOCK;
            int j1 = j0 + ROW_BLOCK < I ? j0 + ROW_BLOCK : I;
            int64_t a0 = offsets[e], n = offsets[e + 1] - a0;
            const float *gw = gate_up + (long)e * 2 * I * H;
            for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
                int m = n - c0 < CHUNK ? (int)(n - c0) : CHUNK;
                const float *xr[CHUNK];
                for (int i = 0; i < m; i++) xr[i] = x + token_of[a0 + c0 + i] * (long)H;
                float g[CHUNK * ROW_BLOCK], u[CHUNK * ROW_BLOCK];
                rows_times_tokens(gw, H, j0, j1, xr, m, H, g, ROW_BLOCK);
                rows_times_tokens(gw + (long)I * H, H, j0, j1, xr, m, H, u, ROW_BLOCK);
                for (int i = 0; i < m; i++)
                    for (int j = j0; j < j1; j++)
                        act[(a0 + c0 + i) * I + j] = silu(g[i * ROW_BLOCK + j - j0]) * u[i * ROW_BLOCK + j - j0];
            }
        }
        /* phase 2: down projection of each assignment's activation */
#pragma omp for schedule(static, 1)
        for (long item = 0; item < (long)E * blocks_h; item++) {
            int e = (int)(item / blocks_h), h0 = (int)(item % blocks_h) * ROW_BLOCK;
            int h1 = h0 + ROW_BLOCK < H ? h0 + ROW_BLOCK : H;
            int64_t a0 = offsets[e], n = offsets[e + 1] - a0;
            const float *dw = down + (long)e * H * I;
            for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
                int m = n - c0 < CHUNK ? (int)(n - c0) : CHUNK;
                const float *ar[CHUNK];
                for (int i = 0; i < m; i++) ar[i] = act + (a0 + c0 + i) * I;
                rows_times_tokens(dw, I, h0, h1, ar, m, I, ys + (a0 + c0) * H + h0, H);
            }
        }
        /* phase 3: weighted combine, each token's choices summed in order */
#pragma omp for schedule(static)
        for (long t = 0; t < T; t++) {
            float *o = out + t * H;
            for (int h = 0; h < H; h++) o[h] = 0.0f;
            for (int c = 0; c < k; c++) {
                float wt = weights[t * k + c];
                const float *y = ys + position[t * k + c] * H;
                for (int h = 0; h < H; h++) o[h] += wt * y[h];
            }
        }
    }
}
