"""The start of the forward: token embedding, muP input scale and the first layer's input RMSNorm, beside its
pure-torch reference, dispatched at run time.

The reference reproduces `TrinityModel.forward` operation for operation (`embed_tokens(ids)`, then
`x * embed_scale` in the activation dtype, then the first layer's `input_layernorm`), so it equals it exactly.

Dispatch (`use_triton`, the rule of `kernels.norm`): the Triton kernel (`kernels.embed_triton`, one launch for
all three) where the Triton kernels run; elsewhere the module's ops, the norm through `kernels.norm.rms_norm`
so that a CPU model keeps its native C norm kernel and computes exactly what the module ops compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import norm as kernel_norm
from . import use_triton
from .norm import rms_norm_reference


def embed_reference(input_ids: torch.Tensor, embed_weight: torch.Tensor, embed_scale: float | None) -> torch.Tensor:
    """Exactly `embed_tokens(input_ids)` (an `nn.Embedding` without padding index or max norm), then the muP
    scale `x * embed_scale` when there is one."""
    x = F.embedding(input_ids, embed_weight)
    return x if embed_scale is None else x * embed_scale


def embed_rms_norm_reference(input_ids: torch.Tensor, embed_weight: torch.Tensor, embed_scale: float | None,
                             norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (RMSNorm(x), x) with x = the scaled embeddings: the residual stream and the first layer's input."""
    x = embed_reference(input_ids, embed_weight, embed_scale)
    return rms_norm_reference(x, norm_weight, eps), x


def embed_rms_norm(input_ids: torch.Tensor, embed_weight: torch.Tensor, embed_scale: float | None,
                   norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [T] (int32 or int64) -> (RMSNorm(x), x), x [T, hidden] = embed_weight[input_ids] * embed_scale
    (no scale when None) in the embedding's dtype; the norm's weight in fp32 as the model keeps it."""
    if use_triton(embed_weight, norm_weight, input_ids):
        from . import embed_triton
        return embed_triton.embed_rms_norm(input_ids, embed_weight, embed_scale, norm_weight, eps)
    x = embed_reference(input_ids, embed_weight, embed_scale)
    return kernel_norm.rms_norm(x, norm_weight, eps), x
