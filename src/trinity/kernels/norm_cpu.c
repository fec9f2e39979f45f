/* RMSNorm-family ops on the CPU, fp32, one pass per row: built and loaded by kernels/native.py; the references
 * they must equal are in kernels/norm.py.
 *
 * Why: each reference is 8-20 small torch ops (cast, square, mean, rsqrt, multiplies, the rotate-half concat),
 * each a few microseconds of dispatch on a [32, 512] decode batch. The sandwich norms and q/k norms of the
 * benchmark model came to ~3.5 ms of a ~45 ms decode step; here a row is a few hundred nanoseconds.
 *
 * rms(x) = w * (x * (1 / sqrt(mean(x^2) + eps))), the reference's order of operations. Every op here goes through
 * the same `rms_row`, so the chained norms equal the layer-by-layer ones bit for bit.
 */
#include <math.h>
#include <stdint.h>

#define MIN_PARALLEL_ELEMENTS (1 << 16) /* below this, one thread: a parallel region costs more than the work */

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

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

void trinity_rms_norm_f32(const float *x, const float *w, float *out, int rows, int n, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)rows * n >= MIN_PARALLEL_ELEMENTS)
    for (long r = 0; r < rows; r++) rms_row(x + r * n, w, eps, n, out + r * n);
}

/* new_residual = residual + rms(x, post_w); normed = rms(new_residual, next_w) */
void trinity_norm_add_rms_norm_f32(const float *x, const float *residual, const float *post_w, const float *next_w,
                                   float *normed, float *new_residual, int rows, int n, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)rows * n >= MIN_PARALLEL_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        float *nr = new_residual + r * n;
        rms_row(x + r * n, post_w, eps, n, nr);
        const float *res = residual + r * n;
        for (int i = 0; i < n; i++) nr[i] = res[i] + nr[i];
        rms_row(nr, next_w, eps, n, normed + r * n);
    }
}

/* One head row: rms with w, then (if cos) neox RoPE: out = h * cos + rotate_half(h) * sin, rotate_half(h) =
 * (-h[D/2:], h[:D/2]). */
static inline void norm_rope_row(const float *x, const float *w, float eps, int D, const float *cos,
                                 const float *sin, float *out) {
    float h[1024];
    rms_row(x, w, eps, D, cos ? h : out);
    if (!cos) return;
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        out[i] = h[i] * cos[i] + (-h[i + half]) * sin[i];
        out[i + half] = h[i + half] * cos[i + half] + h[i] * sin[i + half];
    }
}

/* q: [T, Hq, D], k: [T, Hkv, D] -> q_out, k_out; cos/sin: [T, D] or NULL (no RoPE). D <= 1024, even. */
void trinity_qk_norm_rope_f32(const float *q, const float *k, const float *q_w, const float *k_w, const float *cos,
                              const float *sin, float *q_out, float *k_out, int T, int Hq, int Hkv, int D, float eps,
                              int threads) {
    long heads = (long)Hq + Hkv;
#pragma omp parallel for schedule(static) num_threads(threads) if (T * heads * D >= MIN_PARALLEL_ELEMENTS)
    for (long item = 0; item < T * heads; item++) {
        long t = item / heads, h = item % heads;
        const float *c = cos ? cos + t * D : 0, *s = sin ? sin + t * D : 0;
        if (h < Hq)
            norm_rope_row(q + (t * Hq + h) * D, q_w, eps, D, c, s, q_out + (t * Hq + h) * D);
        else
            norm_rope_row(k + (t * Hkv + h - Hq) * D, k_w, eps, D, c, s, k_out + (t * Hkv + h - Hq) * D);
    }
}
