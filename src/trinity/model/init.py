"""Random weights for models built without a checkpoint (tests, benchmarks, `trinity init`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn


def random_tensor(name: str, shape: tuple[int, ...], std: float, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU value for parameter `name`: norms start at 1, the expert bias at 0, matrices ~ N(0, std)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("expert_bias"):
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place, drawing in fp32 on the CPU so values do not depend on device or dtype."""
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        param.copy_(random_tensor(name, tuple(param.shape), std, generator))


def write_random_checkpoint(config, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            max_shard_size: int | str = "5GB", expert_layout: str = "per_expert") -> None:
    """An HF-layout checkpoint with random weights, written tensor by tensor: the model is never built in
    memory, so Nano- or Mini-sized checkpoints can be made on a small machine."""
    from .checkpoint import hf_layout, parse_size, write_shards
    from .model import TrinityForCausalLM

    with torch.device("meta"):
        shapes = TrinityForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in shapes.named_parameters():
            want = torch.float32 if shapes.keeps_fp32(name) else dtype
            yield name, random_tensor(name, tuple(p.shape), config.initializer_range, generator, want)

    os.makedirs(path, exist_ok=True)
    write_shards(hf_layout(tensors(), expert_layout), path, parse_size(max_shard_size))
    config.replace(dtype=str(dtype).removeprefix("torch.")).save_pretrained(path)
