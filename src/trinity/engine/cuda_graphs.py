"""CUDA graphs for decode steps: the whole forward of a decode-only batch replayed as one launch.

A decode step of a sparse MoE is one to two thousand small kernels; launched one by one from Python, the gaps
between them cost more than the kernels themselves at small batch (measured on an H100: Nano batch 1 went from
11.5 to 88 tok/s with graphs). The runner captures the forward once per bucketed batch size and replays it.

Host work per step is one loop that fills a pinned int32 table (two used in turn), one copy to the device, and
the replay. Each row of the table describes one sequence: its token, position and a 0/1 expert-count weight, then
per KV pool its new token's slot, the first position its attention sees, how many positions it sees, and its block
table (with the engine's look-ahead the tokens come instead from the previous step's sampling, on the device). The
graph itself turns block tables into the per-position slots the Triton decode kernel reads (padded to the widest
context the pool can hold: `max_model_len` for full layers, the window for sliding ones), so nothing else is built
on the host. The kernel reads only the first `length` slots of a row.

A batch of n sequences runs in the smallest bucket b >= n. Rows n..b-1 are padding: token 0 at position 0, writing
and reading only a scratch block past the blocks the KV manager hands out (the runner allocates it), and weighted
0 in the expert-load counts. Only the Triton path is captured: the pure-torch references size tensors from data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels import graph_mode
from .paged_attention import PagedAttention, PoolStep
from .scheduler import ScheduledBatch

# Batch sizes captured, as in the common engines: small sizes one by one, then coarser steps.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

_TOKEN, _POSITION, _COUNT = 0, 1, 2  # the first columns of a row; then each pool's columns
_SLOT, _LO, _LEN, _TABLE = 0, 1, 2, 3  # a pool's columns, from its offset


def buckets_up_to(max_batch: int) -> list[int]:
    """The captured sizes for a runner serving at most `max_batch` sequences (the largest always included)."""
    sizes = [b for b in BUCKETS if b < max_batch]
    return sizes + [min(max_batch, BUCKETS[-1])]


@dataclass(slots=True)
class _Pool:
    name: str
    offset: int  # first column of this pool in a row
    num_table: int  # block-table columns
    width: int  # context positions a decode can see
    ring: int | None  # blocks in the ring (sliding pool), None for the full pool
    scratch_block: int

    @property
    def columns(self) -> int:
        return _TABLE + self.num_table


class DecodeGraphs:
    """Captured decode forwards for the bucketed batch sizes of one ModelRunner."""

    def __init__(self, runner, max_batch: int, max_model_len: int, scratch_slots: dict[str, int]):
        self.runner = runner
        self.block_size = bs = runner.kv.block_size
        dev = runner.device
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        self.pools: list[_Pool] = []
        offset = 3
        for name, scratch in scratch_slots.items():
            sliding = name == "sliding"
            ring = runner.kv.ring_blocks if sliding else None
            pool = _Pool(name, offset, ring if sliding else math.ceil(max_model_len / bs),
                         runner.window if sliding else max_model_len, ring, scratch // bs)
            self.pools.append(pool)
            offset += pool.columns
        self.columns = offset
        # Two pinned host tables used in turn, each with the event of its last copy: with the engine's look-ahead
        # the next step's table is filled while the previous step's copy may still wait in the stream.
        self.hosts = [torch.zeros(self.max_batch, self.columns, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.meta = torch.zeros(self.max_batch, self.columns, dtype=torch.int32, device=dev)
        self._offsets = {p.name: torch.arange(p.width, device=dev) for p in self.pools}
        for host in self.hosts:
            for b in range(self.max_batch):
                self._pad_row(host.numpy(), b)
        self.meta.copy_(self.hosts[0])
        self._moe_blocks = [runner.model.model.layers[i].mlp for i in runner.moe_layers]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps served by a graph (tests and stats read it)
        self._capture()

    # ------------------------------------------------------------------ the captured forward
    def _pool_step(self, pool: _Pool, b: int) -> PoolStep:
        """Inside the graph: this pool's decode addressing for rows 0..b-1, from the device copy of the table."""
        meta, bs = self.meta[:b], self.block_size
        col = lambda c: meta[:, pool.offset + c].long()  # noqa: E731
        lo, length = col(_LO), meta[:, pool.offset + _LEN].contiguous()  # the kernel reads lengths densely
        table = meta[:, pool.offset + _TABLE:pool.offset + _TABLE + pool.num_table].long()
        pos = lo[:, None] + self._offsets[pool.name][None, :]  # [b, width]
        block = pos // bs
        if pool.ring is not None:
            block = block % pool.ring
        slots = table.gather(1, block.clamp(max=pool.num_table - 1)) * bs + pos % bs
        rows = torch.arange(b, device=meta.device)
        return PoolStep(dec_rows=rows, dec_slots=col(_SLOT), dec_ctx_slots=slots, dec_ctx_valid=length,
                        prefill_rows=rows[:0], prefill_slots=rows[:0], prefills=[], decode_only=True)

    def _forward(self, b: int) -> torch.Tensor:
        meta = self.meta[:b]
        for block in self._moe_blocks:
            block.count_mask = meta[:, _COUNT].long()
        attn = PagedAttention(self.runner.cache, {p.name: self._pool_step(p, b) for p in self.pools})
        return self.runner.model(meta[:, _TOKEN].long(), meta[:, _POSITION].long(), attn,
                                 logits_indices=torch.arange(b, device=meta.device))

    @torch.inference_mode()
    def _capture(self) -> None:
        memory_pool = torch.cuda.graph_pool_handle()
        try:
            with graph_mode():
                for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
                    # warm-up outside the capture: Triton compiles and caches its kernels for these shapes here
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            self._forward(b)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=memory_pool):
                        self.logits[b] = self._forward(b)
                    self.graphs[b] = graph
        finally:
            for block in self._moe_blocks:
                block.count_mask = None
        torch.cuda.synchronize(self.runner.device)

    # ------------------------------------------------------------------ per step
    def fits(self, batch: ScheduledBatch, logits_rows: list[int]) -> bool:
        n = len(batch.seqs)
        return (0 < n <= self.max_batch and all(t == 1 for t in batch.num_tokens)
                and logits_rows == list(range(n)))

    def _pad_row(self, host, i: int) -> None:
        row = host[i]
        row[_TOKEN] = row[_POSITION] = row[_COUNT] = 0
        for p in self.pools:
            o = p.offset
            row[o + _SLOT] = p.scratch_block * self.block_size
            row[o + _LO], row[o + _LEN], row[o + _TABLE] = 0, 1, p.scratch_block

    def run(self, batch: ScheduledBatch, input_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the bucket for this decode batch; -> logits [n, V] (a view of the graph's output buffer).
        `input_tokens`: the batch's tokens as a device tensor, when they are not in the sequences yet."""
        n = len(batch.seqs)
        b = next(size for size in self.buckets if size >= n)
        turn = self.turn
        self.turn ^= 1
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # this table's previous copy has been read (normally long done)
        kv, bs, window = self.runner.kv, self.block_size, self.runner.window
        host_t = self.hosts[turn]
        host = host_t.numpy()
        for i, seq in enumerate(batch.seqs):
            s = seq.num_computed_tokens  # the new token's position
            row = host[i]
            row[_TOKEN] = 0 if input_tokens is not None else seq.token_at(s)
            row[_POSITION], row[_COUNT] = s, 1
            tables = kv.tables(seq.seq_id)
            for p in self.pools:
                o = p.offset
                if p.ring is None:
                    table = tables.full
                    row[o + _SLOT] = table[s // bs] * bs + s % bs
                    row[o + _LO], row[o + _LEN] = 0, s + 1
                else:
                    table = tables.sliding
                    lo = max(0, s + 1 - window)
                    row[o + _SLOT] = table[(s // bs) % p.ring] * bs + s % bs
                    row[o + _LO], row[o + _LEN] = lo, s + 1 - lo
                row[o + _TABLE:o + _TABLE + len(table)] = table
        for i in range(n, b):
            self._pad_row(host, i)
        self.meta[:b].copy_(host_t[:b], non_blocking=True)  # one copy from pinned memory
        self.copied[turn] = torch.cuda.Event()
        self.copied[turn].record()
        if input_tokens is not None:
            self.meta[:n, _TOKEN].copy_(input_tokens)
        self.graphs[b].replay()
        self.replays += 1
        return self.logits[b][:n]
