"""Attention metadata: how a flat token batch maps onto sequences and their cached keys/values.

The model never owns a cache. Each forward receives an `AttentionMetadata` object and every attention
layer calls `attn.attend_gated(layer_idx, q, k, v, window, scale, gate, qk_norm)`, which by default comes down
to `attn.attend(layer_idx, q, k, v, window, scale)`; the object decides where new K/V go and which keys each
query sees. This file holds the base class and the pure-torch reference implementations:

- `PackedSequences`: whole sequences (no cache), e.g. the `model(input_ids[B, T])` convenience call and training.
- `ContiguousKVCache` / `CacheStep`: a simple per-sequence contiguous cache for the basic decode loop.

The paged engine supplies its own metadata (`engine.paged_attention.PagedAttention`) on the same base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels import norm as kernel_norm


class AttentionMetadata:
    """What a step tells the model beyond its tokens: where their keys and values live, and what to count.

    Subclasses implement `attend`. `attend_gated` is what the attention layer calls: by default the q/k norm,
    `attend` and the output gate as separate ops; a subclass with fast kernels (the engine's paged metadata) folds
    the norm, the K/V write and the gate into its attention kernel and skips the queries nobody reads.

    Expert-load telemetry, when the step carries it (the engine's runner does): `expert_counts`
    ([num_moe_layers, num_experts] int64, the MoE block with MoE index j adds its routed tokens to row j) and
    `count_weight` ([T] int64, each token's 0/1 weight in those counts: a padded CUDA-graph batch gives its padding
    rows 0; a step whose last layer keeps only some rows gives none).
    """

    __slots__ = ()
    expert_counts: torch.Tensor | None = None
    count_weight: torch.Tensor | None = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None, scale: float) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for the new tokens -> attention output [T, Hq, D]. Every metadata class
        (`PackedSequences`, `CacheStep`, the engine's `PagedAttention`) defines it; the base has no cache to read."""
        raise NotImplementedError(f"{type(self).__name__} does not define attend()")

    def attend_gated(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                     scale: float, gate: torch.Tensor, qk_norm: tuple | None = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """`attend(...) * sigmoid(gate)` (gate [T, Hq, D]). With `qk_norm` = (q_weight, k_weight, eps, cos, sin,
        apply_rope), q and k arrive un-normed and `kernels.norm.qk_norm_rope` with those arguments comes first.
        With `rows` ([N] indices), only those rows' result [N, Hq, D]; every row's K/V is still written."""
        if qk_norm is not None:
            q, k = kernel_norm.qk_norm_rope(q, k, *qk_norm)  # one fused op on GPU
        o = self.attend(layer_idx, q, k, v, window, scale)
        if rows is not None:
            o, gate = o[rows], gate[rows]
        return kernel_norm.sigmoid_gate(o, gate)


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[n, L] bool: query i sees key j when j <= i and, in a sliding layer, j > i - window (window keys incl. itself)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def shared_mask(masks: dict, key, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """`visibility_mask`, built once per step: every layer of a kind (full, or sliding with its window) sees the
    same mask, so the step's metadata keeps it in `masks` under `key` (which must name what the positions are) and
    the window. (Built once per layer, a long prefill's masks would be a noticeable part of a CPU prefill.)"""
    full_key = (key, window, q_pos.device)
    mask = masks.get(full_key)
    if mask is None:
        mask = masks[full_key] = visibility_mask(q_pos, k_pos, window)
    return mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """q: [..., n, Hq, D], k/v: [..., L, Hkv, D], mask: [n, L] -> [..., n, Hq, D]. GQA by head grouping.
    Unbatched inputs get a batch dim of 1: on the CPU, SDPA with GQA over [H, n, D] is several times slower than
    over [1, H, n, D] (the engine's prefill chunks are unbatched)."""
    unbatched = q.dim() == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         attn_mask=mask, scale=scale, enable_gqa=True).transpose(-3, -2)
    return out[0] if unbatched else out


@dataclass(slots=True)
class PackedSequences(AttentionMetadata):
    """Whole sequences packed back to back in the flat batch; `seq_lens` sums to T. No cache."""

    seq_lens: list[int]
    masks: dict = field(default_factory=dict)  # `shared_mask`'s, by sequence length and window

    def attend(self, layer_idx, q, k, v, window, scale):
        lens = self.seq_lens
        if len(set(lens)) == 1:  # equal lengths: one batched call
            b, n = len(lens), lens[0]
            pos = torch.arange(n, device=q.device)
            mask = shared_mask(self.masks, n, pos, pos, window)
            out = reference_attention(q.view(b, n, *q.shape[1:]), k.view(b, n, *k.shape[1:]),
                                      v.view(b, n, *v.shape[1:]), mask, scale)
            return out.reshape(q.shape)
        outs, start = [], 0
        for n in lens:
            pos = torch.arange(n, device=q.device)
            sl = slice(start, start + n)
            outs.append(reference_attention(q[sl], k[sl], v[sl], shared_mask(self.masks, n, pos, pos, window), scale))
            start += n
        return torch.cat(outs, dim=0)


class ContiguousKVCache:
    """Per-layer K/V tensors [B, max_len, Hkv, D]; sequence b's token at position p lives at index p.

    Sliding layers keep every token here and mask to the window: this cache is the simple reference;
    the engine's paged pools are the ones that store only the window.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * batch_size

    def step(self, query_lens: list[int]) -> "CacheStep":
        """Metadata for a forward that appends `query_lens[b]` tokens to sequence b (0 skips it)."""
        if len(query_lens) != len(self.lengths):
            raise ValueError(f"got {len(query_lens)} query lengths for a cache of {len(self.lengths)} sequences")
        for b, n in enumerate(query_lens):
            if self.lengths[b] + n > self.max_len:
                raise ValueError(f"sequence {b} would reach {self.lengths[b] + n} tokens; cache holds {self.max_len}")
        return CacheStep(self, list(self.lengths), list(query_lens))

    def positions(self, query_lens: list[int], device: torch.device | str) -> torch.Tensor:
        """Flat positions [T] for a step appending `query_lens` tokens."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(self.lengths, query_lens)])

    def advance(self, step: "CacheStep") -> None:
        for b, n in enumerate(step.query_lens):
            self.lengths[b] = step.starts[b] + n


@dataclass(slots=True)
class CacheStep(AttentionMetadata):
    cache: ContiguousKVCache
    starts: list[int]
    query_lens: list[int]
    masks: dict = field(default_factory=dict)  # `shared_mask`'s, by (start, length) and window

    def attend(self, layer_idx, q, k, v, window, scale):
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        starts, lens = self.starts, self.query_lens
        active = [b for b, n in enumerate(lens) if n]
        # Uniform step (the common decode case): write and attend for all sequences in one call.
        if len({starts[b] for b in active}) == 1 and len({lens[b] for b in active}) == 1 \
                and active == list(range(active[0], active[0] + len(active))):
            s, n, b0, b1 = starts[active[0]], lens[active[0]], active[0], active[-1] + 1
            ck[b0:b1, s:s + n] = k.view(b1 - b0, n, *k.shape[1:])
            cv[b0:b1, s:s + n] = v.view(b1 - b0, n, *v.shape[1:])
            q_pos = torch.arange(s, s + n, device=q.device)
            k_pos = torch.arange(s + n, device=q.device)
            out = reference_attention(q.view(b1 - b0, n, *q.shape[1:]), ck[b0:b1, :s + n], cv[b0:b1, :s + n],
                                      shared_mask(self.masks, (s, n), q_pos, k_pos, window), scale)
            return out.reshape(q.shape)
        outs, offset = [], 0
        for b in active:
            s, n = starts[b], lens[b]
            sl = slice(offset, offset + n)
            ck[b, s:s + n], cv[b, s:s + n] = k[sl], v[sl]
            q_pos = torch.arange(s, s + n, device=q.device)
            k_pos = torch.arange(s + n, device=q.device)
            outs.append(reference_attention(q[sl], ck[b, :s + n], cv[b, :s + n],
                                            shared_mask(self.masks, (s, n), q_pos, k_pos, window), scale))
            offset += n
        return torch.cat(outs, dim=0)
