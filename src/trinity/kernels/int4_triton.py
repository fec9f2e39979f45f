"""W4A16 GEMM and the fused MoE over 4-bit experts in Triton, each beside its pure-torch reference.

Weights are `quant.int4.Int4Weight`s in the canonical layout: uint8 codes [N, ceil(K / 2)] (two 4-bit codes per
byte along K, the even column in the low nibble), fp32 scales [N, G] over groups of `group` columns (G = ceil(K /
group), the last group may be partial; per channel: one group of K), optional uint8 zero points [N, G] (absent:
symmetric, zero 8), optional g_idx [P, K] (activation order: column c's group is g_idx[c], P row blocks each with
their own column order). x [M, K] in bf16, fp16 or fp32; y in x's dtype. References: `kernels.int4`'s
`linear_int4_reference` and `experts_int4_reference`.

Dequantization is the reference's own arithmetic: (code - zero) * scale in fp32, rounded once to x's dtype, then
the tensor-core dot in x's dtype with fp32 accumulation; kernel and reference differ only in the order of their fp32
sums and in their one final rounding.

Nibbles: each K tile of BLOCK_K columns reads its BLOCK_K / 2 bytes per weight row as they lie (contiguous, so the
load vectorizes), and splits them into the even columns (low nibbles) and the odd ones (high nibbles): two
[BLOCK_N, BLOCK_K / 2] halves, each with its own dot. The activations' tile is loaded whole and split the same way
(`tl.split` of a [BLOCK_M, BLOCK_K / 2, 2] view): the shuffle lands on the x tile, which is the small one at decode,
and no interleaving of the weight tile is needed.

Group scales (`MODE`):
* 0: the K tile lies in one group (BLOCK_K divides the group, or one group spans K): one scale (and zero) per row
  per tile, loaded as a vector [BLOCK_N]. The usual case: group 32, 64, 128 and per channel.
* 1: any other group size: each element gathers its own scale, group = column // group (as fp8_triton's SCALE_2D).
* 2: act-order (g_idx): each column's group read from g_idx, then the same per-element gather. Supported, not
  just declined: the GEMM takes a tile's g_idx row from the tile's row block (BLOCK_N is shrunk to divide the rows
  per block; None where it cannot be). The columns are not re-sorted by group (as exllama does): a gather per
  element, slower than MODE 0; checkpoints with act-order are the minority.

Decode sizes (M <= 16) split K across programs when the output tiles alone would leave SMs idle, as fp8_triton:
fp32 partials summed by torch in a fixed order.

`fused_moe_int4` is `moe_triton.fused_moe` over `quant.int4_modules.Int4Experts`' weights: the same alignment and
combine (as `fp8_triton.fused_moe_fp8`), with gate_up + SwiGLU and down GEMMs that dequantize their 4-bit tiles as
the GEMM does. The up half's g_idx is row block 1 of gate_up's g_idx [E, 2, H].

Portability: integer shifts and masks, fp32 arithmetic and dots in x's dtype: nothing CUDA- or Hopper-specific
(AMD runs the same code). Interpreter: bf16 dots on fp32 copies and fp32 -> bf16 rounded by hand, as moe_triton.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..quant.int4 import Int4Weight
from . import interpreting
from .fp8_triton import _dot_wt, _k_tile, _splits
from .norm_triton import fix_bf16, round_to
from .pdl import launch_options, wait_then_release

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MIN_BLOCK_K = 32  # each half tile [.., BLOCK_K / 2] must be a tl.dot operand: 16 keys at least


# --------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _split_cols(a, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """a [BLOCK_M, BLOCK_K] -> (even columns, odd columns), each [BLOCK_M, BLOCK_K / 2]."""
    return tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))


@triton.jit
def _int4_halves(c_ptrs, s_rows, z_rows, gi_row, k0, offs_h, n_ok, K, group, stride_sk, dtype: tl.constexpr,
                 MODE: tl.constexpr, HAS_ZERO: tl.constexpr, FIX_BF16: tl.constexpr):
    """The weight tile's even and odd columns, [BLOCK_N, BLOCK_K / 2] each, dequantized into `dtype` as
    `quant.int4.dequantize` does ((code - zero) * scale in fp32, one rounding). c_ptrs: the tile's bytes
    [BLOCK_N, BLOCK_K / 2]; s_rows / z_rows [BLOCK_N]: each row's scale and zero-point rows (same strides);
    gi_row: the g_idx row of the tile's row block (MODE 2)."""
    ce = k0 + 2 * offs_h  # the even columns; the odd ones are ce + 1
    e_ok = ce < K
    o_ok = ce + 1 < K
    b = tl.load(c_ptrs, mask=n_ok[:, None] & e_ok[None, :], other=0)
    lo = (b & 0xF).to(tl.float32)
    hi = (b >> 4).to(tl.float32)
    if MODE == 0:  # the tile lies in one group: a scale (and zero) per row
        g = k0 // group
        s = tl.load(s_rows + g * stride_sk, mask=n_ok, other=0.0)[:, None]
        if HAS_ZERO:
            z = tl.load(z_rows + g * stride_sk, mask=n_ok, other=0).to(tl.float32)[:, None]
            we = (lo - z) * s
            wo = (hi - z) * s
        else:
            we = (lo - 8.0) * s
            wo = (hi - 8.0) * s
    else:
        if MODE == 2:
            ge = tl.load(gi_row + ce, mask=e_ok, other=0)
            go = tl.load(gi_row + ce + 1, mask=o_ok, other=0)
        else:
            ge = ce // group
            go = (ce + 1) // group
        me = n_ok[:, None] & e_ok[None, :]
        mo = n_ok[:, None] & o_ok[None, :]
        se = tl.load(s_rows[:, None] + ge[None, :] * stride_sk, mask=me, other=0.0)
        so = tl.load(s_rows[:, None] + go[None, :] * stride_sk, mask=mo, other=0.0)
        if HAS_ZERO:
            ze = tl.load(z_rows[:, None] + ge[None, :] * stride_sk, mask=me, other=0).to(tl.float32)
            zo = tl.load(z_rows[:, None] + go[None, :] * stride_sk, mask=mo, other=0).to(tl.float32)
            we = (lo - ze) * se
            wo = (hi - zo) * so
        else:
            we = (lo - 8.0) * se
            wo = (hi - 8.0) * so
    return round_to(we, dtype, FIX_BF16), round_to(wo, dtype, FIX_BF16)


@triton.jit
def _dot_int4(a, c_ptrs, s_rows, z_rows, gi_row, k0, offs_h, n_ok, K, group, stride_sk, acc,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr, HAS_ZERO: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr):
    """acc + a [BLOCK_M, BLOCK_K] @ dequant(tile [BLOCK_N, BLOCK_K])^T, as two half-K dots."""
    xe, xo = _split_cols(a, BLOCK_M, BLOCK_K)
    we, wo = _int4_halves(c_ptrs, s_rows, z_rows, gi_row, k0, offs_h, n_ok, K, group, stride_sk,
                          a.dtype, MODE, HAS_ZERO, FIX_BF16)
    acc = _dot_wt(xe, we, acc, UPCAST, PRECISION)
    return _dot_wt(xo, wo, acc, UPCAST, PRECISION)


# --------------------------------------------------------------------------------------------- GEMM
@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, c_ptr, s_ptr, z_ptr, gi_ptr, out_ptr, M, N, K, k_per_split, group, rows_per_block,
    stride_xm, stride_cn, stride_sn, stride_sk, stride_gp, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
    SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """Program (m tile, n tile, k split): out[split, m, n] = x[m, keys of the split] . dequant(W)[n, same keys]; out
    in x's dtype when there is one split, else the split's fp32 partial. Splits start on multiples of BLOCK_K (even:
    a tile starts on a byte)."""
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    c_rows = c_ptr + offs_n[:, None].to(tl.int64) * stride_cn
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    z_rows = z_ptr + offs_n.to(tl.int64) * stride_sn
    gi_row = gi_ptr + ((pid_n * BLOCK_N) // rows_per_block) * stride_gp  # BLOCK_N divides rows_per_block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & (offs_k < k_hi - k0)[None, :], other=0.0)
        acc = _dot_int4(a, c_rows + (k0 // 2 + offs_h)[None, :], s_rows, z_rows, gi_row, k0, offs_h, n_ok, K, group,
                        stride_sk, acc, BLOCK_M, BLOCK_K, MODE, HAS_ZERO, UPCAST, PRECISION, FIX_BF16)
    out = out_ptr + split * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT:  # an fp32 partial
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(out, round_to(acc, out_ptr.dtype.element_ty, FIX_BF16), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def gemm_config(m: int, dtype: torch.dtype) -> GemmConfig:
    """Tiles by rows: decode (M <= 16) streams the codes with narrow tiles (and K splits), prefill takes 64 x 128
    output tiles, 8 warps; fp32 dots (IEEE, on the FMA units) smaller ones. fp8_triton's w8a16 choices (the
    dequantized tile is the same size), checked against the sm_90 compile for spills; timings still to come
    (benchmarks/w4a16_gpu.py)."""
    if dtype == torch.float32:
        return GemmConfig(16, 32, 64, 4, 4) if m <= 16 else GemmConfig(64, 64, 32, 8, 3)
    return GemmConfig(16, 32, 128, 4, 4) if m <= 16 else GemmConfig(64, 128, 128, 8, 3)


def _fit(block: int, size: int, minimum: int = 16) -> int:
    """A tile shrunk to the problem (power of two, >= minimum)."""
    return max(minimum, min(block, triton.next_power_of_2(max(size, 1))))


def _gathered_k(target: int, k: int) -> int:
    """The K tile where scales are gathered per element (MODE 1 and 2): at most 64, the gathered [BLOCK_N, BLOCK_K]
    scale (and zero) tiles staying in registers next to the weight's."""
    return _fit(min(target, 64), k, MIN_BLOCK_K)


def _k_tile_mode(target: int, k: int, group: int, has_g_idx: bool) -> tuple[int, int]:
    """(BLOCK_K, MODE) for a GEMM over K columns in groups of `group`."""
    if has_g_idx:
        return _gathered_k(target, k), 2
    tile = _k_tile(target, k, (group,), MIN_BLOCK_K)
    return (tile, 0) if tile else (_gathered_k(target, k), 1)


def _weight_ok(w: Int4Weight, device: torch.device) -> bool:
    """The canonical layout of one matrix or a stack of them, on `device`, in the shapes the kernels read."""
    codes, scale, zero, g_idx = w.codes, w.scale, w.zero_point, w.g_idx
    n, k = codes.shape[-2], w.in_features
    lead = codes.shape[:-2]
    groups = triton.cdiv(k, w.group) if w.group > 0 else -1
    if codes.dtype != torch.uint8 or codes.device != device or k <= 0 or n <= 0 or groups <= 0:
        return False
    if codes.shape[-1] != (k + 1) // 2 or codes.stride(-1) != 1:
        return False
    if scale.device != device or tuple(scale.shape) != (*lead, n, groups) or not scale.dtype.is_floating_point:
        return False
    if zero is not None and (zero.dtype != torch.uint8 or zero.device != device or zero.shape != scale.shape):
        return False
    if g_idx is not None:
        if g_idx.device != device or g_idx.dim() != codes.dim() or tuple(g_idx.shape[:-2]) != tuple(lead):
            return False
        if g_idx.shape[-1] != k or g_idx.shape[-2] < 1 or n % g_idx.shape[-2]:
            return False
    return True


def usable(x: torch.Tensor, w: Int4Weight) -> bool:
    """What the GEMM takes: x [..., K] in bf16/fp16/fp32 on a device Triton runs on; one matrix [N, K] in the
    canonical layout with unit stride along K's bytes."""
    if x.dtype not in DTYPES or w.codes.dim() != 2 or x.shape[-1] != w.in_features:
        return False
    if x.device.type != "cuda" and not interpreting():
        return False
    return _weight_ok(w, x.device)


def linear_int4_gpu(x: torch.Tensor, w: Int4Weight, config: GemmConfig | None = None) -> torch.Tensor | None:
    """y = x @ dequant(w)^T in x's dtype, or None where the kernel does not take these tensors (`usable`; or g_idx
    with row blocks no 16-row tile fits in). `kernels.int4.linear_int4`'s contract."""
    if not usable(x, w):
        return None
    k, n = w.in_features, w.out_features
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    cfg = config or gemm_config(m, x.dtype)
    block_k, mode = _k_tile_mode(cfg.block_k, k, w.group, w.g_idx is not None)
    block_m, block_n = _fit(cfg.block_m, m), _fit(cfg.block_n, n)
    rows_per_block = n
    if w.g_idx is not None and w.g_idx.shape[0] > 1:  # each tile within one row block (its own column order)
        rows_per_block = n // w.g_idx.shape[0]
        while block_n >= 16 and rows_per_block % block_n:
            block_n //= 2
        if block_n < 16:
            return None
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, per_split = _splits(tiles, k, block_k, x.device) if m <= 16 else (1, k)
    out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    scale = w.scale.float().contiguous()  # zero points read with the scales' strides
    zero = None if w.zero_point is None else w.zero_point.contiguous()
    g_idx = None if w.g_idx is None else w.g_idx.to(torch.int32).contiguous()
    _w4a16_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
        x2, w.codes, scale, scale if zero is None else zero, scale if g_idx is None else g_idx, out,
        m, n, k, per_split, w.group, rows_per_block,
        x2.stride(0), w.codes.stride(0), scale.stride(0), scale.stride(1), 0 if g_idx is None else g_idx.stride(0),
        out.stride(0) if splits > 1 else 0, out.stride(-2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, MODE=mode, HAS_ZERO=zero is not None,
        UPCAST=interpreting() and x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", FIX_BF16=fix_bf16(x.dtype), SPLIT=splits > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device))
    if splits > 1:
        y = out.sum(0).to(x.dtype)  # the splits in a fixed order
    return y.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------- fused MoE
@triton.jit
def _int4_gate_up_swiglu_kernel(
    x_ptr, c_ptr, s_ptr, z_ptr, gi_ptr, act_ptr, slots_ptr, block_expert_ptr,
    num_slots, top_k, N, K, num_experts, group, up_gi,
    stride_xt, stride_ce, stride_cn, stride_se, stride_sn, stride_sk, stride_ge, stride_as,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    """`moe_triton._gate_up_swiglu_kernel` over 4-bit experts: act[slot, n] = silu(x[t] . gate[e, n]) * (x[t] .
    up[e, n]), gate rows n and up rows N + n of gate_up (codes, scales, zeros); the up half's g_idx row is `up_gi`
    elements after the gate's."""
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:  # past the last expert's run
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + offs_m)
    row_ok = slots < num_slots
    tokens = tl.where(row_ok, slots // top_k, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_K // 2)
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_xt
    e64 = expert.to(tl.int64)
    gc_rows = c_ptr + e64 * stride_ce + offs_n[:, None].to(tl.int64) * stride_cn
    uc_rows = gc_rows + N * stride_cn
    gs_rows = s_ptr + e64 * stride_se + offs_n.to(tl.int64) * stride_sn
    us_rows = gs_rows + N * stride_sn
    gz_rows = z_ptr + e64 * stride_se + offs_n.to(tl.int64) * stride_sn
    uz_rows = gz_rows + N * stride_sn
    g_gi = gi_ptr + e64 * stride_ge
    u_gi = g_gi + up_gi
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_rows + (k0 + offs_k)[None, :], mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        acc_g = _dot_int4(a, gc_rows + (k0 // 2 + offs_h)[None, :], gs_rows, gz_rows, g_gi, k0, offs_h, n_ok, K,
                          group, stride_sk, acc_g, BLOCK_M, BLOCK_K, MODE, HAS_ZERO, UPCAST, PRECISION, FIX_BF16)
        acc_u = _dot_int4(a, uc_rows + (k0 // 2 + offs_h)[None, :], us_rows, uz_rows, u_gi, k0, offs_h, n_ok, K,
                          group, stride_sk, acc_u, BLOCK_M, BLOCK_K, MODE, HAS_ZERO, UPCAST, PRECISION, FIX_BF16)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out = act_ptr + slots[:, None].to(tl.int64) * stride_as + offs_n[None, :]
    tl.store(out, round_to(act, act_ptr.dtype.element_ty, FIX_BF16), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_down_kernel(
    act_ptr, c_ptr, s_ptr, z_ptr, gi_ptr, rw_ptr, y_ptr, slots_ptr, block_expert_ptr,
    num_slots, N, K, num_experts, group,
    stride_as, stride_ce, stride_cn, stride_se, stride_sn, stride_sk, stride_ge, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    """`moe_triton._down_kernel` over 4-bit experts (without its norm epilogue): y[slot, n] = routing_weight[slot] *
    (act[slot] . down[e, n]) in fp32, one row per slot."""
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(slots_ptr + offs_m)
    row_ok = slots < num_slots
    safe = tl.where(row_ok, slots, 0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_K // 2)
    a_rows = act_ptr + safe[:, None].to(tl.int64) * stride_as
    e64 = expert.to(tl.int64)
    c_rows = c_ptr + e64 * stride_ce + offs_n[:, None].to(tl.int64) * stride_cn
    s_rows = s_ptr + e64 * stride_se + offs_n.to(tl.int64) * stride_sn
    z_rows = z_ptr + e64 * stride_se + offs_n.to(tl.int64) * stride_sn
    gi_row = gi_ptr + e64 * stride_ge
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        acc = _dot_int4(a, c_rows + (k0 // 2 + offs_h)[None, :], s_rows, z_rows, gi_row, k0, offs_h, n_ok, K, group,
                        stride_sk, acc, BLOCK_M, BLOCK_K, MODE, HAS_ZERO, UPCAST, PRECISION, FIX_BF16)
    rw = tl.load(rw_ptr + safe, mask=row_ok, other=0.0).to(tl.float32)
    out = y_ptr + slots[:, None].to(tl.int64) * stride_ys + offs_n[None, :]
    tl.store(out, acc * rw[:, None], mask=row_ok[:, None] & n_ok[None, :])


def moe_usable(x: torch.Tensor, gate_up: Int4Weight, down: Int4Weight) -> bool:
    """The shapes and layouts `fused_moe_int4` takes (`Int4Experts`' own: gate_up [E, 2I, H], down [E, H, I] with
    g_idx row blocks 2 (or 1) and 1), on a Triton device."""
    if x.dtype not in DTYPES or x.dim() != 2 or gate_up.codes.dim() != 3 or down.codes.dim() != 3:
        return False
    if x.device.type != "cuda" and not interpreting():
        return False
    e, two_i = gate_up.codes.shape[:2]
    inter, hidden = two_i // 2, x.shape[1]
    if gate_up.in_features != hidden or two_i != 2 * inter or down.in_features != inter:
        return False
    if tuple(down.codes.shape[:2]) != (e, hidden):
        return False
    if not _weight_ok(gate_up, x.device) or not _weight_ok(down, x.device):
        return False
    if (gate_up.g_idx is None) != (down.g_idx is None):  # one kernel variant per scheme: both or neither
        return False
    if (gate_up.zero_point is None) != (down.zero_point is None):
        return False
    return gate_up.g_idx is None or (gate_up.g_idx.shape[1] in (1, 2) and down.g_idx.shape[1] == 1)


def moe_config(cfg, dtype: torch.dtype):
    """`moe_triton`'s config for these kernels. With fp32 x (IEEE dots on the FMA units; tests and debugging, not
    speed) 16-row blocks of 32 columns, 2 stages: K tiles cannot shrink under 32 keys (two 16-key dots), and the
    sm_90 compile spills at larger blocks next to the dequantized tiles."""
    if dtype != torch.float32:
        return cfg
    return replace(cfg, block_m=16, up_n=min(cfg.up_n, 32), down_n=min(cfg.down_n, 32), num_warps=4, num_stages=2)


def moe_k_tile(target: int, k: int, w: Int4Weight, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, MODE) for an expert GEMM over K columns: the config's tile within one group where it can be (32 keys
    at most with fp32 x: IEEE dots on the FMA units, which spill past it next to the dequantized tiles), else 32 keys
    with gathered scales."""
    if dtype == torch.float32:
        target = min(target, MIN_BLOCK_K)
    tile, mode = _k_tile_mode(max(target, MIN_BLOCK_K), k, w.group, w.g_idx is not None)
    # gathered scales and zeros: gate_up holds four [BLOCK_N, BLOCK_K / 2] of each beside its two weight halves
    # (the sm_90 compile spills at 64 keys)
    return (tile, mode) if mode == 0 else (MIN_BLOCK_K, mode)


def fused_moe_int4(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: Int4Weight,
                   down: Int4Weight, config=None) -> torch.Tensor | None:
    """`Int4Experts.forward` fused: x [T, H]; weights [T, k] fp32 and ids [T, k] (each token's routing); gate_up
    [E, 2I, H] and down [E, H, I] as `Int4Experts.packed()` gives them -> [T, H] in x's dtype, or None where
    `moe_usable` says no (the module then runs its reference)."""
    from .moe_triton import ALIGN_KERNEL_MAX_SLOTS, _combine_kernel, get_config, moe_align, moe_align_triton

    if not moe_usable(x, gate_up, down):
        return None
    num_tokens, hidden = x.shape
    num_experts, inter = gate_up.codes.shape[0], down.in_features
    top_k = ids.shape[1]
    if num_tokens == 0:
        return torch.empty_like(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = moe_config(config or get_config(num_tokens, hidden, inter, num_experts, top_k), x.dtype)
    up_n, down_n = _fit(cfg.up_n, inter), _fit(cfg.down_n, hidden)
    up_k, up_mode = moe_k_tile(cfg.up_k, hidden, gate_up, x.dtype)
    down_k, down_mode = moe_k_tile(cfg.down_k, inter, down, x.dtype)
    if ids.numel() <= ALIGN_KERNEL_MAX_SLOTS:
        slots, block_expert = moe_align_triton(ids, num_experts, cfg.block_m)
    else:
        slots, block_expert = moe_align(ids, num_experts, cfg.block_m)
    num_slots, num_blocks = ids.numel(), block_expert.numel()
    common = dict(BLOCK_M=cfg.block_m, HAS_ZERO=gate_up.zero_point is not None,
                  UPCAST=interpreting() and x.dtype == torch.bfloat16,
                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32", FIX_BF16=fix_bf16(x.dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device))

    def tensors(w: Int4Weight):
        """codes, scales, zeros (or the scales), g_idx (or the scales) and g_idx's expert and row-block strides."""
        scale = w.scale.float().contiguous()
        zero = scale if w.zero_point is None else w.zero_point.contiguous()
        if w.g_idx is None:
            return w.codes, scale, zero, scale, 0, 0
        g_idx = w.g_idx.to(torch.int32).contiguous()
        return w.codes, scale, zero, g_idx, g_idx.stride(0), g_idx.stride(1) if g_idx.shape[1] == 2 else 0

    gc, gs, gz, ggi, g_ge, g_up = tensors(gate_up)
    act = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    _int4_gate_up_swiglu_kernel[(num_blocks, triton.cdiv(inter, up_n))](
        x, gc, gs, gz, ggi, act, slots, block_expert, num_slots, top_k, inter, hidden, num_experts, gate_up.group,
        g_up, x.stride(0), gc.stride(0), gc.stride(1), gs.stride(0), gs.stride(1), gs.stride(2), g_ge, act.stride(0),
        BLOCK_N=up_n, BLOCK_K=up_k, MODE=up_mode, **common)

    dc, ds, dz, dgi, d_ge, _ = tensors(down)
    y = torch.empty(num_slots, hidden, dtype=torch.float32, device=x.device)
    rw = weights.reshape(-1).to(torch.float32).contiguous()
    _int4_down_kernel[(num_blocks, triton.cdiv(hidden, down_n))](
        act, dc, ds, dz, dgi, rw, y, slots, block_expert, num_slots, hidden, inter, num_experts, down.group,
        act.stride(0), dc.stride(0), dc.stride(1), ds.stride(0), ds.stride(1), ds.stride(2), d_ge, y.stride(0),
        BLOCK_N=down_n, BLOCK_K=down_k, MODE=down_mode, **common)

    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    comb_n = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(num_tokens, triton.cdiv(hidden, comb_n))](
        y, out, hidden, top_k, y.stride(0), out.stride(0), BLOCK_N=comb_n, FIX_BF16=fix_bf16(x.dtype), num_warps=4)
    return out
