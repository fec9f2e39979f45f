"""Auxiliary-loss-free load balancing: the router's `expert_bias` moved after each optimizer step.

The model's forward only counts tokens per expert (`MoEBlock.expert_counts`); this module turns the counts
(summed over data-parallel ranks) into bias updates, outside the forward and outside autograd. The bias only
changes which experts are selected, never the routing weights.

Rules, with n_i the tokens expert i received this step and n̄ their mean:
- `none`:  no update.
- `sign`:  b_i += γ · sign(n̄ − n_i), then re-centred (mean 0).                      default γ = 1e-3
- `smebu`: v_i = (n̄ − n_i) / n̄; ṽ_i = tanh(κ · v_i); m_i = β · m_i + (1 − β) · ṽ_i; b_i += λ · m_i; re-centred.
           Soft-clamping makes the step proportional to small violations (so it settles instead of flipping
           by ±γ forever) and bounded for large ones; momentum damps oscillation.  defaults κ = 2, β = 0.9, λ = 2e-3
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

RULES = ("none", "sign", "smebu")


@dataclass(slots=True)
class BalanceConfig:
    rule: str = "smebu"
    gamma: float = 1e-3  # sign rule step
    kappa: float = 2.0  # smebu soft-clamp sharpness
    beta: float = 0.9  # smebu momentum
    lam: float = 2e-3  # smebu rate

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"balance rule {self.rule!r}: allowed {', '.join(RULES)}")


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "expert_bias")]


class ExpertBalancer:
    def __init__(self, model: nn.Module, config: BalanceConfig | None = None):
        self.config = config or BalanceConfig()
        self.blocks = moe_blocks(model)
        for block in self.blocks:
            block.track_expert_load()
        self.momentum = [torch.zeros_like(b.expert_bias, dtype=torch.float32) for b in self.blocks]

    def take_counts(self, all_reduce: bool = True) -> torch.Tensor | None:
        """[layers, experts] token counts since the last call, summed across ranks; resets the counters."""
        if not self.blocks:
            return None
        counts = torch.stack([b.expert_counts for b in self.blocks]).float()
        for b in self.blocks:
            b.expert_counts.zero_()
        if all_reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        return counts

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        c = self.config
        if c.rule == "none" or counts is None:
            return
        for i, block in enumerate(self.blocks):
            n = counts[i].to(block.expert_bias.device)
            mean = n.mean()
            if mean <= 0:
                continue
            if c.rule == "sign":
                step = c.gamma * torch.sign(mean - n)
            else:
                violation = torch.tanh(c.kappa * (mean - n) / mean)
                self.momentum[i].mul_(c.beta).add_(violation, alpha=1 - c.beta)
                step = c.lam * self.momentum[i]
            bias = block.expert_bias.data
            bias.add_(step.to(bias.dtype))
            bias.sub_(bias.mean())

    def state_dict(self) -> dict:
        return {"momentum": [m.clone() for m in self.momentum]}

    def load_state_dict(self, state: dict) -> None:
        for m, saved in zip(self.momentum, state["momentum"]):
            m.copy_(saved)


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: (max_i n_i − n̄) / n̄. counts: [layers, experts] -> [layers]."""
    mean = counts.float().mean(dim=-1)
    return (counts.float().amax(dim=-1) - mean) / mean.clamp_min(1e-12)
