"""Bias-free projections y = x @ W.T, with a faster CPU orientation for small fp32 batches.

On the CPU the BLAS behind `F.linear` handles a few rows against a wide weight poorly. A [4, 512] x [512, 512]^T
product took about 140 us on the project's 2-core EPYC in fp32: the weight streamed at about 7 GB/s, while the
cores read 28-36 GB/s. Computed as W @ x.T, with the weight as the long operand and the rows as a transposed view
of the short one, the same product took about 50 us, 20 GB/s. `benchmarks/cpu_throughput.py` is the end-to-end
measure. bf16 showed no such gap, and from a few hundred rows on the usual orientation wins, so only small fp32
batches on the CPU take this path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference_forced

# Up to this many rows the transposed orientation runs (decode batches and short chunks).
CPU_SMALL_ROWS = 64


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def linear_weight_first(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same product computed as (W @ x.T).T, returned contiguous (callers view it by heads)."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n == 1:  # a single row takes the BLAS's GEMV path: 2-7x slower here than the same row twice (measured)
        rows = rows.expand(2, -1).contiguous()
    return torch.mm(weight, rows.t()).t()[:n].contiguous().view(*x.shape[:-1], weight.shape[0])


def weight_first_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and 0 < x.numel() // x.shape[-1] <= CPU_SMALL_ROWS and not torch.is_grad_enabled()
            and not reference_forced())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight_first_wanted(x, weight):
        return linear_weight_first(x, weight)
    return linear_reference(x, weight)
