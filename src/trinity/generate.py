"""A simple decode loop over a contiguous KV cache: the reference path that the paged engine must match."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .model.attention import ContiguousKVCache
from .model.model import TrinityForCausalLM


@dataclass(slots=True)
class GenerationParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens = {self.max_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: must be >= 0 (0 turns it off)")


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already cover top_p (the first token always stays)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(model: TrinityForCausalLM, prompts: Sequence[Sequence[int]], params: GenerationParams) \
        -> Iterator[list[int | None]]:
    """Yields, per step, the new token of each prompt (None once that prompt has finished)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg, device = model.config, model.device
    longest = max(len(p) for p in prompts) + params.max_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_tokens = {longest} exceeds max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    cache = ContiguousKVCache(cfg.num_hidden_layers, len(prompts), longest, cfg.num_key_value_heads, cfg.head_dim,
                              model.dtype, device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop = set(params.stop_token_ids)
    pending = [list(p) for p in prompts]  # tokens to feed next, per sequence
    done = [False] * len(prompts)
    for _ in range(params.max_tokens):
        lens = [0 if d else len(p) for d, p in zip(done, pending)]
        step = cache.step(lens)
        ids = torch.tensor([t for d, p in zip(done, pending) if not d for t in p], device=device)
        positions = cache.positions(lens, device)
        # each sequence's last row; none to pick when every row is one (a decode step)
        last = None if ids.numel() == sum(n > 0 for n in lens) else \
            torch.tensor(lens, device=device).cumsum(0)[[b for b, n in enumerate(lens) if n]] - 1
        logits = model(ids, positions, step, logits_indices=last)
        cache.advance(step)
        new = sample(logits, params, generator).tolist()
        out: list[int | None] = [None] * len(prompts)
        for b, token in zip((b for b, n in enumerate(lens) if n), new):
            out[b] = token
            pending[b] = [token]
            done[b] = token in stop
        yield out
        if all(done):
            return


def generate(model: TrinityForCausalLM, prompts: Sequence[Sequence[int]], params: GenerationParams) -> list[list[int]]:
    """New tokens per prompt, the stop token included when one ended the sequence."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, params):
        for b, token in enumerate(step):
            if token is not None:
                outputs[b].append(token)
    return outputs
