"""A skinny projection followed by the sandwich-norm step, in one launch (reference in `kernels.linear_norm`).

At decode the output projection of attention (and the dense MLP's down projection) is a GEMV of a few rows, and
the norm step after it (`norm_add_rms_norm`: post-norm, residual add, next pre-norm) needs whole rows of its
output, so it has always been a second launch. Here the projection's programs each write an fp32 tile of the
output, and the program that finishes last (`kernels.last_program`) sums the key splits of each row in order,
rounds the row to the dtype (as the projection's own output would be), and runs the norm step on it
(`norm_triton.norm_row`). The unrounded tiles never leave fp32.

Layout: program (n tile, k split, m tile) computes rows [BLOCK_M] x columns [BLOCK_N] over its share of K with
tl.dot (x [BLOCK_M, BLOCK_K] times the weight tile [BLOCK_N, BLOCK_K] transposed). The weight is the long operand
and is read once; splitting K keeps enough programs in flight to stream it at small N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_triton import _dot_precision, _mm, _program_target, _upcast_dot
from .last_program import arrival_counters, arrive
from .norm_triton import fix_bf16, norm_row, round_to, sum_rows
from .pdl import launch_options, wait_then_release

# The fused path's row limit. Its epilogue goes through the rows one after another in a single program (each row
# waits for its loads: about two memory round trips), and with more rows fewer key splits are allowed (below), so
# fewer programs stream the weight. Both only pay while rows are few; larger batches take the library GEMM and the
# norm kernel as two launches. A first guess from that arithmetic, to be timed (benchmarks/last_program_gpu.py).
MAX_ROWS = 4
# Programs per SM the split GEMV aims for. Its loop is not software-pipelined (the sm_90 compile shows no
# multi-buffering for these tile sizes), so each program has one [16 x BLOCK_K] weight tile in flight per memory
# round trip (~4 KB per ~0.7 us): the bandwidth has to come from several programs per SM.
PROGRAMS_PER_SM = 4


@triton.jit
def gemm_split_tile(x_ptr, w_ptr, ws_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_ws, stride_wsm,
                    pid_n, split, pid_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program's share of y = x @ w.T: rows [BLOCK_M] x columns [BLOCK_N] over keys split * k_per_split
    onwards, stored unrounded (fp32) to the workspace ws[split, m, n] for the last program to sum."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = k0 + offs_k < k_hi
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + (k0 + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _mm(x, tl.trans(w), UPCAST, PRECISION)
    tl.store(ws_ptr + split * stride_ws + offs_m[:, None] * stride_wsm + offs_n[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _linear_norm_kernel(
    x_ptr, w_ptr, ws_ptr, res_ptr, post_w_ptr, next_w_ptr, out_ptr, res_out_ptr, out32_ptr, counter_ptr,
    M, N, K, k_per_split, eps,
    stride_xm, stride_wn, stride_ws, stride_wsm, stride_r, stride_o, stride_ro, stride_o32,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ROW: tl.constexpr,
    SPLITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, FIX_BF16: tl.constexpr,
    FP32_OUT: tl.constexpr, PDL: tl.constexpr,
):
    wait_then_release(PDL)  # before any memory access (kernels/pdl.py)
    pid_m = tl.program_id(2)
    gemm_split_tile(x_ptr, w_ptr, ws_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_ws, stride_wsm,
                    tl.program_id(0), tl.program_id(1), pid_m, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    # the last program of this row tile has every column of every split: it finishes the rows
    if arrive(counter_ptr + pid_m, tl.num_programs(0) * tl.num_programs(1)):
        dtype = out_ptr.dtype.element_ty
        for m in range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, M)):
            y = sum_rows(ws_ptr + m * stride_wsm, SPLITS, stride_ws, BLOCK_ROW, N)  # splits in order
            y = round_to(y, dtype, FIX_BF16).to(tl.float32)  # the projection's output as it would be stored
            norm_row(y, res_ptr + m * stride_r, post_w_ptr, next_w_ptr, out_ptr + m * stride_o,
                     res_out_ptr + m * stride_ro, out32_ptr + m * stride_o32, N, eps, BLOCK_ROW, True, True,
                     FIX_BF16, FP32_OUT)


def split_plan(m: int, n: int, k: int, device: torch.device, block_n: int, block_k: int,
               max_split_rows: int = 16) -> tuple[int, int]:
    """(splits, keys per split; a multiple of block_k) for `gemm_split_tile`: enough programs to stream the weight
    (PROGRAMS_PER_SM) at small n, but at most 8 splits and no more splits x rows than `max_split_rows` (what the
    last program sums)."""
    k_tiles = triton.cdiv(k, block_k)
    target = _program_target(device) * PROGRAMS_PER_SM // 2  # _program_target: two per SM
    want = min(8, triton.cdiv(target, triton.cdiv(n, block_n)))
    splits = max(1, min(want, k_tiles, max(1, max_split_rows // m)))
    per_split = triton.cdiv(k_tiles, splits) * block_k
    return triton.cdiv(k, per_split), per_split


def _launch_shape(m: int, n: int, k: int, device: torch.device, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, splits, keys per split). Picked from the sm_90 compile (16 x 128 bf16 tiles take 90-113
    registers with 4 warps up to 2048 columns; 32-column tiles took 239) and from the programs needed to stream the
    weight, not from timings (none yet: see benchmarks/README.md)."""
    block_n, block_k = 16, (128 if elem_bytes == 2 else 64)
    return (block_n, block_k, *split_plan(m, n, k, device, block_n, block_k))


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows few enough, layouts the kernel reads (unit stride in K), and arrival counters to hand."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= MAX_ROWS and weight.dim() == 2 and weight.stride(-1) == 1 and x.dtype == weight.dtype
            and arrival_counters(x.device, 1) is not None)


def linear_norm_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                             post_weight: torch.Tensor, next_weight: torch.Tensor, eps: float,
                             fp32_copy: bool = False) -> tuple[torch.Tensor, ...]:
    """x [..., K] @ weight[N, K].T, then `norm_add_rms_norm` on it with residual [..., N]: one launch.
    -> (normed, new_residual[, normed in fp32])."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    if residual.shape[-1] != n or residual.numel() != m * n or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match the projection's "
                         f"output [{m}, {n}] {x.dtype}")
    r2 = residual.reshape(m, n)
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    block_n, block_k, splits, per_split = _launch_shape(m, n, k, x.device, x.element_size())
    block_m = 16  # tl.dot's smallest tile; the rows past M are masked
    m_tiles = triton.cdiv(m, block_m)
    counters = arrival_counters(x.device, m_tiles)
    if counters is None:
        raise RuntimeError("the fused projection + norm needs arrival counters (see `usable`)")
    ws = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out)
    out32 = torch.empty(m, n, dtype=torch.float32, device=x.device) if fp32_copy else out
    _linear_norm_kernel[(triton.cdiv(n, block_n), splits, m_tiles)](
        x2, weight, ws, r2, post_weight.contiguous(), next_weight.contiguous(), out, res_out, out32,  # any dtype
        counters, m, n, k, per_split, float(eps),
        x2.stride(0), weight.stride(0), ws.stride(0), ws.stride(1), r2.stride(0), out.stride(0), res_out.stride(0),
        out32.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_ROW=triton.next_power_of_2(n), SPLITS=splits,
        UPCAST=_upcast_dot(x2), PRECISION=_dot_precision(x.dtype), FIX_BF16=fix_bf16(x.dtype), FP32_OUT=fp32_copy,
        num_warps=4 if n <= 2048 else 8, num_stages=3,  # 8 warps for the epilogue's longer rows (Large: 3072)
        **launch_options(x.device))
    shape = (*x.shape[:-1], n)
    results = (out.view(shape), res_out.view(shape))
    return (*results, out32.view(shape)) if fp32_copy else results
