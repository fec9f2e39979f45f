"""Paged attention over the two KV pools: step metadata and the pure-torch reference.

Every layer of one kind (full or sliding) shares the step's metadata for that pool; each layer has its own
K/V tensor in the pool, shaped [num_blocks * block_size, kv_heads, head_dim] (one row per token slot).

A query attends to (a) the sequence's cached context, gathered by slot, and (b) the keys of the tokens
computed in this very step, taken straight from the step's k/v. New keys are written to the cache only
after reading: in the sliding ring a long chunk may overwrite slots that its own first queries still need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model.attention import reference_attention, visibility_mask


@dataclass(slots=True)
class PrefillMeta:
    """A sequence computing more than one token this step (a prompt or a chunk of one)."""

    start: int  # first row in the flat batch
    num: int
    q_pos: torch.Tensor  # [num]
    ctx_slots: torch.Tensor  # [Lc] cached context this chunk sees
    ctx_pos: torch.Tensor  # [Lc]


@dataclass(slots=True)
class PoolStep:
    """One pool's addressing for one step."""

    write_rows: torch.Tensor  # [Tw] rows of the flat batch whose K/V are stored
    write_slots: torch.Tensor  # [Tw]
    dec_rows: torch.Tensor  # [Bd] rows of single-token (decode) sequences
    dec_ctx_slots: torch.Tensor  # [Bd, L] cached context per decode, padded
    dec_ctx_valid: torch.Tensor  # [Bd, L] bool
    prefills: list[PrefillMeta] = field(default_factory=list)


@dataclass(slots=True)
class PagedKV:
    """The cache tensors: per pool, K and V of shape [layers_of_that_kind, slots, kv_heads, head_dim]."""

    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    layer_pool: list[tuple[str, int]]  # model layer -> (pool, index within the pool)


@dataclass(slots=True)
class PagedAttention:
    """AttentionMetadata for the engine: `attend` reads and writes the paged pools."""

    kv: PagedKV
    steps: dict[str, PoolStep]

    def attend(self, layer_idx, q, k, v, window, scale):
        pool, li = self.kv.layer_pool[layer_idx]
        kc, vc, step = self.kv.k[pool][li], self.kv.v[pool][li], self.steps[pool]
        out = torch.empty_like(q)
        if step.dec_rows.numel():
            out[step.dec_rows] = _decode_attention(q[step.dec_rows], k[step.dec_rows], v[step.dec_rows],
                                                   kc[step.dec_ctx_slots], vc[step.dec_ctx_slots],
                                                   step.dec_ctx_valid, scale)
        for p in step.prefills:
            rows = slice(p.start, p.start + p.num)
            keys, values = torch.cat([kc[p.ctx_slots], k[rows]]), torch.cat([vc[p.ctx_slots], v[rows]])
            mask = visibility_mask(p.q_pos, torch.cat([p.ctx_pos, p.q_pos]), window)
            out[rows] = reference_attention(q[rows], keys, values, mask, scale)
        kc[step.write_slots] = k[step.write_rows]
        vc[step.write_slots] = v[step.write_rows]
        return out


def _decode_attention(q, k_new, v_new, k_ctx, v_ctx, ctx_valid, scale):
    """q, k_new, v_new: [B, H, D]; k_ctx/v_ctx: [B, L, Hkv, D] (padded); ctx_valid: [B, L] -> [B, Hq, D]."""
    keys = torch.cat([k_ctx, k_new[:, None]], dim=1).transpose(1, 2)  # [B, Hkv, L+1, D]
    values = torch.cat([v_ctx, v_new[:, None]], dim=1).transpose(1, 2)
    valid = torch.cat([ctx_valid, ctx_valid.new_ones(ctx_valid.shape[0], 1)], dim=1)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=valid[:, None, None, :],
                                         scale=scale, enable_gqa=True)
    return out[:, :, 0]
