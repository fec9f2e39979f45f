"""4-bit checkpoint formats -> the canonical layout (`quant.int4`), one converter per format.

Each converter takes one module's tensors as the checkpoint stores them, with any leading dimensions (stacked
experts [E, ...]) kept, and returns (codes, scale, zero_point, g_idx) in the canonical layout. `shapes` gives what
each tensor must look like for a matrix of [out, in] (the loader checks before converting, and names the tensor).
Layouts as the formats' own code writes and reads them:

AWQ GEMM (AutoAWQ `WQLinear_GEMM`; compressed-tensors' `AutoAWQConverter` reads it the same way):
  qweight int32 [in, out / 8]: word (i, j) holds columns 8j..8j+7 of input row i, nibble k (bits 4k..4k+3) being
  column 8j + AWQ_ORDER[k], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (the order its GPU kernel dequantizes in).
  qzeros int32 [in / group, out / 8]: the zero points, packed the same way, stored as they are (0..15).
  scales fp16 [in / group, out]. w[o, i] = (q - z) * s. Groups must divide `in` (the tool refuses otherwise).

GPTQ (AutoGPTQ / GPTQModel `QuantLinear`, as HF transformers loads it through them):
  qweight int32 [ceil(in / 8), out]: packed along the input dimension in order, word (j, o) holding input rows
  8j..8j+7 of column o, row 8j + k in bits 4k..4k+3.
  qzeros int32 [G, ceil(out / 8)], packed along the output dimension in order. `checkpoint_format` "gptq" (v1, the
  default) stores zero - 1: GPTQModel converts v1 to v2 by adding 0x11111111 to each word (and saves v1 by
  subtracting it), so the conversion here is that word addition, carries included (a zero of 0 was stored as a
  borrow into the next nibble). "gptq_v2" stores the zeros as they are. Symmetric: every zero is 8.
  scales fp16 [G, out]; g_idx int32 [in], column c's group (desc_act: a permutation of c // group's values; without
  it, c // group itself). G = ceil(in / group); group_size -1 is one group per row.

compressed-tensors `pack-quantized` (`PackedQuantizationCompressor`, 4-bit int):
  weight_packed int32 [out, ceil(in / 8)], element 8j + k of a row in bits 4k..4k+3 of word j, each code the signed
  value + 8 (0..15). weight_scale [out, G] (group) or [out, 1] (channel). weight_zero_point (asymmetric): int32
  [ceil(out / 8), G], the signed zero + 8 packed along the output dimension. weight_shape: [out, in].
  w = (q - zp) * s on the signed values: the unsigned codes and zeros as stored.
"""

from __future__ import annotations

import math

import torch

from .int4 import SYMMETRIC_ZERO, pack, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k] of its eight
_AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(c) for c in range(8))  # [0, 4, 1, 5, 2, 6, 3, 7]
GPTQ_V1_ZERO_OFFSET = 0x11111111  # one added to each of a word's eight zero points

# a format's tensor names (the last component of `<module>.<part>`), and those a module needs before converting
PARTS = {"awq": ("qweight", "qzeros", "scales"),
         "gptq": ("qweight", "qzeros", "scales", "g_idx"),
         "pack-quantized": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}


def shapes(fmt: str, out: int, inp: int, group: int) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape for a matrix [out, in] in groups of `group` columns (leading dimensions excluded)."""
    g = math.ceil(inp / group)
    if fmt == "awq":
        return {"qweight": (inp, out // 8), "qzeros": (inp // group, out // 8), "scales": (inp // group, out)}
    if fmt == "gptq":
        return {"qweight": (math.ceil(inp / 8), out), "qzeros": (g, math.ceil(out / 8)), "scales": (g, out),
                "g_idx": (inp,)}
    return {"weight_packed": (out, math.ceil(inp / 8)), "weight_scale": (out, g),
            "weight_zero_point": (math.ceil(out / 8), g), "weight_shape": (2,)}


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous()


# ------------------------------------------------------------------------------------------------ AWQ
def _unpack_awq(words: torch.Tensor, n: int) -> torch.Tensor:
    """AWQ words [..., rows, n / 8] -> codes [..., rows, n] in column order."""
    nibbles = unpack_int32(words).unflatten(-1, (-1, 8))  # [..., rows, n / 8, nibble position]
    order = torch.tensor(_AWQ_NIBBLE_OF_COLUMN, device=words.device)
    return nibbles.index_select(-1, order).flatten(-2)[..., :n]


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AWQ GEMM -> (codes, scale, zero_point, None)."""
    out = scales.shape[-1]
    codes = _transposed(_unpack_awq(qweight, out))  # [..., out, in]
    zero = _transposed(_unpack_awq(qzeros, out))
    return pack(codes), _transposed(scales.float()), zero, None


# ------------------------------------------------------------------------------------------------ GPTQ
def gptq_zeros(qzeros: torch.Tensor, out: int, v1: bool) -> torch.Tensor:
    """GPTQ qzeros [..., G, ceil(out / 8)] -> zero points uint8 [..., out, G] (v1: the stored zero - 1 undone)."""
    if v1:
        qzeros = (qzeros.to(torch.int64) + GPTQ_V1_ZERO_OFFSET) & 0xFFFFFFFF
    return _transposed(unpack_int32(qzeros)[..., :out])


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              inp: int, v1: bool, symmetric: bool):
    """GPTQ -> (codes, scale, zero_point or None (symmetric), g_idx [..., 1, in] or None). A symmetric checkpoint's
    zeros must all be 8 (`ValueError` otherwise)."""
    out = scales.shape[-1]
    codes = _transposed(unpack_int32(qweight, dim=-2)[..., :inp, :])
    zero = gptq_zeros(qzeros, out, v1)
    if symmetric:
        if not bool((zero == SYMMETRIC_ZERO).all()):
            raise ValueError(f"qzeros: a symmetric (sym: true) checkpoint's zero points are all {SYMMETRIC_ZERO}, "
                             f"these hold {sorted(set(zero.unique().tolist()))}")
        zero = None
    keep = None if g_idx is None else g_idx.to(torch.int32).unsqueeze(-2)
    return pack(codes), _transposed(scales.float()), zero, keep


def trivial_g_idx(g_idx: torch.Tensor, group: int) -> bool:
    """Whether g_idx is c // group for every column (no activation order: nothing to keep)."""
    want = torch.arange(g_idx.shape[-1], device=g_idx.device) // group
    return bool((g_idx.long() == want).all())


# ------------------------------------------------------------------------------------------------ compressed-tensors
def from_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                        weight_zero_point: torch.Tensor | None, inp: int):
    """compressed-tensors pack-quantized -> (codes, scale, zero_point or None, None)."""
    out = weight_scale.shape[-2]
    codes = unpack_int32(weight_packed)[..., :inp]
    zero = None if weight_zero_point is None else unpack_int32(weight_zero_point, dim=-2)[..., :out, :]
    return pack(codes), weight_scale.float().contiguous(), zero, None
