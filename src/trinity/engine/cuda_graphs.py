"""CUDA graphs for decode steps: the whole forward of a decode-only batch replayed as one launch.

A decode step of a sparse MoE is one to two thousand small kernels; launched one by one from Python, the gaps
between them cost more than the kernels themselves at small batch (benchmarks/README.md has the measurement).
The runner captures the forward once per bucketed batch size and replays it.

Host work per step is one loop that fills a pinned int32 table (two used in turn), one copy to the device, and
the replay. Each row of the table describes one sequence: its token, position and a 0/1 expert-count weight, then
per KV pool its new token's slot, where its context starts, how many positions it sees, and its row in the
runner's persistent block table (`block_tables.WorkerBlockTables`, on the device, kept up to date from the steps'
table changes) (with the engine's look-ahead the tokens come instead from the previous step's sampling, on the
device). The decode attention kernel reads the block tables in place, by row (`kernels.attention.BlockTable`): the
graph builds no per-position slot tensors, the addressing costs no kernel of its own, and filling a row costs the
same whatever the length of the sequence.

A batch of n sequences runs in the smallest bucket b >= n. Rows n..b-1 are padding: token 0 at position 0, writing
and reading only a scratch block past the blocks the KV manager hands out (the runner allocates it; the block
tables' padding row points there), and weighted 0 in the expert-load counts. Only the Triton path is captured: the pure-torch references size tensors from data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import attention as kernels_attention
from ..kernels import graph_mode
from ..kernels.attention import BlockTable
from .paged_attention import PagedAttention, PoolStep
from .step import StepInput

# Batch sizes captured, as in the common engines: small sizes one by one, then coarser steps.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

_TOKEN, _POSITION, _COUNT = 0, 1, 2  # the first columns of a row; then each pool's columns
_SLOT, _LO, _LEN, _ROW = 0, 1, 2, 3  # a pool's columns, from its offset
_POOL_COLUMNS = 4


def buckets_up_to(max_batch: int) -> list[int]:
    """The captured sizes for a runner serving at most `max_batch` sequences (the largest always included)."""
    sizes = [b for b in BUCKETS if b < max_batch]
    return sizes + [min(max_batch, BUCKETS[-1])]


@dataclass(slots=True)
class _Pool:
    name: str
    offset: int  # first column of this pool in a row
    width: int  # context positions a decode can see
    sliding: bool
    scratch_block: int


class DecodeTable:
    """A decode batch as one int32 table on the device (a row per sequence, layout above), filled on the host, and
    the forward that reads it. Nothing in the forward depends on host values: it is what `DecodeGraphs` captures,
    and it runs as it is (uncaptured) wherever the Triton kernels do, on the CPU too under the interpreter (tests).
    """

    def __init__(self, runner, max_batch: int, max_model_len: int, scratch_slots: dict[str, int]):
        self.runner = runner
        layout = runner.layout
        self.block_size = bs = layout.block_size
        self.max_batch = max_batch
        self.pools: list[_Pool] = []
        offset = 3
        for name, scratch in scratch_slots.items():
            sliding = name == "sliding"
            self.pools.append(_Pool(name, offset, layout.window if sliding else max_model_len, sliding, scratch // bs))
            offset += _POOL_COLUMNS
        self.columns = offset
        self.meta = torch.zeros(max_batch, self.columns, dtype=torch.int32, device=runner.device)
        self._rows: dict[int, torch.Tensor] = {}  # arange(b), made before any capture (warm-up runs first)

    def new_host_table(self, pin: bool) -> torch.Tensor:
        host = torch.zeros(self.max_batch, self.columns, dtype=torch.int32)
        host = host.pin_memory() if pin else host
        for b in range(self.max_batch):
            self.pad_row(host.numpy(), b)
        return host

    def pad_row(self, host, i: int) -> None:
        row = host[i]
        row[_TOKEN] = row[_POSITION] = row[_COUNT] = 0
        for p in self.pools:
            o = p.offset
            row[o + _SLOT] = p.scratch_block * self.block_size
            row[o + _LO], row[o + _LEN], row[o + _ROW] = 0, 1, self.runner.tables.pad_row

    def load(self, host: torch.Tensor, step: StepInput, rows: int) -> None:
        """`fill` the host table, then copy its first `rows` rows to the device table (asynchronous from pinned
        memory; a pageable or CPU table copies as usual). The runner has applied the step's table changes."""
        self.fill(host.numpy(), step, rows)
        self.meta[:rows].copy_(host[:rows], non_blocking=True)

    def fill(self, host, step: StepInput, rows: int) -> None:
        """Rows 0..n-1 of the host table (numpy) from the step's sequences, rows n..rows-1 as padding. A look-ahead
        row has no token on the host (it comes from the device): 0 here."""
        layout, tables = self.runner.layout, self.runner.tables
        n = len(step.seqs)
        for i, seq in enumerate(step.seqs):
            s = seq.start  # the new token's position
            row = host[i]
            row[_TOKEN] = seq.token_ids[0] if seq.token_ids else 0
            row[_POSITION], row[_COUNT] = s, 1
            table_row = tables.row[seq.seq_id]
            for p in self.pools:
                o = p.offset
                lo = layout.context_start(s, p.sliding)
                row[o + _SLOT] = layout.slot(tables.view(seq.seq_id, p.name), s)
                row[o + _LO], row[o + _LEN], row[o + _ROW] = lo, s + 1 - lo, table_row
        for i in range(n, rows):
            self.pad_row(host, i)

    def _pool_step(self, pool: _Pool, b: int) -> PoolStep:
        """This pool's decode addressing for rows 0..b-1: views of the device table, no kernel. The attention
        kernel reads the block tables in place (`kernels.attention.BlockTable`)."""
        meta = self.meta[:b]
        o = pool.offset
        table = BlockTable(table=self.runner.tables.on_device[pool.name], lo=meta[:, o + _LO],
                           block_size=self.block_size, width=pool.width, rows=meta[:, o + _ROW])
        rows = self._rows.get(b)
        if rows is None:
            rows = self._rows[b] = torch.arange(b, device=meta.device)
        return PoolStep(dec_rows=rows, dec_slots=meta[:, o + _SLOT], dec_ctx_slots=None,
                        dec_ctx_valid=meta[:, o + _LEN], prefill_rows=rows[:0], prefill_slots=rows[:0], prefills=[],
                        decode_only=True, dec_table=table)

    def forward(self, b: int) -> torch.Tensor:
        """Logits [b, V] for the first b rows of the device table. Only the Triton path reads block tables (and
        only it can be captured: the pure-torch references size tensors from data)."""
        meta = self.meta[:b]
        if not kernels_attention.use_fast_path(meta):
            raise RuntimeError("the table-driven decode forward needs the Triton kernels")
        # one cast for every MoE layer: the reference routing's scatter_add_ needs the counts' int64, and the
        # Triton router would copy a strided int32 column per layer. Padding rows weigh 0 in the expert counts.
        attn = PagedAttention(self.runner.cache, {p.name: self._pool_step(p, b) for p in self.pools},
                              expert_counts=self.runner.expert_counts, count_weight=meta[:, _COUNT].long())
        # tokens and positions as int32 columns, no cast: the embedding kernel and the RoPE gather take them
        return self.runner.model(meta[:, _TOKEN], meta[:, _POSITION], attn)


class DecodeGraphs:
    """Captured decode forwards (`DecodeTable.forward`) for the bucketed batch sizes of one ModelRunner."""

    def __init__(self, runner, max_batch: int, max_model_len: int, scratch_slots: dict[str, int]):
        self.runner = runner
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = self.buckets[-1]
        self.table = DecodeTable(runner, self.max_batch, max_model_len, scratch_slots)
        # Two pinned host tables used in turn, each with the event of its last copy: with the engine's look-ahead
        # the next step's table is filled while the previous step's copy may still wait in the stream.
        self.hosts = [self.table.new_host_table(pin=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.table.meta.copy_(self.hosts[0])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps served by a graph (tests and stats read it)
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        memory_pool = torch.cuda.graph_pool_handle()
        with graph_mode():
            for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
                # warm-up outside the capture: Triton compiles and caches its kernels for these shapes here
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.table.forward(b)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory_pool):
                    self.logits[b] = self.table.forward(b)
                self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)

    # ------------------------------------------------------------------ per step
    def fits(self, step: StepInput) -> bool:
        return step.decode_only and len(step.seqs) <= self.max_batch

    def run(self, step: StepInput, input_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the bucket for this decode step; -> logits [n, V] (a view of the graph's output buffer).
        `input_tokens`: the step's tokens as a device tensor, when they are not known on the host yet."""
        n = len(step.seqs)
        b = next(size for size in self.buckets if size >= n)
        turn = self.turn
        self.turn ^= 1
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # this table's previous copy has been read (normally long done)
        host_t = self.hosts[turn]
        self.table.load(host_t, step, b)  # one copy from pinned memory
        self.copied[turn] = torch.cuda.Event()
        self.copied[turn].record()
        if input_tokens is not None:
            self.table.meta[:n, _TOKEN].copy_(input_tokens)
        self.graphs[b].replay()
        self.replays += 1
        return self.logits[b][:n]
