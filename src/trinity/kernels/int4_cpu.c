/* Projections with 4-bit weights (W4A16, the canonical layout of quant/int4.py) on the CPU: y = x @ W.T for a few
 * rows of x (decode), the routed experts of a MoE layer (and the whole layer, routing included) over such weights,
 * and the dequantization of weight rows (for the GEMM that takes longer inputs). Built and loaded by
 * kernels/native.py; the references they must equal are in kernels/int4.py (`linear_int4_reference`,
 * `experts_int4_reference`) and quant/int4.py (`dequantize`).
 *
 * Layout: codes [N, ceil(K / 2)] uint8, two 4-bit codes per byte, the even column in the low nibble; scale
 * [N, G] fp32, G = ceil(K / group) (the last group may be partial); zero [N, G] uint8 or NULL (symmetric: 8);
 * gidx [P, K] int32 or NULL (activation order: column c of a row in row block r / gidx_rows is in group
 * gidx[r / gidx_rows][c], not c / group).
 *
 * Why: the reference dequantizes the whole weight on every call (half a byte read, 2-4 bytes written and read
 * again per weight); a decode step should read each code byte once. Each weight row streams once against up to
 * TOKS token rows held in registers (as fp8_cpu.c does), the codes widened in registers.
 *
 * How a code becomes a weight: per group, a 16-entry table lut[c] = (c - zero) * scale in fp32 (the reference's
 * dequantized value, exactly), and with AVX-512 one vpermps looks up 16 weights at once (its index is the low 4
 * bits of each lane, so the low nibbles need no mask). The weights then feed the FMAs directly: the scale is
 * applied once per weight, independent of the number of token rows, where summing each group apart and scaling
 * the sums costs one more multiply-add per group and token (more than the lookups at 8 token rows, group 32).
 *
 * The token rows are stored de-interleaved per 32 columns (`perm_col`: the 16 even columns, then the 16 odd), so
 * that the low nibbles of 16 code bytes line up with one vector of x and the high nibbles with the next: no
 * shuffle of codes or weights in the inner loop. x is copied into that order once per call (it is widened there
 * for bf16 anyway). */

/* Products accumulate with fused multiply-adds (-std=c11 turns contraction off for the whole build); the generic
 * build contracts the same expressions, so both builds give the same values. */
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

#define I4_SYMMETRIC_ZERO 8
#define I4_STEP 32 /* columns per vector step: 16 code bytes */

typedef int32_t i4_i32x16 __attribute__((vector_size(64)));
typedef uint8_t i4_u8x16 __attribute__((vector_size(16)));
typedef uint16_t i4_u16x16 __attribute__((vector_size(32)));
typedef uint32_t i4_u32x16 __attribute__((vector_size(64)));

/* Column c's place in a de-interleaved token row: within each 32 columns the even ones first, then the odd. */
static inline long perm_col(long c) { return (c & ~31L) | ((c & 1) << 4) | ((c & 31) >> 1); }

static inline long padded(long K) { return (K + I4_STEP - 1) / I4_STEP * I4_STEP; }

static inline int code_at(const uint8_t *row, long c) { return (row[c >> 1] >> ((c & 1) * 4)) & 15; }

/* AVX-512: the table lookup above. Elsewhere (AVX2, NEON, or a build with TRINITY_INT4_GENERIC, which the tests
 * use to check this fallback) the same values by arithmetic in plain vector code. */
#if defined(__AVX512F__) && !defined(TRINITY_INT4_GENERIC)
#include <immintrin.h>
typedef __m512 i4_lut;

static inline i4_lut make_lut(int zero, float s) {
    __m512i c = _mm512_sub_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                 _mm512_set1_epi32(zero));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(s));
}

/* 16 code bytes (32 columns) -> the even columns' weights and the odd columns' weights */
static inline void unpack32(const uint8_t *p, i4_lut lut, v16 *even, v16 *odd) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *even = (v16)_mm512_permutexvar_ps(v, lut); /* vpermps reads the index's low 4 bits: the low nibble */
    *odd = (v16)_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
}
#else
typedef struct {
    int zero;
    float s;
} i4_lut;

static inline i4_lut make_lut(int zero, float s) { return (i4_lut){zero, s}; }

static inline void unpack32(const uint8_t *p, i4_lut lut, v16 *even, v16 *odd) {
    i4_u8x16 b;
    memcpy(&b, p, sizeof b);
    i4_i32x16 v = __builtin_convertvector(b, i4_i32x16);
    *even = __builtin_convertvector((v & 15) - lut.zero, v16) * lut.s;
    *odd = __builtin_convertvector((v >> 4) - lut.zero, v16) * lut.s;
}
#endif

/* 16 fp32 -> bf16, rounded to nearest even as torch's .to(bfloat16) (no NaN reaches here). */
static inline void i4_store_bf16x16(uint16_t *p, v16 v) {
    i4_u32x16 u;
    memcpy(&u, &v, sizeof u);
    i4_u16x16 h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, i4_u16x16);
    memcpy(p, &h, sizeof h);
}

static inline uint16_t i4_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One matrix (or one expert's) in the layout above. */
typedef struct {
    const uint8_t *codes;
    const float *scale;
    const uint8_t *zero; /* NULL: symmetric */
    const int32_t *gidx; /* NULL: groups of `group` contiguous columns */
    int gidx_rows;       /* rows per g_idx block */
    int group, K, G;
    long Kb; /* code bytes per row */
} i4_mat;

static i4_mat make_mat(const uint8_t *codes, const float *scale, const uint8_t *zero, const int32_t *gidx,
                       int gidx_rows, int group, int K) {
    i4_mat m = {codes, scale, zero, gidx, gidx_rows, group, K, (K + group - 1) / group, (K + 1) / 2};
    return m;
}

/* Expert e of a stack of E matrices of `rows` rows each (g_idx: `blocks` rows of K per expert). */
static i4_mat expert_mat(const i4_mat *m, int e, int rows, int blocks) {
    i4_mat r = *m;
    r.codes += (long)e * rows * m->Kb;
    r.scale += (long)e * rows * m->G;
    if (r.zero) r.zero += (long)e * rows * m->G;
    if (r.gidx) r.gidx += (long)e * blocks * m->K;
    return r;
}

/* Independent sums per token in the main loop (a chain of dependent adds would wait on the add latency). */
#define I4_ACC_SETS(N) ((N) <= 2 ? 4 : (N) <= 4 ? 2 : 1)

/* out[n] = sum_c w[r, c] x[n][c] for n < N (a constant at every call site: the loops unroll, the accumulators
 * stay in registers), contiguous groups. x rows are de-interleaved (perm_col) and padded to 32 columns. Columns
 * of a group outside whole 32-column steps (a group not a multiple of 32, the row's end) go through the scalar
 * tail, with the same weight values. */
static inline __attribute__((always_inline)) void i4_dot_row(const uint8_t *w, const float *scale,
                                                            const uint8_t *zero, int group, const float *const *x,
                                                            int N, int K, float *out) {
    const int sets = I4_ACC_SETS(N);
    v16 acc[4][TOKS];
    float tail[TOKS];
    for (int a = 0; a < sets; a++)
        for (int n = 0; n < N; n++) acc[a][n] = (v16){0};
    for (int n = 0; n < N; n++) tail[n] = 0;
    for (int c0 = 0, b = 0; c0 < K; c0 += group, b++) {
        int c1 = K - c0 <= group ? K : c0 + group;
        int z = zero ? zero[b] : I4_SYMMETRIC_ZERO;
        float s = scale[b];
        int v0 = (c0 + I4_STEP - 1) / I4_STEP * I4_STEP, v1 = c1 / I4_STEP * I4_STEP;
        if (v1 < v0) v0 = v1 = c1; /* the group lies inside one step: all scalar */
        i4_lut lut = make_lut(z, s);
        int k = v0;
        for (; k + 2 * I4_STEP <= v1; k += 2 * I4_STEP) {
            if ((k & 127) == 0) /* a cache line of codes ahead */
                __builtin_prefetch((const char *)(w + k / 2) + PREFETCH_BYTES, 0, PREFETCH_LOCALITY);
            v16 we[2], wo[2];
            unpack32(w + k / 2, lut, &we[0], &wo[0]);
            unpack32(w + k / 2 + 16, lut, &we[1], &wo[1]);
            for (int n = 0; n < N; n++) {
                acc[0][n] += we[0] * *(const v16u *)(x[n] + k);
                acc[1 % sets][n] += wo[0] * *(const v16u *)(x[n] + k + 16);
                acc[2 % sets][n] += we[1] * *(const v16u *)(x[n] + k + 32);
                acc[3 % sets][n] += wo[1] * *(const v16u *)(x[n] + k + 48);
            }
        }
        for (; k < v1; k += I4_STEP) {
            v16 we, wo;
            unpack32(w + k / 2, lut, &we, &wo);
            for (int n = 0; n < N; n++) {
                acc[0][n] += we * *(const v16u *)(x[n] + k);
                acc[1 % sets][n] += wo * *(const v16u *)(x[n] + k + 16);
            }
        }
        for (int c = c0; c < c1; c++) {
            if (c == v0) c = v1; /* skip the vector steps */
            if (c >= c1) break;
            float wc = (float)(code_at(w, c) - z) * s;
            long pc = perm_col(c);
            for (int n = 0; n < N; n++) tail[n] += wc * x[n][pc];
        }
    }
    for (int n = 0; n < N; n++) {
        v16 sum = acc[0][n];
        for (int a = 1; a < sets; a++) sum += acc[a][n];
        out[n] = hsum(sum) + tail[n];
    }
}

/* Row r of m dequantized into buf in the de-interleaved order (pads zero): the act-order path, where each column
 * has its own group. */
static void i4_row_perm(const i4_mat *m, int r, float *buf) {
    const uint8_t *w = m->codes + (long)r * m->Kb;
    const float *s = m->scale + (long)r * m->G;
    const uint8_t *z = m->zero ? m->zero + (long)r * m->G : NULL;
    const int32_t *g = m->gidx + (long)(r / m->gidx_rows) * m->K;
    long Kp = padded(m->K);
    for (long c = m->K; c < Kp; c++) buf[perm_col(c)] = 0.0f;
    for (long c = 0; c < m->K; c++) {
        int gc = g[c];
        buf[perm_col(c)] = (float)(code_at(w, c) - (z ? z[gc] : I4_SYMMETRIC_ZERO)) * s[gc];
    }
}

static inline __attribute__((always_inline)) void i4_dot_dense(const float *buf, const float *const *x, int N,
                                                              long Kp, float *out) {
    v16 acc[TOKS];
    for (int n = 0; n < N; n++) acc[n] = (v16){0};
    for (long k = 0; k < Kp; k += 16) {
        v16 wv = *(const v16u *)(buf + k);
        for (int n = 0; n < N; n++) acc[n] += wv * *(const v16u *)(x[n] + k);
    }
    for (int n = 0; n < N; n++) out[n] = hsum(acc[n]);
}

#define I4_DISPATCH(CALL_N) \
    switch (N) {            \
    case 8: CALL_N(8); break; \
    case 7: CALL_N(7); break; \
    case 6: CALL_N(6); break; \
    case 5: CALL_N(5); break; \
    case 4: CALL_N(4); break; \
    case 3: CALL_N(3); break; \
    case 2: CALL_N(2); break; \
    default: CALL_N(1); break; \
    }

/* Rows [row0, row1) of m against n de-interleaved token rows x[0..n): out[i * ldo + (r - row0)]. Passes of TOKS
 * tokens outside, rows inside (a work item's rows stay in L2 from one pass to the next). Returns -1 where the
 * act-order scratch could not be allocated. */
static int i4_rows_times_tokens(const i4_mat *m, int row0, int row1, const float *const *x, int n, float *out,
                                long ldo) {
    float buf[TOKS];
    float *dense = NULL;
    long Kp = padded(m->K);
    if (m->gidx && !(dense = aligned_alloc(64, Kp * sizeof *dense))) return -1;
    for (int t0 = 0; t0 < n; t0 += TOKS) {
        int N = n - t0 < TOKS ? n - t0 : TOKS;
        const float *const *xt = x + t0;
        for (int r = row0; r < row1; r++) {
            if (dense) {
                i4_row_perm(m, r, dense);
#define I4_DENSE(NN) i4_dot_dense(dense, xt, NN, Kp, buf)
                I4_DISPATCH(I4_DENSE)
            } else {
                const uint8_t *wr = m->codes + (long)r * m->Kb;
                const float *sr = m->scale + (long)r * m->G;
                const uint8_t *zr = m->zero ? m->zero + (long)r * m->G : NULL;
#define I4_GROUPED(NN) i4_dot_row(wr, sr, zr, m->group, xt, NN, m->K, buf)
                I4_DISPATCH(I4_GROUPED)
            }
            for (int i = 0; i < N; i++) out[(long)(t0 + i) * ldo + r - row0] = buf[i];
        }
    }
    free(dense);
    return 0;
}

static void *i4_scratch(long bytes) { return aligned_alloc(64, bytes > 0 ? (bytes + 63) / 64 * 64 : 64); }

/* Token rows [n, K] (fp32, or bf16 widened exactly) -> [n, padded(K)] fp32, de-interleaved, pads zero. */
static float *i4_tokens_in(const void *x, int bf16, long n, long K) {
    long Kp = padded(K);
    float *f = i4_scratch(n * Kp * sizeof *f);
    if (!f) return NULL;
    for (long i = 0; i < n; i++) {
        float *o = f + i * Kp;
        for (long c = K; c < Kp; c++) o[perm_col(c)] = 0.0f;
        if (bf16) {
            const uint16_t *h = (const uint16_t *)x + i * K;
            for (long c = 0; c < K; c++) o[perm_col(c)] = bf16_to_f32(h[c]);
        } else {
            const float *v = (const float *)x + i * K;
            for (long c = 0; c < K; c++) o[perm_col(c)] = v[c];
        }
    }
    return f;
}

static void i4_out_bf16(uint16_t *h, const float *v, long count) {
    long i = 0;
    for (; i + 16 <= count; i += 16) i4_store_bf16x16(h + i, *(const v16u *)(v + i));
    for (; i < count; i++) h[i] = i4_f32_to_bf16(v[i]);
}

#define I4_ROW_BLOCK 64 /* weight rows per work item of the linear */
#define I4_MAX_ROWS 64  /* token rows per parallel region (passes of TOKS inside) */
/* Less work than this many weight x token products runs on the calling thread alone: waking a second thread
 * costs microseconds (far more where another process holds the other core), the work itself less. */
#define I4_PARALLEL_MIN (1L << 16)

/* x: [n, K] fp32 or (act_bf16) bf16; the weight as in the header comment; out: [n, N] in x's dtype. Any n; meant
 * for a few rows. Returns 0, or -1 where scratch could not be allocated. */
int trinity_linear_int4(const void *x, int act_bf16, const uint8_t *codes, const float *scale, const uint8_t *zero,
                        const int32_t *gidx, int gidx_rows, int group, void *out, int n, int K, int N,
                        int num_threads) {
    i4_mat m = make_mat(codes, scale, zero, gidx, gidx_rows, group, K);
    long Kp = padded(K);
    float *xp = i4_tokens_in(x, act_bf16, n, K);
    float *of = act_bf16 ? i4_scratch((long)n * N * sizeof *of) : out;
    int failed = !xp || !of;
    long blocks = (N + I4_ROW_BLOCK - 1) / I4_ROW_BLOCK;
    for (int c0 = 0; c0 < n && !failed; c0 += I4_MAX_ROWS) {
        int rows = n - c0 < I4_MAX_ROWS ? n - c0 : I4_MAX_ROWS;
        const float *xr[I4_MAX_ROWS];
        for (int i = 0; i < rows; i++) xr[i] = xp + (long)(c0 + i) * Kp;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(| : failed) \
    if ((long)rows * N * K >= I4_PARALLEL_MIN)
        for (long b = 0; b < blocks; b++) {
            int r0 = (int)(b * I4_ROW_BLOCK), r1 = r0 + I4_ROW_BLOCK < N ? r0 + I4_ROW_BLOCK : N;
            failed |= i4_rows_times_tokens(&m, r0, r1, xr, rows, of + (long)c0 * N + r0, N) != 0;
        }
    }
    if (act_bf16 && !failed) i4_out_bf16(out, of, (long)n * N);
    free(xp);
    if (act_bf16) free(of);
    return failed ? -1 : 0;
}

/* Rows [row0, row1) dequantized: out[(r - row0) * K + c] = (code - zero) * scale of the column's group, in fp32
 * as the reference (`quant.int4.dequantize`) computes it, stored as fp32 or (out_bf16) rounded once to bf16: the
 * same values, bit for bit. */
void trinity_int4_dequantize(const uint8_t *codes, const float *scale, const uint8_t *zero, const int32_t *gidx,
                             int gidx_rows, int group, void *out, int out_bf16, int row0, int row1, int K,
                             int num_threads) {
    i4_mat m = make_mat(codes, scale, zero, gidx, gidx_rows, group, K);
#pragma omp parallel for schedule(static) num_threads(num_threads) if ((long)(row1 - row0) * K >= I4_PARALLEL_MIN)
    for (int r = row0; r < row1; r++) {
        const uint8_t *w = m.codes + (long)r * m.Kb;
        const float *s = m.scale + (long)r * m.G;
        const uint8_t *z = m.zero ? m.zero + (long)r * m.G : NULL;
        float *of = (float *)out + (long)(r - row0) * K;
        uint16_t *oh = (uint16_t *)out + (long)(r - row0) * K;
        if (m.gidx) {
            const int32_t *g = m.gidx + (long)(r / m.gidx_rows) * K;
            for (long c = 0; c < K; c++) {
                float v = (float)(code_at(w, c) - (z ? z[g[c]] : I4_SYMMETRIC_ZERO)) * s[g[c]];
                if (out_bf16)
                    oh[c] = i4_f32_to_bf16(v);
                else
                    of[c] = v;
            }
            continue;
        }
        for (int c0 = 0, b = 0; c0 < K; c0 += group, b++) {
            int c1 = K - c0 <= group ? K : c0 + group;
            int zb = z ? z[b] : I4_SYMMETRIC_ZERO;
            int v0 = (c0 + I4_STEP - 1) / I4_STEP * I4_STEP, v1 = c1 / I4_STEP * I4_STEP;
            if (v1 < v0) v0 = v1 = c1;
            i4_lut lut = make_lut(zb, s[b]);
            for (int k = v0; k < v1; k += I4_STEP) {
                v16 we, wo;
                unpack32(w + k / 2, lut, &we, &wo);
                v16 lo = __builtin_shufflevector(we, wo, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                v16 hi = __builtin_shufflevector(we, wo, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15,
                                                 31);
                if (out_bf16) {
                    i4_store_bf16x16(oh + k, lo);
                    i4_store_bf16x16(oh + k + 16, hi);
                } else {
                    memcpy(of + k, &lo, sizeof lo);
                    memcpy(of + k + 16, &hi, sizeof hi);
                }
            }
            for (int c = c0; c < c1; c++) {
                if (c == v0) c = v1;
                if (c >= c1) break;
                float v = (float)(code_at(w, c) - zb) * s[b];
                if (out_bf16)
                    oh[c] = i4_f32_to_bf16(v);
                else
                    of[c] = v;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ MoE experts */

#define I4_EXPERT_ROWS 16 /* weight rows per work item */
#define I4_CHUNK 64       /* tokens of one expert taken together: each weight row is read once per chunk */

static inline float i4_silu(float g) { return g / (1.0f + expf(-g)); }

/* Routed experts in 4 bits, SwiGLU, and the weighted combine, in one call: what `experts_int4_reference`
 * computes one expert at a time, here with fp32 inside and the output rounded once.
 *
 * x: [T, H] fp32 or (act_bf16) bf16; weights: [T, k] fp32; ids: [T, k] int64 (each < E). gate_up: [E, 2I] rows of
 * H columns (gate rows, then up rows) with gu_scale / gu_zero [E, 2I, G(H)], gu_gidx [E, 2, H] or NULL (the gate's
 * column order, then the up's); down: [E, H] rows of I columns with d_scale / d_zero [E, H, G(I)], d_gidx
 * [E, 1, I] or NULL; out: [T, H] in x's dtype. Returns 0; -1 where scratch could not be allocated, -2 where an id
 * is outside [0, E) (nothing written either way).
 *
 * Tokens are grouped by expert with a counting sort (stable, in (token, choice) order); then, each phase split
 * across threads and ended by the barrier of `omp for`:
 *   1. act[a, j] = silu(x[t_a] . gate_e[j]) * (x[t_a] . up_e[j])   for every assignment a of expert e
 *      (written de-interleaved, as phase 2 reads its token rows)
 *   2. ys[a, h]  = act[a] . down_e[h]
 *   3. out[t]    = sum_c weight[t, c] * ys[position[t, c]]          (in choice order: deterministic) */
int trinity_moe_experts_int4(const void *x, int act_bf16, const float *weights, const int64_t *ids,
                             const uint8_t *gate_up, const float *gu_scale, const uint8_t *gu_zero,
                             const int32_t *gu_gidx, int gu_group, const uint8_t *down, const float *d_scale,
                             const uint8_t *d_zero, const int32_t *d_gidx, int d_group, void *out, int T, int H,
                             int I, int E, int k, int num_threads) {
    long A = (long)T * k;
    for (long a = 0; a < A; a++)
        if (ids[a] < 0 || ids[a] >= E) return -2;
    i4_mat gu = make_mat(gate_up, gu_scale, gu_zero, gu_gidx, I, gu_group, H);
    i4_mat dn = make_mat(down, d_scale, d_zero, d_gidx, H, d_group, I);
    long Hp = padded(H), Ip = padded(I);
    float *xp = i4_tokens_in(x, act_bf16, T, H);
    int64_t *offsets = malloc((E + 1) * sizeof *offsets), *token_of = malloc((A ? A : 1) * sizeof *token_of);
    int64_t *position = malloc((A ? A : 1) * sizeof *position), *fill = malloc((E + 1) * sizeof *fill);
    float *act = i4_scratch(A * Ip * sizeof *act), *ys = i4_scratch(A * H * sizeof *ys);
    float *of = act_bf16 ? i4_scratch((long)T * H * sizeof *of) : out;
    int failed = !(xp && offsets && token_of && position && fill && act && ys && of);
    if (!failed) {
        memset(act, 0, A * Ip * sizeof *act); /* the pads of the de-interleaved rows */
        for (int e = 0; e <= E; e++) offsets[e] = 0;
        for (long a = 0; a < A; a++) offsets[ids[a] + 1]++;
        for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
        for (int e = 0; e < E; e++) fill[e] = offsets[e];
        for (long a = 0; a < A; a++) {
            int64_t at = fill[ids[a]]++;
            token_of[at] = a / k;
            position[a] = at;
        }
        int blocks_i = (I + I4_EXPERT_ROWS - 1) / I4_EXPERT_ROWS;
        int blocks_h = (H + I4_EXPERT_ROWS - 1) / I4_EXPERT_ROWS;
#pragma omp parallel num_threads(num_threads) reduction(| : failed) if (A * 3 * I * H >= I4_PARALLEL_MIN)
        {
            /* phase 1: gate/up and SwiGLU. Items interleaved (static, 1) so that busy and idle experts are shared;
             * an expert without tokens costs nothing (its weights are not read). */
#pragma omp for schedule(static, 1)
            for (long item = 0; item < (long)E * blocks_i; item++) {
                int e = (int)(item / blocks_i), j0 = (int)(item % blocks_i) * I4_EXPERT_ROWS;
                int j1 = j0 + I4_EXPERT_ROWS < I ? j0 + I4_EXPERT_ROWS : I;
                int64_t a0 = offsets[e], n = offsets[e + 1] - a0;
                i4_mat me = expert_mat(&gu, e, 2 * I, 2);
                for (int64_t c0 = 0; c0 < n; c0 += I4_CHUNK) {
                    int m = n - c0 < I4_CHUNK ? (int)(n - c0) : I4_CHUNK;
                    const float *xr[I4_CHUNK];
                    for (int i = 0; i < m; i++) xr[i] = xp + token_of[a0 + c0 + i] * Hp;
                    float g[I4_CHUNK * I4_EXPERT_ROWS], u[I4_CHUNK * I4_EXPERT_ROWS];
                    failed |= i4_rows_times_tokens(&me, j0, j1, xr, m, g, I4_EXPERT_ROWS) != 0;
                    failed |= i4_rows_times_tokens(&me, I + j0, I + j1, xr, m, u, I4_EXPERT_ROWS) != 0;
                    for (int i = 0; i < m; i++)
                        for (int j = j0; j < j1; j++)
                            act[(a0 + c0 + i) * Ip + perm_col(j)] =
                                i4_silu(g[i * I4_EXPERT_ROWS + j - j0]) * u[i * I4_EXPERT_ROWS + j - j0];
                }
            }
            /* phase 2: down projection of each assignment's activation */
#pragma omp for schedule(static, 1)
            for (long item = 0; item < (long)E * blocks_h; item++) {
                int e = (int)(item / blocks_h), h0 = (int)(item % blocks_h) * I4_EXPERT_ROWS;
                int h1 = h0 + I4_EXPERT_ROWS < H ? h0 + I4_EXPERT_ROWS : H;
                int64_t a0 = offsets[e], n = offsets[e + 1] - a0;
                i4_mat me = expert_mat(&dn, e, H, 1);
                for (int64_t c0 = 0; c0 < n; c0 += I4_CHUNK) {
                    int m = n - c0 < I4_CHUNK ? (int)(n - c0) : I4_CHUNK;
                    const float *ar[I4_CHUNK];
                    for (int i = 0; i < m; i++) ar[i] = act + (a0 + c0 + i) * Ip;
                    failed |= i4_rows_times_tokens(&me, h0, h1, ar, m, ys + (a0 + c0) * H + h0, H) != 0;
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
        if (act_bf16 && !failed) i4_out_bf16(out, of, (long)T * H);
    }
    free(xp);
    if (act_bf16) free(of);
    free(offsets), free(token_of), free(position), free(fill), free(act), free(ys);
    return failed ? -1 : 0;
}

/* In moe_cpu.c (the same library): the whole-layer kernels' routing. */
void trinity_moe_route(const float *x, const float *router_w, const float *bias, int top_k, int route_norm,
                       float route_scale, int shared, int64_t *ids, float *choice_w, int T, int H, int E_routed,
                       int num_threads);

/* A whole MoE layer with 4-bit experts in one call, as `trinity_moe_layer_fp8` does for FP8: the routing
 * (`trinity_moe_route`: router_w [E_routed, H] fp32, bias [E_routed]), then `trinity_moe_experts_int4` over the
 * chosen experts and, with `shared`, the shared expert stacked as expert E_routed (the stacks hold E_routed + 1
 * experts). counts (int64 [E_routed] or NULL) gains each routed expert's tokens. x and out in fp32 or (act_bf16)
 * bf16. Returns as trinity_moe_experts_int4. Why: a decode step's routing in torch is ~15 small ops per layer and
 * the shared expert ~6 more, which cost more than the layer's arithmetic at small hidden sizes. */
int trinity_moe_layer_int4(const void *x, int act_bf16, const float *router_w, const float *bias, int top_k,
                           int route_norm, float route_scale, int shared, int64_t *counts, const uint8_t *gate_up,
                           const float *gu_scale, const uint8_t *gu_zero, const int32_t *gu_gidx, int gu_group,
                           const uint8_t *down, const float *d_scale, const uint8_t *d_zero, const int32_t *d_gidx,
                           int d_group, void *out, int T, int H, int I, int E_routed, int num_threads) {
    int kk = top_k + (shared ? 1 : 0);
    long A = (long)T * kk;
    float *xf = NULL;
    if (act_bf16 && (xf = i4_scratch((long)T * H * sizeof *xf)))
        for (long i = 0; i < (long)T * H; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    const float *xr = act_bf16 ? xf : x;
    int64_t *ids = malloc((A > 0 ? A : 1) * sizeof *ids);
    float *choice_w = malloc((A > 0 ? A : 1) * sizeof *choice_w);
    int status = -1;
    if (xr && ids && choice_w) {
        trinity_moe_route(xr, router_w, bias, top_k, route_norm, route_scale, shared, ids, choice_w, T, H, E_routed,
                          num_threads);
        /* x as given (the experts de-interleave it in their own copy) */
        status = trinity_moe_experts_int4(x, act_bf16, choice_w, ids, gate_up, gu_scale, gu_zero, gu_gidx, gu_group,
                                          down, d_scale, d_zero, d_gidx, d_group, out, T, H, I,
                                          E_routed + (shared ? 1 : 0), kk, num_threads);
        if (status == 0 && counts)
            for (long a = 0; a < A; a++)
                if (ids[a] < E_routed) counts[ids[a]]++;
    }
    free(xf), free(ids), free(choice_w);
    return status;
}
