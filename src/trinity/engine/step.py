"""The step contract: what the control plane hands the model runner each step (plain Python, no torch).

Everything a worker needs to run a step is here, as plain data: the tokens and positions each sequence computes,
the changes to its block tables, the sequences whose blocks are gone, and the rows whose logits come back. The
runner keeps its own block tables from these changes and never reads the KV manager, so with tensor parallelism
the same message can be sent to every worker process.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TableChanges:
    """One sequence's block-table changes in one step, in the order a worker applies them."""

    new: bool = False  # start from empty tables: the sequence was admitted (again, after a preemption) this step
    full: list[int] = field(default_factory=list)  # blocks appended to the full-attention table
    # With `new`: the sliding ring as admitted (blocks adopted from the prefix cache at their entries, -1 where
    # an entry is filled below); a prefill chunk reads its context through the ring as it is before `ring_set`.
    ring: list[int] | None = None
    # (entry, block): ring entries that move to another block this step. A chunk's context may still be in the
    # entry's old block (it is freed only after the step), so the worker applies these after reading the context.
    ring_set: list[tuple[int, int]] = field(default_factory=list)
    # (block index, block): whole blocks of a long prefill chunk that the ring does not keep, written into blocks
    # of their own for the prefix cache; for this step only.
    spill: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class StepSeq:
    """One sequence's share of the flat batch: positions start .. start + num_tokens - 1."""

    seq_id: str
    start: int  # tokens it had computed before this step
    num_tokens: int
    token_ids: list[int]  # the tokens at those positions; empty for a look-ahead row (its token is on the device)


@dataclass(slots=True)
class StepInput:
    seqs: list[StepSeq] = field(default_factory=list)  # in flat-batch order
    tables: dict[str, TableChanges] = field(default_factory=dict)  # by seq_id, scheduled or not
    freed: list[str] = field(default_factory=list)  # sequences whose tables are gone (applied before `tables`)
    logits_rows: list[int] = field(default_factory=list)  # flat-batch rows whose logits the step returns

    @property
    def num_tokens(self) -> list[int]:
        return [s.num_tokens for s in self.seqs]

    @property
    def decode_only(self) -> bool:
        """One token per sequence and a logit for each, in order: what a CUDA-graph decode step runs."""
        return (bool(self.seqs) and all(s.num_tokens == 1 for s in self.seqs)
                and self.logits_rows == list(range(len(self.seqs))))


@dataclass(slots=True)
class SeqTables:
    """A worker's copy of one sequence's block tables, kept from `TableChanges`."""

    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)  # by ring entry (-1: not filled yet)
    # this step only: the ring before the step's moves (a prefill chunk's context is still in the old blocks), and
    # the spill blocks of a long chunk
    context: list[int] | None = None
    spill: list[tuple[int, int]] = field(default_factory=list)

    def apply(self, change: TableChanges) -> None:
        if change.new:
            self.full, self.sliding = [], list(change.ring or ())
        self.full += change.full
        self.context = list(self.sliding) if change.ring_set else None
        for entry, block in change.ring_set:
            while len(self.sliding) <= entry:
                self.sliding.append(-1)
            self.sliding[entry] = block
        self.spill = change.spill

    def end_step(self) -> None:
        """Forget what held for one step only."""
        self.context, self.spill = None, []
