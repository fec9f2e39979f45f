"""Fused routed-expert compute in Triton, built for decode (few tokens, top-8 of 128 experts).

Pipeline (same contract as `kernels.moe.experts_reference`):

1. alignment (no host sync, CUDA-graph friendly): the T*k token-slots (slot = t*k + j) are grouped by
   expert and each expert's run is padded to a multiple of BLOCK_M; every BLOCK_M-row block belongs to
   one expert (`block_expert`), or to none (== E) past the end. The buffers are sized by a bound that
   depends on T*k and E only, so the launch grids are static for a given batch size. Decode-sized
   batches (T*k <= 4096) use `_align_kernel` (one single-program launch: histogram, prefix sum, integer
   atomics for the slot positions); larger ones the torch `moe_align` (argsort, cumsum, searchsorted).
2. `_gate_up_swiglu_kernel`: grouped GEMM over those blocks. Each program reads its expert's gate and
   up weight tiles in place (`gate_up[e]`, no gather copy), accumulates both in fp32, and writes
   act = silu(gate) * up for its token-slots to an intermediate [T*k, I] in x's dtype.
3. `_down_kernel`: grouped GEMM act @ down[e]^T, multiplied by the slot's routing weight, written in
   fp32 to y [T*k, H] (one row per slot, each written exactly once: no atomics).
4. `_combine_kernel`: out[t] = sum_j y[t*k + j] in fp32, cast to x's dtype. No floating-point atomics
   anywhere: the sum order is fixed (j = 0..k-1) and each row of a GEMM tile is computed independently of
   its position in the tile, so results are run-to-run deterministic (the integer atomics of the align
   kernel only choose where inside an expert's run a slot lands).

`fused_route` is `kernels.moe.select_experts` (fp32 sigmoid scores, bias-selected top-k, normalise, scale) on
router logits (from one library GEMM), one launch per batch, up to 16 tokens per program. `fused_moe_layer` is the
layer as inference runs it: routing (with a stacked shared expert as every token's extra choice, and the
expert-load counts) and alignment in one single-program launch at decode sizes (for the smallest batches with the
router GEMM in the same launch, finished by its last program: `kernels.last_program`), then steps 2-3, and step 4,
or the per-choice outputs left for the next norm kernel to sum, or that norm step itself run by the down GEMM's
last program.

Block sizes come from a small table for the Nano (H 1024, I 256) and Mini (H 2048, I 1024) shapes with
E 128, k 8, keyed by T bucket (1, 8, 32, 64+); other shapes get untuned defaults. The table entries are
first guesses for an H100 and still need measuring on a GPU.

Interpreter notes: under TRITON_INTERPRET=1 a bf16 `tl.dot` returns garbage (numpy has no bf16), so bf16
operands are upcast to fp32 before the dot there (`UPCAST`), and fp32 -> bf16 casts truncate, so they are
rounded by hand there (`round_to`); on a GPU the dot runs in bf16 natively and casts round to nearest even.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

import torch.nn.functional as F

from . import interpreting
from .last_program import arrival_counters, arrive
from .linear_triton import gemm_split_tile, split_plan
from .norm_triton import fix_bf16, norm_row, round_to, sum_norm_add_rms_norm, sum_rows
from .pdl import launch_options, wait_then_release


# --------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class MoEConfig:
    block_m: int = 16
    up_n: int = 64       # gate_up kernel: tile over I (for each of gate and up)
    up_k: int = 64       # gate_up kernel: tile over H
    down_n: int = 64     # down kernel: tile over H
    down_k: int = 64     # down kernel: tile over I
    num_warps: int = 4
    num_stages: int = 3


# (hidden, moe_intermediate, num_experts, top_k) -> {T bucket: config}. First guesses for H100 (untuned).
_NANO = (1024, 256, 128, 8)
_MINI = (2048, 1024, 128, 8)
CONFIGS: dict[tuple[int, int, int, int], dict[int, MoEConfig]] = {
    _NANO: {
        # T=1: 8 blocks x 16 column tiles of I=256 -> 128 programs for gate_up, 8 x 16 for down
        1: MoEConfig(block_m=16, up_n=16, up_k=128, down_n=64, down_k=128, num_warps=4, num_stages=3),
        8: MoEConfig(block_m=16, up_n=32, up_k=128, down_n=64, down_k=128, num_warps=4, num_stages=3),
        32: MoEConfig(block_m=16, up_n=64, up_k=128, down_n=64, down_k=128, num_warps=4, num_stages=3),
        64: MoEConfig(block_m=16, up_n=64, up_k=64, down_n=128, down_k=64, num_warps=4, num_stages=3),
    },
    _MINI: {
        1: MoEConfig(block_m=16, up_n=64, up_k=128, down_n=64, down_k=128, num_warps=4, num_stages=4),
        8: MoEConfig(block_m=16, up_n=64, up_k=128, down_n=64, down_k=128, num_warps=4, num_stages=4),
        32: MoEConfig(block_m=16, up_n=64, up_k=128, down_n=128, down_k=64, num_warps=4, num_stages=3),
        64: MoEConfig(block_m=16, up_n=64, up_k=64, down_n=128, down_k=64, num_warps=4, num_stages=3),
    },
}
T_BUCKETS = (1, 8, 32, 64)


def _bucket(num_tokens: int) -> int:
    """The largest bucket <= T (T >= 1): 1, 8, 32 or 64 (64 stands for 64 and above)."""
    chosen = T_BUCKETS[0]
    for b in T_BUCKETS:
        if num_tokens >= b:
            chosen = b
    return chosen


def _block_m_for_load(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per block from the mean tokens per expert: 16 for decode, up to 64 for prefill-sized batches."""
    per_expert = num_tokens * top_k / max(num_experts, 1)
    if per_expert <= 16:
        return 16
    if per_expert <= 48:
        return 32
    return 64


def get_config(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int) -> MoEConfig:
    table = CONFIGS.get((hidden, inter, num_experts, top_k))
    if table is not None:
        cfg = table[_bucket(num_tokens)]
    else:
        cfg = MoEConfig()
    block_m = max(cfg.block_m, _block_m_for_load(num_tokens, top_k, num_experts))
    if block_m != cfg.block_m:  # a prefill-sized batch in the 64+ bucket: larger, compute-bound tiles
        cfg = MoEConfig(block_m=block_m, up_n=max(cfg.up_n, 64), up_k=64, down_n=max(cfg.down_n, 64), down_k=64,
                        num_warps=8 if block_m >= 64 else 4, num_stages=3)
    return cfg


def fit_shared_memory(cfg: MoEConfig, elem_bytes: int, limit: int) -> MoEConfig:
    """Fewer pipeline stages, then shorter K tiles, until both GEMMs' staged tiles fit in `limit` bytes of
    shared memory per block (fp32 inputs or a smaller GPU than the H100 the table was written for)."""
    def need(c: MoEConfig) -> int:
        up = (c.block_m * c.up_k + 2 * c.up_n * c.up_k) * elem_bytes
        down = (c.block_m * c.down_k + c.down_n * c.down_k) * elem_bytes
        return (c.num_stages - 1) * max(up, down) + 4096  # Triton buffers stages - 1 tiles (+ epilogue slack)
    while need(cfg) > limit:
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif max(cfg.up_k, cfg.down_k) > 16:
            cfg = replace(cfg, up_k=max(16, cfg.up_k // 2), down_k=max(16, cfg.down_k // 2))
        else:
            break
    return cfg


@functools.cache
def _shared_memory_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _fit(block: int, size: int) -> int:
    """Shrink a tile to the problem (power of two, >= 16 for tl.dot)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def _dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast operands to fp32 before tl.dot, dot input precision)."""
    upcast = interpreting() and dtype == torch.bfloat16
    return upcast, ("ieee" if dtype == torch.float32 else "tf32")


# --------------------------------------------------------------------------------------------- align
def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_slots [num_blocks * block_m] int32, block_expert [num_blocks] int32).

    sorted_slots lists the slots (t*k + j) grouped by expert, each expert's run padded with T*k (an
    invalid slot) to a multiple of block_m; block_expert[b] is the expert of block b, or num_experts for
    blocks past the last expert's run. num_blocks is an upper bound that depends only on T*k and E, and
    nothing here reads device values on the host (safe under CUDA graph capture).
    """
    n = ids.numel()
    device = ids.device
    flat = ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)          # slots sorted by expert
    expert_sorted = flat[order]
    rank = torch.arange(n, device=device) - cnt_start[expert_sorted]
    dest = pad_start[expert_sorted] + rank
    num_blocks = num_align_blocks(n, num_experts, block_m)
    sorted_slots = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True).to(torch.int32)
    return sorted_slots, block_expert


@triton.jit
def _align_kernel(
    ids_ptr, slots_ptr, block_expert_ptr, cursor_ptr, num_slots, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """`moe_align` in one program (decode-sized T*k <= BLOCK_S; BLOCK_E > num_experts). Launched on its own, and
    called by `_route_align_kernel` after routing.

    Within an expert's run the slots land in atomic order (not sorted); each slot still appears exactly
    once, and every output row is computed independently, so results do not depend on that order.
    """
    total = num_blocks * BLOCK_M
    for p0 in range(0, total, BLOCK_P):  # every entry starts as padding
        offs_p = p0 + tl.arange(0, BLOCK_P)
        tl.store(slots_ptr + offs_p, tl.full((BLOCK_P,), 0, tl.int32) + num_slots, mask=offs_p < total)
    offs_s = tl.arange(0, BLOCK_S)
    ok = offs_s < num_slots
    ids = tl.load(ids_ptr + offs_s, mask=ok, other=num_experts).to(tl.int32)  # masked lanes: bin E
    offs_e = tl.arange(0, BLOCK_E)
    real_e = offs_e < num_experts
    counts = tl.where(real_e, tl.histogram(ids, BLOCK_E), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + offs_e, pad_end - padded)
    for b0 in range(0, num_blocks, BLOCK_B):  # expert of a block: how many runs end at or before its start
        offs_b = b0 + tl.arange(0, BLOCK_B)
        before = (pad_end[None, :] <= (offs_b * BLOCK_M)[:, None]) & real_e[None, :]
        tl.store(block_expert_ptr + offs_b, tl.sum(before.to(tl.int32), axis=1), mask=offs_b < num_blocks)
    tl.debug_barrier()  # padding and cursors written before the scatter below
    dest = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
    tl.store(slots_ptr + dest, offs_s, mask=ok)


# T*k up to this many slots are aligned by `_align_kernel` (one launch); more go to the torch `moe_align`.
ALIGN_KERNEL_MAX_SLOTS = 4096


def num_align_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the row blocks: each used expert wastes at most block_m - 1 padding rows."""
    return triton.cdiv(num_slots + min(num_slots, num_experts) * (block_m - 1), block_m)


def _align_buffers(num_slots: int, num_experts: int, block_m: int, device: torch.device):
    """The align outputs, its cursor scratch, and its launch constants (`_align_kernel`'s constexprs)."""
    num_blocks = num_align_blocks(num_slots, num_experts, block_m)
    slots = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts + 1)
    cursor = torch.empty(block_e, dtype=torch.int32, device=device)
    constants = dict(BLOCK_M=block_m, BLOCK_S=max(16, triton.next_power_of_2(num_slots)), BLOCK_E=block_e,
                     BLOCK_B=max(1, min(64, 8192 // block_e)), BLOCK_P=1024)
    return slots, block_expert, cursor, num_blocks, constants


def moe_align_triton(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `moe_align` (except the order of slots inside an expert's run), in one launch."""
    n = ids.numel()
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    slots, block_expert, cursor, num_blocks, constants = _align_buffers(n, num_experts, block_m, ids.device)
    _align_kernel[(1,)](flat, slots, block_expert, cursor, n, num_experts, num_blocks, **constants, num_warps=4)
    return slots, block_expert


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, w_ptr, act_ptr, slots_ptr, block_expert_ptr,
    num_slots, top_k, N, K, num_experts,
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_as, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, FIX_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """act[slot, n] = silu(x[t] . gate_up[e, n]) * (x[t] . gate_up[e, N + n]) for the block's slots."""
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:  # past the last expert's run
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + offs_m)
    row_ok = slots < num_slots
    tokens = tl.where(row_ok, slots // top_k, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk          # [BM, BK]
    w_base = w_ptr + expert.to(tl.int64) * stride_we                                     # in place
    g_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk          # [BK, BN]
    u_ptrs = g_ptrs + N * stride_wn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        bg = tl.load(g_ptrs, mask=w_mask, other=0.0)
        bu = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk

    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = act_ptr + slots[:, None] * stride_as + offs_n[None, :] * stride_an
    tl.store(out_ptrs, round_to(act, act_ptr.dtype.element_ty, FIX_BF16), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w_ptr, rw_ptr, y_ptr, slots_ptr, block_expert_ptr,
    num_slots, N, K, num_experts,
    stride_as, stride_ak, stride_we, stride_wn, stride_wk, stride_ys, stride_yn,
    res_ptr, post_w_ptr, next_w_ptr, out_ptr, res_out_ptr, counter_ptr, num_tokens, eps,
    stride_r, stride_o, stride_ro,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    NORM: tl.constexpr, TOP_K: tl.constexpr, BLOCK_ROW: tl.constexpr, FIX_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """y[slot, n] = routing_weight[slot] * (act[slot] . down[e, n]), in fp32. With NORM, the program that
    finishes last (`last_program.arrive`) also runs the sandwich-norm step on each token's summed choices (as
    `norm_triton.sum_norm_add_rms_norm`), so the layer ends without another launch."""
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < num_experts:  # else past the last expert's run: nothing to compute (but still counted in)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(slots_ptr + offs_m)
        row_ok = slots < num_slots
        safe_slots = tl.where(row_ok, slots, 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = act_ptr + safe_slots[:, None] * stride_as + offs_k[None, :] * stride_ak    # [BM, BK]
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                  + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk)              # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

        rw = tl.load(rw_ptr + safe_slots, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
        y_ptrs = y_ptr + slots[:, None] * stride_ys + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])
    if NORM:
        if arrive(counter_ptr, tl.num_programs(0) * tl.num_programs(1)):
            dtype = out_ptr.dtype.element_ty
            for t in range(0, num_tokens):
                h = sum_rows(y_ptr + t * TOP_K * stride_ys, TOP_K, stride_ys, BLOCK_ROW, N)  # the choices in order
                h = round_to(h, dtype, FIX_BF16).to(tl.float32)
                norm_row(h, res_ptr + t * stride_r, post_w_ptr, next_w_ptr, out_ptr + t * stride_o,
                         res_out_ptr + t * stride_ro, out_ptr, N, eps, BLOCK_ROW, True, True, FIX_BF16, False)


@triton.jit
def _combine_kernel(y_ptr, out_ptr, N, top_k, stride_ys, stride_ot, BLOCK_N: tl.constexpr,
                    FIX_BF16: tl.constexpr):
    """out[t] = sum_j y[t*k + j] (fp32, fixed order), cast to out's dtype."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row = y_ptr + (t * top_k).to(tl.int64) * stride_ys
    for _ in range(0, top_k):
        acc += tl.load(row + offs, mask=ok, other=0.0)
        row += stride_ys
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs, round_to(acc, out_ptr.dtype.element_ty, FIX_BF16),
             mask=ok)


@triton.jit
def _gather_combine_kernel(ys_ptr, w_ptr, pos_ptr, out_ptr, N, top_k, stride_ys, stride_ot, BLOCK_N: tl.constexpr,
                           FIX_BF16: tl.constexpr):
    """out[t] = sum_j w[t*k + j] * ys[position[t*k + j]] (fp32, fixed order j = 0..k-1), cast to out's dtype."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, top_k):
        slot = t.to(tl.int64) * top_k + j
        row = tl.load(pos_ptr + slot).to(tl.int64)
        w = tl.load(w_ptr + slot).to(tl.float32)
        acc += tl.load(ys_ptr + row * stride_ys + offs, mask=ok, other=0.0).to(tl.float32) * w
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs, round_to(acc, out_ptr.dtype.element_ty, FIX_BF16),
             mask=ok)


def gather_combine(ys: torch.Tensor, weights: torch.Tensor, position: torch.Tensor, num_tokens: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """`kernels.moe._combine` in one launch: ys [T*k, H], each token's k expert outputs in grouped (by-expert)
    order; position [T*k]: where (token, choice) t*k + j went in ys; weights [T, k]. -> [T, H] in dtype. The
    torch version gathers a copy of ys, widens it, multiplies and sums (four passes over [T*k, H]); this reads ys
    once."""
    hidden = ys.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=dtype, device=ys.device)
    if num_tokens == 0:
        return out
    ys = ys if ys.stride(1) == 1 else ys.contiguous()
    w = weights.reshape(-1).to(torch.float32).contiguous()
    block_n = min(1024, triton.next_power_of_2(hidden))
    _gather_combine_kernel[(num_tokens, triton.cdiv(hidden, block_n))](
        ys, w, position.contiguous(), out, hidden, weights.shape[-1], ys.stride(0), out.stride(0), BLOCK_N=block_n,
        FIX_BF16=fix_bf16(dtype), num_warps=4)
    return out


# --------------------------------------------------------------------------------------------- entry
def _launch_config(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int, shared: int,
                   config: MoEConfig | None) -> MoEConfig:
    """Checks the shapes and dtypes; the table's configuration (keyed by the routed shape) fitted to them."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, hidden_w = gate_up.shape
    inter = two_inter // 2
    if shared not in (0, 1):
        raise ValueError(f"shared = {shared}: one shared expert at most")
    if hidden_w != hidden or down.shape != (num_experts, hidden, inter):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, "
                         f"down {tuple(down.shape)}")
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: x {x.dtype}, gate_up {gate_up.dtype}, down {down.dtype}")
    config = config or get_config(num_tokens, hidden, inter, num_experts - shared, top_k)
    cfg = replace(config, up_n=_fit(config.up_n, inter), up_k=_fit(config.up_k, hidden),
                  down_n=_fit(config.down_n, hidden), down_k=_fit(config.down_k, inter))
    if x.is_cuda:
        cfg = fit_shared_memory(cfg, x.element_size(), _shared_memory_limit(
            x.device.index if x.device.index is not None else torch.cuda.current_device()))
    return cfg


def fused_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, config: MoEConfig | None = None) -> torch.Tensor:
    """x [T, H]; weights/ids [T, k]; gate_up [E, 2I, H] (gate rows first); down [E, H, I] -> [T, H] in x's dtype.

    Expert weights are read in place; the combine over k is accumulated in fp32 without atomics. (A stacked shared
    expert goes through `fused_moe_layer`, which routes too.)
    """
    num_experts = gate_up.shape[0]
    cfg = _launch_config(x, gate_up, down, ids.shape[1], 0, config)
    if x.shape[0] == 0:
        return torch.empty_like(x)
    num_slots = ids.numel()
    if num_slots <= ALIGN_KERNEL_MAX_SLOTS:
        sorted_slots, block_expert = moe_align_triton(ids, num_experts, cfg.block_m)
    else:
        sorted_slots, block_expert = moe_align(ids, num_experts, cfg.block_m)
    rw = weights.reshape(-1).to(torch.float32).contiguous()
    return _grouped_experts(x, rw, sorted_slots, block_expert, ids.shape[1], gate_up, down, cfg)


# Up to this many tokens the down GEMM's last program runs the norm step after the layer (`_down_kernel` NORM): it
# reads every token's choices alone, which pays only for few tokens. A first guess, to be measured on a GPU.
DOWN_NORM_MAX_TOKENS = 4


def _grouped_experts(x: torch.Tensor, rw: torch.Tensor, sorted_slots: torch.Tensor, block_expert: torch.Tensor,
                     top_k: int, gate_up: torch.Tensor, down: torch.Tensor, cfg: MoEConfig,
                     combine: bool = True, norm: tuple | None = None):
    """The aligned slots through gate_up + SwiGLU, down x routing weight (rw: [T * top_k] fp32, by slot), and the
    combine: three launches. Without `combine`: the weighted per-choice outputs [T, top_k, H] in fp32, for a
    following kernel to sum (`norm_triton.sum_norm_add_rms_norm`). With `norm` = (residual, post_weight,
    next_weight, eps): that sum and norm step, -> (normed, new residual); in the down launch for up to
    DOWN_NORM_MAX_TOKENS tokens, else as the norm kernel after it."""
    num_tokens, hidden = x.shape
    num_experts, inter = gate_up.shape[0], down.shape[2]
    num_slots = num_tokens * top_k
    num_blocks = block_expert.numel()
    bm = cfg.block_m
    upcast, prec = _dot_options(x.dtype)

    act = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    up_n, up_k = cfg.up_n, cfg.up_k
    _gate_up_swiglu_kernel[(num_blocks, triton.cdiv(inter, up_n))](
        x, gate_up, act, sorted_slots, block_expert,
        num_slots, top_k, inter, hidden, num_experts,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        act.stride(0), act.stride(1),
        BLOCK_M=bm, BLOCK_N=up_n, BLOCK_K=up_k, UPCAST=upcast, DOT_PREC=prec, FIX_BF16=fix_bf16(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device),
    )

    y = torch.empty(num_slots, hidden, dtype=torch.float32, device=x.device)
    down_n, down_k = cfg.down_n, cfg.down_k
    grid = (num_blocks, triton.cdiv(hidden, down_n))
    counters = arrival_counters(x.device, 1) if norm is not None and num_tokens <= DOWN_NORM_MAX_TOKENS else None
    if counters is not None:
        residual, post_weight, next_weight, eps = norm
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                             f"{tuple(x.shape)} {x.dtype}")
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        normed, res_out = torch.empty_like(x), torch.empty_like(x)
        epilogue = (residual, post_weight.contiguous(), next_weight.contiguous(), normed, res_out, counters,
                    num_tokens, float(eps), residual.stride(0), normed.stride(0), res_out.stride(0))
    else:
        epilogue = (y, y, y, y, y, y, 0, 0.0, 0, 0, 0)  # unused
    _down_kernel[grid](
        act, down, rw, y, sorted_slots, block_expert,
        num_slots, hidden, inter, num_experts,
        act.stride(0), act.stride(1), down.stride(0), down.stride(1), down.stride(2),
        y.stride(0), y.stride(1), *epilogue,
        BLOCK_M=bm, BLOCK_N=down_n, BLOCK_K=down_k, UPCAST=upcast, DOT_PREC=prec,
        NORM=counters is not None, TOP_K=top_k, BLOCK_ROW=triton.next_power_of_2(hidden), FIX_BF16=fix_bf16(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device),
    )
    if counters is not None:
        return normed, res_out
    if norm is not None:
        residual, post_weight, next_weight, eps = norm
        return sum_norm_add_rms_norm(y.view(num_tokens, top_k, hidden), residual, post_weight, next_weight, eps)
    if not combine:
        return y.view(num_tokens, top_k, hidden)

    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    comb_n = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(num_tokens, triton.cdiv(hidden, comb_n))](
        y, out, hidden, top_k, y.stride(0), out.stride(0), BLOCK_N=comb_n, FIX_BF16=fix_bf16(x.dtype), num_warps=4,
    )
    return out


# --------------------------------------------------------------------------------------------- routing
@triton.jit
def _route_rows(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, counts_ptr, count_mask_ptr, t0, num_tokens, num_experts, top_k,
    route_scale, stride_lt, stride_le,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    SHARED: tl.constexpr, COUNT: tl.constexpr, MASKED: tl.constexpr,
):
    """Tokens t0 .. t0 + BLOCK_T - 1 at once: scores = sigmoid(fp32 logits), top-k of scores + bias (the bias
    only selects; ties go to the lower expert id), weights = the chosen unbiased scores (normalised when NORM)
    times route_scale. Written by slot (t * kk + j, kk = top_k + SHARED); with SHARED the last choice is the
    shared expert, stacked after the routed ones (id num_experts), weight 1. With COUNT, counts[e] gains each
    routed choice of e, weighted by count_mask[t] when MASKED (a CUDA-graph batch's padding rows weigh 0)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < num_experts
    logits = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_lt + offs_e[None, :] * stride_le,
                     mask=t_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    scores = tl.sigmoid(logits)
    bias = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    sel = tl.where(e_ok[None, :], scores + bias[None, :], float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    chosen_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    chosen_id = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(0, top_k):
        best = tl.max(sel, axis=1)
        idx = tl.min(tl.where(sel == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        hit = offs_e[None, :] == idx[:, None]
        chosen_w = tl.where(offs_k == j, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], chosen_w)
        chosen_id = tl.where(offs_k == j, idx[:, None], chosen_id)
        sel = tl.where(hit, float("-inf"), sel)
    if NORM:
        chosen_w = chosen_w / (tl.sum(chosen_w, axis=1)[:, None] + 1e-20)
    chosen_w = chosen_w * route_scale
    if SHARED:
        chosen_w = tl.where(offs_k == top_k, 1.0, chosen_w)
        chosen_id = tl.where(offs_k == top_k, num_experts, chosen_id)
    kk = top_k + SHARED
    slot = offs_t[:, None].to(tl.int64) * kk + offs_k
    keep = t_ok[:, None] & (offs_k < kk)
    tl.store(w_ptr + slot, chosen_w, mask=keep)
    tl.store(ids_ptr + slot, chosen_id.to(tl.int64), mask=keep)
    if COUNT:
        if MASKED:
            weight = tl.load(count_mask_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)
        else:
            weight = tl.full((BLOCK_T,), 1, tl.int64)
        # the weights as a full tile, not a broadcast view: Triton 3.6's interpreter (the device's) adds a
        # broadcast [1, K] operand from the wrong addresses
        tl.atomic_add(counts_ptr + chosen_id, weight[:, None] + tl.zeros((BLOCK_T, BLOCK_K), tl.int64),
                      mask=t_ok[:, None] & (offs_k < top_k))


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, counts_ptr, count_mask_ptr, num_tokens, num_experts, top_k,
    route_scale, stride_lt, stride_le,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    SHARED: tl.constexpr, COUNT: tl.constexpr, MASKED: tl.constexpr,
):
    _route_rows(logits_ptr, bias_ptr, w_ptr, ids_ptr, counts_ptr, count_mask_ptr, tl.program_id(0) * BLOCK_T,
                num_tokens, num_experts, top_k, route_scale, stride_lt, stride_le,
                BLOCK_T, BLOCK_E, BLOCK_K, NORM, SHARED, COUNT, MASKED)


@triton.jit
def _route_align_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, counts_ptr, count_mask_ptr, num_tokens, num_experts, top_k,
    route_scale, stride_lt, stride_le,
    slots_ptr, block_expert_ptr, cursor_ptr, num_slots, num_aligned_experts, num_blocks,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    SHARED: tl.constexpr, COUNT: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_AE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Routing and alignment by one program: each token tile is routed (`_route_rows`), then the choices just
    written are read back by `_align_kernel`. Launched on its own (one program, decode-sized batches, from router
    logits), and called by the last program of `_router_route_align_kernel`."""
    for t0 in range(0, num_tokens, BLOCK_T):
        _route_rows(logits_ptr, bias_ptr, w_ptr, ids_ptr, counts_ptr, count_mask_ptr, t0, num_tokens, num_experts,
                    top_k, route_scale, stride_lt, stride_le, BLOCK_T, BLOCK_E, BLOCK_K, NORM, SHARED, COUNT, MASKED)
    tl.debug_barrier()  # the choices are in memory before any thread reads them
    _align_kernel(ids_ptr, slots_ptr, block_expert_ptr, cursor_ptr, num_slots, num_aligned_experts, num_blocks,
                  BLOCK_M, BLOCK_S, BLOCK_AE, BLOCK_B, BLOCK_P)


@triton.jit
def _router_route_align_kernel(
    x_ptr, router_ptr, ws_ptr, counter_ptr, hidden, k_per_split, stride_xt, stride_rw, stride_ws, stride_wst,
    logits_ptr, bias_ptr, w_ptr, ids_ptr, counts_ptr, count_mask_ptr, num_tokens, num_experts, top_k,
    route_scale, stride_lt, stride_le,
    slots_ptr, block_expert_ptr, cursor_ptr, num_slots, num_aligned_experts, num_blocks,
    BLOCK_GT: tl.constexpr, BLOCK_GE: tl.constexpr, BLOCK_GK: tl.constexpr, SPLITS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    SHARED: tl.constexpr, COUNT: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_AE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr, PDL: tl.constexpr,
):
    """The router GEMM too: program (expert tile, key split) computes its fp32 share of the logits
    (`linear_triton.gemm_split_tile`); the last to finish (`last_program.arrive`) sums the splits in order into
    the logits, then routes and aligns (`_route_align_kernel`). One launch where there were two."""
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    gemm_split_tile(x_ptr, router_ptr, ws_ptr, num_tokens, num_experts, hidden, k_per_split, stride_xt, stride_rw,
                    stride_ws, stride_wst, tl.program_id(0), tl.program_id(1), 0, BLOCK_GT, BLOCK_GE, BLOCK_GK,
                    UPCAST, PRECISION)
    if arrive(counter_ptr, tl.num_programs(0) * tl.num_programs(1)):
        for t in range(0, num_tokens):
            row = sum_rows(ws_ptr + t * stride_wst, SPLITS, stride_ws, BLOCK_E, num_experts)
            offs_e = tl.arange(0, BLOCK_E)
            tl.store(logits_ptr + t * stride_lt + offs_e * stride_le, row, mask=offs_e < num_experts)
        tl.debug_barrier()  # the logits are in memory before any thread routes on them
        _route_align_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, counts_ptr, count_mask_ptr, num_tokens,
                            num_experts, top_k, route_scale, stride_lt, stride_le, slots_ptr, block_expert_ptr,
                            cursor_ptr, num_slots, num_aligned_experts, num_blocks, BLOCK_T, BLOCK_E, BLOCK_K, NORM,
                            SHARED, COUNT, MASKED, BLOCK_M, BLOCK_S, BLOCK_AE, BLOCK_B, BLOCK_P)


def _route_launch(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, route_norm: bool,
                  route_scale: float, shared: int, counts: torch.Tensor | None, count_mask: torch.Tensor | None):
    """The routing outputs (weights [T, kk] fp32, ids [T, kk] int64, kk = top_k + shared), and the arguments and
    constants both routing kernels take."""
    num_tokens, num_experts = logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k {top_k} out of range for {num_experts} experts")
    if counts is not None and (counts.dtype != torch.long or not counts.is_contiguous()):
        raise ValueError("expert counts must be a contiguous int64 tensor")
    kk = top_k + shared
    weights = torch.empty(num_tokens, kk, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, kk, dtype=torch.int64, device=logits.device)
    block_e = triton.next_power_of_2(num_experts)
    args = (logits, expert_bias.contiguous(), weights, ids,
            counts if counts is not None else ids, count_mask.contiguous() if count_mask is not None else ids,
            num_tokens, num_experts, top_k, float(route_scale), logits.stride(0), logits.stride(1))
    # tokens per tile: up to 16 (fewer for wide expert counts, and no more than the batch: a one-token decode
    # reduces over one row, not sixteen)
    block_t = max(1, min(16, 2048 // block_e, triton.next_power_of_2(max(num_tokens, 1))))
    constants = dict(BLOCK_T=block_t, BLOCK_E=block_e,
                     BLOCK_K=triton.next_power_of_2(kk), NORM=bool(route_norm), SHARED=int(shared),
                     COUNT=counts is not None, MASKED=count_mask is not None)
    return weights, ids, args, constants


def _route_warps(block_e: int) -> int:
    """Warps for the routing kernels: 8 past 128 experts, where 4 spill registers on sm_90 (ptxas)."""
    return 4 if block_e <= 128 else 8


def fused_route(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, route_norm: bool,
                route_scale: float, shared: int = 0, counts: torch.Tensor | None = None,
                count_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.moe.select_experts` in one launch: router logits [T, E] (fp32, from one library GEMM: see
    `kernels.moe.route`) -> (weights [T, k] fp32, ids [T, k] int64), ids in descending order of biased score.
    Ties in the biased score go to the lower expert id (torch.topk leaves tie order unspecified).
    `shared` = 1 appends each token's shared-expert choice (id E, weight 1); `counts` ([E] int64) gains every
    routed choice, weighted by `count_mask` [T] when given.
    """
    weights, ids, args, constants = _route_launch(logits, expert_bias, top_k, route_norm, route_scale, shared,
                                                  counts, count_mask)
    if logits.shape[0]:
        _route_kernel[(triton.cdiv(logits.shape[0], constants["BLOCK_T"]),)](
            *args, **constants, num_warps=_route_warps(constants["BLOCK_E"]))
    return weights, ids


# Up to this many tokens, routing and alignment run as one single-program launch (`_route_align_kernel`); its
# routing goes through the tokens BLOCK_T at a time, so larger batches route in parallel (`_route_kernel`) then
# align. A first guess, to be measured on a GPU.
ROUTE_ALIGN_MAX_TOKENS = 32
# Up to this many tokens the router GEMM joins that launch (`_router_route_align_kernel`): its last program sums
# splits x tokens rows of logits, so it pays only for few tokens. Also a first guess.
ROUTER_FUSED_MAX_TOKENS = 8


def _route_align_launch(x: torch.Tensor, logits: torch.Tensor | None, router: tuple[torch.Tensor, torch.Tensor] | None,
                        expert_bias: torch.Tensor, top_k: int, route_norm: bool, route_scale: float, shared: int,
                        counts: torch.Tensor | None, count_mask: torch.Tensor | None, num_experts: int, block_m: int):
    """Routing and alignment as one launch, from the logits, or from router = (x in fp32, the fp32 router weight)
    with the router GEMM in the same launch when the batch is small and arrival counters are to hand.
    -> (weights [T, kk], slots, block_expert)."""
    num_tokens = x.shape[0]
    counters = None
    if logits is None:
        x32, weight = router
        if num_tokens <= ROUTER_FUSED_MAX_TOKENS and weight.stride(-1) == 1 and x32.stride(-1) == 1:
            counters = arrival_counters(x.device, 1)
        if counters is None:
            logits = F.linear(x32, weight)
    fused_router = counters is not None
    if fused_router:  # filled by the last program
        logits = torch.empty(num_tokens, router[1].shape[0], dtype=torch.float32, device=x.device)
    weights, ids, args, constants = _route_launch(logits, expert_bias, top_k, route_norm, route_scale, shared,
                                                  counts, count_mask)
    num_slots = num_tokens * (top_k + shared)
    slots, block_expert, cursor, num_blocks, align = _align_buffers(num_slots, num_experts, block_m, x.device)
    tail = (slots, block_expert, cursor, num_slots, num_experts, num_blocks)
    align_constants = dict(BLOCK_M=align["BLOCK_M"], BLOCK_S=align["BLOCK_S"], BLOCK_AE=align["BLOCK_E"],
                           BLOCK_B=align["BLOCK_B"], BLOCK_P=align["BLOCK_P"])
    warps = _route_warps(constants["BLOCK_E"])
    if not fused_router:
        _route_align_kernel[(1,)](*args, *tail, **constants, **align_constants, num_warps=warps)
        return weights, slots, block_expert
    x32, weight = router
    routed, hidden = weight.shape
    block_ge, block_gk = 16, 64  # fp32 tiles (the router is fp32): 16 experts x 64 keys
    splits, per_split = split_plan(num_tokens, routed, hidden, x.device, block_ge, block_gk, max_split_rows=16)
    ws = torch.empty(splits, num_tokens, routed, dtype=torch.float32, device=x.device)
    _router_route_align_kernel[(triton.cdiv(routed, block_ge), splits)](
        x32, weight, ws, counters, hidden, per_split, x32.stride(0), weight.stride(0), ws.stride(0), ws.stride(1),
        *args, *tail, BLOCK_GT=16, BLOCK_GE=block_ge, BLOCK_GK=block_gk, SPLITS=splits, UPCAST=False,
        PRECISION="ieee", **constants, **align_constants, num_warps=warps, **launch_options(x.device))
    return weights, slots, block_expert


def fused_moe_layer(x: torch.Tensor, logits: torch.Tensor | None, expert_bias: torch.Tensor, top_k: int,
                    route_norm: bool, route_scale: float, gate_up: torch.Tensor, down: torch.Tensor, shared: int = 0,
                    counts: torch.Tensor | None = None, count_mask: torch.Tensor | None = None,
                    config: MoEConfig | None = None, combine: bool = True,
                    router: tuple[torch.Tensor, torch.Tensor] | None = None, norm: tuple | None = None):
    """A MoE layer from its router logits: `fused_route` (with the stacked shared expert as every token's last
    choice when `shared`, and the expert-load counts), the alignment, and the grouped expert GEMMs. At decode
    the routing, the shared expert's padding, the counting and the alignment are one launch. Given `router` = (x in
    fp32, the fp32 router weight)
    instead of logits, the router GEMM joins that launch for the smallest batches (`_route_align_launch`). With
    `norm` = (residual, post_weight, next_weight, eps), the layer's output goes through the decoder layer's
    sandwich-norm step -> (normed, new residual). Otherwise -> [T, H] in x's dtype; without `combine`, the weighted
    per-choice outputs [T, top_k + shared, H] in fp32 (see `_grouped_experts`)."""
    num_tokens = x.shape[0]
    num_experts = gate_up.shape[0]
    if logits is None:
        if router is None:
            raise ValueError("fused_moe_layer needs the router logits or router = (x in fp32, router weight)")
        x32, weight = router
        if x32.shape != x.shape or weight.shape != (num_experts - shared, x.shape[1]) \
                or x32.dtype != torch.float32 or weight.dtype != torch.float32:
            raise ValueError(f"router input {tuple(x32.shape)} {x32.dtype} and weight {tuple(weight.shape)} "
                             f"{weight.dtype}: need fp32 [{num_tokens}, {x.shape[1]}] and "
                             f"[{num_experts - shared}, {x.shape[1]}]")
    elif logits.shape != (num_tokens, num_experts - shared):
        raise ValueError(f"router logits {tuple(logits.shape)} for {num_tokens} tokens and "
                         f"{num_experts - shared} routed experts")
    cfg = _launch_config(x, gate_up, down, top_k, shared, config)
    kk = top_k + shared
    if num_tokens == 0:
        if norm is not None:
            return torch.empty_like(x), torch.empty_like(x)
        return torch.empty_like(x) if combine else x.new_empty(0, kk, x.shape[1], dtype=torch.float32)
    num_slots = num_tokens * kk
    if num_tokens <= ROUTE_ALIGN_MAX_TOKENS and num_slots <= ALIGN_KERNEL_MAX_SLOTS:
        weights, slots, block_expert = _route_align_launch(x, logits, router, expert_bias, top_k, route_norm,
                                                           route_scale, shared, counts, count_mask, num_experts,
                                                           cfg.block_m)
    else:
        if logits is None:
            logits = F.linear(*router)
        weights, ids = fused_route(logits, expert_bias, top_k, route_norm, route_scale, shared, counts, count_mask)
        if num_slots <= ALIGN_KERNEL_MAX_SLOTS:
            slots, block_expert = moe_align_triton(ids, num_experts, cfg.block_m)
        else:
            slots, block_expert = moe_align(ids, num_experts, cfg.block_m)
    return _grouped_experts(x, weights.view(-1), slots, block_expert, kk, gate_up, down, cfg, combine, norm)
