"""Triton kernels for the small per-token ops of a Trinity layer (references in `kernels.norm`).

- `rms_norm`: RMSNorm in fp32 with an fp32 weight, output in x's dtype; one program per row.
- `add_rms_norm`: new_residual = x + residual (rounded to the dtype, as torch's add is), then RMSNorm of it.
- `norm_add_rms_norm`: the sandwich-norm step in one pass: h = RMSNorm_post(x), new_residual = residual + h,
  normed = RMSNorm_next(new_residual) (each intermediate rounded to the dtype, as the module code does);
  optionally also `normed` widened to fp32 (the MoE router's input, without a cast launch).
- `sum_norm_add_rms_norm`: the same step on the sum of a MoE layer's per-choice expert outputs (fp32 parts,
  summed in the combine kernel's order and rounded), so the combine costs no launch of its own.
- `qk_norm_rope`: per-head RMSNorm of q and k, then neox RoPE (optional), one launch for both tensors.
- `sigmoid_gate`: o * sigmoid(gate).
- `silu_mul`: silu(gate) * up, the SwiGLU activation (two launches and an intermediate as torch ops).

Interpreter note: under TRITON_INTERPRET=1 an fp32 -> bf16 cast truncates (the GPU rounds to nearest even),
so bf16 results are rounded by hand there (`round_to` with FIX_BF16); on a GPU the plain cast is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting


def fix_bf16(dtype: torch.dtype) -> bool:
    """Round fp32 -> bf16 by hand (only the interpreter needs it)."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def round_to(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even (by hand when FIX_BF16, for the interpreter)."""
    if FIX_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


def _row_warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 2048 else 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View as [rows, last] with a unit stride on the last dim (copying only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# --------------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, pre_w_ptr, w_ptr, out_ptr, res_out_ptr, out32_ptr,
    N, stride_x, stride_part, stride_r, stride_o, stride_ro, stride_o32, eps,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, PRE_NORM: tl.constexpr, FIX_BF16: tl.constexpr,
    PARTS: tl.constexpr, FP32_OUT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    dtype = out_ptr.dtype.element_ty
    if PARTS:  # x = the sum of PARTS fp32 rows (a MoE layer's weighted expert outputs), rounded to the dtype
        h = round_to(sum_rows(x_ptr + row * stride_x, PARTS, stride_part, BLOCK, N), dtype, FIX_BF16).to(tl.float32)
    else:
        h = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    norm_row(h, res_ptr + row * stride_r, pre_w_ptr, w_ptr, out_ptr + row * stride_o, res_out_ptr + row * stride_ro,
             out32_ptr + row * stride_o32, N, eps, BLOCK, HAS_RES, PRE_NORM, FIX_BF16, FP32_OUT)


@triton.jit
def sum_rows(first_row, COUNT: tl.constexpr, stride, BLOCK: tl.constexpr, N):
    """The sum of COUNT fp32 rows spaced `stride` apart, added in order (the combine kernel's order, and a result
    that does not depend on which program sums): [BLOCK] fp32, zeros past N. Unrolled, so the COUNT loads are
    independent and issue together: a last-program epilogue then waits for memory once, not COUNT times."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(COUNT):
        total += tl.load(first_row + i * stride + offs, mask=offs < N, other=0.0)
    return total


@triton.jit
def norm_row(h, res_row, pre_w_ptr, w_ptr, out_row, res_out_row, out32_row, N, eps,
             BLOCK: tl.constexpr, HAS_RES: tl.constexpr, PRE_NORM: tl.constexpr, FIX_BF16: tl.constexpr,
             FP32_OUT: tl.constexpr):
    """The norm family on one row h ([BLOCK] fp32 holding dtype values, N valid): optionally RMSNorm_pre(h), then
    optionally the residual add (new residual stored), then RMSNorm and the stores. Each intermediate is rounded
    to the output dtype as the module code rounds it. Shared by the norm kernel, the embedding kernel and the
    last-program epilogues (`linear_triton`, the MoE down kernel)."""
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    dtype = out_row.dtype.element_ty
    if PRE_NORM:  # h = RMSNorm_pre(x), rounded to the dtype
        r0 = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        w0 = tl.load(pre_w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = round_to(w0 * (h * r0), dtype, FIX_BF16).to(tl.float32)
    if HAS_RES:  # new residual = h + residual, rounded to the dtype
        res = tl.load(res_row + offs, mask=ok, other=0.0).to(tl.float32)
        s = round_to(h + res, dtype, FIX_BF16)
        tl.store(res_out_row + offs, s, mask=ok)
        h = s.to(tl.float32)
    r = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    normed = round_to(w * (h * r), dtype, FIX_BF16)
    tl.store(out_row + offs, normed, mask=ok)
    if FP32_OUT:  # the same values widened: what `normed.float()` would copy (the router's fp32 input)
        tl.store(out32_row + offs, normed.to(tl.float32), mask=ok)


def _launch_rms(x, residual, pre_weight, weight, eps, parts: int = 0, fp32_out: bool = False):
    """x [..., N] (with `parts`: [rows, parts, N] fp32 rows summed first, the result in residual's dtype)."""
    if parts:
        if residual is None or x.dim() != 3 or x.shape[1] != parts or x.dtype != torch.float32 or x.stride(-1) != 1:
            raise ValueError(f"parts {tuple(x.shape)} {x.dtype}: need [rows, {parts}, N] fp32 and a residual")
        shape, dtype = residual.shape, residual.dtype
        x2 = x
        stride_x, stride_part = x.stride(0), x.stride(1)
    else:
        shape, dtype = x.shape, x.dtype
        x2 = _rows(x)
        stride_x, stride_part = x2.stride(0), 0
    n = shape[-1]
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=dtype, device=x.device)
    if residual is not None:
        if residual.shape != shape or residual.dtype != dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                             f"{tuple(shape)} {dtype}")
        r2 = _rows(residual)
        res_out = torch.empty(rows, n, dtype=dtype, device=x.device)
    else:
        r2 = res_out = out  # unused
    out32 = torch.empty(rows, n, dtype=torch.float32, device=x.device) if fp32_out else out
    w = weight.contiguous()
    pw = pre_weight.contiguous() if pre_weight is not None else w
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            x2, r2, pw, w, out, res_out, out32,
            n, stride_x, stride_part, r2.stride(0), out.stride(0), res_out.stride(0), out32.stride(0), float(eps),
            BLOCK=block, HAS_RES=residual is not None, PRE_NORM=pre_weight is not None,
            FIX_BF16=fix_bf16(dtype), PARTS=parts, FP32_OUT=fp32_out, num_warps=_row_warps(block),
        )
    results = [out.view(shape)]
    if residual is not None:
        results.append(res_out.view(shape))
    if fp32_out:
        results.append(out32.view(shape))
    return results[0] if len(results) == 1 else tuple(results)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_rms(x, None, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_rms(x, residual, None, weight, eps)


def norm_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                      next_weight: torch.Tensor, eps: float, fp32_copy: bool = False) -> tuple[torch.Tensor, ...]:
    return _launch_rms(x, residual, post_weight, next_weight, eps, fp32_out=fp32_copy)


def sum_norm_add_rms_norm(parts: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor,
                          next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_rms(parts, residual, post_weight, next_weight, eps, parts=parts.shape[1])


# --------------------------------------------------------------------------------------------- q/k norm + RoPE
@triton.jit
def norm_rope_rows(rows_ptr, row_mask, stride_d, w_ptr, cos_ptr, sin_ptr, eps,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, FIX_BF16: tl.constexpr):
    """Head rows at rows_ptr ([R, 1] pointers, elements stride_d apart): RMSNorm over the head dim (fp32 weight),
    then neox RoPE with the cos/sin row when ROPE, each step rounded to the rows' dtype as
    `kernels.norm.qk_norm_rope_reference` rounds it; rotate_half is a second load at the swapped offsets.
    -> [R, BLOCK_D] in that dtype. Shared by the q/k norm kernel and the decode attention kernel."""
    dtype = rows_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    mask = row_mask & d_ok[None, :]
    x = tl.load(rows_ptr + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
    w = tl.load(w_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    n = round_to(w * (x * r), dtype, FIX_BF16)
    if ROPE:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product and the sum rounded
        HALF: tl.constexpr = HEAD_DIM // 2
        swapped = (offs_d + HALF) % HEAD_DIM
        x_sw = tl.load(rows_ptr + swapped[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        w_sw = tl.load(w_ptr + swapped, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        n_sw = round_to(w_sw * (x_sw * r), dtype, FIX_BF16).to(tl.float32)
        rot = tl.where((offs_d < HALF)[None, :], -n_sw, n_sw)
        c = tl.load(cos_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        a = round_to(n.to(tl.float32) * c, dtype, FIX_BF16).to(tl.float32)
        rs = round_to(rot * s, dtype, FIX_BF16).to(tl.float32)
        n = round_to(a + rs, dtype, FIX_BF16)
    return n


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
    HQ, HK, q_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_ct, stride_st, eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    """Program (t, hb): BLOCK_H heads of token t, q's first (hb < q_blocks), then k's."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    cos_row = cos_ptr + t * stride_ct
    sin_row = sin_ptr + t * stride_st
    if hb < q_blocks:
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = (heads < HQ)[:, None]
        n = norm_rope_rows(q_ptr + t * stride_qt + heads[:, None] * stride_qh, ok, 1, qw_ptr, cos_row, sin_row, eps,
                           HEAD_DIM, BLOCK_D, ROPE, FIX_BF16)
        tl.store(qo_ptr + t * stride_qot + heads[:, None] * stride_qoh + offs_d[None, :], n, mask=ok & d_ok[None, :])
    else:
        heads = (hb - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = (heads < HK)[:, None]
        n = norm_rope_rows(k_ptr + t * stride_kt + heads[:, None] * stride_kh, ok, 1, kw_ptr, cos_row, sin_row, eps,
                           HEAD_DIM, BLOCK_D, ROPE, FIX_BF16)
        tl.store(ko_ptr + t * stride_kot + heads[:, None] * stride_koh + offs_d[None, :], n, mask=ok & d_ok[None, :])


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor | None, sin: torch.Tensor | None,
                 apply_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t, hq, d = q.shape
    hk = k.shape[1]
    if k.shape[0] != t or k.shape[2] != d or d % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same T and an even head dim")
    if k.dtype != q.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    q, k = _heads_view(q), _heads_view(k)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if apply_rope:
        if cos is None or sin is None or cos.shape != (t, d) or sin.shape != (t, d):
            raise ValueError(f"RoPE needs cos/sin of shape {(t, d)}")
        cos, sin = _rows(cos), _rows(sin)
    else:
        cos = sin = q  # unused
    if t == 0:
        return qo, ko
    block_d = triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hk)), max(1, 2048 // block_d)))
    q_blocks = triton.cdiv(hq, block_h)
    grid = (t, q_blocks + triton.cdiv(hk, block_h))
    _qk_norm_rope_kernel[grid](
        q, k, qo, ko, q_weight.contiguous(), k_weight.contiguous(), cos, sin,
        hq, hk, q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        cos.stride(0), sin.stride(0), float(eps),
        HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, ROPE=bool(apply_rope), FIX_BF16=fix_bf16(q.dtype),
        num_warps=4,
    )
    return qo, ko


# --------------------------------------------------------------------------------------------- sigmoid gate
@triton.jit
def _sigmoid_gate_kernel(o_ptr, g_ptr, out_ptr, numel, BLOCK: tl.constexpr, FIX_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    dtype = out_ptr.dtype.element_ty
    o = tl.load(o_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = round_to(tl.sigmoid(g), dtype, FIX_BF16).to(tl.float32)  # torch rounds sigmoid(gate) to the dtype
    tl.store(out_ptr + offs, round_to(o * s, dtype, FIX_BF16), mask=ok)


def sigmoid_gate(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if o.shape != gate.shape or o.dtype != gate.dtype:
        raise ValueError(f"o {tuple(o.shape)} {o.dtype} and gate {tuple(gate.shape)} {gate.dtype} must match")
    o_c, g_c = o.contiguous(), gate.contiguous()
    out = torch.empty(o.shape, dtype=o.dtype, device=o.device)
    numel = o.numel()
    if numel:
        block = 1024
        _sigmoid_gate_kernel[(triton.cdiv(numel, block),)](o_c, g_c, out, numel, BLOCK=block,
                                                            FIX_BF16=fix_bf16(o.dtype), num_warps=4)
    return out


# --------------------------------------------------------------------------------------------- SwiGLU activation
@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
                     FIX_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    dtype = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0).to(tl.float32)
    act = round_to(g * tl.sigmoid(g), dtype, FIX_BF16).to(tl.float32)  # torch rounds silu(gate) to the dtype
    tl.store(out_ptr + row * stride_o + offs, round_to(act * u, dtype, FIX_BF16), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., N] rows (unit stride in N, any row stride: the two halves of one GEMM's output)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    g2, u2 = _rows(gate), _rows(up)
    n = gate.shape[-1]
    out = torch.empty(g2.shape[0], n, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
            g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block, FIX_BF16=fix_bf16(gate.dtype),
            num_warps=4)
    return out.view(gate.shape)
