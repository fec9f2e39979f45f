/* RMSNorm-family ops on the CPU, one pass per row, activations in fp32 or bf16 (weights fp32, math fp32): built
 * and loaded by kernels/native.py; the references they must equal are in kernels/norm.py.
 *
 * Why: each reference is 8-20 small torch ops (cast, square, mean, rsqrt, multiplies, the rotate-half concat),
 * each costing more dispatch than work on a decode batch; here a row is one pass.
 *
 * rms(x) = w * (x * (1 / sqrt(mean(x^2) + eps))), the reference's order of operations. bf16 results are rounded
 * (to nearest even) where the reference rounds: after each norm and after the residual add; RoPE is computed
 * from the rounded norm in fp32 and rounded once. Every op goes through the same `rms_row`, so the chained norms
 * equal the layer-by-layer ones bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MIN_PARALLEL_ELEMENTS (1 << 16) /* below this, one thread: a parallel region costs more than the work */
#define MAX_ROW 8192                    /* elements per row (the Python side checks) */

#include "skinny_gemm.h" /* v16, bf16_to_f32 */

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* A row of n activations into fp32 (bf16: widened exactly) and back (bf16: rounded). */
static inline void load_row(const void *base, int bf16, long offset, int n, float *out) {
    if (!bf16) {
        memcpy(out, (const float *)base + offset, n * sizeof(float));
        return;
    }
    const uint16_t *h = (const uint16_t *)base + offset;
    for (int i = 0; i < n; i++) out[i] = bf16_to_f32(h[i]);
}

static inline void store_row(void *base, int bf16, long offset, int n, float *v) {
    if (!bf16) {
        memcpy((float *)base + offset, v, n * sizeof(float));
        return;
    }
    uint16_t *h = (uint16_t *)base + offset;
    for (int i = 0; i < n; i++) {
        h[i] = f32_to_bf16(v[i]);
        v[i] = bf16_to_f32(h[i]); /* what was stored: later steps read the rounded value, as the reference does */
    }
}

static inline void rms_row(const float *x, const float *w, float eps, int n, float *out) {
    v16 acc = {0}; /* sixteen partial sums: a single running sum would be a chain of n dependent adds */
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        v16 v = *(const v16u *)(x + i);
        acc += v * v;
    }
    float ss = 0.0f;
    for (int j = 0; j < 16; j++) ss += acc[j];
    for (; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

void trinity_rms_norm(const void *x, int bf16, const float *w, void *out, int rows, int n, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)rows * n >= MIN_PARALLEL_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        float a[MAX_ROW], b[MAX_ROW];
        load_row(x, bf16, r * n, n, a);
        rms_row(a, w, eps, n, b);
        store_row(out, bf16, r * n, n, b);
    }
}

/* new_residual = residual + rms(x, post_w); normed = rms(new_residual, next_w) */
void trinity_norm_add_rms_norm(const void *x, const void *residual, int bf16, const float *post_w,
                               const float *next_w, void *normed, void *new_residual, int rows, int n, float eps,
                               int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)rows * n >= MIN_PARALLEL_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        float a[MAX_ROW], b[MAX_ROW];
        load_row(x, bf16, r * n, n, a);
        rms_row(a, post_w, eps, n, b);
        if (bf16) store_row(normed, bf16, r * n, n, b); /* rounds b in place (normed is scratch until below) */
        load_row(residual, bf16, r * n, n, a);
        for (int i = 0; i < n; i++) a[i] = a[i] + b[i];
        store_row(new_residual, bf16, r * n, n, a);
        rms_row(a, next_w, eps, n, b);
        store_row(normed, bf16, r * n, n, b);
    }
}

/* q: [T, Hq, D], k: [T, Hkv, D] -> q_out, k_out (same dtype); per-head rms with q_w / k_w, then, if cos is given,
 * neox RoPE: out = h * cos + rotate_half(h) * sin, rotate_half(h) = (-h[D/2:], h[:D/2]); cos/sin: [T, D] in the
 * activations' dtype. D even, <= MAX_ROW. */
void trinity_qk_norm_rope(const void *q, const void *k, int bf16, const float *q_w, const float *k_w,
                          const void *cos, const void *sin, void *q_out, void *k_out, int T, int Hq, int Hkv, int D,
                          float eps, int threads) {
    long heads = (long)Hq + Hkv;
#pragma omp parallel for schedule(static) num_threads(threads) if (T * heads * D >= MIN_PARALLEL_ELEMENTS)
    for (long item = 0; item < T * heads; item++) {
        long t = item / heads, h = item % heads;
        int is_q = h < Hq;
        const void *src = is_q ? q : k;
        void *dst = is_q ? q_out : k_out;
        long offset = (is_q ? t * Hq + h : t * Hkv + h - Hq) * D;
        float a[MAX_ROW], b[MAX_ROW];
        load_row(src, bf16, offset, D, a);
        rms_row(a, is_q ? q_w : k_w, eps, D, b);
        if (cos) {
            float c[MAX_ROW], s[MAX_ROW];
            if (bf16) store_row(dst, bf16, offset, D, b); /* the reference rounds the norm before RoPE */
            load_row(cos, bf16, t * D, D, c);
            load_row(sin, bf16, t * D, D, s);
            int half = D / 2;
            for (int i = 0; i < half; i++) {
                a[i] = b[i] * c[i] + (-b[i + half]) * s[i];
                a[i + half] = b[i + half] * c[i + half] + b[i] * s[i + half];
            }
            store_row(dst, bf16, offset, D, a);
        } else {
            store_row(dst, bf16, offset, D, b);
        }
    }
}
