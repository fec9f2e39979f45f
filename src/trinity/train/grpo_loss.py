"""GRPO's arithmetic: group-normalised advantages, per-token log-probabilities, the clipped-ratio loss with a k3
KL penalty. Plain tensor functions, so a test can check them against numbers worked out by hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P * G] (group by group) -> (r - mean) / (std + eps) within each group of G, [P * G].

    std is the sample standard deviation (Bessel-corrected, as torch.std). A group whose rewards all agree
    teaches nothing about which sample was better: its advantages are 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1).to(rewards.dtype)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens) under logits / temperature: logits [B, L, V], tokens [B, L] -> [B, L] (fp32).

    The temperature is the rollouts' own, so the ratio compares the distribution the samples came from."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass(slots=True)
class GRPOLoss:
    loss: torch.Tensor  # scalar to backpropagate
    policy_loss: float  # the clipped-ratio term alone (token mean)
    kl: float  # mean k3 estimate of KL(new || ref) per completion token
    clip_fraction: float  # share of tokens whose clipped term was the active one (no gradient through it)
    ratio_mean: float
    tokens: int


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_coeff: float, num_tokens: int | None = None) -> GRPOLoss:
    """The GRPO objective as a loss, a token-level mean over completion tokens.

    logp_*: [N, L] log-probabilities of the completion tokens under the policy being trained, the policy that
    sampled them, and the frozen reference; advantages [N] (one per completion, every token shares it);
    mask [N, L] (1 on completion tokens, 0 on padding). Per token:

        ratio = exp(logp_new - logp_old)
        objective = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
        k3 = exp(ref - new) - (ref - new) - 1        (>= 0, an unbiased estimate of KL(new || ref))
        loss = -objective + kl_coeff * k3

    averaged over every completion token of the batch (a long completion weighs more than a short one, DAPO's
    token-level mean). `num_tokens`: divide by this count instead of the mask's (micro batches of one optimizer
    step share the step's total, so their gradients add up to the whole batch's)."""
    mask = mask.to(logp_new.dtype)
    count = float(num_tokens) if num_tokens is not None else mask.sum().clamp_min(1.0)
    adv = advantages.to(logp_new.dtype).unsqueeze(-1)  # [N, 1]
    ratio = torch.exp(logp_new - logp_old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)
    delta = logp_ref - logp_new
    k3 = torch.exp(delta) - delta - 1
    per_token = -objective + kl_coeff * k3
    loss = (per_token * mask).sum() / count
    with torch.no_grad():
        # the clipped term is the one in force where the ratio left the band in the direction the advantage pushes
        active = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        tokens = mask.sum()
        denom = tokens.clamp_min(1.0)
        stats = dict(policy_loss=float((-objective * mask).sum() / count), kl=float((k3 * mask).sum() / denom),
                     clip_fraction=float((active.to(mask.dtype) * mask).sum() / denom),
                     ratio_mean=float((ratio * mask).sum() / denom), tokens=int(tokens))
    return GRPOLoss(loss, **stats)
