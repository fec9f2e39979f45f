"""Random initialisation for models built without a checkpoint (tests, benchmarks, `trinity init`)."""

from __future__ import annotations

import torch
from torch import nn


def random_tensor(name: str, shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """The fp32 CPU value of parameter `name`: norms start at 1, the expert bias at 0, matrices ~ N(0, std)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("expert_bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place, drawing on the CPU so the values do not depend on the device."""
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        param.copy_(random_tensor(name, tuple(param.shape), std, generator))
