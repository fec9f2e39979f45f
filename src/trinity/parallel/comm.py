"""The tensor-parallel group: the collectives the sharded model and the executor use, over torch.distributed.

Two process groups: the device group (NCCL on GPUs, gloo on the CPU) carries activations (the all-reduces after
row-parallel projections, the logits' gather, the look-ahead's sampled tokens); a gloo group carries the step
messages (`engine.step.StepInput`, plain Python) from rank 0 to the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int
    size: int
    group: dist.ProcessGroup | None = None  # the device group (None: the default group)
    cpu_group: dist.ProcessGroup | None = None  # gloo, for Python objects

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank r's part at columns r * n .. (r + 1) * n - 1."""
        if self.size == 1:
            return x
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty((self.size * flat.shape[0], flat.shape[1]), dtype=x.dtype, device=x.device)
        _all_gather(out, flat, group=self.group)  # the ranks' parts one after the other
        out = out.view(self.size, *flat.shape).permute(1, 0, 2)
        return out.reshape(*x.shape[:-1], self.size * x.shape[-1])

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src, group=self.group)
        return x

    def broadcast_object(self, obj=None, src: int = 0):
        """Rank `src`'s object on every rank (pickled, over the gloo group)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, group=self.cpu_group)
        return box[0]


# torch 2.13 names it all_gather_single; torch 2.11 (the GPU machines) has only all_gather_into_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
