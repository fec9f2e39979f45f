"""The model runner: owns the device and the KV pools' tensors, keeps its own block tables, and turns a step
(`step.StepInput`, plain data from the scheduler) into logits. It never reads the KV manager: every block it
addresses came in a step's table changes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import attention as kernels_attention
from ..model.model import TrinityForCausalLM
from .block_tables import WorkerBlockTables
from .cuda_graphs import DecodeGraphs
from .kv_layout import KVLayout
from .paged_attention import PagedAttention, PagedKV, PoolStep, PrefillMeta
from .step import StepInput

DEFAULT_CPU_KV_MEMORY = 2 << 30  # bytes, when neither num_kv_blocks nor kv_cache_memory is given on the CPU


@dataclass(slots=True)
class CachePlan:
    block_size: int
    num_full_blocks: int
    num_sliding_blocks: int
    full_block_bytes: int
    sliding_block_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.num_full_blocks * self.full_block_bytes + self.num_sliding_blocks * self.sliding_block_bytes


def plan_cache(model: TrinityForCausalLM, block_size: int, max_num_seqs: int, max_model_len: int,
               num_kv_blocks: int | None = None, kv_cache_memory: int | None = None,
               gpu_memory_utilization: float = 0.9, prefix_caching: bool = False,
               max_num_batched_tokens: int = 2048, kv_cache_dtype: str | torch.dtype = "auto") -> CachePlan:
    """How many blocks each pool gets.

    `num_kv_blocks`: exactly that many full-pool blocks, and as many sliding blocks (without prefix caching
    capped at what `max_num_seqs` sequences can ever hold at once). Otherwise a byte budget (`kv_cache_memory`; on a
    GPU by default `gpu_memory_utilization` of the device minus what is already allocated and an activation
    reserve) is split: the sliding pool first (a window per running sequence, plus the new blocks of a step's
    prefill chunks), the rest to the full pool, never more than `max_num_seqs` sequences of `max_model_len` tokens
    can use. With prefix caching, budget the full pool cannot use goes to the sliding pool, where cached prefixes
    keep the blocks of their windows.

    Blocks are sized in the pools' storage dtype (`kv_cache_dtype`, as `EngineConfig.kv_cache_dtype`): an fp8 cache's
    value takes 1 byte, so a budget holds twice the blocks of a bf16 cache (its per-layer scales are not counted:
    a few bytes per layer).
    """
    cfg = model.config
    n_sliding = sum(cfg.is_sliding_layer(i) for i in range(cfg.num_hidden_layers))
    n_full = cfg.num_hidden_layers - n_sliding
    kv_dtype = kernels_attention.kv_storage_dtype(kv_cache_dtype, model.dtype)
    per_token_layer = 2 * kv_heads_held(model) * cfg.head_dim * kv_dtype.itemsize
    full_bytes, sliding_bytes = n_full * block_size * per_token_layer, n_sliding * block_size * per_token_layer
    layout = KVLayout(block_size, cfg.sliding_window)
    # at once, a sequence holds its step's context and new blocks for the last window of its step's positions
    # (`KVCacheManager.allocate`): a window and a block per sequence, plus the prefill chunks' new blocks, at most one
    # per block of the step's tokens and a window per sequence (a long chunk's other blocks are for the prefix cache,
    # taken only when left over)
    chunks = min(layout.num_blocks(max_num_batched_tokens), max_num_seqs * layout.window_blocks)
    sliding_cap = min(max_num_seqs * (layout.window_blocks + 1) + chunks,
                      max_num_seqs * layout.num_blocks(max_model_len))
    full_cap = max_num_seqs * layout.num_blocks(max_model_len)
    if num_kv_blocks is not None:
        if num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks = {num_kv_blocks} must be >= 1")
        sliding_blocks = num_kv_blocks if prefix_caching else min(num_kv_blocks, sliding_cap)
        return CachePlan(block_size, num_kv_blocks if n_full else 0, sliding_blocks if n_sliding else 0, full_bytes,
                         sliding_bytes)
    if kv_cache_memory is None:
        kv_cache_memory = _default_kv_budget(model, gpu_memory_utilization, max_num_seqs)
    num_sliding = min(sliding_cap, kv_cache_memory // sliding_bytes) if n_sliding else 0
    rest = kv_cache_memory - num_sliding * sliding_bytes
    num_full = min(full_cap, rest // full_bytes) if n_full else 0
    if prefix_caching and n_sliding:  # room for the cache: at most one block per token the full pool can hold
        rest -= num_full * full_bytes
        num_sliding += min(full_cap, rest // sliding_bytes)
    if (n_full and num_full < 1) or (n_sliding and num_sliding < 1):
        raise ValueError(f"KV cache budget of {kv_cache_memory / 2**20:.1f} MiB leaves no room for a single block "
                         f"(full block {full_bytes} B, sliding block {sliding_bytes} B)")
    return CachePlan(block_size, num_full, num_sliding, full_bytes, sliding_bytes)


def kv_heads_held(model: TrinityForCausalLM) -> int:
    """The KV heads this process's model holds: all of them, or its tensor-parallel rank's share
    (`parallel.sharding.ShardPlan`)."""
    plan = getattr(model, "shard_plan", None)
    return plan.num_kv_heads if plan is not None else model.config.num_key_value_heads


def _default_kv_budget(model: TrinityForCausalLM, utilization: float, max_num_seqs: int) -> int:
    device = model.device
    if device.type != "cuda":
        return DEFAULT_CPU_KV_MEMORY
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization = {utilization} must be in (0, 1]")
    free, total = torch.cuda.mem_get_info(device)
    # memory this process's caching allocator holds but has not handed out is ours to reuse (after an earlier
    # model was freed in the same process it can be tens of GB): only what neither we nor our cache hold
    # belongs to others
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    # activations of one step: logits for every sequence plus a generous margin for the layer temporaries
    reserve = max_num_seqs * model.config.vocab_size * 4 * 2 + (1 << 30)
    return kv_budget(total, utilization, torch.cuda.memory_allocated(device), used_by_others, reserve)


def kv_budget(total: int, utilization: float, allocated: int, used_by_others: int, reserve: int) -> int:
    """What the KV pools may take of a device of `total` bytes: its `utilization` share, less what this process
    has allocated (the weights: each tensor-parallel rank its part), what other processes use and the activations'
    reserve (`trinity plan` budgets a GPU the same way: tests/test_tensor_parallel.py)."""
    return max(0, int(total * utilization) - allocated - used_by_others - reserve)


def _take_kv_scales(model: TrinityForCausalLM, cache: PagedKV, kv_dtype: torch.dtype) -> None:
    """An e4m3 cache takes the per-layer scales a quantized checkpoint ships (`k_scale` / `v_scale`, or one
    `kv_scale` for both, as tensors or floats on each layer's attention module); a layer without them keeps 1.0.
    e5m2 needs none (its range is bf16's). The checkpoint loader puts a checkpoint's `self_attn.k_scale` /
    `v_scale` / `kv_scale` tensors on the modules (`model.checkpoint._take_kv_scale`)."""
    if kv_dtype != torch.float8_e4m3fn:
        return
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        k_scale = getattr(attn, "k_scale", None)
        v_scale = getattr(attn, "v_scale", None)
        both = getattr(attn, "kv_scale", None)
        k_scale, v_scale = (k_scale if k_scale is not None else both), (v_scale if v_scale is not None else both)
        if k_scale is not None or v_scale is not None:
            cache.set_scales(i, float(k_scale if k_scale is not None else 1.0),
                             float(v_scale if v_scale is not None else 1.0))


def build_runner(model: TrinityForCausalLM, config, max_model_len: int, agree=None) -> ModelRunner:
    """The runner of an `EngineConfig` (the engine's, and each tensor-parallel worker's). `agree`: plan -> the plan
    every rank can hold (`parallel.executor.agree_plan`)."""
    plan = plan_cache(model, config.block_size, config.max_num_seqs, max_model_len, config.num_kv_blocks,
                      config.kv_cache_memory, config.gpu_memory_utilization, config.enable_prefix_caching,
                      config.max_num_batched_tokens, config.kv_cache_dtype)
    if agree is not None:
        plan = agree(plan)
    return ModelRunner(model, plan, KVLayout(config.block_size, model.config.sliding_window),
                       max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
                       enforce_eager=config.enforce_eager, kv_cache_dtype=config.kv_cache_dtype)


class ModelRunner:
    def __init__(self, model: TrinityForCausalLM, plan: CachePlan, layout: KVLayout, *, max_num_seqs: int = 1,
                 max_model_len: int | None = None, enforce_eager: bool = True,
                 kv_cache_dtype: str | torch.dtype = "auto"):
        self.model = model
        self.plan = plan
        self.layout = layout
        cfg = model.config
        self.device = model.device
        # RoPE for every position a sequence can reach, precomputed: each step's cos/sin is then one gather (a
        # CUDA-graph decode step saves six launches). The gather does not check its positions; the engine never
        # computes one at or past max_model_len (requests are refused when prompt + max_tokens exceeds it, and
        # a look-ahead row is only queued for a token within max_tokens). The table stays with the model, so it
        # also covers the model's whole range (max_position_embeddings): a direct call after the engine with a
        # longer sequence must not index past it (a device assert on a GPU). 64 MiB for 128K positions in bf16.
        model.model.rotary.reserve(max(max_model_len or 0, cfg.max_position_embeddings), self.device,
                                   model.model.embed_tokens.weight.dtype)
        sliding = [i for i in range(cfg.num_hidden_layers) if cfg.is_sliding_layer(i)]
        full = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding_layer(i)]
        layer_pool = [("sliding", sliding.index(i)) if i in sliding else ("full", full.index(i))
                      for i in range(cfg.num_hidden_layers)]
        shape = (kv_heads_held(model), cfg.head_dim)
        fast = kernels_attention.use_fast_path(torch.empty(0, device=self.device, dtype=model.dtype))
        use_graphs = self.device.type == "cuda" and not enforce_eager and fast
        # the pools' storage: the model's dtype, or fp8 (`plan_cache` sized the blocks in it)
        self.kv_dtype = kernels_attention.kv_storage_dtype(kv_cache_dtype, model.dtype)
        k, v, scratch = {}, {}, {}
        for pool, layers, blocks in (("full", full, plan.num_full_blocks), ("sliding", sliding, plan.num_sliding_blocks)):
            if layers:
                # on the Triton path one block more than the KV manager hands out: the scratch slot of a decode
                # table's padding rows (cuda_graphs.DecodeTable)
                slots = (blocks + fast) * plan.block_size
                k[pool] = torch.zeros(len(layers), slots, *shape, dtype=self.kv_dtype, device=self.device)
                v[pool] = torch.zeros_like(k[pool])
                scratch[pool] = blocks * plan.block_size
        self.cache = PagedKV(k, v, layer_pool)
        _take_kv_scales(model, self.cache, self.kv_dtype)
        # the persistent block tables: a row per running sequence, on the host and the device
        self.tables = WorkerBlockTables(max_num_seqs, layout.num_blocks(max_model_len or cfg.max_position_embeddings),
                                        self.device, {pool: n // plan.block_size for pool, n in scratch.items()})
        self.fast_path = fast  # the Triton kernels run this model's attention
        self.scratch_slots = scratch if fast else None
        # Expert-load telemetry: every MoE layer counts the tokens routed to each expert.
        self.moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        # one [moe_layers, experts] buffer, carried in each step's metadata, whose rows the blocks count into:
        # taking and resetting the counts is then two launches and no host sync per step
        self.expert_counts = torch.zeros(len(self.moe_layers), cfg.num_experts, dtype=torch.long,
                                         device=self.device) if self.moe_layers else None
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len or cfg.max_position_embeddings, scratch)

    def take_expert_counts(self) -> torch.Tensor | None:
        """[moe_layers, experts] tokens routed since the last call (on the model's device), then reset."""
        if self.expert_counts is None:
            return None
        counts = self.expert_counts.clone()
        self.expert_counts.zero_()
        return counts

    # ------------------------------------------------------------------ metadata
    def apply_changes(self, step: StepInput) -> None:
        """Bring the runner's block tables up to the step (`execute` does this first)."""
        self.tables.apply(step)

    def _pool_step(self, pool: str, step: StepInput, starts: list[int]) -> PoolStep:
        layout, bs, dev, tables = self.layout, self.layout.block_size, self.device, self.tables
        sliding = pool == "sliding"
        prefill_rows: list[int] = []
        prefill_slots: list[int] = []
        dec_rows, dec_slots, dec_table_rows, dec_lo, dec_len = [], [], [], [], []
        prefills: list[PrefillMeta] = []
        for seq, row in zip(step.seqs, starts):
            s, n = seq.start, seq.num_tokens
            if n == 1:  # its context is read from the device table, by row
                lo = layout.context_start(s, sliding)
                dec_rows.append(row)
                dec_slots.append(layout.slot(tables.view(seq.seq_id, pool), s))
                dec_table_rows.append(tables.row[seq.seq_id])
                dec_lo.append(lo)
                dec_len.append(s + 1 - lo)
                continue
            table = tables.entries(seq.seq_id, pool)
            # A chunk writes the positions it holds blocks for, a block at a time: in a sliding pool, a long chunk's
            # whole blocks that no later query sees have none unless the prefix cache keeps them.
            for j in range(s // bs, (s + n - 1) // bs + 1):
                if table[j] >= 0:
                    lo_j, hi_j, slot = max(s, j * bs), min(s + n, (j + 1) * bs), table[j] * bs - j * bs
                    prefill_rows += range(row + lo_j - s, row + hi_j - s)
                    prefill_slots += range(slot + lo_j, slot + hi_j)
            lo = layout.context_start(s, sliding)  # the first position the chunk's first query sees
            prefills.append(PrefillMeta(
                start=row, num=n, q_pos=torch.arange(s, s + n, device=dev),
                ctx_slots=torch.tensor(layout.slots(table, lo, s), dtype=torch.long, device=dev),
                ctx_pos=torch.arange(lo, s, device=dev)))
        ctx_slots, ctx_valid = self._decode_context(pool, dec_table_rows, dec_lo, dec_len)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        return PoolStep(dec_rows=as_long(dec_rows), dec_slots=as_long(dec_slots), dec_ctx_slots=ctx_slots,
                        dec_ctx_valid=ctx_valid, prefill_rows=as_long(prefill_rows),
                        prefill_slots=as_long(prefill_slots), prefills=prefills, decode_only=not prefills,
                        dec_lens=torch.tensor(dec_len, dtype=torch.int32, device=dev))

    def _decode_context(self, pool: str, rows: list[int], lo: list[int], lengths: list[int]):
        """Padded [B, L] slots and validity of each decode's cached context, from the device table's `rows`; each
        context starts at position `lo`."""
        dev = self.device
        if not rows:
            return torch.zeros(0, 0, dtype=torch.long, device=dev), torch.zeros(0, 0, dtype=torch.bool, device=dev)
        width = max(lengths)
        blocks = kernels_attention.BlockTable(table=self.tables.on_device[pool], lo=torch.tensor(lo, device=dev),
                                              block_size=self.layout.block_size, width=width,
                                              rows=torch.tensor(rows, device=dev))
        valid = torch.arange(width, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
        return blocks.slots().masked_fill(~valid, 0), valid

    # ------------------------------------------------------------------ execution
    @torch.inference_mode()
    def execute(self, step: StepInput, input_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the step's table changes, run the model over its tokens; return fp32 logits at its logits rows.

        `input_tokens`: for a decode-only step, its tokens as a device tensor (one per sequence), when they were
        sampled by the step still in flight and are not known on the host yet (the engine's look-ahead)."""
        self.apply_changes(step)
        if not step.seqs:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step, input_tokens).float()
        starts, ids, positions, row = [], [], [], 0
        for seq in step.seqs:
            starts.append(row)
            ids += seq.token_ids
            positions += range(seq.start, seq.start + seq.num_tokens)
            row += seq.num_tokens
        logits_rows = step.logits_rows
        pools = {pool: self._pool_step(pool, step, starts) for pool in self.cache.k}
        if self.fast_path:  # the prefill packing (host-built tensors copied to the device) before the forward, not
            for pool_step in pools.values():  # inside its first layer, where the copies would wait for the layers
                if pool_step.prefills:
                    pool_step.packed = kernels_attention.pack_prefills(pool_step.prefills)
        attn = PagedAttention(self.cache, pools, expert_counts=self.expert_counts)
        dev = self.device
        ids = input_tokens if input_tokens is not None else torch.tensor(ids, device=dev)
        # every row in order (a decode step): no gather; otherwise the model drops the other rows in its last layer
        keep = None if logits_rows == list(range(row)) else torch.tensor(logits_rows, dtype=torch.long, device=dev)
        logits = self.model(ids, torch.tensor(positions, device=dev), attn, logits_indices=keep)
        return logits.float()
