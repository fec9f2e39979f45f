/* Projections with FP8 (e4m3fn) weights and block scales on the CPU: y = x @ (q * scale).T for a few rows of x
 * (decode), the routed experts of a MoE layer over such weights, and the dequantization of weight rows (for the
 * GEMM that takes longer inputs). Built and loaded by kernels/native.py; the references they must equal are in
 * kernels/fp8.py (`linear_fp8_reference`, `experts_fp8_reference`, `quant.fp8.dequantize`).
 *
 * Layout (quant/fp8.py): q [N, K] one byte per weight, scale [ceil(N / br), ceil(K / bc)] fp32 over blocks of
 * br rows x bc columns, the edge blocks partial. Any block shape: (128, 128), (1, K) (a scale per row), (N, K)
 * (one scale).
 *
 * Why: the reference dequantizes the whole weight on every call, reading one byte and writing four per weight; a
 * decode step should read each byte once. Here each weight row streams once against up to TOKS token rows held
 * in registers (as skinny_gemm.h does for fp32/bf16 weights), the codes widened to fp32 in registers, and the
 * products of one block's columns are summed in fp32 before that sum is multiplied by the block's scale.
 *
 * Tried and dropped: for bf16 activations, codes turned into bf16 by byte-table lookups (VBMI) and multiplied
 * with vdpbf16ps (AVX512-BF16, two products per lane): no faster on a Sapphire Rapids Xeon at 1-8 rows,
 * where vdpbf16ps issues at the rate of the two FMA ports it replaces.
 *
 * NaN codes (0x7f, 0xff) are undefined here (they read as +-480): quantized weights never hold NaN. */

/* Products accumulate with fused multiply-adds: -std=c11 turns contraction off for the whole build, and here it
 * halves the arithmetic per weight (the sums differ from mul-then-add ones by rounding only). */
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "skinny_gemm.h" /* v16, v16u, hsum, TOKS, PREFETCH_*, bf16 widening */

/* The kernels multiply in fp32 with the weights as e4m3 codes read as fp16 bit patterns: the code's fields moved
 * one bit up (the sign to bit 15, the exponent and mantissa under it) give the same value times 2^-8 (fp16's
 * exponent bias is 15, e4m3's 7; subnormals line up with subnormals), and the hardware widens fp16 exactly. The
 * 2^8 goes into each block's scale, exactly (a power of two): products and sums come out as with the true
 * values, so the dequantized weights equal the reference's bit for bit. */
#define FP8_UNIT 256.0f /* a code read as below is its value / FP8_UNIT */

/* AVX-512 (BW for the 16-bit shifts): fp16 -> fp32 in one instruction. Elsewhere (AVX2, NEON, or a build with
 * TRINITY_FP8_GENERIC, which the tests use to check this fallback) plain vector code the compiler lowers. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(TRINITY_FP8_GENERIC)
#include <immintrin.h>
/* 16 codes -> 16 fp32 values / FP8_UNIT: sign-extend to 16 bits, shift the fields into place (bit 15 becomes the
 * sign, the sign's copy in bit 14 is masked off), convert fp16 -> fp32. Four instructions for 16 weights. */
static inline v16 e4m3x16_to_f32(const uint8_t *p) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xbf80));
    return (v16)_mm512_cvtph_ps(h);
}

/* 32 codes: the widening, shift and mask once for both halves. */
static inline void e4m3x32_to_f32(const uint8_t *p, v16 *lo, v16 *hi) {
    __m512i h = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
    h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16((short)0xbf80));
    *lo = (v16)_mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *hi = (v16)_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
#else
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

/* The same value by integer arithmetic: a code s.eeee.mmm with e > 0 is
 * (1 + m/8) 2^(e-7), the fp32 with the exponent rebiased (by +120, less 8 for FP8_UNIT) and the fields shifted
 * into place; e = 0 is m 2^-9, an int->float conversion. Widening the byte as signed puts the sign in bit 31.
 * Subnormal codes become normal fp32 values: no denormal arithmetic. */
static inline v16 e4m3x16_to_f32(const uint8_t *p) {
    i8x16 b;
    memcpy(&b, p, sizeof b);
    i32x16 s = __builtin_convertvector(b, i32x16);
    i32x16 mag = s & 0x7f;
    i32x16 normal = (mag << 20) + (112 << 23);
    v16 sub = __builtin_convertvector(mag, v16) * (1.0f / (512 * FP8_UNIT));
    i32x16 sub_bits;
    memcpy(&sub_bits, &sub, sizeof sub_bits);
    i32x16 is_sub = mag < 8; /* all ones where subnormal (or zero) */
    i32x16 bits = (sub_bits & is_sub) | (normal & ~is_sub) | (s & (int32_t)0x80000000u);
    v16 f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void e4m3x32_to_f32(const uint8_t *p, v16 *lo, v16 *hi) {
    *lo = e4m3x16_to_f32(p);
    *hi = e4m3x16_to_f32(p + 16);
}
#endif

/* One code, as e4m3x16_to_f32 reads it (value / FP8_UNIT). */
static inline float e4m3_to_f32(uint8_t code) {
    int32_t mag = code & 0x7f;
    float f;
    if (mag < 8) {
        f = (float)mag * (1.0f / (512 * FP8_UNIT));
    } else {
        int32_t bits = (mag << 20) + (112 << 23);
        memcpy(&f, &bits, sizeof f);
    }
    return code & 0x80 ? -f : f;
}

typedef uint16_t u16x16_t __attribute__((vector_size(32)));
typedef uint32_t u32x16_t __attribute__((vector_size(64)));

/* 16 fp32 -> bf16, rounded to nearest even as torch's .to(bfloat16) (NaN is not kept: no NaN reaches here). */
static inline void store_bf16x16(uint16_t *p, v16 v) {
    u32x16_t u;
    memcpy(&u, &v, sizeof u);
    u16x16_t h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, u16x16_t);
    memcpy(p, &h, sizeof h);
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Independent sums per token in the main loop: few tokens give few accumulators, and a chain of dependent adds
 * would wait on the add latency (4 cycles) instead of the loads. */
#define FP8_ACC_SETS(N) ((N) <= 2 ? 4 : (N) <= 4 ? 2 : 1)

/* out[n] = sum over the row's column blocks b of scale[b] * (w[cols of b] . x[n][cols of b]), for n < N (a
 * constant at every call site: the loops unroll and the accumulators stay in registers). `scales` is the row's
 * row of the scale grid. Each block's sum is kept apart (acc) and added to the total times its scale, as a
 * vector: one multiply per block and token, not per weight. Columns of a block that do not fill a vector (a
 * block width not a multiple of 16, or the row's end) go through the scalar tail. */
static inline __attribute__((always_inline)) void fp8_dot_row(const uint8_t *w, const float *scales, int bc,
                                                             const float *const *x, int N, int K, float *out) {
    const int sets = FP8_ACC_SETS(N);
    v16 total[TOKS];
    float tail[TOKS];
    for (int n = 0; n < N; n++) total[n] = (v16){0}, tail[n] = 0;
    for (int c0 = 0, b = 0; c0 < K; c0 += bc, b++) {
        int c1 = K - c0 <= bc ? K : c0 + bc;
        v16 acc[4][TOKS];
        float part[TOKS];
        for (int a = 0; a < sets; a++)
            for (int n = 0; n < N; n++) acc[a][n] = (v16){0};
        for (int n = 0; n < N; n++) part[n] = 0;
        int k = c0;
        for (; k + 64 <= c1; k += 64) { /* a cache line of codes, one prefetch */
            __builtin_prefetch((const char *)(w + k) + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            for (int j = 0; j < 4; j += 2) {
                v16 wv[2];
                e4m3x32_to_f32(w + k + 16 * j, &wv[0], &wv[1]);
                for (int i = 0; i < 2; i++)
                    for (int n = 0; n < N; n++)
                        acc[(j + i) % sets][n] += wv[i] * *(const v16u *)(x[n] + k + 16 * (j + i));
            }
        }
        for (; k + 16 <= c1; k += 16) {
            v16 wv = e4m3x16_to_f32(w + k);
            for (int n = 0; n < N; n++) acc[0][n] += wv * *(const v16u *)(x[n] + k);
        }
        for (; k < c1; k++) {
            float wk = e4m3_to_f32(w[k]);
            for (int n = 0; n < N; n++) part[n] += wk * x[n][k];
        }
        float s = scales[b] * FP8_UNIT;
        for (int n = 0; n < N; n++) {
            v16 sum = acc[0][n];
            for (int a = 1; a < sets; a++) sum += acc[a][n];
            total[n] += sum * s, tail[n] += part[n] * s;
        }
    }
    for (int n = 0; n < N; n++) out[n] = hsum(total[n]) + tail[n];
}

/* Rows [row0, row1) of q against n token rows x[0..n): out[i * ldo + (r - row0)]. Passes of TOKS tokens outside,
 * rows inside, as rows_times_tokens in skinny_gemm_body.h (a work item's rows stay in L2 from one pass to the
 * next). */
static void fp8_rows_times_tokens(const uint8_t *q, const float *scale, int br, int bc, int row0, int row1,
                                  const float *const *x, int n, int K, float *out, long ldo) {
    int cols = (K + bc - 1) / bc;
    float buf[TOKS];
    for (int t0 = 0; t0 < n; t0 += TOKS) {
        int N = n - t0 < TOKS ? n - t0 : TOKS;
        const float *const *xt = x + t0;
        for (int r = row0; r < row1; r++) {
            const uint8_t *wr = q + (long)r * K;
            const float *sr = scale + (long)(r / br) * cols;
            switch (N) {
            case 8: fp8_dot_row(wr, sr, bc, xt, 8, K, buf); break;
            case 7: fp8_dot_row(wr, sr, bc, xt, 7, K, buf); break;
            case 6: fp8_dot_row(wr, sr, bc, xt, 6, K, buf); break;
            case 5: fp8_dot_row(wr, sr, bc, xt, 5, K, buf); break;
            case 4: fp8_dot_row(wr, sr, bc, xt, 4, K, buf); break;
            case 3: fp8_dot_row(wr, sr, bc, xt, 3, K, buf); break;
            case 2: fp8_dot_row(wr, sr, bc, xt, 2, K, buf); break;
            default: fp8_dot_row(wr, sr, bc, xt, 1, K, buf); break;
            }
            for (int i = 0; i < N; i++) out[(long)(t0 + i) * ldo + r - row0] = buf[i];
        }
    }
}

/* Scratch aligned to a cache line, as torch's tensors are: an unaligned 64-byte vector load spans two lines, and
 * the token rows are loaded once per 16 weights. */
static void *scratch(long bytes) {
    return aligned_alloc(64, bytes > 0 ? (bytes + 63) / 64 * 64 : 64);
}

/* Activations in and out: fp32 as they are, or (bf16) widened exactly on the way in and rounded once on the way
 * out, so that the caller needs no conversion ops around the call. */
static float *activations_in(const void *x, int bf16, long count) {
    if (!bf16) return (float *)x;
    float *f = scratch(count * sizeof *f);
    if (f)
        for (long i = 0; i < count; i++) f[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    return f;
}

static void activations_out(void *out, int bf16, const float *v, long count) {
    if (!bf16) return; /* written in place */
    uint16_t *h = out;
    long i = 0;
    for (; i + 16 <= count; i += 16) store_bf16x16(h + i, *(const v16u *)(v + i));
    for (; i < count; i++) h[i] = f32_to_bf16(v[i]);
}

#define FP8_ROW_BLOCK 64 /* weight rows per work item of the linear */
#define FP8_MAX_ROWS 64  /* token rows per parallel region (passes of TOKS inside) */
/* Less work than this many weight x token products runs on the calling thread alone: waking a second thread
 * costs microseconds (far more where another process holds the other core), the work itself less. */
#define FP8_PARALLEL_MIN (1L << 16)

/* x: [n, K] fp32 or (act_bf16) bf16; q: [N, K] e4m3fn codes; scale: [ceil(N / br), ceil(K / bc)] fp32; out:
 * [n, N] in x's dtype. Any n; meant for a few rows, where each weight row is read from memory once. Returns 0, or
 * -1 where scratch could not be allocated. */
int trinity_linear_fp8(const void *x, int act_bf16, const uint8_t *q, const float *scale, int br, int bc,
                       void *out, int n, int K, int N, int num_threads) {
    const float *xf = activations_in(x, act_bf16, (long)n * K);
    float *of = act_bf16 ? scratch((long)n * N * sizeof *of) : out;
    if (!xf || !of) {
        if (act_bf16) free((void *)xf), free(of);
        return -1;
    }
    long blocks = (N + FP8_ROW_BLOCK - 1) / FP8_ROW_BLOCK;
    for (int c0 = 0; c0 < n; c0 += FP8_MAX_ROWS) {
        int m = n - c0 < FP8_MAX_ROWS ? n - c0 : FP8_MAX_ROWS;
        const float *xr[FP8_MAX_ROWS];
        for (int i = 0; i < m; i++) xr[i] = xf + (long)(c0 + i) * K;
#pragma omp parallel for schedule(static) num_threads(num_threads) if ((long)m * N * K >= FP8_PARALLEL_MIN)
        for (long b = 0; b < blocks; b++) {
            int r0 = (int)(b * FP8_ROW_BLOCK), r1 = r0 + FP8_ROW_BLOCK < N ? r0 + FP8_ROW_BLOCK : N;
            fp8_rows_times_tokens(q, scale, br, bc, r0, r1, xr, m, K, of + (long)c0 * N + r0, N);
        }
    }
    if (act_bf16) {
        activations_out(out, 1, of, (long)n * N);
        free((void *)xf), free(of);
    }
    return 0;
}

/* Rows [row0, row1) of q dequantized: out[(r - row0) * K + k] = q[r, k] * scale of its block, computed in fp32 as
 * the reference (`quant.fp8.dequantize`) does, then stored as fp32 or (out_bf16) rounded once to bf16: the same
 * values, bit for bit. */
void trinity_fp8_dequantize(const uint8_t *q, const float *scale, int br, int bc, void *out, int out_bf16,
                            int row0, int row1, int K, int num_threads) {
    int cols = (K + bc - 1) / bc;
#pragma omp parallel for schedule(static) num_threads(num_threads) if ((long)(row1 - row0) * K >= FP8_PARALLEL_MIN)
    for (int r = row0; r < row1; r++) {
        const uint8_t *wr = q + (long)r * K;
        const float *sr = scale + (long)(r / br) * cols;
        float *of = (float *)out + (long)(r - row0) * K;
        uint16_t *oh = (uint16_t *)out + (long)(r - row0) * K;
        for (int c0 = 0, b = 0; c0 < K; c0 += bc, b++) {
            int c1 = K - c0 <= bc ? K : c0 + bc;
            float s = sr[b] * FP8_UNIT;
            int k = c0;
            for (; k + 16 <= c1; k += 16) {
                v16 v = e4m3x16_to_f32(wr + k) * s;
                if (out_bf16)
                    store_bf16x16(oh + k, v);
                else
                    memcpy(of + k, &v, sizeof v);
            }
            for (; k < c1; k++) {
                float v = e4m3_to_f32(wr[k]) * s;
                if (out_bf16)
                    oh[k] = f32_to_bf16(v);
                else
                    of[k] = v;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ MoE experts */

#define FP8_EXPERT_ROWS 16 /* weight rows per work item */
#define FP8_CHUNK 64       /* tokens of one expert taken together: each weight row is read once per chunk */

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* Routed experts in FP8, SwiGLU, and the weighted combine, in one call: what `quant.modules.Fp8Experts` computes
 * one expert at a time (`kernels.fp8.experts_fp8_reference`), here with fp32 inside and the output rounded once.
 *
 * x: [T, H] fp32 or (act_bf16) bf16; weights: [T, k] fp32; ids: [T, k] int64 (each < E); gate_up: [E, 2I, H]
 * codes, gate rows then up rows, with gate_up_scale [E, 2 * gr, gc] (gr x gc = the grid of [I, H] in blocks of
 * gb = (gbr, gbc): the gate half's block rows, then the up half's); down: [E, H, I] codes with down_scale
 * [E, dr, dc] in blocks of (dbr, dbc); out: [T, H] in x's dtype. Returns 0; -1 where scratch could not be
 * allocated, -2 where an id is outside [0, E) (nothing written either way).
 *
 * Tokens are grouped by expert with a counting sort (stable, in (token, choice) order); then, each phase split
 * across threads and ended by the barrier of `omp for`:
 *   1. act[a, j] = silu(x[t_a] . gate_e[j]) * (x[t_a] . up_e[j])   for every assignment a of expert e
 *   2. ys[a, h]  = act[a] . down_e[h]
 *   3. out[t]    = sum_c weight[t, c] * ys[position[t, c]]          (in choice order: deterministic) */
int trinity_moe_experts_fp8(const void *x, int act_bf16, const float *weights, const int64_t *ids,
                            const uint8_t *gate_up, const float *gate_up_scale, int gbr, int gbc,
                            const uint8_t *down, const float *down_scale, int dbr, int dbc, void *out, int T, int H,
                            int I, int E, int k, int num_threads) {
    long A = (long)T * k;
    for (long a = 0; a < A; a++)
        if (ids[a] < 0 || ids[a] >= E) return -2;
    int gr = (I + gbr - 1) / gbr, gc = (H + gbc - 1) / gbc, dr = (H + dbr - 1) / dbr, dc = (I + dbc - 1) / dbc;
    const float *xf = activations_in(x, act_bf16, (long)T * H);
    int64_t *offsets = malloc((E + 1) * sizeof *offsets), *token_of = malloc(A * sizeof *token_of);
    int64_t *position = malloc(A * sizeof *position), *fill = malloc((E + 1) * sizeof *fill);
    float *act = scratch(A * I * sizeof *act), *ys = scratch(A * H * sizeof *ys);
    float *of = act_bf16 ? scratch((long)T * H * sizeof *of) : out;
    int ok = xf && offsets && token_of && position && fill && act && ys && of;
    if (ok) {
        for (int e = 0; e <= E; e++) offsets[e] = 0;
        for (long a = 0; a < A; a++) offsets[ids[a] + 1]++;
        for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
        for (int e = 0; e < E; e++) fill[e] = offsets[e];
        for (long a = 0; a < A; a++) {
            int64_t at = fill[ids[a]]++;
            token_of[at] = a / k;
            position[a] = at;
        }
        int blocks_i = (I + FP8_EXPERT_ROWS - 1) / FP8_EXPERT_ROWS;
        int blocks_h = (H + FP8_EXPERT_ROWS - 1) / FP8_EXPERT_ROWS;
#pragma omp parallel num_threads(num_threads) if (A * 3 * I * H >= FP8_PARALLEL_MIN)
        {
            /* phase 1: gate/up and SwiGLU. Items interleaved (static, 1) so that busy and idle experts are shared;
             * an expert without tokens costs nothing (its weights are not read). */
#pragma omp for schedule(static, 1)
            for (long item = 0; item < (long)E * blocks_i; item++) {
                int e = (int)(item / blocks_i), j0 = (int)(item % blocks_i) * FP8_EXPERT_ROWS;
                int j1 = j0 + FP8_EXPERT_ROWS < I ? j0 + FP8_EXPERT_ROWS : I;
                int64_t a0 = offsets[e], n = offsets[e + 1] - a0;
                const uint8_t *gq = gate_up + (long)e * 2 * I * H, *uq = gq + (long)I * H;
                const float *gs = gate_up_scale + (long)e * 2 * gr * gc, *us = gs + (long)gr * gc;
                for (int64_t c0 = 0; c0 < n; c0 += FP8_CHUNK) {
                    int m = n - c0 < FP8_CHUNK ? (int)(n - c0) : FP8_CHUNK;
                    const float *xr[FP8_CHUNK];
                    for (int i = 0; i < m; i++) xr[i] = xf + token_of[a0 + c0 + i] * (long)H;
                    float g[FP8_CHUNK * FP8_EXPERT_ROWS], u[FP8_CHUNK * FP8_EXPERT_ROWS];
                    fp8_rows_times_tokens(gq, gs, gbr, gbc, j0, j1, xr, m, H, g, FP8_EXPERT_ROWS);
                    fp8_rows_times_tokens(uq, us, gbr, gbc, j0, j1, xr, m, H, u, FP8_EXPERT_ROWS);
                    for (int i = 0; i < m; i++)
                        for (int j = j0; j < j1; j++)
                            act[(a0 + c0 + i) * I + j] =
                                silu(g[i * FP8_EXPERT_ROWS + j - j0]) * u[i * FP8_EXPERT_ROWS + j - j0];
                }
            }
            /* phase 2: down projection of each assignment's activation */
#pragma omp for schedule(static, 1)
            for (long item = 0; item < (long)E * blocks_h; item++) {
                int e = (int)(item / blocks_h), h0 = (int)(item % blocks_h) * FP8_EXPERT_ROWS;
                int h1 = h0 + FP8_EXPERT_ROWS < H ? h0 + FP8_EXPERT_ROWS : H;
                int64_t a0 = offsets[e], n = offsets[e + 1] - a0;
                const uint8_t *dq = down + (long)e * H * I;
                const float *ds = down_scale + (long)e * dr * dc;
                for (int64_t c0 = 0; c0 < n; c0 += FP8_CHUNK) {
                    int m = n - c0 < FP8_CHUNK ? (int)(n - c0) : FP8_CHUNK;
                    const float *ar[FP8_CHUNK];
                    for (int i = 0; i < m; i++) ar[i] = act + (a0 + c0 + i) * I;
                    fp8_rows_times_tokens(dq, ds, dbr, dbc, h0, h1, ar, m, I, ys + (a0 + c0) * H + h0, H);
                }
            }
            /* phase 3: weighted combine, each token's choices summed in order */
#pragma omp for schedule(static)
            for (long t = 0; t < T; t++) {
                float *o = of + t * H;
                for (int h = 0; h < H; h++) o[h] = 0.0f;
                for (int c = 0; c < k; c++) {
                    float wt = weights[t * k + c];
                    const float *y = ys + position[t * k + c] * H;
                    for (int h = 0; h < H; h++) o[h] += wt * y[h];
                }
            }
        }
        activations_out(out, act_bf16, of, (long)T * H);
    }
    if (act_bf16) free((void *)xf), free(of);
    free(offsets), free(token_of), free(position), free(fill), free(act), free(ys);
    return ok ? 0 : -1;
}

/* In moe_cpu.c (the same library): the whole-layer kernels' routing. */
void trinity_moe_route(const float *x, const float *router_w, const float *bias, int top_k, int route_norm,
                       float route_scale, int shared, int64_t *ids, float *choice_w, int T, int H, int E_routed,
                       int num_threads);

/* A whole MoE layer with FP8 experts in one call, as `trinity_moe_layer` does for plain weights: the routing
 * (`trinity_moe_route`: router_w [E_routed, H] fp32, bias [E_routed]), then `trinity_moe_experts_fp8` over the
 * chosen experts and, with `shared`, the shared expert stacked as expert E_routed (gate_up / down hold
 * E_routed + 1 experts). counts (int64 [E_routed] or NULL) gains each routed expert's tokens. x and out in fp32
 * or (act_bf16) bf16; x is widened once for both the router and the experts. Returns as
 * trinity_moe_experts_fp8. Why: a decode step's routing in torch is ~15 small ops per layer and the shared
 * expert ~6 more, which cost more than the layer's arithmetic at small hidden sizes. */
int trinity_moe_layer_fp8(const void *x, int act_bf16, const float *router_w, const float *bias, int top_k,
                          int route_norm, float route_scale, int shared, int64_t *counts, const uint8_t *gate_up,
                          const float *gate_up_scale, int gbr, int gbc, const uint8_t *down, const float *down_scale,
                          int dbr, int dbc, void *out, int T, int H, int I, int E_routed, int num_threads) {
    int kk = top_k + (shared ? 1 : 0);
    long A = (long)T * kk;
    const float *xf = activations_in(x, act_bf16, (long)T * H);
    int64_t *ids = malloc((A > 0 ? A : 1) * sizeof *ids);
    float *choice_w = malloc((A > 0 ? A : 1) * sizeof *choice_w);
    float *of = act_bf16 ? scratch((long)T * H * sizeof *of) : out;
    int status = -1;
    if (xf && ids && choice_w && of) {
        trinity_moe_route(xf, router_w, bias, top_k, route_norm, route_scale, shared, ids, choice_w, T, H, E_routed,
                          num_threads);
        status = trinity_moe_experts_fp8(xf, 0, choice_w, ids, gate_up, gate_up_scale, gbr, gbc, down, down_scale,
                                         dbr, dbc, of, T, H, I, E_routed + (shared ? 1 : 0), kk, num_threads);
        if (status == 0) {
            if (counts)
                for (long a = 0; a < A; a++)
                    if (ids[a] < E_routed) counts[ids[a]]++;
            activations_out(out, act_bf16, of, (long)T * H);
        }
    }
    if (act_bf16) free((void *)xf), free(of);
    free(ids), free(choice_w);
    return status;
}
