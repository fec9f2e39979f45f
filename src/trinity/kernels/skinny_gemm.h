/* Skinny GEMM pieces shared by the native CPU kernels: a few fp32 token rows against a long stream of fp32 or bf16
 * weight rows, as in decode. Each weight row is read once per pass of up to TOKS tokens, the accumulators stay in
 * registers, and the weight stream is prefetched into L2 ahead of use. */
#ifndef TRINITY_SKINNY_GEMM_H
#define TRINITY_SKINNY_GEMM_H

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* unaligned loads */

#define TOKS 8            /* token rows per pass over a weight row */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192 /* how far ahead in the weight stream */
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 1 /* into L2: prefetching into L1 this far ahead measured no better than none */
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) { /* a tree, not a chain of 15 dependent adds */
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
           + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* bf16 is the top half of an fp32: widening is a shift, exact. With AVX-512 one zero-extending load (GCC's
 * generic lowering of the same vector code took five instructions). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16 bf16x16_to_f32(const uint16_t *p) {
    __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (v16)_mm512_castsi512_ps(u);
}
#else
static inline v16 bf16x16_to_f32(const uint16_t *p) {
    u16x16 h;
    __builtin_memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    v16 f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 weights: dot_row_f32, rows_times_tokens_f32 */
#define WEIGHT float
#define SKINNY(name) name##_f32
#define LOAD16(p) (*(const v16u *)(p))
#define TO_FLOAT(w) (w)
#include "skinny_gemm_body.h"
#undef WEIGHT
#undef SKINNY
#undef LOAD16
#undef TO_FLOAT

/* bf16 weights (activations stay fp32, products and sums in fp32): dot_row_bf16, rows_times_tokens_bf16 */
#define WEIGHT uint16_t
#define SKINNY(name) name##_bf16
#define LOAD16(p) bf16x16_to_f32(p)
#define TO_FLOAT(w) bf16_to_f32(w)
#include "skinny_gemm_body.h"
#undef WEIGHT
#undef SKINNY
#undef LOAD16
#undef TO_FLOAT

/* One fp32 dot product of length K (16 partial sums, a tree at the end). */
static inline float dot_row_single(const float *w, const float *x, int K) {
    v16 acc = {0};
    int k = 0;
    for (; k + 16 <= K; k += 16) acc += *(const v16u *)(w + k) * *(const v16u *)(x + k);
    float s = hsum(acc);
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

/* Either: w points at fp32 weights or (weight_bf16) bf16 ones; ldw counts elements. */
static inline void rows_times_tokens(const void *w, int weight_bf16, long ldw, int row0, int row1,
                                     const float *const *x, int n, int K, float *out, long ldo) {
    if (weight_bf16)
        rows_times_tokens_bf16((const uint16_t *)w, ldw, row0, row1, x, n, K, out, ldo);
    else
        rows_times_tokens_f32((const float *)w, ldw, row0, row1, x, n, K, out, ldo);
}

#endif
