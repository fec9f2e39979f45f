"""Projections and routed experts with 4-bit weights (`quant.int4.Int4Weight`, the canonical layout): y = x @ W^T
with W dequantized from its codes, group scales, zero points and g_idx.

`linear_int4` is the one dispatch point: today it always takes the pure-torch reference (the whole weight
dequantized into x's dtype, then `F.linear`). A CPU or Triton kernel slots in there, beside the reference it must
agree with, as `kernels.fp8.linear_fp8` does for FP8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import int4 as int4_format
from ..quant.int4 import Int4Weight
from . import in_graph_mode


def linear_int4_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    return F.linear(x, int4_format.dequantize(w, x.dtype))


def linear_int4(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    return linear_int4_reference(x, w)


def experts_int4_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: Int4Weight,
                           down: Int4Weight, *, linear=linear_int4) -> torch.Tensor:
    """Routed experts with 4-bit weights (gate_up [E, 2I, H] and down [E, H, I] in the canonical layout): x [T, H],
    each token's top-k (weights [T, k] fp32, ids [T, k]) -> [T, H] in x's dtype. Each used expert's projections
    through `linear`, SwiGLU in x's dtype, the outputs summed per token in fp32 (as `kernels.moe`'s reference).

    Which experts are used is read on the host; inside a CUDA-graph capture, where it cannot be, every expert runs
    over every token, weighted 0 where not chosen (the same sums: the extra terms are zeros)."""
    inter = down.in_features
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if in_graph_mode():
        dense = torch.zeros(x.shape[0], gate_up.codes.shape[0], dtype=torch.float32, device=x.device)
        dense.scatter_add_(1, ids.long(), weights.float())
        for e in range(gate_up.codes.shape[0]):
            h = linear(x, gate_up.expert(e))
            y = linear(F.silu(h[:, :inter]) * h[:, inter:], down.expert(e))
            out += y.float() * dense[:, e, None]
        return out.to(x.dtype)
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        h = linear(x[token], gate_up.expert(e))
        y = linear(F.silu(h[:, :inter]) * h[:, inter:], down.expert(e))
        out.index_add_(0, token, y.float() * weights[token, choice, None])
    return out.to(x.dtype)
