"""The step contract: what the control plane hands the model runner each step (plain Python, no torch).

Everything a worker needs to run a step is here, as plain data: the tokens and positions each sequence computes,
the changes to its block tables, the sequences whose blocks are gone, and the rows whose logits come back. The
runner keeps its own block tables from these changes (`block_tables.WorkerBlockTables`) and never reads the KV
manager, so with tensor parallelism the same message can be sent to every worker process.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TableChanges:
    """One sequence's block-table changes in one step: entries appended to its tables (by block index). Entries the
    KV manager lets go behind a sliding window are not sent: the runner never addresses them again."""

    new: bool = False  # start from empty tables: the sequence was admitted (again, after a preemption) this step
    full: list[int] = field(default_factory=list)  # entries appended to the full-attention table
    # entries appended to the sliding-window table; -1 where no block is held (before an adopted prefix's window,
    # or a long chunk's positions that no later query sees and that the prefix cache does not keep)
    sliding: list[int] = field(default_factory=list)


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
