"""Triton attention kernels for the paged engine: decode over slot-addressed context, varlen prefill, K/V scatter.

Decode and write_kv address the layer's cache rows ([S, Hkv, D], one row per token slot) directly, so the
decode context is never gathered into a copy; prefill takes each sequence's keys already packed.

- `decode_attention`: one query token per sequence. A program owns one (sequence, kv head, key split) and
  all the query heads that share that kv head (GQA), so each K/V row is loaded once per kv head. Long
  contexts are cut into splits (flash-decoding), merged by their log-sum-exp by the split that finishes last
  (`kernels.last_program`), or by a second kernel where no arrival counters are available.
- `prefill_attention`: sequences packed back to back (cu_q / cu_k prefix sums), causal and optional sliding
  window by absolute positions. A program owns BLOCK_M query tokens x all query heads of one kv head (the
  rows of its score tile are token-major, head-minor), walks the sequence's key tiles, and skips a tile
  whose positions are all after its last query or all before its first query's window.
- `write_kv`: scatter new K/V rows to their slots; a slot of -1 is skipped.

An fp8 cache (torch.float8_e4m3fn / float8_e5m2: the kernels specialise on the cache pointer's element type, no
flag of their own) is read as bytes and widened to the queries' dtype; the layer's K scale folds into the score
scale and its V scale into the output, so a tile costs one conversion per value and no multiply. Writes divide by
the scale, saturate and round to nearest-even by hand (`_to_fp8`), so the stored bytes are torch's
(`kernels.attention.quantize_kv`) on any Triton, the interpreter's flawed fp8 casts included.

Softmax runs online in fp32 with base-2 exponentials (the scale is pre-multiplied by log2(e)); fp32 inputs
use IEEE fp32 dot products (no TF32) so they match the torch reference to ~1e-5.

Importing this module needs triton; `TRITON_INTERPRET=1` must be set before the import to run the kernels
on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .last_program import arrival_counters, arrive
from .norm_triton import fix_bf16, norm_rope_rows, round_to
from .pdl import launch_options, wait_then_release

_LOG2E = 1.4426950408889634


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dot(t: torch.Tensor) -> bool:
    """Triton's interpreter multiplies bf16 as raw uint16 bits: there, dot products run on fp32 copies."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _to_fp8(x, dtype: tl.constexpr):
    """fp32 x -> the fp8 `dtype` (float8e4nv = e4m3fn or float8e5 = e5m2) as torch casts it after a clamp: saturated
    to the largest finite value, rounded to nearest-even. The rounding is done in fp32 first, so the cast itself is
    exact: adding and subtracting c, a power of two 23 - MBITS binades above x's fp8 exponent (the format's smallest
    normal exponent for its subnormals), rounds x to a multiple of x's fp8 spacing (Triton's interpreter casts to fp8
    wrongly: -7.99 gives -4 in e4m3)."""
    if dtype == tl.float8e4nv:
        MBITS: tl.constexpr = 3
        EMIN: tl.constexpr = -6
        FMAX: tl.constexpr = 448.0
    else:
        MBITS: tl.constexpr = 2
        EMIN: tl.constexpr = -14
        FMAX: tl.constexpr = 57344.0
    x = tl.clamp(x, -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)
    bits = x.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)  # x's binade, at least the format's smallest normal one
    c = (((e - MBITS + 23 + 127) << 23) | sign).to(tl.float32, bitcast=True)
    r = ((x + c) - c).to(tl.int32, bitcast=True) | sign  # the sign again: -tiny rounds to -0, as torch's cast
    return r.to(tl.float32, bitcast=True).to(dtype)


@triton.jit
def _kv_stored(x, scale_ptr, dtype: tl.constexpr):
    """x as a cache of `dtype` stores it: a cast; fp8: x / the layer's scale, saturated and rounded (`_to_fp8`). The
    division correctly rounded (div_rn), as torch's: Triton's `/` on a GPU is approximate (div.full.f32, 2 ulp), which
    near a rounding boundary would store another byte than the references."""
    if dtype.is_fp8():
        return _to_fp8(tl.div_rn(x.to(tl.float32), tl.load(scale_ptr)), dtype)
    else:
        return x.to(dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _program_target(device: torch.device) -> int:
    """How many programs keep the device busy: two per SM on a GPU, a small number in the interpreter."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


# ---------------------------------------------------------------------------------------------- decode
@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, out_ptr, part_ptr, lse_ptr, gate_ptr,
                   new_k_ptr, new_v_ptr, new_slots_ptr, lo_ptr, rows_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
                   counter_ptr, k_scale_ptr, v_scale_ptr, qk_scale, keys_per_split, norm_eps,
                   stride_qb, stride_qh, stride_qd,
                   stride_ks, stride_kh, stride_kd,
                   stride_vs, stride_vh, stride_vd,
                   stride_sb, stride_sl,
                   stride_ob, stride_oh, stride_od,
                   stride_pb, stride_ph, stride_ps,
                   stride_gb, stride_gh,
                   stride_nkb, stride_nkh, stride_nvb, stride_nvh,
                   stride_lens, stride_ns, stride_lo, stride_rows, stride_cos, stride_sin,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   HAS_GATE: tl.constexpr, FIX_BF16: tl.constexpr, HAS_NEW: tl.constexpr,
                   TABLE: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
                   QK_NORM: tl.constexpr, ROPE: tl.constexpr, MERGE_LAST: tl.constexpr, BLOCK_S: tl.constexpr,
                   PDL: tl.constexpr):
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    n_ctx = tl.load(lens_ptr + b * stride_lens).to(tl.int32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h

    q_rows = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    cos_row = cos_ptr + b.to(tl.int64) * stride_cos
    sin_row = sin_ptr + b.to(tl.int64) * stride_sin
    if QK_NORM:  # q arrives straight from the projection: its per-head norm and RoPE here (no launch of their own)
        q = norm_rope_rows(q_rows, h_mask[:, None], stride_qd, qw_ptr, cos_row, sin_row, norm_eps,
                         HEAD_DIM, BLOCK_D, ROPE, FIX_BF16)
    else:
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    # an fp8 cache: values widened to q's dtype, k's scale in the scores' scale, v's applied to the output
    FP8: tl.constexpr = k_ptr.dtype.element_ty.is_fp8()
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    table_row = b
    if ROWS:  # the table's row for this sequence (a persistent table: one row per running sequence)
        table_row = tl.load(rows_ptr + b * stride_rows).to(tl.int32)
    slot_row = slots_ptr + table_row.to(tl.int64) * stride_sb
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    # With HAS_NEW the last context position is this step's token: its K/V come in registers (and are written to
    # the cache here, replacing a write_kv launch), the rest is read from the cache.
    cached_hi = hi
    if HAS_NEW:
        cached_hi = tl.minimum(hi, n_ctx - 1)
    first = 0
    if TABLE:
        first = tl.load(lo_ptr + b * stride_lo).to(tl.int32)  # the position of context index 0
    for start in range(lo, cached_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < cached_hi
        if TABLE:  # position lo + i lives in its block's slot: the block table read in place
            pos = first + offs_n
            block = pos // BLOCK_SIZE
            entry = tl.load(slot_row + block * stride_sl, mask=n_mask, other=0).to(tl.int64)
            slot = entry * BLOCK_SIZE + pos % BLOCK_SIZE
        else:
            slot = tl.load(slot_row + offs_n * stride_sl, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if FP8:
            k = k.to(tl.float32).to(q_ptr.dtype.element_ty)
        s = _mm(q, tl.trans(k), UPCAST, DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # every tile holds at least one valid key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if FP8:
            v = v.to(tl.float32).to(q_ptr.dtype.element_ty)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST, DOT_PRECISION)
        m_i = m_new
    if HAS_NEW:
        if (n_ctx > 0) & (lo <= n_ctx - 1) & (n_ctx - 1 < hi):  # the split that holds the new token
            # [1, BLOCK_D] rows, so that the normed/roped k takes the same path as q
            k_row = new_k_ptr + b.to(tl.int64) * stride_nkb + kvh * stride_nkh + tl.zeros([1, 1], dtype=tl.int64)
            one_row = tl.full([1, 1], 1, tl.int1)
            if QK_NORM:
                kn = norm_rope_rows(k_row, one_row, 1, kw_ptr, cos_row, sin_row, norm_eps, HEAD_DIM, BLOCK_D, ROPE,
                                  FIX_BF16)
            else:
                kn = tl.load(k_row + offs_d[None, :], mask=d_mask[None, :], other=0.0)
            vn = tl.load(new_v_ptr + b.to(tl.int64) * stride_nvb + kvh * stride_nvh + offs_d[None, :],
                         mask=d_mask[None, :], other=0.0)
            new_slot = tl.load(new_slots_ptr + b * stride_ns).to(tl.int64)
            kn = _kv_stored(kn, k_scale_ptr, k_ptr.dtype.element_ty)
            vn = _kv_stored(vn, v_scale_ptr, v_ptr.dtype.element_ty)
            if new_slot >= 0:
                tl.store(k_head + new_slot * stride_ks + offs_d[None, :] * stride_kd, kn, mask=d_mask[None, :])
                tl.store(v_head + new_slot * stride_vs + offs_d[None, :] * stride_vd, vn, mask=d_mask[None, :])
            kn = kn.to(tl.float32)  # the values the cache holds from now on (an fp8 cache's: before its scales)
            vn = vn.to(tl.float32)
            s_new = tl.sum(q.to(tl.float32) * kn, axis=1) * qk_scale  # [BLOCK_H]
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            # p rounded to the dtype of the tiles' P @ V (the cache's, or q's where the cache is fp8)
            if FP8:
                p_new = p_new.to(q_ptr.dtype.element_ty).to(tl.float32)
            else:
                p_new = p_new.to(v_ptr.dtype.element_ty).to(tl.float32)
            acc = acc * alpha[:, None] + p_new[:, None] * vn
            m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    if FP8:
        o = o * tl.load(v_scale_ptr)
    if SPLIT:
        # normalised partial output plus its log2-sum-exp; an empty split stores lse = -inf (weight 0)
        part = part_ptr + b.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part[:, None] + offs_d[None, :], o, mask=h_mask[:, None] & d_mask[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(lse_ptr + (b * tl.num_programs(1) * GROUP + heads) * tl.num_programs(2) + split, lse,
                 mask=h_mask)
        if MERGE_LAST:  # the split that finishes last merges them all: no merge launch
            if arrive(counter_ptr + b * tl.num_programs(1) + kvh, tl.num_programs(2)):
                for i in range(0, GROUP):  # a loop, not unrolled: eight heads of 32 splits unrolled spill registers
                    _merge_head(part_ptr, lse_ptr, out_ptr, gate_ptr, b, kvh * GROUP + i, tl.num_programs(2),
                                stride_pb, stride_ph, stride_ps, stride_ob, stride_oh, stride_od, stride_gb,
                                stride_gh, tl.num_programs(1) * GROUP, HEAD_DIM, BLOCK_S, BLOCK_D, HAS_GATE,
                                FIX_BF16)
    else:
        o = _gated(o, gate_ptr + b.to(tl.int64) * stride_gb + heads[:, None] * stride_gh + offs_d[None, :],
                   h_mask[:, None] & d_mask[None, :], out_ptr.dtype.element_ty, HAS_GATE, FIX_BF16)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o, mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _gated(o, gate_ptrs, mask, dtype: tl.constexpr, HAS_GATE: tl.constexpr, FIX_BF16: tl.constexpr):
    """The attention output in the dtype, times sigmoid(gate) when HAS_GATE, rounded as the separate
    `sigmoid_gate` after attention rounds: the output, sigmoid(gate) and their product each to the dtype."""
    o = round_to(o, dtype, FIX_BF16)
    if HAS_GATE:
        g = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = round_to(tl.sigmoid(g), dtype, FIX_BF16).to(tl.float32)
        o = round_to(o.to(tl.float32) * s, dtype, FIX_BF16)
    return o


@triton.jit
def _merge_head(part_ptr, lse_ptr, out_ptr, gate_ptr, b, head, num_splits,
                stride_pb, stride_ph, stride_ps, stride_ob, stride_oh, stride_od, stride_gb, stride_gh,
                num_heads, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_GATE: tl.constexpr, FIX_BF16: tl.constexpr):
    """Merge the key splits of (sequence b, query head) by their log2-sum-exp, apply the gate and store: every
    split loaded at once ([BLOCK_S, BLOCK_D]), one wait for memory."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + (b * num_heads + head) * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits
    part = tl.load(part_ptr + b.to(tl.int64) * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps
                   + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    o = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    o = _gated(o, gate_ptr + b.to(tl.int64) * stride_gb + head * stride_gh + offs_d, d_mask, out_ptr.dtype.element_ty,
               HAS_GATE, FIX_BF16)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d * stride_od, o, mask=d_mask)


@triton.jit
def _decode_merge_kernel(part_ptr, lse_ptr, out_ptr, gate_ptr, num_splits,
                         stride_pb, stride_ph, stride_ps,
                         stride_ob, stride_oh, stride_od,
                         stride_gb, stride_gh,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_GATE: tl.constexpr, FIX_BF16: tl.constexpr):
    """The merge as a launch of its own (grid: sequence x query head), where no arrival counters are available."""
    _merge_head(part_ptr, lse_ptr, out_ptr, gate_ptr, tl.program_id(0), tl.program_id(1), num_splits,
                stride_pb, stride_ph, stride_ps, stride_ob, stride_oh, stride_od, stride_gb, stride_gh,
                tl.num_programs(1), HEAD_DIM, BLOCK_S, BLOCK_D, HAS_GATE, FIX_BF16)


def _decode_splits(batch: int, kv_heads: int, width: int, block_n: int, device: torch.device,
                   num_splits: int | None) -> tuple[int, int]:
    """(number of key splits, keys per split; a multiple of block_n) for a padded context width."""
    tiles = triton.cdiv(max(width, 1), block_n)
    if num_splits is None:
        # split only while the (sequence, kv head) grid leaves the device idle, and keep >= 4 tiles per split
        want = triton.cdiv(_program_target(device), max(batch * kv_heads, 1))
        num_splits = max(1, min(want, tiles // 4))
    num_splits = max(1, min(int(num_splits), tiles))
    per_split = triton.cdiv(tiles, num_splits) * block_n
    return triton.cdiv(max(width, 1), per_split), per_split


def decode_block_n(q_elem: int, cache_elem: int) -> int:
    """Keys per step of the decode kernel, picked from sm_90 register/spill reports (ptxas -v), not from timings:
    64 for 16-bit queries, 32 for fp32 ones; 16 for fp32 queries over an fp8 cache, which at 32 keys spill inside
    the loop (255 registers, 300 bytes of stack; `test_fp8_decode_compiles_without_spills`)."""
    if q_elem == 2:
        return 64
    return 16 if cache_elem == 1 else 32


_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}


def _scales(cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """The scale pointers a launch passes: the given scales (an fp8 cache; 1.0 where None, one tensor per device made
    on first use) or, for a cache in the model's dtype, the cache itself as a placeholder the kernel never reads."""
    if cache.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return cache, cache
    if k_scale is None or v_scale is None:
        unit = _UNIT_SCALES.get(cache.device)
        if unit is None:
            unit = _UNIT_SCALES[cache.device] = torch.ones(1, dtype=torch.float32, device=cache.device)
        k_scale, v_scale = (unit if k_scale is None else k_scale), (unit if v_scale is None else v_scale)
    for t in (k_scale, v_scale):
        if t.dtype != torch.float32 or t.numel() != 1 or t.device != cache.device:
            raise ValueError(f"a KV scale must be one fp32 value on {cache.device}, not {tuple(t.shape)} {t.dtype} "
                             f"on {t.device}")
    return k_scale, v_scale


def _qk_norm_args(qk_norm, has_new: bool, q: torch.Tensor, head_dim: int):
    """The decode kernel's q/k-norm arguments: (q weight, k weight, eps, cos, sin, rope); placeholders without."""
    if qk_norm is None:
        return q, q, 0.0, q[:, 0], q[:, 0], False
    q_weight, k_weight, eps, cos, sin, rope = qk_norm
    if not has_new:
        raise ValueError("q/k norm in the decode kernel needs the new K/V (new_kv): the cached keys are normed")
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, not {head_dim}")
    if rope:
        if cos.shape != (q.shape[0], head_dim) or sin.shape != cos.shape or cos.stride(-1) != 1 \
                or sin.stride(-1) != 1:
            raise ValueError(f"cos/sin {tuple(cos.shape)} must be [{q.shape[0]}, {head_dim}] with unit stride")
    else:
        cos = sin = q[:, 0]  # unused
    return q_weight.contiguous(), k_weight.contiguous(), float(eps), cos, sin, bool(rope)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx_slots: torch.Tensor | None,
                     ctx_lens: torch.Tensor, scale: float, *, gate: torch.Tensor | None = None,
                     new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, table=None,
                     qk_norm: tuple | None = None, num_splits: int | None = None,
                     block_n: int | None = None, merge_last: bool = True, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence against its slot-addressed context.

    q: [B, Hq, D]; k_cache/v_cache: [S, Hkv, D]; ctx_slots: [B, L] int slots of each context token (the
    sequence's new token included, already written), padded; ctx_lens: [B] int (any stride), row b uses
    ctx_slots[b, :ctx_lens[b]] and never reads past it. Returns [B, Hq, D] in q's dtype; a row with no
    context gives zeros.
    - `table` (a `kernels.attention.BlockTable`, with ctx_slots None): the contexts by block table instead, each
      slot computed from the table in the kernel (no [B, L] slot tensor is built).
    - `gate` [B, Hq, D] (unit stride in D): the output times sigmoid(gate), the attention layer's output gate.
    - `new_kv` = (k [B, Hkv, D], v, slots [B], any stride): this step's K/V, written to their slots by this launch
      (`write_kv` before the kernel, without its launch); each row's last context position must be its new
      token, whose slot is then never read.
    - `qk_norm` = (q_weight, k_weight, eps, cos, sin, apply_rope), with `new_kv`: q and the new k come raw from the
      projection and get the per-head RMSNorm and (when apply_rope) RoPE here, exactly as `kernels.norm.qk_norm_rope`
      (cos/sin [B, D] in q's dtype); the cache receives the normed k.
    - `k_scale` / `v_scale`: an fp8 cache's scales (one fp32 value each on q's device; None = 1.0), read by the kernel
      (a CUDA graph replays whatever they hold); ignored for a cache in q's dtype.
    `num_splits` / `block_n` override the launch heuristics (tests, tuning). With key splits, the last split of
    each (sequence, kv head) to finish merges them (`kernels.last_program`); `merge_last=False` runs the merge as
    a second launch instead (tests compare the two).
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    out = torch.empty_like(q)
    if B == 0:
        return out
    group = Hq // Hkv
    k_scale, v_scale = _scales(k_cache, k_scale, v_scale)
    if table is not None:
        slots, width, lo = table.table, table.width, table.lo
        rows = table.rows if table.rows is not None else lo  # unused without rows
        addressing = dict(TABLE=True, BLOCK_SIZE=table.block_size, ROWS=table.rows is not None)
    else:
        slots, width, lo, rows = ctx_slots, ctx_slots.shape[1], ctx_lens, ctx_lens  # lo, rows unused
        addressing = dict(TABLE=False, BLOCK_SIZE=1, ROWS=False)
    block_n = block_n or decode_block_n(q.element_size(), k_cache.element_size())
    block_h, block_d = _pow2(group), _pow2(D)
    splits, per_split = _decode_splits(B, Hkv, width, block_n, q.device, num_splits)
    if splits > 1:
        part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    if gate is not None and (gate.shape != q.shape or gate.dtype != q.dtype or gate.stride(-1) != 1):
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} must match q {tuple(q.shape)} {q.dtype} "
                         "with a unit stride in the head dim")
    gated = dict(HAS_GATE=gate is not None, FIX_BF16=fix_bf16(q.dtype))
    gate_strides = gate.stride()[:2] if gate is not None else (0, 0)
    gate = gate if gate is not None else out  # unused
    if new_kv is not None:
        new_k, new_v, new_slots = new_kv
        if new_k.shape != (B, Hkv, D) or new_v.shape != (B, Hkv, D) or new_slots.shape != (B,) \
                or new_k.stride(-1) != 1 or new_v.stride(-1) != 1:
            raise ValueError(f"new K/V {tuple(new_k.shape)} / {tuple(new_v.shape)} and slots "
                             f"{tuple(new_slots.shape)} must be [{B}, {Hkv}, {D}] (unit stride in D) and [{B}]")
        new_strides = (*new_k.stride()[:2], *new_v.stride()[:2])
    else:
        new_k = new_v = new_slots = out  # unused
        new_strides = (0, 0, 0, 0)
    qw, kw, norm_eps, cos, sin, rope = _qk_norm_args(qk_norm, new_kv is not None, q, D)
    # with splits, the last split of each (sequence, kv head) to finish merges them (no merge launch)
    counters = arrival_counters(q.device, B * Hkv) if splits > 1 and merge_last else None
    # the merge's split block (a constant where the kernel does not merge: no compiled variant per split count)
    merge_block = _pow2(splits, 2) if counters is not None else 2
    _decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, slots, ctx_lens, out, part, lse, gate, new_k, new_v, new_slots, lo, rows, qw, kw, cos,
        sin, counters if counters is not None else lse, k_scale, v_scale, scale * _LOG2E, per_split, norm_eps,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *slots.stride(), *out.stride(),
        *(part.stride()[:3] if splits > 1 else (0, 0, 0)), *gate_strides, *new_strides,
        ctx_lens.stride(0), new_slots.stride(0), lo.stride(0), rows.stride(0), cos.stride(0), sin.stride(0),
        GROUP=group, HEAD_DIM=D, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
        SPLIT=splits > 1, DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast_dot(q), **gated,
        HAS_NEW=new_kv is not None, **addressing, QK_NORM=qk_norm is not None, ROPE=rope,
        MERGE_LAST=counters is not None, BLOCK_S=merge_block, num_warps=8 if block_d >= 128 else 4,
        **launch_options(q.device))
    if splits > 1 and counters is None:
        _decode_merge_kernel[(B, Hq)](part, lse, out, gate, splits, *part.stride()[:3], *out.stride(), *gate_strides,
                                      HEAD_DIM=D, BLOCK_S=_pow2(splits, 2), BLOCK_D=block_d, **gated, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------- prefill
@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, cu_k_ptr, q_pos_ptr, k_pos_ptr,
                    qk_scale, window,
                    stride_qt, stride_qh, stride_qd,
                    stride_kt, stride_kh, stride_kd,
                    stride_vt, stride_vh, stride_vd,
                    stride_ot, stride_oh, stride_od,
                    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    CONTIGUOUS: tl.constexpr, SKIP_MASKS: tl.constexpr):
    BLOCK_R: tl.constexpr = BLOCK_M * GROUP_P2
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)

    q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
    q_end = tl.load(cu_q_ptr + seq + 1).to(tl.int32)
    first = q_start + tile * BLOCK_M
    if first >= q_end:
        return
    k_start = tl.load(cu_k_ptr + seq).to(tl.int32)
    k_end = tl.load(cu_k_ptr + seq + 1).to(tl.int32)

    # row r of the tile: token first + r // GROUP_P2, query head kvh * GROUP + r % GROUP_P2
    offs_r = tl.arange(0, BLOCK_R)
    tok = first + offs_r // GROUP_P2
    head = kvh * GROUP + offs_r % GROUP_P2
    r_mask = (tok < q_end) & (offs_r % GROUP_P2 < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = tl.load(q_ptr + tok[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    # positions in int32 (a context is far below 2**30 tokens): int64 vectors would cost registers in the loop
    qp = tl.load(q_pos_ptr + tok, mask=r_mask, other=0).to(tl.int32)
    q_lo = tl.min(tl.where(r_mask, qp, 2**30), axis=0)
    q_hi = tl.max(tl.where(r_mask, qp, -2**30), axis=0)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)

    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    if CONTIGUOUS:
        # key j of the sequence has position p0 + (j - k_start): the keys this block can see are one index range,
        # walked without per-tile visibility branches (which keep Triton from pipelining the K/V loads)
        p0 = tl.load(k_pos_ptr + k_start, mask=k_start < k_end, other=0).to(tl.int32)
        shift = p0 - k_start  # key index -> position
        hi = tl.minimum(k_start + (q_hi - p0 + 1), k_end).to(tl.int32)
        lo = k_start
        # [full_lo, full_hi): the keys every row of the block sees (at or before its first query, inside its
        # last query's window); whole tiles of them skip the visibility mask, as flash attention does off the
        # diagonal. Tiles start at lo, so the walk is: masked tiles up to full_lo, unmasked whole tiles, masked
        # tiles to hi (the diagonal).
        full_lo = lo
        if HAS_WINDOW:
            lo = tl.maximum(k_start + (q_lo - window + 1 - p0), k_start).to(tl.int32)
            full_lo = tl.maximum(k_start + (q_hi - window + 1 - p0), lo).to(tl.int32)
        full_hi = tl.minimum(k_start + (q_lo - p0 + 1), hi).to(tl.int32)
        a = tl.minimum(lo + tl.cdiv(full_lo - lo, BLOCK_N) * BLOCK_N, hi)
        b = a + tl.maximum(full_hi - a, 0) // BLOCK_N * BLOCK_N
        if not SKIP_MASKS:  # one masked walk: fp32's FMA dots spill in three loops (74 -> 255 registers on sm_90)
            a = hi
            b = hi
        for start in range(lo, a, BLOCK_N):
            m_i, l_i, acc = _prefill_tile(q, qp, m_i, l_i, acc, k_head, v_head, start, hi,
                                          start + tl.arange(0, BLOCK_N) + shift, offs_d, d_mask, qk_scale, window,
                                          stride_kt, stride_kd, stride_vt, stride_vd, HAS_WINDOW, DOT_PRECISION,
                                          UPCAST, True, BLOCK_N)
        for start in range(a, b, BLOCK_N):
            m_i, l_i, acc = _prefill_tile(q, qp, m_i, l_i, acc, k_head, v_head, start, hi,
                                          start + tl.arange(0, BLOCK_N) + shift, offs_d, d_mask, qk_scale, window,
                                          stride_kt, stride_kd, stride_vt, stride_vd, HAS_WINDOW, DOT_PRECISION,
                                          UPCAST, False, BLOCK_N)
        for start in range(b, hi, BLOCK_N):
            m_i, l_i, acc = _prefill_tile(q, qp, m_i, l_i, acc, k_head, v_head, start, hi,
                                          start + tl.arange(0, BLOCK_N) + shift, offs_d, d_mask, qk_scale, window,
                                          stride_kt, stride_kd, stride_vt, stride_vd, HAS_WINDOW, DOT_PRECISION,
                                          UPCAST, True, BLOCK_N)
    else:
        for start in range(k_start, k_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < k_end
            kp = tl.load(k_pos_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)
            # skip tiles that no query of this block can see (works for any key order)
            visible = tl.min(tl.where(n_mask, kp, 2**30), axis=0) <= q_hi
            if HAS_WINDOW:
                visible = visible & (tl.max(tl.where(n_mask, kp, -2**30), axis=0) > q_lo - window)
            if visible:
                m_i, l_i, acc = _prefill_tile(q, qp, m_i, l_i, acc, k_head, v_head, start, k_end, kp, offs_d,
                                              d_mask, qk_scale, window, stride_kt, stride_kd, stride_vt, stride_vd,
                                              HAS_WINDOW, DOT_PRECISION, UPCAST, True, BLOCK_N)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _prefill_tile(q, qp, m_i, l_i, acc, k_head, v_head, start, end, kp, offs_d, d_mask, qk_scale,
                  window, stride_kt, stride_kd, stride_vt, stride_vd,
                  HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys start .. start + BLOCK_N - 1 (those before `end`) into the block's online softmax: -> (m_i, l_i, acc).
    kp: the tile's key positions [BLOCK_N] (computed from the index by a contiguous caller, loaded once by the
    any-order walk, which also tests them for visibility). MASKED=False: a whole tile that every row sees (no
    bounds, no visibility test, no empty rows; kp unused)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        n_mask = offs_n < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_head + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    s = _mm(q, tl.trans(k), UPCAST, DOT_PRECISION) * qk_scale
    if MASKED:
        see = n_mask[None, :] & (kp[None, :] <= qp[:, None])
        if HAS_WINDOW:
            see = see & (kp[None, :] > qp[:, None] - window)
        s = tl.where(see, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        # a row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not nan
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new  # finite: every score of the tile is
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_head + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST, DOT_PRECISION)
    return m_new, l_i, acc


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, scale: float, *,
                      max_q_len: int | None = None, contiguous_keys: bool = False, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None) -> torch.Tensor:
    """Varlen causal attention over sequences packed back to back.

    q: [Tq, Hq, D]; k/v: [Tk, Hkv, D]; cu_q/cu_k: [B+1] int prefix sums (sequence b owns q rows
    cu_q[b]:cu_q[b+1] and k rows cu_k[b]:cu_k[b+1]); q_pos: [Tq], k_pos: [Tk] absolute positions. Query i
    sees key j of its own sequence iff k_pos[j] <= q_pos[i] and (window is None or k_pos[j] > q_pos[i] - window).
    Returns [Tq, Hq, D] in q's dtype; a query that sees no key gives zeros. `max_q_len` (the longest
    sequence's query count, known to the caller on the host) sizes the grid; without it the grid assumes
    Tq and the surplus programs exit at once. `contiguous_keys`: the caller guarantees each sequence's key
    positions run p0, p0 + 1, ... in order (the engine packs context then chunk so): a query block then walks only
    the keys it can see, as one range (any key order is handled without it). block_m (tokens per program),
    block_n (keys per step), num_warps and num_stages override `prefill_launch_settings` (for tuning).
    """
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    out = torch.empty_like(q)
    B = cu_q.shape[0] - 1
    if Tq == 0 or B <= 0:
        return out
    group = Hq // Hkv
    group_p2 = triton.next_power_of_2(group)
    block_d = _pow2(D)
    auto = prefill_launch_settings(q.element_size(), D, group, q.is_cuda)
    block_m = max(block_m or auto["block_m"], triton.cdiv(16, group_p2))  # tl.dot needs >= 16 rows
    block_n = block_n or auto["block_n"]
    num_warps = num_warps or _prefill_warps(block_m * group_p2, block_d)
    grid = (B, triton.cdiv(max_q_len if max_q_len is not None else Tq, block_m), Hkv)
    _prefill_kernel[grid](
        q, k, v, out, cu_q, cu_k, q_pos, k_pos,
        scale * _LOG2E, 0 if window is None else int(window),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        GROUP=group, GROUP_P2=group_p2, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_WINDOW=window is not None, DOT_PRECISION=_dot_precision(q.dtype), UPCAST=_upcast_dot(q),
        CONTIGUOUS=bool(contiguous_keys), SKIP_MASKS=q.element_size() <= 2, num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}))
    return out


def prefill_launch_settings(elem_size: int, head_dim: int, group: int, on_cuda: bool) -> dict:
    """The prefill kernel's default tile: score rows (tokens x heads of the group) per program and keys per step.
    On sm_90 with head_dim 128 and 16-bit inputs, 128 rows x 64 keys at 8 warps compile to wgmma without register
    spills (222 registers, `test_kernels_compile_for_sm90`); 128 keys spill. Scaled down for larger heads and fp32.
    Chosen by compiling, not yet by timing (`benchmarks/tune_prefill.py` times the alternatives on a GPU)."""
    block_d = _pow2(head_dim)
    rows = (128 if elem_size == 2 else 32) if on_cuda else 64
    rows = max(16, rows * 128 // max(block_d, 128))
    block_n = 64 if on_cuda and elem_size == 2 and block_d <= 128 else 32
    block_m = max(1, rows // triton.next_power_of_2(group))
    return {"block_m": block_m, "block_n": block_n,
            "num_warps": _prefill_warps(block_m * triton.next_power_of_2(group), block_d)}


def _prefill_warps(rows: int, block_d: int) -> int:
    """8 warps for tiles of 32+ score rows at head_dim 128 (or the same area), else 4."""
    return 8 if rows * block_d >= 32 * 128 else 4


# -------------------------------------------------------------------------------------------- write_kv
@triton.jit
def _write_kv_kernel(k_cache_ptr, v_cache_ptr, slots_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,
                     stride_kcs, stride_kch, stride_kcd,
                     stride_vcs, stride_vch, stride_vcd,
                     stride_kt, stride_kh, stride_kd,
                     stride_vt, stride_vh, stride_vd,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(k_cache_ptr + slot * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd,
             _kv_stored(k, k_scale_ptr, k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd,
             _kv_stored(v, v_scale_ptr, v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """k_cache[slots[t]] = k[t] (and v) for every t with slots[t] >= 0; slots must not repeat.

    k_cache/v_cache: [S, Hkv, D]; slots: [T] int; k/v: [T, Hkv, D] (any strides, cast to the cache dtype; an fp8
    cache: quantized with `k_scale` / `v_scale` as `kernels.attention.quantize_kv` does).
    """
    T = slots.shape[0]
    if T == 0:
        return
    _, Hkv, D = k.shape
    k_scale, v_scale = _scales(k_cache, k_scale, v_scale)
    _write_kv_kernel[(T,)](
        k_cache, v_cache, slots, k, v, k_scale, v_scale,
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
        HEADS=Hkv, HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4 if Hkv * D >= 512 else 1)


__all__ = ["decode_attention", "decode_block_n", "prefill_attention", "prefill_launch_settings", "write_kv"]
