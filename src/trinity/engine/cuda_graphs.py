"""CUDA graphs for decode steps: the whole forward of a decode-only batch replayed as one launch.

A decode step of a sparse MoE is a few hundred small kernels; launched one by one from Python, the gaps between
them cost more than the kernels themselves at small batch. The runner captures the forward once per bucketed
batch size and replays it.

Everything a replay reads lives in static buffers that the graph captured by address:

- token ids, positions, and the rows whose logits are returned (all of them: one token per sequence);
- per KV pool: each row's new slot, its context slots padded to the widest context the pool can hold
  (`max_model_len` for full layers, the window for sliding ones) and its context length, which bounds what the
  Triton decode kernel reads (so stale entries past the length are never read);
- a 0/1 mask per row that the MoE blocks multiply into their expert-load counts.

A batch of n sequences runs in the smallest bucket b >= n. Rows n..b-1 are padding: token 0 at position 0,
writing their K/V into a scratch slot past the blocks the KV manager hands out (the runner allocates it) and
attending only to that slot, so they touch no real sequence; their expert choices are masked out of the
telemetry. Only the Triton path is captured: the pure-torch references size tensors from the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import graph_mode
from .paged_attention import PagedAttention, PoolStep
from .scheduler import ScheduledBatch

# Batch sizes captured, as in the common engines: small sizes one by one, then coarser steps.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def buckets_up_to(max_batch: int) -> list[int]:
    """The captured sizes for a runner serving at most `max_batch` sequences (the largest always included)."""
    sizes = [b for b in BUCKETS if b < max_batch]
    return sizes + [min(max_batch, BUCKETS[-1])]


@dataclass(slots=True)
class _StaticPool:
    scratch: int  # the slot padding rows write and read
    slots: torch.Tensor  # [B] new token's slot
    ctx: torch.Tensor  # [B, W] context slots
    lens: torch.Tensor  # [B] int32 context lengths

    def step(self, rows: torch.Tensor, b: int) -> PoolStep:
        empty = rows[:0]
        return PoolStep(dec_rows=rows[:b], dec_slots=self.slots[:b], dec_ctx_slots=self.ctx[:b],
                        dec_ctx_valid=self.lens[:b], prefill_rows=empty, prefill_slots=empty, prefills=[])

    def load(self, step: PoolStep, n: int, b: int) -> None:
        """Copy a step's real rows in and reset the padding rows (a larger earlier batch left real slots there)."""
        self.slots[:n].copy_(step.dec_slots)
        width = step.dec_ctx_slots.shape[1]
        self.ctx[:n, :width].copy_(step.dec_ctx_slots)
        self.lens[:n].copy_(step.dec_ctx_valid.sum(dim=1, dtype=torch.int32))
        if b > n:
            self.slots[n:b].fill_(self.scratch)
            self.ctx[n:b, 0].fill_(self.scratch)
            self.lens[n:b].fill_(1)


class DecodeGraphs:
    """Captured decode forwards for the bucketed batch sizes of one ModelRunner."""

    def __init__(self, runner, max_batch: int, max_model_len: int, scratch_slots: dict[str, int]):
        self.runner = runner
        model, dev = runner.model, runner.device
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        size = self.max_batch
        self.ids = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(size, dtype=torch.long, device=dev)
        self.rows = torch.arange(size, device=dev)
        self.count_mask = torch.zeros(size, dtype=torch.long, device=dev)
        self.pools: dict[str, _StaticPool] = {}
        for pool, scratch in scratch_slots.items():
            width = runner.window if pool == "sliding" else max_model_len
            ctx = torch.zeros(size, width, dtype=torch.long, device=dev)
            ctx[:, 0] = scratch
            self.pools[pool] = _StaticPool(scratch, torch.full((size,), scratch, dtype=torch.long, device=dev), ctx,
                                           torch.ones(size, dtype=torch.int32, device=dev))
        self._moe_blocks = [model.model.layers[i].mlp for i in runner.moe_layers]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps served by a graph (tests and stats read it)
        self._capture()

    def _forward(self, b: int) -> torch.Tensor:
        attn = PagedAttention(self.runner.cache, {p: sp.step(self.rows, b) for p, sp in self.pools.items()})
        return self.runner.model(self.ids[:b], self.positions[:b], attn, logits_indices=self.rows[:b])

    @torch.inference_mode()
    def _capture(self) -> None:
        memory_pool = torch.cuda.graph_pool_handle()
        try:
            with graph_mode():
                for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
                    for block in self._moe_blocks:
                        block.count_mask = self.count_mask[:b]
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

    def fits(self, batch: ScheduledBatch, logits_rows: list[int]) -> bool:
        n = len(batch.seqs)
        return (0 < n <= self.max_batch and all(t == 1 for t in batch.num_tokens)
                and logits_rows == list(range(n)))

    def run(self, batch: ScheduledBatch, steps: dict[str, PoolStep], ids: list[int],
            positions: list[int]) -> torch.Tensor:
        """Replay the bucket for this decode batch; -> logits [n, V] (a view of the graph's output buffer)."""
        n = len(ids)
        b = next(size for size in self.buckets if size >= n)
        self.ids[:n].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions, dtype=torch.long), non_blocking=True)
        self.count_mask[:n].fill_(1)
        if b > n:
            self.ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.count_mask[n:b].zero_()
        for pool, sp in self.pools.items():
            sp.load(steps[pool], n, b)
        self.graphs[b].replay()
        self.replays += 1
        return self.logits[b][:n]
