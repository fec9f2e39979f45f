"""A projection followed by the sandwich-norm step: `norm_add_rms_norm(linear(x, W), residual, ...)`.

The decoder layer ends each sublayer this way (attention's o_proj, the dense MLP's down_proj, then post-norm,
residual add and the next pre-norm). On the Triton path at decode sizes it is one launch
(`kernels.linear_triton`); everywhere else it is exactly the two dispatched ops it stands for.
"""

from __future__ import annotations

import torch

from . import norm as kernel_norm
from . import use_triton
from .linear import linear


def linear_norm_add_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                                       post_weight: torch.Tensor, next_weight: torch.Tensor, eps: float,
                                       fp32_copy: bool = False) -> tuple[torch.Tensor, ...]:
    """The two ops, each through its own dispatch (so on the CPU exactly the native/oneDNN paths of each)."""
    return kernel_norm.norm_add_rms_norm(linear(x, weight), residual, post_weight, next_weight, eps, fp32_copy)


def linear_norm_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                             post_weight: torch.Tensor, next_weight: torch.Tensor, eps: float,
                             fp32_copy: bool = False) -> tuple[torch.Tensor, ...]:
    """-> (RMSNorm_next(r), r[, the first in fp32]) with r = residual + RMSNorm_post(x @ weight.T)."""
    if use_triton(x, weight, residual, post_weight, next_weight):
        from . import linear_triton
        if linear_triton.usable(x, weight):
            return linear_triton.linear_norm_add_rms_norm(x, weight, residual, post_weight, next_weight, eps,
                                                          fp32_copy)
    return linear_norm_add_rms_norm_reference(x, weight, residual, post_weight, next_weight, eps, fp32_copy)
