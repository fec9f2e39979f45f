/* Decode attention over a paged KV pool on the CPU, fp32, bf16 or fp8 K/V (queries and math in fp32): each sequence's
 * one new query token against its cached context, read in place by slot. Built and loaded by kernels/native.py;
 * the reference it must equal is `decode_attention_reference` in kernels/attention.py (gather + SDPA).
 *
 * Why: the reference gathers every decode's whole context into a padded copy, twice per layer (K and V), then
 * runs SDPA with a mask, a sizeable part of a CPU decode step. Here each (sequence, KV head) pair reads its keys
 * and values once, where they lie.
 *
 * Also writes the step's new K/V rows to their slots first (the reference does the same before reading).
 * One pass with a running max (online softmax): no score buffer, any context length.
 */
#include <math.h>
#include <stdint.h>

#include "skinny_gemm.h" /* dot_row_single, bf16_to_f32 */

#define MAX_GROUP 16  /* query heads per KV head */
#define MAX_DIM 512   /* head_dim */

enum { KV_FP32 = 0, KV_BF16 = 1, KV_FP8 = 2 }; /* the cache's format */

/* A cache row as fp32: the row itself (fp32 pool), or widened into buf: bf16 (exact), or fp8 bytes through the
 * format's 256-entry table of values times the layer's scale (as `dequantize_kv`: the product in fp32). */
static inline const float *cache_row(const void *cache, int format, const float *fp8_table, float fp8_scale,
                                     long offset, int D, float *buf) {
    if (format == KV_FP32) return (const float *)cache + offset;
    if (format == KV_BF16) {
        const uint16_t *h = (const uint16_t *)cache + offset;
        for (int d = 0; d < D; d++) buf[d] = bf16_to_f32(h[d]);
    } else {
        const uint8_t *c = (const uint8_t *)cache + offset;
        for (int d = 0; d < D; d++) buf[d] = fp8_table[c[d]] * fp8_scale;
    }
    return buf;
}

/* q: [B, Hq, D] fp32; k_cache, v_cache: [slots, Hkv, D] in kv_format (KV_FP32, KV_BF16, or KV_FP8: one byte a
 * value, fp8_table[256] its value, times *k_scale / *v_scale, each 1.0 when NULL); new_k, new_v: [B, Hkv, D] in
 * the cache's dtype (an fp8 cache's values already quantized by the caller), written to new_slots[B] first (skipped
 * when new_k is NULL); ctx_slots: [B, L] and ctx_valid: [B, L] (1 byte each) each decode's context, its new token
 * included; out: [B, Hq, D]. Returns 0, or -1 if the shapes exceed MAX_GROUP / MAX_DIM. */
int trinity_paged_decode_attention(const float *q, void *k_cache, void *v_cache, int kv_format,
                                   const float *fp8_table, const float *k_scale, const float *v_scale,
                                   const void *new_k, const void *new_v, const int64_t *new_slots,
                                   const int64_t *ctx_slots, const uint8_t *ctx_valid, float *out, int B, int Hq,
                                   int Hkv, int D, int L, float scale, int num_threads) {
    int group = Hq / Hkv;
    if (group > MAX_GROUP || D > MAX_DIM || group * Hkv != Hq) return -1;
    long row = (long)Hkv * D; /* elements per slot */
    long elem = kv_format == KV_FP32 ? 4 : kv_format == KV_BF16 ? 2 : 1; /* bytes per element */
    float ks = k_scale ? *k_scale : 1.0f, vs = v_scale ? *v_scale : 1.0f;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long item = 0; item < (long)B * Hkv; item++) {
        int b = (int)(item / Hkv), h = (int)(item % Hkv);
        if (new_k) {
            long dst = (new_slots[b] * row + (long)h * D) * elem, src = (((long)b * Hkv + h) * D) * elem;
            __builtin_memcpy((char *)k_cache + dst, (const char *)new_k + src, D * elem);
            __builtin_memcpy((char *)v_cache + dst, (const char *)new_v + src, D * elem);
        }
        const float *qh = q + ((long)b * Hq + (long)h * group) * D;
        float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][MAX_DIM], kbuf[MAX_DIM], vbuf[MAX_DIM];
        for (int g = 0; g < group; g++) {
            m[g] = -INFINITY;
            l[g] = 0.0f;
            for (int d = 0; d < D; d++) acc[g][d] = 0.0f;
        }
        for (int j = 0; j < L; j++) {
            if (!ctx_valid[(long)b * L + j]) continue;
            long slot = ctx_slots[(long)b * L + j];
            const float *kr = cache_row(k_cache, kv_format, fp8_table, ks, slot * row + (long)h * D, D, kbuf);
            const float *vr = cache_row(v_cache, kv_format, fp8_table, vs, slot * row + (long)h * D, D, vbuf);
            for (int g = 0; g < group; g++) {
                float s = dot_row_single(qh + (long)g * D, kr, D) * scale;
                float p;
                if (s > m[g]) { /* a new maximum: rescale what was summed so far */
                    float c = expf(m[g] - s);
                    l[g] *= c;
                    for (int d = 0; d < D; d++) acc[g][d] *= c;
                    m[g] = s;
                    p = 1.0f;
                } else {
                    p = expf(s - m[g]);
                }
                l[g] += p;
                for (int d = 0; d < D; d++) acc[g][d] += p * vr[d];
            }
        }
        for (int g = 0; g < group; g++) {
            float *o = out + ((long)b * Hq + (long)h * group + g) * D;
            float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f; /* no valid key (cannot happen: the new token is one) */
            for (int d = 0; d < D; d++) o[d] = acc[g][d] * inv;
        }
    }
    return 0;
}
