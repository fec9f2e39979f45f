"""Block-scaled FP8 GEMMs and the fused MoE over FP8 experts in Triton, each beside its pure-torch reference.

Weights are as `quant.fp8` stores them: W [N, K] float8_e4m3fn with fp32 scales over blocks `block` = (bn, bk)
(scale grid [ceil(N / bn), ceil(K / bk)], edge blocks partial); x [M, K] in bf16, fp16 or fp32; y in x's dtype.
One GEMM kernel (`_fp8_gemm_kernel`), two modes:

* w8a16 (`A8` False; `linear_fp8_gpu(..., act_group=None)`): y = x @ dequant(W)^T. Each program widens its fp8
  weight tile to fp32, multiplies it by the blocks' scales and rounds once to x's dtype, which is exactly what
  `quant.fp8.dequantize` does, then runs the tensor-core dot in x's dtype with fp32 accumulation. Any GPU.
  Reference: `kernels.fp8.linear_fp8_reference`.
* w8a8 (`A8` True; `act_group=128`, the DeepSeek-V3 scheme and Trinity FP8-Block's dynamic activations): x is
  quantized per token and group of columns (`_quantize_acts_kernel`: scale = absmax / 448), then each K tile is an
  fp8 x fp8 dot whose fp32 result is scaled by the tile's x-group scales [BLOCK_M] and weight-block scales
  [BLOCK_N] and added into an fp32 accumulator. Promoting every K tile out of the tensor cores is also what keeps
  Hopper's fp8 dot accurate: its own accumulator keeps about 14 bits (DeepSeek-V3 report, 3.3.2). Needs fp8 tensor
  cores (CUDA 8.9+); elsewhere the activations are fake-quantized by the same kernel, then go through the w8a16
  GEMM (the reference's own arithmetic). Reference: `quant.fp8.fake_quantize_activations(x, group)`, then the
  w8a16 one.

Scales are applied per K tile, so a tile must lie within one scale column: BLOCK_K divides bk (and the activation
group), or one column spans K. w8a16 takes any other block by gathering a scale per element (`SCALE_2D`); w8a8
then runs as fake-quantized activations + w8a16.

Decode sizes (M <= 16) split K across programs when the output tiles alone would leave SMs idle: each split
writes an fp32 partial and torch sums them in a fixed order (deterministic, one extra small launch).

`fused_moe_fp8` is `moe_triton.fused_moe` over `quant.modules.Fp8Experts`' weights: the same alignment and
combine, with gate_up + SwiGLU and down GEMMs that dequantize their fp8 tiles as the w8a16 GEMM does.

Portability: fp8 values are loaded natively (Triton's float8e4nv) only where Triton supports that type, CUDA 8.9+
(and the interpreter); elsewhere (Ampere, AMD: MI300's fp8 is the fnuz variant, MI350's OCP fp8 is still to be
verified) the kernels read the bytes as uint8 and widen them by bit manipulation (`_fp8_to_f32`, `BITS`).

Interpreter notes (TRITON_INTERPRET=1): bf16 dots run on fp32 copies (`UPCAST`) and fp32 -> bf16 casts are
rounded by hand (`norm_triton.round_to`), as in `moe_triton`; its fp32 -> fp8 cast rounds wrongly, so
activations are rounded to e4m3 by hand everywhere (`_round_e4m3`, exact and cheap). Its fp8 x fp8 dots work
(exact products summed in fp32, where Hopper's tensor cores keep fewer bits within a K tile: the tests allow for
it on a GPU), so the w8a8 path runs there as it is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import interpreting
from .norm_triton import fix_bf16, round_to
from .pdl import launch_options, wait_then_release

FP8 = torch.float8_e4m3fn
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PER_TOKEN = 0  # act_group value: one activation scale per token (compressed-tensors' `token` strategy)


# --------------------------------------------------------------------------------------------- devices
@functools.cache
def _cuda_capability(index: int) -> tuple[int, int] | None:
    """The CUDA capability, or None on ROCm (whose devices take the portable paths)."""
    if torch.version.hip:
        return None
    return torch.cuda.get_device_capability(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def native_fp8(device: torch.device) -> bool:
    """Whether Triton has the e4m3fn type here (loads, casts and tensor-core dots on fp8 operands): CUDA 8.9+
    (Ada, Hopper, Blackwell), and the interpreter."""
    if device.type != "cuda":
        return interpreting()
    cap = _cuda_capability(_index(device))
    return cap is not None and cap >= (8, 9)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _program_target(device: torch.device) -> int:
    """Programs that keep the device busy: two per SM; in the interpreter a few, so the tests cross splits."""
    return 2 * _sm_count(_index(device)) if device.type == "cuda" else 4


# --------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _fp8_to_f32(raw, BITS: tl.constexpr):
    """e4m3fn values -> fp32 (exact). BITS: `raw` is their bytes (uint8), widened by moving the sign, exponent and
    mantissa into an fp16's (exponent bias 15 instead of 7: times 2^8 after the exact fp16 -> fp32 widening;
    subnormals land on fp16 subnormals, which GPUs do not flush). NaN bytes (never in a weight) read as +-480."""
    if BITS:
        b = raw.to(tl.uint16)
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    else:
        return raw.to(tl.float32)


@triton.jit
def _round_e4m3(x):
    """fp32 x -> the nearest e4m3fn value (ties to even), saturated at +-448, still in fp32: torch's cast of
    x.clamp(-448, 448). Adding then subtracting c = 2^(e + 20), e = |x|'s binade (at least -6, e4m3's smallest
    normal one), leaves |x| a multiple of 2^(e - 3), its e4m3 spacing, by fp32's own round-to-nearest-even. By
    hand because Triton's interpreter casts fp32 -> fp8 wrongly; on a GPU it costs a few ALU operations."""
    a = tl.minimum(tl.abs(x), 448.0)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    c = ((e + 20 + 127) << 23).to(tl.float32, bitcast=True)
    r = (a + c) - c
    return tl.where(x < 0, -r, r)


@triton.jit
def _weight_tile(w_ptrs, s_rows, k0, offs_k, n_ok, k_ok, bk, stride_sk, dtype: tl.constexpr,
                 SCALE_2D: tl.constexpr, BITS: tl.constexpr, FIX_BF16: tl.constexpr):
    """The weight tile [BLOCK_N, BLOCK_K] dequantized into `dtype` as `quant.fp8.dequantize` does it (fp32 product,
    one rounding). s_rows [BLOCK_N]: each row's scale row. The tile's K range lies in scale column k0 // bk unless
    SCALE_2D, where each element gathers its own."""
    mask = n_ok[:, None] & k_ok[None, :]
    w = _fp8_to_f32(tl.load(w_ptrs, mask=mask, other=0.0), BITS)
    if SCALE_2D:
        s = tl.load(s_rows[:, None] + ((k0 + offs_k) // bk)[None, :] * stride_sk, mask=mask, other=0.0)
    else:
        s = tl.load(s_rows + (k0 // bk) * stride_sk, mask=n_ok, other=0.0)[:, None]
    return round_to(w * s, dtype, FIX_BF16)


@triton.jit
def _dot_wt(a, w, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a [BM, BK] @ w [BN, BK]^T (bf16 operands on fp32 copies in the interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)


# --------------------------------------------------------------------------------------------- activations
@triton.jit
def _quantize_acts_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                          GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                          FAKE: tl.constexpr, FIX_BF16: tl.constexpr):
    """Rows [BLOCK_R] x one group of GROUP columns: scale = absmax / 448 (1 for an all-zero group), q = x / scale
    rounded to e4m3 (`quant.fp8.fake_quantize_activations`' arithmetic, IEEE divisions included). Writes q (fp8)
    and the scales [M, groups] in fp32; FAKE: q * scale in q's dtype instead (what the reference computes with),
    and no scales."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * GROUP + tl.arange(0, BLOCK_G)
    ok = (offs_r < M)[:, None] & (offs_c < K)[None, :] & (tl.arange(0, BLOCK_G) < GROUP)[None, :]
    rows = offs_r[:, None].to(tl.int64)
    x = tl.load(x_ptr + rows * stride_xm + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, tl.div_rn(amax, 448.0), 1.0)
    q = _round_e4m3(tl.div_rn(x, scale[:, None]))
    if FAKE:
        tl.store(q_ptr + rows * stride_qm + offs_c[None, :], round_to(q * scale[:, None], q_ptr.dtype.element_ty,
                                                                      FIX_BF16), mask=ok)
    else:
        tl.store(q_ptr + rows * stride_qm + offs_c[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + offs_r * stride_sm + tl.program_id(1), scale, mask=offs_r < M)


def _group_width(group: int, k: int) -> int:
    """The activation group's width in columns (PER_TOKEN: the whole row)."""
    return k if group == PER_TOKEN else group


def quantize_activations(x: torch.Tensor, group: int, fake: bool = False):
    """x [M, K] -> (q [M, K] float8_e4m3fn, scales [M, ceil(K / g)] fp32) per token and group of g = `group`
    columns (PER_TOKEN: one group per row); `fake`: q * scale in x's dtype alone, the w8a16 path's input and
    `quant.fp8.fake_quantize_activations(x, group or None)` exactly. None where the kernel does not take the group
    (wider than 8192 columns)."""
    m, k = x.shape
    g = _group_width(group, k)
    block_g = triton.next_power_of_2(max(g, 1))
    if block_g > 8192:
        return None
    groups = triton.cdiv(k, g)
    q = torch.empty(m, k, dtype=x.dtype if fake else FP8, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    block_r = max(1, min(16, 4096 // block_g, triton.next_power_of_2(max(m, 1))))
    if m and k:
        _quantize_acts_kernel[(triton.cdiv(m, block_r), groups)](
            x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), GROUP=g, BLOCK_R=block_r, BLOCK_G=block_g,
            FAKE=fake, FIX_BF16=fix_bf16(x.dtype) and fake, num_warps=4 if block_g * block_r >= 2048 else 1)
    return q if fake else (q, s)


# --------------------------------------------------------------------------------------------- GEMM
@triton.jit
def _fp8_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, M, N, K, k_per_split, bn, bk, group,
    stride_xm, stride_xsm, stride_wn, stride_sn, stride_sk, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, A8: tl.constexpr,
    SCALE_2D: tl.constexpr, BITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    FIX_BF16: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """Program (m tile, n tile, k split): out[split, m, n] = x[m, keys of the split] . W[n, same keys], with W's
    block scales (and with A8, x fp8 with its group scales xs [M, groups]); out in x's dtype when there is one
    split, else the split's fp32 partial."""
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    s_rows = s_ptr + (offs_n // bn) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < k_hi - k0
        a = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ptrs = w_rows + (k0 + offs_k)[None, :]
        if A8:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(a, tl.trans(w))  # fp8 x fp8, exact products, fp32 sums
            xs = tl.load(xs_ptr + offs_m * stride_xsm + k0 // group, mask=m_ok, other=0.0)
            ws = tl.load(s_rows + (k0 // bk) * stride_sk, mask=n_ok, other=0.0)
            acc += part * xs[:, None] * ws[None, :]
        else:
            w = _weight_tile(w_ptrs, s_rows, k0, offs_k, n_ok, k_ok, bk, stride_sk, x_ptr.dtype.element_ty,
                             SCALE_2D, BITS, FIX_BF16)
            acc = _dot_wt(a, w, acc, UPCAST, PRECISION)
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


def gemm_config(m: int, a8: bool, dtype: torch.dtype) -> GemmConfig:
    """Tiles by rows: decode (M <= 16) streams the weight with narrow tiles (and K splits); prefill takes 64 x 128
    output tiles over 128-key tiles (one scale column of 128 x 128 blocks), 8 warps. Chosen from the sm_90 compile
    (registers without spills: w8a8 177, w8a16 128, where 4 warps take 240 and 255), not timings: see
    benchmarks/gpu_session.sh. The prefill w8a8 dot is fp8 wgmma (e4m3 x e4m3); at 16 rows Triton lowers it to fp16
    mma.sync on widened operands (exact: the same products), which decode, bound by the weight's bytes, can afford."""
    if a8:  # fp8 operands whatever x's dtype
        return GemmConfig(16, 64, 128, 4, 4) if m <= 16 else GemmConfig(64, 128, 128, 8, 3)
    if dtype == torch.float32:  # IEEE fp32 dots run on the FMA units: smaller tiles (larger ones spill)
        return GemmConfig(16, 32, 64, 4, 4) if m <= 16 else GemmConfig(64, 64, 32, 8, 3)
    return GemmConfig(16, 32, 128, 4, 4) if m <= 16 else GemmConfig(64, 128, 128, 8, 3)


def _k_tile(target: int, k: int, widths: tuple[int, ...], minimum: int) -> int | None:
    """The largest power-of-two K tile <= target (and <= K rounded up) lying in one column of every scale grid of
    the given column widths (a width >= K is one column), or None under `minimum`."""
    tile = min(target, max(minimum, triton.next_power_of_2(k)))
    while tile >= minimum:
        if all(w % tile == 0 or w >= k for w in widths):
            return tile
        tile //= 2
    return None


def _splits(tiles: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split, a multiple of block_k): K split across up to 8 programs when the output tiles
    alone are fewer than the device's program target (decode), none otherwise."""
    k_tiles = triton.cdiv(k, block_k)
    splits = max(1, min(8, k_tiles, triton.cdiv(_program_target(device), tiles)))
    per_split = triton.cdiv(k_tiles, splits) * block_k
    return triton.cdiv(k, per_split), per_split


def _fit(block: int, size: int) -> int:
    """A tile shrunk to the problem (power of two, >= 16 for tl.dot)."""
    return max(16, min(block, triton.next_power_of_2(max(size, 1))))


def usable(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> bool:
    """What the kernels take: x [..., K] in bf16/fp16/fp32 on a device Triton runs on, W [N, K] e4m3fn with unit
    stride in K, fp32 scales [ceil(N / bn), ceil(K / bk)]."""
    if x.dtype not in DTYPES or weight.dtype != FP8 or weight.dim() != 2 or scale.dim() != 2:
        return False
    if not x.device == weight.device == scale.device or (x.device.type != "cuda" and not interpreting()):
        return False
    n, k = weight.shape
    return (x.shape[-1] == k and k > 0 and n > 0 and weight.stride(-1) == 1
            and tuple(scale.shape) == (triton.cdiv(n, block[0]), triton.cdiv(k, block[1])))


def linear_fp8_gpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   act_group: int | None = None) -> torch.Tensor | None:
    """y = x @ dequant(weight)^T in x's dtype, or None where the kernels do not take these tensors (`usable`).

    act_group None: x as given (w8a16; `kernels.fp8.linear_fp8`'s contract). An int: x quantized dynamically per
    token and group of that many columns (PER_TOKEN = 0: per token), as a checkpoint with dynamic fp8 activations
    computes: w8a8 on fp8 tensor cores where the device has them and the tiles fit the groups and blocks, else the
    same activations fake-quantized then w8a16. Pass such an x raw, not through `quant.modules._activations_in`."""
    if not usable(x, weight, scale, block):
        return None
    return _linear(x, weight, scale, block, act_group)


def _linear(x, weight, scale, block, act_group, a8: bool | None = None, bits: bool | None = None,
            config: GemmConfig | None = None) -> torch.Tensor | None:
    """`linear_fp8_gpu` with its choices open to tests: a8 (None: w8a8 where possible), bits (None: native fp8
    loads where possible), config (None: `gemm_config`)."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    native = native_fp8(x.device)
    bits = not native if bits is None else bits
    if act_group is not None and a8 is not False and native:
        cfg = config or gemm_config(m, True, x.dtype)
        block_k = _k_tile(cfg.block_k, k, (block[1], _group_width(act_group, k)), 32)  # fp8 dots: K >= 32
        quantized = quantize_activations(x2, act_group) if block_k else None
        if quantized is not None:
            xq, xs = quantized
            y = _gemm(xq, xs, weight, scale, block, _group_width(act_group, k), replace(cfg, block_k=block_k),
                      True, False, x.dtype)
            return y.view(*x.shape[:-1], n)
    if act_group is not None:  # w8a8's arithmetic on the activations, then w8a16
        x2 = quantize_activations(x2, act_group, fake=True)
        if x2 is None:
            return None
    cfg = config or gemm_config(m, False, x.dtype)
    block_k = _k_tile(cfg.block_k, k, (block[1],), 16)
    # gathered scales: a [BLOCK_N, BLOCK_K] fp32 tile each step, which the pipeline stages in shared memory too
    cfg = replace(cfg, block_k=block_k or _fit(min(cfg.block_k, 64), k))
    y = _gemm(x2, None, weight, scale, block, 1, cfg, False, bits, x.dtype, scale_2d=block_k is None)
    return y.view(*x.shape[:-1], n)


def _gemm(x2, xs, weight, scale, block, group, cfg: GemmConfig, a8: bool, bits: bool, dtype: torch.dtype,
          scale_2d: bool = False) -> torch.Tensor:
    """One launch of `_fp8_gemm_kernel` (and the sum of its K splits) -> y [M, N] in `dtype`."""
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=dtype, device=x2.device)
    if m == 0:
        return y
    block_m, block_n = _fit(cfg.block_m, m), _fit(cfg.block_n, n)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, per_split = _splits(tiles, k, cfg.block_k, x2.device) if m <= 16 else (1, k)
    out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x2.device)
    w = weight.view(torch.uint8) if bits else weight
    scale = scale.float()
    _fp8_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
        x2, xs if xs is not None else scale, w, scale, out, m, n, k, per_split, block[0], block[1], group,
        x2.stride(0), xs.stride(0) if xs is not None else 0, weight.stride(0), scale.stride(0), scale.stride(1),
        out.stride(0) if splits > 1 else 0, out.stride(-2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, A8=a8, SCALE_2D=scale_2d, BITS=bits,
        UPCAST=interpreting() and dtype == torch.bfloat16, PRECISION="ieee" if dtype == torch.float32 else "tf32",
        FIX_BF16=fix_bf16(dtype), SPLIT=splits > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_options(x2.device))
    return y if splits == 1 else out.sum(0).to(dtype)  # the splits in a fixed order


# --------------------------------------------------------------------------------------------- fused MoE
@triton.jit
def _fp8_gate_up_swiglu_kernel(
    x_ptr, w_ptr, s_ptr, act_ptr, slots_ptr, block_expert_ptr,
    num_slots, top_k, N, K, num_experts, bn, bk, up_rows,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_as,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_2D: tl.constexpr,
    BITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """`moe_triton._gate_up_swiglu_kernel` over fp8 experts: act[slot, n] = silu(x[t] . gate[e, n]) * (x[t] .
    up[e, n]), each weight tile dequantized into x's dtype; the up half's scales start at block row `up_rows`."""
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
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_xt
    g_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    u_rows = g_rows + N * stride_wn
    gs_rows = s_ptr + expert.to(tl.int64) * stride_se + (offs_n // bn) * stride_sn
    us_rows = gs_rows + up_rows * stride_sn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_rows + (k0 + offs_k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = _weight_tile(g_rows + (k0 + offs_k)[None, :], gs_rows, k0, offs_k, n_ok, k_ok, bk, stride_sk, dtype,
                         SCALE_2D, BITS, FIX_BF16)
        acc_g = _dot_wt(a, g, acc_g, UPCAST, PRECISION)
        u = _weight_tile(u_rows + (k0 + offs_k)[None, :], us_rows, k0, offs_k, n_ok, k_ok, bk, stride_sk, dtype,
                         SCALE_2D, BITS, FIX_BF16)
        acc_u = _dot_wt(a, u, acc_u, UPCAST, PRECISION)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out = act_ptr + slots[:, None].to(tl.int64) * stride_as + offs_n[None, :]
    tl.store(out, round_to(act, act_ptr.dtype.element_ty, FIX_BF16), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_down_kernel(
    act_ptr, w_ptr, s_ptr, rw_ptr, y_ptr, slots_ptr, block_expert_ptr,
    num_slots, N, K, num_experts, bn, bk,
    stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_ys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_2D: tl.constexpr,
    BITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """`moe_triton._down_kernel` over fp8 experts (without its norm epilogue): y[slot, n] = routing_weight[slot] *
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
    a_rows = act_ptr + safe[:, None].to(tl.int64) * stride_as
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    s_rows = s_ptr + expert.to(tl.int64) * stride_se + (offs_n // bn) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(w_rows + (k0 + offs_k)[None, :], s_rows, k0, offs_k, n_ok, k_ok, bk, stride_sk,
                         act_ptr.dtype.element_ty, SCALE_2D, BITS, FIX_BF16)
        acc = _dot_wt(a, w, acc, UPCAST, PRECISION)
    rw = tl.load(rw_ptr + safe, mask=row_ok, other=0.0).to(tl.float32)
    out = y_ptr + slots[:, None].to(tl.int64) * stride_ys + offs_n[None, :]
    tl.store(out, acc * rw[:, None], mask=row_ok[:, None] & n_ok[None, :])


def moe_usable(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor, gate_block: tuple[int, int],
               down: torch.Tensor, down_scale: torch.Tensor, down_block: tuple[int, int]) -> bool:
    """The shapes and layouts `fused_moe_fp8` takes (`quant.modules.Fp8Experts`' own), on a Triton device."""
    if x.dtype not in DTYPES or gate_up.dtype != FP8 or down.dtype != FP8 or x.dim() != 2:
        return False
    if x.device.type != "cuda" and not interpreting():
        return False
    e, two_i, h = gate_up.shape
    inter = two_i // 2
    g_rows, g_cols = triton.cdiv(inter, gate_block[0]), triton.cdiv(h, gate_block[1])
    d_grid = (triton.cdiv(h, down_block[0]), triton.cdiv(inter, down_block[1]))
    return (x.shape[1] == h and two_i == 2 * inter and inter > 0 and tuple(down.shape) == (e, h, inter)
            and tuple(gate_up_scale.shape) == (e, 2 * g_rows, g_cols) and tuple(down_scale.shape) == (e, *d_grid)
            and gate_up.stride(-1) == 1 and down.stride(-1) == 1)


def fused_moe_fp8(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                  gate_up_scale: torch.Tensor, gate_block: tuple[int, int], down: torch.Tensor,
                  down_scale: torch.Tensor, down_block: tuple[int, int], act_group: int | None = None,
                  config=None, bits: bool | None = None) -> torch.Tensor | None:
    """`quant.modules.Fp8Experts.forward` fused: x [T, H]; weights [T, k] fp32 and ids [T, k] (each token's
    routing); the experts' fp8 weights and scales as `Fp8Experts` holds them -> [T, H] in x's dtype, or None where
    `moe_usable` says no. act_group: the dynamic activations' group (None: none; PER_TOKEN: per token), applied to
    x and to the SwiGLU output as the module's `_activations_in` does (each fake-quantized by one launch; the GEMMs
    are w8a16). `Fp8Experts.forward` calls it first on the Triton path and keeps its loop for None.
    """
    from .moe_triton import (ALIGN_KERNEL_MAX_SLOTS, _combine_kernel, get_config, moe_align,
                             moe_align_triton)

    if not moe_usable(x, gate_up, gate_up_scale, gate_block, down, down_scale, down_block):
        return None
    num_tokens, hidden = x.shape
    num_experts, inter = gate_up.shape[0], down.shape[2]
    top_k = ids.shape[1]
    if num_tokens == 0:
        return torch.empty_like(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if act_group is not None:
        x = quantize_activations(x, act_group, fake=True)
        if x is None:
            return None
    cfg = moe_config(config or get_config(num_tokens, hidden, inter, num_experts, top_k), x.dtype)
    up_n, down_n = _fit(cfg.up_n, inter), _fit(cfg.down_n, hidden)
    up_k, up_2d = _moe_k_tile(cfg.up_k, hidden, gate_block[1])
    down_k, down_2d = _moe_k_tile(cfg.down_k, inter, down_block[1])
    if ids.numel() <= ALIGN_KERNEL_MAX_SLOTS:
        slots, block_expert = moe_align_triton(ids, num_experts, cfg.block_m)
    else:
        slots, block_expert = moe_align(ids, num_experts, cfg.block_m)
    num_slots, num_blocks = ids.numel(), block_expert.numel()
    bits = not native_fp8(x.device) if bits is None else bits
    gu, dn = (gate_up.view(torch.uint8), down.view(torch.uint8)) if bits else (gate_up, down)
    gus, ds = gate_up_scale.float(), down_scale.float()
    common = dict(BLOCK_M=cfg.block_m, BITS=bits, UPCAST=interpreting() and x.dtype == torch.bfloat16,
                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32", FIX_BF16=fix_bf16(x.dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device))

    act = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    _fp8_gate_up_swiglu_kernel[(num_blocks, triton.cdiv(inter, up_n))](
        x, gu, gus, act, slots, block_expert, num_slots, top_k, inter, hidden, num_experts,
        gate_block[0], gate_block[1], gate_up_scale.shape[1] // 2,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), gus.stride(0), gus.stride(1), gus.stride(2), act.stride(0),
        BLOCK_N=up_n, BLOCK_K=up_k, SCALE_2D=up_2d, **common)
    if act_group is not None:
        act = quantize_activations(act, act_group, fake=True)
        if act is None:
            return None

    y = torch.empty(num_slots, hidden, dtype=torch.float32, device=x.device)
    rw = weights.reshape(-1).to(torch.float32).contiguous()
    _fp8_down_kernel[(num_blocks, triton.cdiv(hidden, down_n))](
        act, dn, ds, rw, y, slots, block_expert, num_slots, hidden, inter, num_experts, down_block[0], down_block[1],
        act.stride(0), down.stride(0), down.stride(1), ds.stride(0), ds.stride(1), ds.stride(2), y.stride(0),
        BLOCK_N=down_n, BLOCK_K=down_k, SCALE_2D=down_2d, **common)

    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    comb_n = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(num_tokens, triton.cdiv(hidden, comb_n))](
        y, out, hidden, top_k, y.stride(0), out.stride(0), BLOCK_N=comb_n, FIX_BF16=fix_bf16(x.dtype), num_warps=4)
    return out


def moe_config(cfg, dtype: torch.dtype):
    """`moe_triton`'s config for these kernels: with fp32 x, 32-key tiles (16 for 64-row blocks): IEEE fp32 dots run
    on the FMA units, and the sm_90 compile spills past these next to the dequantized weight tiles."""
    if dtype != torch.float32:
        return cfg
    keys = 16 if cfg.block_m >= 64 else 32
    return replace(cfg, up_k=min(cfg.up_k, keys), down_k=min(cfg.down_k, keys))


def _moe_k_tile(target: int, k: int, bk: int) -> tuple[int, bool]:
    """(K tile, SCALE_2D) for an expert GEMM: a tile within one scale column, else the config's with gathered
    scales."""
    tile = _k_tile(target, k, (bk,), 16)
    return (tile, False) if tile else (_fit(target, k), True)
