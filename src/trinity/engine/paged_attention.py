"""Paged attention over the two KV pools: step metadata and the pure-torch reference.

Every layer of one kind (full or sliding) shares the step's metadata for that pool; each layer has its own
K/V tensor in the pool, shaped [num_blocks * block_size, kv_heads, head_dim] (one row per token slot).

A decode (one new token) writes its K/V first, then gathers its whole context by slot. A prefill chunk
attends to its cached context gathered by slot plus its own keys taken straight from the step's k/v, and
is written after reading (a chunk never writes a slot of its context: blocks are not rewritten in place).

The pools may be stored in fp8 (`EngineConfig.kv_cache_dtype`): every path below then quantizes what it writes and
dequantizes what it reads with the layer's scales (`PagedKV.scales`; `kernels.attention.quantize_kv`). A chunk's
own keys are used as computed, unquantized, as the model's dtype would use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import attention as kernels_attention
from ..kernels import norm as kernel_norm
from ..model.attention import AttentionMetadata, reference_attention, shared_mask, visibility_mask


@dataclass(slots=True)
class PrefillMeta:
    """A sequence computing more than one token this step (a prompt or a chunk of one)."""

    start: int  # first row in the flat batch
    num: int
    q_pos: torch.Tensor  # [num]
    ctx_slots: torch.Tensor  # [Lc] cached context this chunk sees
    ctx_pos: torch.Tensor  # [Lc]
    masks: dict = field(default_factory=dict)  # the reference path's visibility masks, by window (`shared_mask`)


@dataclass(slots=True)
class PoolStep:
    """One pool's addressing for one step."""

    dec_rows: torch.Tensor  # [Bd] rows of single-token (decode) sequences
    dec_slots: torch.Tensor  # [Bd] where each decode's new K/V go
    dec_ctx_slots: torch.Tensor | None  # [Bd, L] each decode's context including its new token, padded
    dec_ctx_valid: torch.Tensor  # [Bd, L] bool, a prefix of each row; or [Bd] int lengths (the CUDA graph's)
    prefill_rows: torch.Tensor  # [Tp] rows of multi-token sequences whose K/V are stored (after reading)
    prefill_slots: torch.Tensor  # [Tp]
    prefills: list[PrefillMeta] = field(default_factory=list)
    packed: object = None  # the prefills packed for the fast kernels, made on first use
    dec_lens: torch.Tensor | None = None  # [Bd] int32 context lengths for the fast kernels (else made on first use)
    # the decode contexts by block table instead of dec_ctx_slots (the CUDA graph's; the fast path only)
    dec_table: kernels_attention.BlockTable | None = None
    decode_only: bool = False  # every row of the batch is a decode, in order (dec_rows = 0..T-1)


@dataclass(slots=True)
class PagedKV:
    """The cache tensors: per pool, K and V of shape [layers_of_that_kind, slots, kv_heads, head_dim], in the model's
    dtype or in fp8. An fp8 pool stores x / scale with a per-layer K scale and V scale ([layers_of_that_kind] fp32 on
    the pool's device, 1.0 unless set: `set_scales`); the kernels read the scales from there, so a CUDA graph
    captured before a change replays the new values."""

    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    layer_pool: list[tuple[str, int]]  # model layer -> (pool, index within the pool)
    k_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # per pool [layers]; made (1.0) where missing
    v_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    _layer_scales: list = field(default_factory=list, init=False, repr=False)  # per layer: (k, v) 1-element views

    def __post_init__(self):
        for pool, t in self.k.items():
            for scales in (self.k_scale, self.v_scale):
                if pool not in scales:
                    scales[pool] = torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
        # the views made once: `attend` runs once per layer and step
        self._layer_scales = [(self.k_scale[pool][i:i + 1], self.v_scale[pool][i:i + 1])
                              for pool, i in self.layer_pool]

    def scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (K scale, V scale), one fp32 value each (views into the pools' scale tensors)."""
        return self._layer_scales[layer_idx]

    def set_scales(self, layer_idx: int, k_scale: float, v_scale: float) -> None:
        """The layer's fp8 scales (a checkpoint's `k_scale` / `v_scale`), set before the pools hold anything: values
        already stored keep the old ones' meaning. Pools in the model's dtype ignore them."""
        if not (k_scale > 0 and v_scale > 0):
            raise ValueError(f"KV scales must be positive, not {k_scale}, {v_scale}")
        ks, vs = self._layer_scales[layer_idx]
        ks.fill_(float(k_scale))
        vs.fill_(float(v_scale))


@dataclass(slots=True)
class PagedAttention(AttentionMetadata):
    """AttentionMetadata for the engine: `attend` reads and writes the paged pools."""

    kv: PagedKV
    steps: dict[str, PoolStep]
    # the step's expert-load telemetry (see `AttentionMetadata`): [num_moe_layers, num_experts] int64 counts the
    # MoE blocks add to, and each token's [T] int64 0/1 weight in them (a padded decode table's padding rows: 0)
    expert_counts: torch.Tensor | None = None
    count_weight: torch.Tensor | None = None

    def attend(self, layer_idx, q, k, v, window, scale, rows=None):
        """With `rows` ([N] indices): only those rows' output [N, Hq, D], every row's K/V still written. The CPU
        reference path then computes only those rows' queries of each prefill chunk (the model's last layer needs
        one per sampling prompt); elsewhere every row is computed and the rows picked."""
        pool, li = self.kv.layer_pool[layer_idx]
        kc, vc, step = self.kv.k[pool][li], self.kv.v[pool][li], self.steps[pool]
        ks, vs = self.kv.scales(layer_idx)
        if kernels_attention.use_fast_path(q):
            return _pick(self._attend_fast(kc, vc, step, q, k, v, window, scale, ks, vs), rows)
        ka = kernels_attention
        if step.decode_only and ka.native_decode_wanted(q, kc):  # the whole batch, without row gathers
            return _pick(ka.decode_attention_native(q, kc, vc, step.dec_ctx_slots, step.dec_ctx_valid, scale, k, v,
                                                    step.dec_slots, ks, vs), rows)
        kept = rows.tolist() if rows is not None and rows.device.type == "cpu" else None  # no sync: CPU only
        out = torch.empty_like(q)
        if step.dec_rows.numel():
            out[step.dec_rows] = _decode_rows(kc, vc, step, q, k, v, scale, ks, vs)
        for p in step.prefills:
            chunk = slice(p.start, p.start + p.num)
            queries = range(p.num) if kept is None else sorted({r - p.start for r in kept if 0 <= r - p.start < p.num})
            if not queries:
                continue  # nobody reads this chunk's outputs here: only its K/V (written below)
            keys = torch.cat([ka.dequantize_kv(ka.gather_kv(kc, p.ctx_slots), k.dtype, ks), k[chunk]])
            values = torch.cat([ka.dequantize_kv(ka.gather_kv(vc, p.ctx_slots), v.dtype, vs), v[chunk]])
            if len(queries) == p.num and ka.blocked_prefill_wanted(q):
                q_start = int(p.q_pos[0])  # a CPU tensor: no sync
                out[chunk] = ka.chunk_attention_blocked(q[chunk], keys, values, q_start, q_start - p.ctx_pos.numel(),
                                                        window, scale)
                continue
            k_pos = torch.cat([p.ctx_pos, p.q_pos])
            if len(queries) == p.num:
                mask = shared_mask(p.masks, "chunk", p.q_pos, k_pos, window)
                out[chunk] = reference_attention(q[chunk], keys, values, mask, scale)
            else:  # only the last layer asks for a few rows: their mask rows alone, not the chunk's whole mask
                local = torch.tensor(queries, device=q.device)
                mask = visibility_mask(p.q_pos[local], k_pos, window)
                out[p.start + local] = reference_attention(q[chunk][local], keys, values, mask, scale)
        if step.prefill_rows.numel():
            kc[step.prefill_slots] = ka.quantize_kv(k[step.prefill_rows], kc.dtype, ks)
            vc[step.prefill_slots] = ka.quantize_kv(v[step.prefill_rows], vc.dtype, vs)
        return _pick(out, rows)

    def attend_gated(self, layer_idx, q, k, v, window, scale, gate, qk_norm=None, rows=None):
        """`attend`, then times sigmoid(gate) ([T, Hq, D]); with `qk_norm` = (q_weight, k_weight, eps, cos, sin,
        apply_rope), q and k arrive un-normed and `kernels.norm.qk_norm_rope` comes first; with `rows`, only those
        rows' result (see `attend`). On the fast path a decode step is one launch: the attention kernel norms q and
        the new k, writes the new K/V and applies the gate. Otherwise the separate ops around `attend`."""
        pool, li = self.kv.layer_pool[layer_idx]
        step = self.steps[pool]
        if step.decode_only and kernels_attention.use_fast_path(q):
            return _pick(_decode_only_fast(self.kv.k[pool][li], self.kv.v[pool][li], step, q, k, v, scale,
                                           *self.kv.scales(layer_idx), gate, qk_norm), rows)
        if qk_norm is not None:
            q, k = kernel_norm.qk_norm_rope(q, k, *qk_norm)
        return kernel_norm.sigmoid_gate(self.attend(layer_idx, q, k, v, window, scale, rows), _pick(gate, rows))

    @staticmethod
    def _attend_fast(kc, vc, step: PoolStep, q, k, v, window, scale, ks=None, vs=None):
        """The same steps through the Triton kernels (kernels/attention.py), chosen on CUDA. `ks` / `vs`: the
        layer's fp8 scales (None: 1.0)."""
        ka = kernels_attention
        if step.decode_only:
            return _decode_only_fast(kc, vc, step, q, k, v, scale, ks, vs)
        out = torch.empty_like(q)
        if step.dec_rows.numel():
            ka.write_kv(kc, vc, step.dec_slots, k[step.dec_rows], v[step.dec_rows], ks, vs)
            out[step.dec_rows] = ka.decode_attention(q[step.dec_rows], kc, vc, step.dec_ctx_slots, _lengths(step),
                                                     scale, k_scale=ks, v_scale=vs)
        if step.prefills:
            if step.packed is None:  # built once per step, shared by the pool's layers
                step.packed = ka.pack_prefills(step.prefills)
            out[step.packed.rows] = ka.paged_prefill_attention(q, k, v, kc, vc, step.packed, window, scale, ks, vs)
            ka.write_kv(kc, vc, step.prefill_slots, k[step.prefill_rows], v[step.prefill_rows], ks, vs)
        return out


def _pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _decode_only_fast(kc, vc, step: PoolStep, q, k, v, scale, ks=None, vs=None, gate=None, qk_norm=None):
    """A decode-only step on the Triton path: one kernel, no row gathers or scatters. It writes the new K/V itself
    (quantized, in an fp8 pool), reads the contexts by slot or by block table, and applies the q/k norm and the
    output gate when given."""
    return kernels_attention.decode_attention(q, kc, vc, step.dec_ctx_slots, _lengths(step), scale, gate=gate,
                                              new_kv=(k, v, step.dec_slots), table=step.dec_table, qk_norm=qk_norm,
                                              k_scale=ks, v_scale=vs)


def _lengths(step: PoolStep) -> torch.Tensor:
    """The decode rows' context lengths for the fast kernels: the runner passes them (the CUDA graph as
    `dec_ctx_valid`); otherwise counted once per step and pool, not once per layer."""
    if step.dec_lens is None:
        valid = step.dec_ctx_valid
        step.dec_lens = valid.sum(dim=1, dtype=torch.int32) if valid.dtype == torch.bool else valid
    return step.dec_lens


def _decode_rows(kc, vc, step: PoolStep, q, k, v, scale, ks=None, vs=None):
    """The decode rows' attention, their new K/V written first: a decode's own slot is never one its context
    needs, so it is read back with the context (quantized, in an fp8 pool, as every later step reads it). On the
    CPU (fp32 or bf16) the C kernel does both and reads the contexts in place; otherwise the reference (one gather
    of each context, then SDPA)."""
    rows = step.dec_rows
    ka = kernels_attention
    if ka.native_decode_wanted(q, kc):
        return ka.decode_attention_native(q[rows], kc, vc, step.dec_ctx_slots, step.dec_ctx_valid, scale, k[rows],
                                          v[rows], step.dec_slots, ks, vs)
    kc[step.dec_slots] = ka.quantize_kv(k[rows], kc.dtype, ks)
    vc[step.dec_slots] = ka.quantize_kv(v[rows], vc.dtype, vs)
    return ka.decode_attention_reference(q[rows], kc, vc, step.dec_ctx_slots, step.dec_ctx_valid, scale, ks, vs)
