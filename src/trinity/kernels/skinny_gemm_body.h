/* The skinny-GEMM routines for one weight type, included once per type by skinny_gemm.h with WEIGHT (the
 * element type), SKINNY(name) (the name with the type's suffix), LOAD16(p) (16 weights as floats) and
 * TO_FLOAT(w) defined. No include guard: that is the point. */

/* out[n] = w . x[n] for n < N: one weight row against up to TOKS token rows. N is a constant at every call site,
 * so the loops unroll and the accumulators stay in registers. One row at a time, not a tile of several: on the
 * project's EPYC a single row streams faster from memory than four read side by side. */
static inline __attribute__((always_inline)) void SKINNY(dot_row)(const WEIGHT *w, const float *const *x, int N,
                                                                  int K, float *out) {
    v16 acc[TOKS];
    for (int n = 0; n < N; n++) acc[n] = (v16){0};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __builtin_prefetch((const char *)(w + k) + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
        v16 wv = LOAD16(w + k);
        for (int n = 0; n < N; n++) acc[n] += wv * *(const v16u *)(x[n] + k);
    }
    for (int n = 0; n < N; n++) {
        float s = hsum(acc[n]);
        for (int kk = k; kk < K; kk++) s += TO_FLOAT(w[kk]) * x[n][kk];
        out[n] = s;
    }
}

/* Rows [row0, row1) of w (row stride ldw) against n token rows x[0..n): out[i * ldo + (r - row0)]. Passes of
 * TOKS tokens outside, rows inside: the pass's token rows stay in L1, and a work item's weight rows (16 rows of
 * 2 KB at Trinity-like sizes in the MoE kernel) stay in L1/L2 from one pass to the next. (Rows outside read the
 * tokens from L2 once per row instead: slower for a long prefill.) */
static void SKINNY(rows_times_tokens)(const WEIGHT *w, long ldw, int row0, int row1, const float *const *x, int n,
                                      int K, float *out, long ldo) {
    float buf[TOKS];
    for (int t0 = 0; t0 < n; t0 += TOKS) {
        int N = n - t0 < TOKS ? n - t0 : TOKS;
        const float *const *xt = x + t0;
        for (int r = row0; r < row1; r++) {
            const WEIGHT *wr = w + (long)r * ldw;
            switch (N) {
            case 8: SKINNY(dot_row)(wr, xt, 8, K, buf); break;
            case 7: SKINNY(dot_row)(wr, xt, 7, K, buf); break;
            case 6: SKINNY(dot_row)(wr, xt, 6, K, buf); break;
            case 5: SKINNY(dot_row)(wr, xt, 5, K, buf); break;
            case 4: SKINNY(dot_row)(wr, xt, 4, K, buf); break;
            case 3: SKINNY(dot_row)(wr, xt, 3, K, buf); break;
            case 2: SKINNY(dot_row)(wr, xt, 2, K, buf); break;
            default: SKINNY(dot_row)(wr, xt, 1, K, buf); break;
            }
            for (int i = 0; i < N; i++) out[(long)(t0 + i) * ldo + r - row0] = buf[i];
        }
    }
}
