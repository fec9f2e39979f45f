"""Triton kernel for the start of the forward: the token embedding, the muP input scale and the first layer's
input RMSNorm in one launch (reference and dispatch in `kernels.embed`).

At decode these are three or four tiny torch ops (a gather, a multiply, the norm) that cost a launch each for a
few kilobytes of work. Here one program per token gathers its embedding row, scales it (rounded to the dtype as
torch's `x * scale` rounds it) and writes it as the residual stream x, then normalises it with exactly the
routine of `kernels.norm_triton._rms_norm_kernel` (`norm_row`, with the same block and warps: the same reduction
on a GPU, so the same bits).

Interpreter note: as in `kernels.norm_triton`, fp32 -> bf16 is rounded by hand there (`round_to` with FIX_BF16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm_triton import _row_warps, fix_bf16, norm_row, round_to


@triton.jit
def _embed_rms_norm_kernel(
    ids_ptr, table_ptr, w_ptr, x_ptr, h_ptr,
    N, stride_ids, stride_table, stride_x, stride_h, scale, eps,
    BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, FIX_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(ids_ptr + row * stride_ids).to(tl.int64)  # int32 or int64 ids; vocab * hidden may pass 2^31
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    dtype = x_ptr.dtype.element_ty
    x = tl.load(table_ptr + token * stride_table + offs, mask=ok, other=0.0)
    if HAS_SCALE:  # torch's `x * python_float`: the scalar as fp32, the product in fp32, rounded to the dtype
        x = round_to(x.to(tl.float32) * scale, dtype, FIX_BF16)
    tl.store(x_ptr + row * stride_x + offs, x, mask=ok)
    # the RMSNorm kernel's own row routine, without pre-norm, residual or fp32 copy (their pointers unused)
    h_row = h_ptr + row * stride_h
    norm_row(x.to(tl.float32), h_row, w_ptr, w_ptr, h_row, h_row, h_row, N, eps,
             BLOCK, False, False, FIX_BF16, False)


def embed_rms_norm(input_ids: torch.Tensor, embed_weight: torch.Tensor, embed_scale: float | None,
                   norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [T] (int32 or int64, any stride: a column of the decode table) -> (RMSNorm(x), x), x [T, hidden]
    the scaled embeddings in the embedding's dtype. Ids must lie in [0, vocab): the kernel does not check."""
    if input_ids.dim() != 1 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} {input_ids.dtype}: need [T] int32 or int64")
    n = embed_weight.shape[1]
    table = embed_weight if embed_weight.stride(-1) == 1 else embed_weight.contiguous()
    t = input_ids.shape[0]
    x = torch.empty(t, n, dtype=table.dtype, device=table.device)
    h = torch.empty_like(x)
    if t:
        block = triton.next_power_of_2(n)
        _embed_rms_norm_kernel[(t,)](
            input_ids, table, norm_weight.contiguous(), x, h,
            n, input_ids.stride(0), table.stride(0), x.stride(0), h.stride(0),
            float(embed_scale) if embed_scale is not None else 1.0, float(eps),
            BLOCK=block, HAS_SCALE=embed_scale is not None, FIX_BF16=fix_bf16(table.dtype),
            num_warps=_row_warps(block),  # as the RMSNorm kernel: the same reduction, so the same bits
        )
    return h, x
