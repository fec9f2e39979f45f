"""Synthetic copy rows: random tokens with a span written twice; the loss is on the second writing.

Why they exist: to call a tool it has never seen, a model copies the tool's name and keys from the tool list,
hundreds of tokens back. That copy is an induction head (find the earlier occurrence of the current token, write
the token that followed it). A model of the built-in size does not form one from the corpus, where such copies are
rare. It does form one from these rows, after a plateau of several hundred steps, and loses it again when later
training never needs it. The span's length changes per segment, so the distance of the copy does too: "the token
n back" does not predict the repeat, only a content match does. Measurements: benchmarks/README.md, "Issue 24,
twelfth try".

`TrainConfig.copy_warmup_steps` trains on these rows before the corpus and `copy_rows` mixes them into it;
`benchmarks/copy_probe.py` trains on them alone; `benchmarks/copy_accuracy.py` scores saved models on them.
"""

from __future__ import annotations

import torch

from .data import IGNORE


def ordinary_token_ids(tokenizer) -> torch.Tensor:
    """Every id below the tokenizer's vocab size that is not an added token (control tokens, think/tool tags)."""
    added = set(tokenizer.backend.get_added_tokens_decoder())
    return torch.tensor([i for i in range(tokenizer.vocab_size) if i not in added], dtype=torch.long)


def copy_segment(span: int, pool: torch.Tensor, generator: torch.Generator,
                 fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """2 * span tokens drawn from `pool`: filler, a span of span/2..span tokens (exactly `span` if `fixed`), the
    same span again, filler. Returns (ids, target): target marks the repeat from its second token (its first
    token is not predictable: nothing says where the span began)."""
    length = 2 * span
    ids = pool[torch.randint(len(pool), (length,), generator=generator)]
    target = torch.zeros(length, dtype=torch.bool)
    n = span if fixed else int(torch.randint(span // 2, span + 1, (1,), generator=generator))
    start = int(torch.randint(0, length - 2 * n + 1, (1,), generator=generator))
    ids[start + n:start + 2 * n] = ids[start:start + n]
    target[start + n + 1:start + 2 * n] = True
    return ids, target


def copy_batch(batch: int, seq_len: int, span: int, pool: torch.Tensor, generator: torch.Generator,
               fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both [batch, seq_len], like the corpus loaders: each row is seq_len + 1 tokens of
    back-to-back segments (the remainder is filler without loss), shifted by one into inputs and next-token
    labels."""
    if 2 * span > seq_len + 1:
        raise ValueError(f"a copy segment of span {span} needs {2 * span} tokens; rows have {seq_len + 1}")
    rows_ids, rows_labels = [], []
    for _ in range(batch):
        pieces = [copy_segment(span, pool, generator, fixed) for _ in range((seq_len + 1) // (2 * span))]
        rest = seq_len + 1 - 2 * span * len(pieces)
        ids = torch.cat([p[0] for p in pieces] + [pool[torch.randint(len(pool), (rest,), generator=generator)]])
        target = torch.cat([p[1] for p in pieces] + [torch.zeros(rest, dtype=torch.bool)])
        labels = torch.where(target, ids, torch.full_like(ids, IGNORE))
        rows_ids.append(ids[:-1])
        rows_labels.append(labels[1:])
    return torch.stack(rows_ids), torch.stack(rows_labels)


def copy_accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the labelled (repeat) positions where the model's greedy next token is the copy."""
    with torch.no_grad():
        predicted = model(ids).argmax(-1)
    scored = labels != IGNORE
    return (predicted[scored] == labels[scored]).float().mean().item()


class CopyTaskLoader:
    """`next_batch(batch_size)` of copy rows, as the corpus loaders give batches; its state resumes exactly."""

    def __init__(self, seq_len: int, span: int, pool: torch.Tensor, seed: int = 0):
        if span < 2:
            raise ValueError(f"copy span {span} must be at least 2")
        self.seq_len, self.span, self.pool = seq_len, span, pool
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return copy_batch(batch_size, self.seq_len, self.span, self.pool, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
