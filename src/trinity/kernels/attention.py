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

The caches may be stored in fp8 (`EngineConfig.kv_cache_dtype`; torch.float8_e4m3fn or float8_e5m2): every
function that reads or writes a cache then takes the layer's `k_scale` / `v_scale` (a one-element fp32 tensor on
the cache's device; None = 1.0). A cache holds x / scale, saturated to the format's largest finite value and rounded
to nearest-even (`quantize_kv`); a read gives the stored value times the scale (`dequantize_kv`). Caches in the
model's dtype ignore the scales.

Selection, per call:
- `TRINITY_KERNELS=reference` or `kernels.use_reference(True)`: the references.
- `TRINITY_KERNELS=triton`: the Triton kernels wherever triton can run them: CUDA tensors, or CPU
  tensors when `TRITON_INTERPRET=1` (Triton's interpreter, for tests). Set both variables before the
  first call: the interpreter is fixed when the kernels module is imported.
- `auto` (default): Triton on CUDA, the references elsewhere.
Autograd always takes the references (the kernels have no backward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.attention import reference_attention, visibility_mask
from . import kernels_mode, reference_forced, triton_available, use_triton  # noqa: F401
from .norm import qk_norm_rope_reference, sigmoid_gate_reference


def _kernels():
    from . import attention_triton
    return attention_triton


# ------------------------------------------------------------------------------------------ fp8 KV storage
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# `EngineConfig.kv_cache_dtype` -> the pools' torch dtype ("auto": the model's)
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_storage_dtype(kv_cache_dtype: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pools' dtype for a `kv_cache_dtype` setting (a name, or already a torch dtype)."""
    if isinstance(kv_cache_dtype, torch.dtype):
        return kv_cache_dtype
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; allowed: auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_KV_DTYPES


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it. fp8: x / scale in fp32, clamped to the format's largest finite value
    (a key past it saturates instead of becoming inf or NaN, which would poison every later query), then rounded to
    nearest-even by the cast. Other dtypes: a plain cast (the scale is ignored)."""
    if not is_fp8(cache_dtype):
        return x.to(cache_dtype)
    y = x.float() if scale is None else x.float() / scale
    fmax = torch.finfo(cache_dtype).max
    return y.clamp(-fmax, fmax).to(cache_dtype)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache.index_select(0, slots); an fp8 cache through its bytes: torch's indexing kernels have not covered the
    fp8 dtypes on every device and version (pytorch#133605), byte gathers run everywhere."""
    if is_fp8(cache.dtype):
        return cache.view(torch.uint8).index_select(0, slots).view(cache.dtype)
    return cache.index_select(0, slots)


def dequantize_kv(c: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Cache rows as `dtype` for the attention math: fp8 rows times the scale (exact in fp32, then one rounding to
    `dtype`), as every kernel reads them. Rows of another dtype come back as they are."""
    if not is_fp8(c.dtype):
        return c
    y = c.float() if scale is None else c.float() * scale
    return y.to(dtype)


# ------------------------------------------------------------------------------------------ references
def decode_attention_reference(q, k_cache, v_cache, ctx_slots, ctx_valid_or_lens, scale, k_scale=None,
                               v_scale=None):
    """The decode math (the engine's, off the fast paths): gather each context by slot, masked SDPA with GQA. An fp8
    cache is gathered as stored (1 byte a value), then dequantized."""
    if ctx_valid_or_lens.dtype == torch.bool:
        valid = ctx_valid_or_lens
    else:
        valid = torch.arange(ctx_slots.shape[1], device=ctx_slots.device)[None, :] < ctx_valid_or_lens[:, None]
    # padded entries may hold anything: point them at slot 0 so the gather stays in bounds
    slots = ctx_slots.masked_fill(~valid, 0).reshape(-1)
    # index_select copies whole rows (advanced indexing copies element by element: several times slower)
    k_ctx = gather_kv(k_cache, slots).view(*ctx_slots.shape, *k_cache.shape[1:])  # [B, L, Hkv, D]
    v_ctx = gather_kv(v_cache, slots).view(*ctx_slots.shape, *v_cache.shape[1:])
    k_ctx, v_ctx = dequantize_kv(k_ctx, q.dtype, k_scale), dequantize_kv(v_ctx, q.dtype, v_scale)
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


def write_kv_reference(k_cache, v_cache, slots, k, v, k_scale=None, v_scale=None):
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache[slots] = quantize_kv(k, k_cache.dtype, k_scale)
    v_cache[slots] = quantize_kv(v, v_cache.dtype, v_scale)


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


def paged_prefill_attention(q, k, v, k_cache, v_cache, packed: PackedPrefills, window, scale, k_scale=None,
                            v_scale=None):
    """The engine's prefill branch for all chunks at once: q/k/v are the step's flat [T, H, D] projections;
    returns the attention output of packed.rows ([Tq, Hq, D]). Reads the cache only (write afterwards). The cached
    context is gathered as stored and dequantized (an fp8 cache) before the chunks' own keys join it."""
    k_ctx = dequantize_kv(gather_kv(k_cache, packed.ctx_slots), k.dtype, k_scale)
    v_ctx = dequantize_kv(gather_kv(v_cache, packed.ctx_slots), v.dtype, v_scale)
    keys = torch.cat([k_ctx, k[packed.rows]])[packed.kv_order]
    values = torch.cat([v_ctx, v[packed.rows]])[packed.kv_order]
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
                     table: BlockTable | None = None, qk_norm: tuple | None = None, k_scale=None, v_scale=None):
    """`gate` ([B, Hq, D]): the output times sigmoid(gate) (the attention layer's output gate); `new_kv` = (k, v,
    slots): this step's K/V written to the cache first (`write_kv`); `table` (with ctx_slots None): the contexts
    by block table; `qk_norm` = (q_weight, k_weight, eps, cos, sin, apply_rope), with new_kv: q and the new k
    still un-normed, `kernels.norm.qk_norm_rope` applied first; `k_scale` / `v_scale`: an fp8 cache's scales. On
    the Triton path all in the one launch."""
    if not use_triton(q, k_cache, v_cache):
        if qk_norm is not None:
            q, k = qk_norm_rope_reference(q, new_kv[0], *qk_norm)
            new_kv = (k, new_kv[1], new_kv[2])
        if new_kv is not None:
            write_kv_reference(k_cache, v_cache, new_kv[2], new_kv[0], new_kv[1], k_scale, v_scale)
        if table is not None:
            ctx_slots = table.slots()
        out = decode_attention_reference(q, k_cache, v_cache, ctx_slots, ctx_valid_or_lens, scale, k_scale, v_scale)
        return out if gate is None else sigmoid_gate_reference(out, gate)
    lens = ctx_valid_or_lens
    if lens.dtype == torch.bool:  # validity is a prefix of each row: its count is the length
        lens = lens.sum(dim=1, dtype=torch.int32)
    return _kernels().decode_attention(q, k_cache, v_cache, ctx_slots, lens, scale, gate=gate, new_kv=new_kv,
                                       table=table, qk_norm=qk_norm, k_scale=k_scale, v_scale=v_scale)


def prefill_attention(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale, *, max_q_len: int | None = None,
                      contiguous_keys: bool = False):
    """`max_q_len` (the longest sequence's query count, if the caller knows it on the host) trims the grid;
    `contiguous_keys` (each sequence's key positions consecutive and ascending) lets the kernel walk one range."""
    if not use_triton(q, k, v):
        return prefill_attention_reference(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale)
    return _kernels().prefill_attention(q, k, v, cu_q, cu_k, q_pos, k_pos, window, scale, max_q_len=max_q_len,
                                        contiguous_keys=contiguous_keys)


def write_kv(k_cache, v_cache, slots, k, v, k_scale=None, v_scale=None):
    if not use_triton(k_cache, k, v):
        return write_kv_reference(k_cache, v_cache, slots, k, v, k_scale, v_scale)
    return _kernels().write_kv(k_cache, v_cache, slots, k, v, k_scale=k_scale, v_scale=v_scale)


# ------------------------------------------------------------------------------------- native CPU kernel
def native_decode_wanted(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The C decode kernel (`attention_cpu.c`): fp32 or bf16 CPU inference where `native.library()` is built, over a
    cache in the model's dtype or in fp8."""
    from . import reference_forced
    from .native import library

    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and (k_cache.dtype == q.dtype or is_fp8(k_cache.dtype))
            and not reference_forced() and not torch.is_grad_enabled() and library() is not None)


# the C kernel's cache formats: fp32, bf16, fp8 (read through a 256-entry table of the byte's value)
_NATIVE_FORMAT = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 2}


@functools.cache
def fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """[256] fp32: the value of every byte of an fp8 format, as torch converts it (the C kernel's decoder)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def _scale_ptr(scale: torch.Tensor | None):
    """A CPU scale's address for the C kernel (NULL: 1.0)."""
    if scale is None:
        return None
    if scale.dtype != torch.float32 or scale.device.type != "cpu" or scale.numel() != 1:
        raise ValueError(f"a KV scale must be one fp32 value on the CPU, not {tuple(scale.shape)} {scale.dtype}")
    return scale.data_ptr()


def decode_attention_native(q, k_cache, v_cache, ctx_slots, ctx_valid, scale, new_k=None, new_v=None,
                            new_slots=None, k_scale=None, v_scale=None):
    """As the engine's reference decode (write the new K/V at `new_slots`, then attend over each row's context,
    read by slot): q [B, Hq, D]; caches [slots, Hkv, D]; ctx_slots/ctx_valid [B, L] -> [B, Hq, D]. An fp8 cache:
    the new K/V quantized here (`quantize_kv`), the kernel reading each byte through `fp8_table` times the scale."""
    from .native import library

    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV pools must be contiguous")
    qf, ctx_slots, ctx_valid = q.float().contiguous(), ctx_slots.contiguous(), ctx_valid.contiguous()
    writes = new_k is not None
    if writes:
        new_k = quantize_kv(new_k, k_cache.dtype, k_scale).contiguous()
        new_v = quantize_kv(new_v, v_cache.dtype, v_scale).contiguous()
        new_slots = new_slots.contiguous()
    fp8 = is_fp8(k_cache.dtype)
    out = torch.empty_like(qf)
    status = library().trinity_paged_decode_attention(
        qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _NATIVE_FORMAT[k_cache.dtype],
        fp8_table(k_cache.dtype).data_ptr() if fp8 else None, _scale_ptr(k_scale) if fp8 else None,
        _scale_ptr(v_scale) if fp8 else None,
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
           "decode_attention_reference", "prefill_attention_reference", "write_kv_reference",
           "kv_storage_dtype", "is_fp8", "quantize_kv", "dequantize_kv"]


def use_fast_path(q: torch.Tensor) -> bool:
    """Whether the engine should route this step's attention through the Triton kernels."""
    return use_triton(q)
