"""Training losses: next-token cross-entropy, the sequence-level balance loss, the router z-loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] (already aligned: label t is the target of position t)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, batch: int, num_experts: int) -> torch.Tensor:
    """Sequence-wise auxiliary balance loss (DeepSeek-V3 style), averaged over sequences and returned un-scaled.

    scores: [B*T, E] sigmoid router scores (fp32); ids: [B*T, k] chosen experts.
    Per sequence: f_i = E / (k T) · #tokens choosing i, P_i = mean over tokens of s_i / sum_j s_j; loss = sum_i f_i P_i.
    Balanced routing gives 1."""
    k = ids.shape[-1]
    t = scores.shape[0] // batch
    s = scores.view(batch, t, num_experts)
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    chosen = torch.zeros(batch, t, num_experts, device=scores.device).scatter_(-1, ids.view(batch, t, k), 1.0)
    f = chosen.sum(dim=1) * num_experts / (k * t)  # [B, E]
    return (f * p).sum(dim=-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-sum-exp of the router logits: keeps them from growing without bound."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
