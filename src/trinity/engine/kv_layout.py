"""Where a token's K/V lives: the slot and window arithmetic of the two KV pools, in one place (plain Python).

A pool's tensors have one row per token slot: block b holds slots b * block_size .. (b + 1) * block_size - 1.
In both pools position p of a sequence lives in its block table's entry p // block_size (the block index). A
full-attention table holds every entry; a sliding-window table holds only the blocks a query can still see (-1
for the others: the KV manager frees them once the sequence moves past them).
A query at position p sees positions context_start(p) .. p: all of them in a full layer, the last `window`
in a sliding one.

The KV manager (which blocks a sequence holds), the runner (the slots a step writes and reads), the CUDA-graph
decode table and the Triton kernels' block-table reader (`kernels.attention.BlockTable`, the same formulas on
tensors) all address the cache this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVLayout:
    block_size: int
    window: int  # the sliding layers' window, in tokens

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size = {self.block_size} must be >= 1")
        if self.window < 1:
            raise ValueError(f"sliding_window = {self.window} must be >= 1")

    def span(self, num_positions: int) -> int:
        """The most blocks `num_positions` consecutive positions touch."""
        return (num_positions + self.block_size - 2) // self.block_size + 1 if num_positions > 0 else 0

    @property
    def window_blocks(self) -> int:
        """The most blocks a sliding layer's query sees (its window): what a decoding sequence holds at most."""
        return self.span(self.window)

    def num_blocks(self, num_tokens: int) -> int:
        """Blocks that hold positions 0..num_tokens-1 (a table's length)."""
        return math.ceil(num_tokens / self.block_size)

    def context_start(self, position: int, sliding: bool) -> int:
        """The first position a query at `position` attends to."""
        return max(0, position + 1 - self.window) if sliding else 0

    def first_block(self, position: int, sliding: bool) -> int:
        """The first block a query at `position` sees."""
        return self.context_start(position, sliding) // self.block_size

    def slot(self, table, position: int) -> int:
        """`table`: a list, or a row of the runner's block tables (`WorkerBlockTables.view`)."""
        bs = self.block_size
        return int(table[position // bs]) * bs + position % bs

    def slots(self, table: list[int], lo: int, hi: int) -> list[int]:
        """The slots of positions lo..hi-1, a block at a time (one range per block, not one call per position:
        this is on the path to a long prompt's first token)."""
        bs, out, p = self.block_size, [], lo
        while p < hi:
            block = p // bs
            end = min(hi, (block + 1) * bs)
            first = table[block] * bs + p % bs
            out.extend(range(first, first + end - p))
            p = end
        return out
