"""FP8 (e4m3) weights with scales over blocks of a matrix: quantizing, dequantizing, and activations' scheme.

Every scale layout is a grid of blocks over the last two dimensions of a weight [..., out, in]: `block` = (rows,
columns) of one block, the scale tensor [..., ceil(out / rows), ceil(in / columns)], edge blocks partial.
compressed-tensors' strategies map onto it: `block` with its `block_structure`, `channel` = (1, in) (a scale per
output row), `tensor` = (out, in) (one scale). A weight is stored as round(w / scale) in float8_e4m3fn
(saturated at +-448) and read back as q * scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value


def grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a [out, in] matrix in blocks of `block`."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_scale(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """[..., rows, cols] block scales -> [..., out, in], each block's scale over its elements."""
    return scale.repeat_interleave(block[0], -2)[..., :shape[0], :].repeat_interleave(block[1], -1)[..., :shape[1]]


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] (any float dtype) -> (q float8_e4m3fn, scale fp32 [..., rows, cols]): each block's absolute
    maximum maps to 448. An all-zero block gets scale 1 (its values are 0 whatever the scale)."""
    out, inp = w.shape[-2:]
    rows, cols = grid((out, inp), block)
    padded = F.pad(w.float(), (0, cols * block[1] - inp, 0, rows * block[0] - out))
    blocks = padded.unflatten(-1, (cols, block[1])).unflatten(-3, (rows, block[0]))  # [..., rows, br, cols, bc]
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.float() / expand_scale(scale, block, (out, inp))).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q [..., out, in] in fp8, scale [..., rows, cols] -> the weight in `dtype` (computed in fp32, rounded once)."""
    return (q.float() * expand_scale(scale.float(), block, tuple(q.shape[-2:]))).to(dtype)


def fake_quantize_activations(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """What a w8a8 kernel computes with: x [..., K] quantized to e4m3 with a dynamic scale per token and group of
    `group` columns (None: per token), and read back. The reference of the FP8 activations' scheme."""
    k = x.shape[-1]
    g = group or k
    groups = math.ceil(k / g)
    padded = F.pad(x.float(), (0, groups * g - k)).unflatten(-1, (groups, g))
    amax = padded.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (padded / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (q.float() * scale).flatten(-2)[..., :k].to(x.dtype)
