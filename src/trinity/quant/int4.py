"""4-bit integer weights (W4A16) with group-wise scales: the engine's one in-memory layout, quantizing and
dequantizing references.

The canonical layout (`Int4Weight`), whatever the checkpoint's format (`int4_formats` converts AWQ, GPTQ and
compressed-tensors into it at load):

- codes: uint8 [..., out, ceil(in / 2)], two unsigned 4-bit codes per byte along the input dimension, the even
  column in the low nibble: byte (r, j) = code(r, 2j) | code(r, 2j + 1) << 4 (an odd `in`'s last high nibble is 0).
  This is compressed-tensors' `pack-quantized` int32 words read as bytes on a little-endian host, so a kernel
  written for that layout reads these codes unchanged.
- scale: fp32 [..., out, G], G = ceil(in / group) (the last group may be partial; a per-channel scheme is one group
  of `in` columns). fp32 holds the checkpoints' fp16 and bf16 scales exactly.
- zero_point: uint8 [..., out, G], codes 0..15 (asymmetric schemes), or None: symmetric, the zero is 8.
- g_idx: int32 [..., P, in] or None. With activation order (GPTQ `desc_act`) column c's group is g_idx[c], not
  c // group. The rows fall in P equal blocks, each with its own g_idx: 1 for a projection, 2 for stacked experts'
  gate_up (gate and up were quantized as separate matrices, each with its own column order).

A weight is w[r, c] = (code[r, c] - zero[r, g(c)]) * scale[r, g(c)], computed in fp32 and rounded once to the
activations' dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

SYMMETRIC_ZERO = 8  # the zero of a symmetric scheme's unsigned codes (signed -8..7 stored as 0..15)
MAX_CODE = 15


class Int4Weight(NamedTuple):
    """One matrix (or a stack of them, leading dimensions first) in the canonical layout above."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
    group: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[-2]

    def expert(self, e: int) -> Int4Weight:
        """Matrix e of a stack [E, ...] (one expert's)."""
        return self._replace(codes=self.codes[e], scale=self.scale[e],
                             zero_point=None if self.zero_point is None else self.zero_point[e],
                             g_idx=None if self.g_idx is None else self.g_idx[e])


def num_groups(in_features: int, group: int) -> int:
    return math.ceil(in_features / group)


# ------------------------------------------------------------------------------------------------ nibbles
def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (0..15) -> uint8 [..., ceil(n / 2)], the even element in the low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n / 2)] -> uint8 codes [..., n]."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return both.flatten(-2)[..., :n]


def unpack_int32(words: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """int32 (or int64 holding 32-bit) words -> uint8 codes, 8 per word along `dim`, in bit order: bits 4k..4k+3 of
    word j are element 8j + k. The in-order packing of GPTQ and compressed-tensors (AWQ then reorders)."""
    moved = words.movedim(dim, -1)
    shifts = torch.arange(0, 32, 4, dtype=moved.dtype, device=moved.device)
    nibbles = (moved.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift of a negative word: the mask drops its sign
    return nibbles.flatten(-2).to(torch.uint8).movedim(-1, dim)


# ------------------------------------------------------------------------------------------------ references
def column_groups(w: Int4Weight) -> torch.Tensor:
    """Each column's group: int64 [..., out, in] (with g_idx), or [in] (contiguous groups)."""
    if w.g_idx is None:
        return torch.arange(w.in_features, device=w.codes.device) // w.group
    blocks = w.g_idx.shape[-2]
    return w.g_idx.long().repeat_interleave(w.out_features // blocks, dim=-2)


def _per_column(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[..., out, G] -> [..., out, in]: each column's group's value."""
    if groups.dim() == 1:
        return values.index_select(-1, groups)
    return values.gather(-1, groups)


def dequantize(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight [..., out, in] in `dtype`, computed in fp32 and rounded once."""
    groups = column_groups(w)
    codes = unpack(w.codes, w.in_features).float()
    zero = SYMMETRIC_ZERO if w.zero_point is None else _per_column(w.zero_point.float(), groups)
    return ((codes - zero) * _per_column(w.scale.float(), groups)).to(dtype)


def quantize(w: torch.Tensor, group: int | None, symmetric: bool, g_idx: torch.Tensor | None = None,
             scale_dtype: torch.dtype = torch.float32) -> Int4Weight:
    """Round-to-nearest of w [out, in] (any float dtype) in groups of `group` columns (None: one per row), or the
    groups g_idx [in] gives. Each group's range is widened to hold 0 (0 stays exact, as AWQ, GPTQ and
    compressed-tensors do). Symmetric: scale = absmax / 7.5, zero 8; asymmetric: scale = (max - min) / 15, zero =
    round(-min / scale). The scale is rounded to `scale_dtype` before the codes are computed with it (a checkpoint
    in fp16 scales holds exactly the scale its codes were made with); a group of zeros gets scale 1."""
    out, inp = w.shape
    group = group or inp
    columns = torch.arange(inp, device=w.device) // group if g_idx is None else g_idx.long().to(w.device)
    count = int(columns.max()) + 1 if inp else 0
    index = columns.expand(out, inp)
    wf = w.float()
    high = torch.zeros(out, count, device=w.device).scatter_reduce(1, index, wf, "amax")
    low = torch.zeros(out, count, device=w.device).scatter_reduce(1, index, wf, "amin")
    if symmetric:
        scale = torch.maximum(high, -low) / (MAX_CODE / 2)
    else:
        scale = (high - low) / MAX_CODE
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).float()
    if symmetric:
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
    else:
        zero = torch.round(-low / scale).clamp(0, MAX_CODE)
    codes = torch.round(wf / scale.gather(1, index)) + zero.gather(1, index)
    codes = codes.clamp(0, MAX_CODE).to(torch.uint8)
    zero_point = None if symmetric else zero.to(torch.uint8)
    keep_g_idx = None if g_idx is None else g_idx.to(torch.int32).reshape(1, inp)
    return Int4Weight(pack(codes), scale, zero_point, keep_g_idx, group, inp)
