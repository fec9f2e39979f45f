/* Routed experts of one MoE layer on the CPU, fp32 or bf16 weights: SwiGLU experts over tokens grouped by
 * expert, and the weighted combine. Built at first use by kernels/native.py (cc -O3 -march=native -fopenmp) and
 * called through ctypes; kernels/moe.py holds the pure-torch reference it must equal.
 *
 * Why: a decode batch gives each expert a handful of tokens, so every expert product is a skinny GEMM
 * ([2I, H] x [H, n] with n around 4), which the BLAS runs far below the memory bandwidth. Here each weight row is
 * read once and multiplied with up to eight token rows held in registers (skinny_gemm.h), so the work streams the
 * expert weights at close to the bandwidth.
 *
 * Phases, each split across threads, separated by the implicit barrier of `omp for`:
 *   1. act[a, j] = silu(x[t_a] . gate_e[j]) * (x[t_a] . up_e[j])   for every assignment a of expert e
 *   2. ys[a, h]  = act[a] . down_e[h]
 *   3. out[t]    = sum_c weight[t, c] * ys[position[t, c]]          (in choice order: deterministic)
 */
#include <math.h>
#include <stdint.h>

#include "skinny_gemm.h"

#define ROW_BLOCK 16      /* weight rows per work item */
#define CHUNK 64          /* tokens of one expert taken together: each weight row is read once per chunk */

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* x: [T, H]; token_of: [A] token of each assignment, grouped by expert; offsets: [E + 1] start of each expert's
 * group in token_of; gate_up: [E, 2I, H] (gate rows, then up rows); down: [E, H, I], both fp32 or, with
 * weight_bf16, bf16 (activations, products and sums stay fp32); weights: [T, k];
 * position: [T, k] index into the grouped assignments of token t's c-th choice; act: [A, I] and ys: [A, H]
 * scratch; out: [T, H]. */
void trinity_moe_experts(const float *x, const int64_t *token_of, const int64_t *offsets, const void *gate_up,
                         const void *down, int weight_bf16, const float *weights, const int64_t *position, float *act,
                         float *ys, float *out, int T, int H, int I, int E, int k, int num_threads) {
    long elem = weight_bf16 ? 2 : 4; /* bytes per weight */
    int blocks_i = (I + ROW_BLOCK - 1) / ROW_BLOCK, blocks_h = (H + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel num_threads(num_threads)
    {
        /* phase 1: gate/up and SwiGLU. Items interleaved (static, 1) so that busy and idle experts are shared. */
#pragma omp for schedule(static, 1)
        for (long item = 0; item < (long)E * blocks_i; item++) {
            int e = (int)(item / blocks_i), j0 = (int)(item % blocks_i) * ROW_BLOCK;
            int j1 = j0 + ROW_BLOCK < I ? j0 + ROW_BLOCK : I;
            int64_t a0 = offsets[e], n = offsets[e + 1] - a0;
            const char *gw = (const char *)gate_up + (long)e * 2 * I * H * elem;
            for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
                int m = n - c0 < CHUNK ? (int)(n - c0) : CHUNK;
                const float *xr[CHUNK];
                for (int i = 0; i < m; i++) xr[i] = x + token_of[a0 + c0 + i] * (long)H;
                float g[CHUNK * ROW_BLOCK], u[CHUNK * ROW_BLOCK];
                rows_times_tokens(gw, weight_bf16, H, j0, j1, xr, m, H, g, ROW_BLOCK);
                rows_times_tokens(gw + (long)I * H * elem, weight_bf16, H, j0, j1, xr, m, H, u, ROW_BLOCK);
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
            const char *dw = (const char *)down + (long)e * H * I * elem;
            for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
                int m = n - c0 < CHUNK ? (int)(n - c0) : CHUNK;
                const float *ar[CHUNK];
                for (int i = 0; i < m; i++) ar[i] = act + (a0 + c0 + i) * I;
                rows_times_tokens(dw, weight_bf16, I, h0, h1, ar, m, I, ys + (a0 + c0) * H + h0, H);
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

/* Routing for the whole-layer kernels (this file's and fp8_cpu.c's `trinity_moe_layer_fp8`), per token:
 * `kernels.moe.route_reference`: fp32 logits x . router_w[e], scores = sigmoid, the top_k experts by score + bias
 * (ties to the lower index; the reference's torch.topk order is unspecified there), their unbiased scores
 * normalised to sum 1 when route_norm (plus 1e-20), times route_scale. With `shared`, each token also goes to the
 * stacked shared expert (index E_routed) with weight 1, as its last choice. ids, choice_w: [T, top_k + shared]. */
void trinity_moe_route(const float *x, const float *router_w, const float *bias, int top_k, int route_norm,
                       float route_scale, int shared, int64_t *ids, float *choice_w, int T, int H, int E_routed,
                       int num_threads) {
    int kk = top_k + (shared ? 1 : 0);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T >= 64)
    for (long t = 0; t < T; t++) {
        float score[1024], biased[1024];
        unsigned char taken[1024];
        const float *xt = x + t * H;
        for (int e = 0; e < E_routed; e++) {
            float logit = dot_row_single(router_w + (long)e * H, xt, H);
            score[e] = 1.0f / (1.0f + expf(-logit));
            biased[e] = score[e] + bias[e];
            taken[e] = 0;
        }
        float sum = 0.0f;
        for (int c = 0; c < top_k; c++) { /* selection of the top_k, largest first */
            int best = -1;
            for (int e = 0; e < E_routed; e++) /* top_k <= E_routed (checked by the caller): one is left */
                if (!taken[e] && (best < 0 || biased[e] > biased[best])) best = e;
            taken[best] = 1;
            ids[t * kk + c] = best;
            choice_w[t * kk + c] = score[best];
            sum += score[best];
        }
        for (int c = 0; c < top_k; c++) {
            float w = choice_w[t * kk + c];
            if (route_norm) w = w / (sum + 1e-20f);
            choice_w[t * kk + c] = w * route_scale;
        }
        if (shared) {
            ids[t * kk + top_k] = E_routed;
            choice_w[t * kk + top_k] = 1.0f;
        }
    }
}

/* The whole MoE layer after its pre-norm in one call: routing (`trinity_moe_route`), grouping, experts, combine.
 * counts (int64 [E_routed] or NULL) gets each routed expert's token count added (the engine's expert-load
 * telemetry).
 *
 * Scratch from the caller: ids [T, kk] and choice_w [T, kk] with kk = top_k + shared; token_of [T * kk];
 * offsets [E_total + 1]; position [T * kk]; act [T * kk, I]; ys [T * kk, H]. */
void trinity_moe_layer(const float *x, const float *router_w, const float *bias, int top_k, int route_norm,
                       float route_scale, int shared, int64_t *counts, const void *gate_up, const void *down,
                       int weight_bf16, int64_t *ids, float *choice_w, int64_t *token_of, int64_t *offsets,
                       int64_t *position, float *act, float *ys, float *out, int T, int H, int I, int E_routed,
                       int num_threads) {
    int kk = top_k + (shared ? 1 : 0), E_total = E_routed + (shared ? 1 : 0);
    trinity_moe_route(x, router_w, bias, top_k, route_norm, route_scale, shared, ids, choice_w, T, H, E_routed,
                      num_threads);
    /* group by expert: a counting sort, stable in (token, choice) order like the reference's argsort */
    for (int e = 0; e <= E_total; e++) offsets[e] = 0;
    for (long a = 0; a < (long)T * kk; a++) offsets[ids[a] + 1]++;
    if (counts)
        for (int e = 0; e < E_routed; e++) counts[e] += offsets[e + 1];
    for (int e = 0; e < E_total; e++) offsets[e + 1] += offsets[e];
    {
        int64_t fill[E_total > 0 ? E_total : 1];
        for (int e = 0; e < E_total; e++) fill[e] = offsets[e];
        for (long a = 0; a < (long)T * kk; a++) {
            int64_t at = fill[ids[a]]++;
            token_of[at] = a / kk;
            position[a] = at;
        }
    }
    trinity_moe_experts(x, token_of, offsets, gate_up, down, weight_bf16, choice_w, position, act, ys, out, T, H, I,
                        E_total, kk, num_threads);
}
