"""Paged-attention entry points: Triton kernels beside pure-torch references, chosen at run time.

Interfaces (shared by the references `*_reference` and the Triton kernels in `attention_triton`):

- `decode_attention(q, k_cache, v_cache, ctx_slots, ctx_valid_or_lens, scale)`: q [B, Hq, D];
  k_cache/v_cache [S, Hkv, D] (one layer's slot rows); ctx_slots [B, L] int; ctx_valid_or_lens either the
  engine's [B, L] bool validity (a prefix of each row, as `ModelRunner._decode_context` builds it) or
  [B] int valid lengths. -> [B, Hq, D].
- `prefill_attention(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale)`: sequences packed back to back;
  q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_q/cu_k [B+1] prefix sums, q_pos [Tq] / k_pos [Tk] absolute
  positions; query i sees key j of its sequence iff k_pos[j] <= q_pos[i] and (no window or
  k_pos[j] > q_pos[i] - window). -> [Tq, Hq, D].
- `write_kv(k_cache, v_cache, slots, k, v)`: k_cache[slots] = k, v_cache[slots] = v, skipping slots < 0.
- `pack_prefills(step.prefills)` (once per step and pool) and `paged_prefill_attention(q, k, v, k_cache,
  v_cache, packed, window, scale)`: the engine's whole prefill branch in one `prefill_attention` call.

Selection, per call:
- `TRINITY_KERNELS=reference` or `kernels.use_reference(True)`: the references.
- `TRINITY_KERNELS=triton`: the Triton kernels wherever triton can run them: CUDA tensors, or CPU
  tensors when `TRITON_INTERPRET=1` (Triton's interpreter, for tests). Set both variables before the
  first call: the interpreter is fixed when the kernels module is imported.
- `auto` (default): Triton on CUDA, the references elsewhere.
Autograd always takes the references (the kernels have no backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.attention import reference_attention, visibility_mask
from . import kernels_mode, reference_forced, triton_available, use_triton  # noqa: F401
from .norm import qk_norm_rope_reference, sigmoid_gate_reference


def _kernels():
    from . import attention_triton
    return attention_triton


# ------------------------------------------------------------------------------------------ references
def decode_attention_reference(q, k_cache, v_cache, ctx_slots, ctx_valid_or_lens, scale):
    """The decode math (the engine's, off the fast paths): gather each context by slot, masked SDPA with GQA."""
    if ctx_valid_or_lens.dtype == torch.bool:
        valid = ctx_valid_or_lens
    else:
        valid = torch.arange(ctx_slots.shape[1], device=ctx_slots.device)[None, :] < ctx_valid_or_lens[:, None]
    # padded entries may hold anything: point them at slot 0 so the gather stays in bounds
    slots = ctx_slots.masked_fill(~valid, 0).reshape(-1)
    # index_select copies whole rows (advanced indexing copies element by element: several times slower)
    k_ctx = k_cache.index_select(0, slots).view(*ctx_slots.shape, *k_cache.shape[1:])  # [B, L, Hkv, D]
    v_ctx = v_cache.index_select(0, slots).view(*ctx_slots.shape, *v_cache.shape[1:])
    out = F.scaled_dot_product_attention(q[:, :, None], k_ctx.transpose(1, 2), v_ctx.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True)
    return out[:, :, 0]


def prefill_attention_reference(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale):
    """The engine's prefill math, one sequence at a time (visibility_mask + reference_attention)."""
    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if cq[b + 1] == cq[b]:
            continue
        mask = visibility_mask(q_pos[qs], k_pos[ks], window)
        out[qs] = reference_attention(q[qs], k[ks], v[ks], mask, scale)
    return out


def write_kv_reference(k_cache, v_cache, slots, k, v):
    keep = slots >= 0
    if bool(keep.all()):
        k_cache[slots] = k.to(k_cache.dtype)
        v_cache[slots] = v.to(v_cache.dtype)
    else:
        k_cache[slots[keep]] = k[keep].to(k_cache.dtype)
        v_cache[slots[keep]] = v[keep].to(v_cache.dtype)


# ------------------------------------------------------------------------- packing the engine's prefills
@dataclass(slots=True)
class PackedPrefills:
    """One step's prefill chunks packed for `prefill_attention`; built once per step and pool, used by every
    layer of the pool. Sequence b's keys are its cached context (gathered by slot) then its chunk's keys."""

    rows: torch.Tensor  # [Tq] flat-batch rows of the chunks' tokens, sequence by sequence
    ctx_slots: torch.Tensor  # [C] cached-context slots of all chunks
    kv_order: torch.Tensor  # [Tk] index into cat([cache[ctx_slots], new[rows]]) giving the packed keys
    cu_q: torch.Tensor  # [B+1] int32
    cu_k: torch.Tensor  # [B+1] int32
    q_pos: torch.Tensor  # [Tq]
    k_pos: torch.Tensor  # [Tk]
    max_q_len: int


def pack_prefills(prefills) -> PackedPrefills:
    """prefills: `engine.paged_attention.PrefillMeta`-like objects (start, num, q_pos, ctx_slots, ctx_pos)."""
    dev = prefills[0].q_pos.device
    nq = [p.num for p in prefills]
    nc = [p.ctx_slots.numel() for p in prefills]
    c_total, order, c_off, q_off = sum(nc), [], 0, 0
    for n, c in zip(nq, nc):
        order += [torch.arange(c_off, c_off + c), torch.arange(c_total + q_off, c_total + q_off + n)]
        c_off, q_off = c_off + c, q_off + n
    k_pos = torch.cat([x for p in prefills for x in (p.ctx_pos, p.q_pos)])
    cum = lambda xs: torch.tensor([0] + xs, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)  # noqa: E731
    return PackedPrefills(
        rows=torch.cat([torch.arange(p.start, p.start + p.num) for p in prefills]).to(dev),
        ctx_slots=torch.cat([p.ctx_slots for p in prefills]), kv_order=torch.cat(order).to(dev),
        cu_q=cum(nq), cu_k=cum([n + c for n, c in zip(nq, nc)]), q_pos=torch.cat([p.q_pos for p in prefills]),
        k_pos=k_pos, max_q_len=max(nq))


def paged_prefill_attention(q, k, v, k_cache, v_cache, packed: PackedPrefills, window, scale):
    """The engine's prefill branch for all chunks at once: q/k/v are the step's flat [T, H, D] projections;
    returns the attention output of packed.rows ([Tq, Hq, D]). Reads the cache only (write afterwards)."""
    keys = torch.cat([k_cache[packed.ctx_slots], k[packed.rows]])[packed.kv_order]
    values = torch.cat([v_cache[packed.ctx_slots], v[packed.rows]])[packed.kv_order]
    # each chunk's keys are its cached context (positions lo..s-1) then its own tokens (s..s+n-1): contiguous
    return prefill_attention(q[packed.rows], keys, values, packed.cu_q, packed.cu_k, packed.q_pos, packed.k_pos,
                             window, scale, max_q_len=packed.max_q_len, contiguous_keys=True)


# ------------------------------------------------------------------------------------ decode block tables
@dataclass(slots=True)
class BlockTable:
    """Decode contexts addressed by block table, as the engine's runner keeps them: row b sees the positions
    lo[b] .. lo[b] + length - 1, and position p lives in slot entry * block_size + p % block_size, where entry is
    column p // block_size of its table row (the engine's `kv_layout.KVLayout.slot`, on tensors, as the Triton
    decode kernel reads it). Its table row is row b of `table`, or row rows[b] with `rows` (a persistent table, one
    row per running sequence, that the batch indexes). The tensors may be strided columns of one int32 table.
    `width`: the most positions a row can see (sizes the key splits)."""

    table: torch.Tensor  # [B, blocks], or [R, blocks] with rows
    lo: torch.Tensor  # [B]
    block_size: int
    width: int
    rows: torch.Tensor | None = None  # [B] the table row of each batch row

    def slots(self) -> torch.Tensor:
        """[B, width] int64: every row's per-position slots (what the kernel computes in place)."""
        pos = self.lo.long()[:, None] + torch.arange(self.width, device=self.lo.device)[None, :]
        block = (pos // self.block_size).clamp(max=self.table.shape[1] - 1)  # past a row's length: never read
        table = self.table if self.rows is None else self.table.index_select(0, self.rows.long())
        return table.long().gather(1, block) * self.block_size + pos % self.block_size


# ---------------------------------------------------------------------------------------- dispatchers
def decode_attention(q, k_cache, v_cache, ctx_slots, ctx_valid_or_lens, scale, gate=None, new_kv=None,
                     table: BlockTable | None = None, qk_norm: tuple | None = None):
    """`gate` ([B, Hq, D]): the output times sigmoid(gate) (the attention layer's output gate); `new_kv` = (k, v,
    slots): this step's K/V written to the cache first (`write_kv`); `table` (with ctx_slots None): the contexts
    by block table; `qk_norm` = (q_weight, k_weight, eps, cos, sin, apply_rope), with new_kv: q and the new k
    still un-normed, `kernels.norm.qk_norm_rope` applied first. On the Triton path all in the one launch."""
    if not use_triton(q, k_cache, v_cache):
        if qk_norm is not None:
            q, k = qk_norm_rope_reference(q, new_kv[0], *qk_norm)
            new_kv = (k, new_kv[1], new_kv[2])
        if new_kv is not None:
            write_kv_reference(k_cache, v_cache, new_kv[2], new_kv[0], new_kv[1])
        if table is not None:
            ctx_slots = table.slots()
        out = decode_attention_reference(q, k_cache, v_cache, ctx_slots, ctx_valid_or_lens, scale)
        return out if gate is None else sigmoid_gate_reference(out, gate)
    lens = ctx_valid_or_lens
    if lens.dtype == torch.bool:  # validity is a prefix of each row: its count is the length
        lens = lens.sum(dim=1, dtype=torch.int32)
    return _kernels().decode_attention(q, k_cache, v_cache, ctx_slots, lens, scale, gate=gate, new_kv=new_kv,
                                       table=table, qk_norm=qk_norm)


def prefill_attention(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale, *, max_q_len: int | None = None,
                      contiguous_keys: bool = False):
    """`max_q_len` (the longest sequence's query count, if the caller knows it on the host) trims the grid;
    `contiguous_keys` (each sequence's key positions consecutive and ascending) lets the kernel walk one range."""
    if not use_triton(q, k, v):
        return prefill_attention_reference(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale)
    return _kernels().prefill_attention(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale, max_q_len=max_q_len,
                                        contiguous_keys=contiguous_keys)


def write_kv(k_cache, v_cache, slots, k, v):
    if not use_triton(k_cache, k, v):
        return write_kv_reference(k_cache, v_cache, slots, k, v)
    return _kernels().write_kv(k_cache, v_cache, slots, k, v)


# ------------------------------------------------------------------------------------- native CPU kernel
def native_decode_wanted(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The C decode kernel (`attention_cpu.c`): fp32 or bf16 CPU inference where `native.library()` is built."""
    from . import reference_forced
    from .native import library

    return (q.device.type == "cpu" and q.dtype == k_cache.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and not reference_forced() and not torch.is_grad_enabled() and library() is not None)


def decode_attention_native(q, k_cache, v_cache, ctx_slots, ctx_valid, scale, new_k=None, new_v=None,
                            new_slots=None):
    """As the engine's reference decode (write the new K/V at `new_slots`, then attend over each row's context,
    read by slot): q [B, Hq, D]; caches [slots, Hkv, D]; ctx_slots/ctx_valid [B, L] -> [B, Hq, D]."""
    from .native import library

    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV pools must be contiguous")
    qf, ctx_slots, ctx_valid = q.float().contiguous(), ctx_slots.contiguous(), ctx_valid.contiguous()
    writes = new_k is not None
    if writes:
        new_k, new_v = new_k.to(k_cache.dtype).contiguous(), new_v.to(k_cache.dtype).contiguous()
        new_slots = new_slots.contiguous()
    out = torch.empty_like(qf)
    status = library().trinity_paged_decode_attention(
        qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
        new_k.data_ptr() if writes else None, new_v.data_ptr() if writes else None,
        new_slots.data_ptr() if writes else None, ctx_slots.data_ptr(), ctx_valid.data_ptr(), out.data_ptr(),
        b, hq, hkv, d, ctx_slots.shape[1], scale, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"native decode attention does not support {hq} query heads over {hkv} KV heads of "
                         f"dimension {d}")
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- CPU prefill, block by block
# Queries per block of `chunk_attention_blocked`: with the built-in model's 128-token window a block then reads at
# most 255 keys (against every key for one masked SDPA over the chunk).
CHUNK_BLOCK = 128


def blocked_prefill_wanted(q: torch.Tensor) -> bool:
    """CPU inference (the references not forced): the engine's prefill chunks take `chunk_attention_blocked`."""
    from . import reference_forced

    return q.device.type == "cpu" and not reference_forced() and not torch.is_grad_enabled()


def chunk_attention_blocked(q, k, v, q_start: int, k_start: int, window: int | None, scale: float,
                            block: int = CHUNK_BLOCK):
    """One prefill chunk's attention in blocks of queries, as `reference_attention` with `visibility_mask` gives it:
    q [n, Hq, D] at positions q_start.., k/v [L, Hkv, D] at positions k_start.. (the chunk's cached context, then
    its own keys: k_start + L == q_start + n). Each block of queries attends only to the keys it can see: up to its
    last query, and in a sliding layer from its first query's window on (a masked SDPA over every key computes
    them all, most masked out). A chunk with no context in a full layer takes SDPA's causal kernel instead (no
    mask, and faster)."""
    n, length = q.shape[0], k.shape[0]
    if k_start + length != q_start + n:
        raise ValueError(f"keys at {k_start}..{k_start + length - 1} must end where the queries "
                         f"({q_start}..{q_start + n - 1}) end")
    if window is None and length == n:
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    out = torch.empty_like(q)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        first, end = q_start + i0, q_start + i1  # the block's query positions: first .. end - 1
        lo = k_start if window is None else max(k_start, first - window + 1)
        keys = slice(lo - k_start, end - k_start)
        mask = visibility_mask(torch.arange(first, end), torch.arange(lo, end), window)
        out[i0:i1] = reference_attention(q[i0:i1], k[keys], v[keys], mask, scale)
    return out


__all__ = ["decode_attention", "prefill_attention", "write_kv", "triton_available", "BlockTable", "PackedPrefills",
           "pack_prefills", "paged_prefill_attention",
           "decode_attention_reference", "prefill_attention_reference", "write_kv_reference"]


def use_fast_path(q: torch.Tensor) -> bool:
    """Whether the engine should route this step's attention through the Triton kernels."""
    return use_triton(q)
