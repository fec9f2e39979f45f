"""Projections with FP8 (e4m3) weights and block scales: y = x @ (q * scale)^T, beside its pure-torch reference.

The weight is [out, in] float8_e4m3fn with fp32 scales over blocks of `block` = (rows, columns) (`quant.fp8`);
x is [..., in] in the activations' dtype, and so is y.

Dispatch: the reference (dequantize the weight into x's dtype, then `F.linear`) everywhere for now.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import fp8 as fp8_format


def linear_fp8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    return F.linear(x, fp8_format.dequantize(weight, scale, block, x.dtype))


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return linear_fp8_reference(x, weight, scale, block)
