"""The runner's persistent block tables: one int32 row per running sequence and KV pool, on the host (pinned on a
GPU) and mirrored on the device, kept from the steps' table changes (`step.TableChanges`).

Column j of a sequence's row is its block for positions j * block_size .. (j + 1) * block_size - 1 (`KVLayout`):
a step writes only the entries it appends, and copies only those to the device, so the cost of a step does not grow
with the length of its sequences' contexts. The decode attention kernel reads a sequence's row in place by its row
index (`kernels.attention.BlockTable.rows`). The last row is the padding row of CUDA-graph decode batches: every
entry there is the pool's scratch block.
"""

from __future__ import annotations

import torch

from .step import StepInput

POOLS = ("full", "sliding")


class WorkerBlockTables:
    def __init__(self, max_num_seqs: int, max_blocks: int, device: torch.device, scratch_blocks: dict[str, int]):
        """`max_blocks`: entries per row (the blocks of the longest sequence); `scratch_blocks`: per pool the block
        the padding row points at (0 where there is none)."""
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.pad_row = max_num_seqs
        self._pinned = device.type == "cuda"  # asynchronous copies from pinned memory, ordered by an event
        self.host: dict[str, torch.Tensor] = {}
        self.on_device: dict[str, torch.Tensor] = {}
        self._host_np = {}  # numpy views of the host tables: a list is written into a row without a tensor
        for pool in POOLS:
            host = torch.zeros(max_num_seqs + 1, max_blocks, dtype=torch.int32, pin_memory=self._pinned)
            host[self.pad_row] = scratch_blocks.get(pool, 0)
            self.host[pool], self._host_np[pool] = host, host.numpy()
            # on the CPU the device table is the host table: nothing to copy
            self.on_device[pool] = host if device.type == "cpu" else host.to(device)
        self.row: dict[str, int] = {}  # seq_id -> its row
        self.length: dict[str, list[int]] = {}  # seq_id -> entries per pool
        self._free = list(range(max_num_seqs - 1, -1, -1))
        self._copied: torch.cuda.Event | None = None  # the last host-to-device copy, when one may be in flight

    def apply(self, step: StepInput) -> None:
        """Apply a step's freed sequences and table changes, and copy the new entries to the device."""
        for seq_id in step.freed:
            if seq_id in self.row:
                self._free.append(self.row.pop(seq_id))
                del self.length[seq_id]
        if not step.tables:
            return
        if self._copied is not None:
            self._copied.synchronize()  # the host entries of the last copy are read before they change
        copies = []
        for seq_id, change in step.tables.items():
            row = self.row.get(seq_id)
            if row is None:
                if not self._free:
                    raise RuntimeError(f"more than max_num_seqs = {self.max_num_seqs} sequences hold blocks")
                row = self.row[seq_id] = self._free.pop()
                self.length[seq_id] = [0, 0]
            lengths = self.length[seq_id]
            if change.new:
                lengths[:] = [0, 0]
            for i, (pool, entries) in enumerate((("full", change.full), ("sliding", change.sliding))):
                if not entries:
                    continue
                lo, hi = lengths[i], lengths[i] + len(entries)
                if hi > self.host[pool].shape[1]:
                    raise RuntimeError(f"sequence {seq_id!r} needs {hi} blocks, past the table's "
                                       f"{self.host[pool].shape[1]} (max_model_len)")
                self._host_np[pool][row, lo:hi] = entries
                lengths[i] = hi
                copies.append((pool, row, lo, hi))
        if self.device.type != "cpu" and copies:
            for pool, row, lo, hi in copies:
                self.on_device[pool][row, lo:hi].copy_(self.host[pool][row, lo:hi], non_blocking=True)
            if self._pinned:
                self._copied = torch.cuda.Event()
                self._copied.record()

    def entries(self, seq_id: str, pool: str) -> list[int]:
        """A sequence's table in one pool, on the host (the prefill path's slot arithmetic runs on lists)."""
        return self._host_np[pool][self.row[seq_id], :self.length[seq_id][POOLS.index(pool)]].tolist()

    def view(self, seq_id: str, pool: str):
        """A sequence's whole host row in one pool (a numpy view: its entries past the table's length are stale)."""
        return self._host_np[pool][self.row[seq_id]]
