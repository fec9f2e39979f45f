"""The engine's hook for constrained decoding (structured output), free of any grammar library.

A request's SamplingParams may carry `constraint_factory`: called once per generated sequence, it returns
an object with this protocol. Each step the sampler masks the sequence's logits to `allowed_tokens`, and
after a token is chosen the engine calls `accept`. When `is_finished` turns true the sequence ends with
finish_reason "stop" (the grammar is complete). `trinity.serve.structured` implements it with xgrammar.

The rest of this module composes constraints from token ids alone, so that a grammar can start after some
free text (a reasoning block, the text before a tool call) and fixed markup (tags) can sit around it:

- `ForcedTokens`: exactly these ids, then finished.
- `Chain`: parts one after another.
- `Repeat`: a part once or more, with a separator between, ended by a stop token (or after `max_count`).
- `Triggered`: free text, where each trigger token starts a part; free again once the part is finished.
- `ReasoningGate`: the reasoning first (free, or under a constraint of its own), closed by the reasoning's end
  tag or forced closed at a token limit, then the answer's constraint.

Parts are given as zero-argument factories (like `constraint_factory`), so that every use gets a fresh state.
A mask that a constraint returns is shared: callers treat it as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Protocol

import torch


class TokenConstraint(Protocol):
    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """Bool mask [vocab_size] of the tokens that may come next."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past a chosen token (always one `allowed_tokens` permitted)."""
        ...

    def is_finished(self) -> bool:
        ...


Factory = Callable[[], TokenConstraint]


@lru_cache(maxsize=64)
def _all_but(vocab_size: int, blocked: frozenset[int]) -> torch.Tensor:
    mask = torch.ones(vocab_size, dtype=torch.bool)
    ids = [i for i in blocked if 0 <= i < vocab_size]
    if ids:
        mask[ids] = False
    return mask


def free_mask(vocab_size: int, blocked: Iterable[int] = ()) -> torch.Tensor:
    """Every token allowed except `blocked` (a shared, cached mask)."""
    return _all_but(vocab_size, frozenset(int(i) for i in blocked))


def only(vocab_size: int, ids: Iterable[int]) -> torch.Tensor:
    """A mask allowing just `ids`."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    ids = [i for i in ids if 0 <= i < vocab_size]
    if ids:
        mask[ids] = True
    return mask


class ForcedTokens:
    """Exactly `ids`, in order; finished after the last (at once when `ids` is empty)."""

    __slots__ = ("_ids", "_pos")

    def __init__(self, ids: Sequence[int]):
        self._ids = tuple(int(i) for i in ids)
        self._pos = 0

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        return only(vocab_size, self._ids[self._pos:self._pos + 1])

    def accept(self, token_id: int) -> None:
        self._pos = min(self._pos + 1, len(self._ids))

    def is_finished(self) -> bool:
        return self._pos >= len(self._ids)


class Chain:
    """The parts one after another: each starts once the one before is finished."""

    __slots__ = ("_factories", "_index", "_current")

    def __init__(self, parts: Sequence[Factory]):
        self._factories = tuple(parts)
        self._index = -1
        self._current: TokenConstraint | None = None
        self._advance()

    def _advance(self) -> None:
        """Move to the next part that is not finished before it starts (a part with nothing to write)."""
        while self._current is None or self._current.is_finished():
            self._index += 1
            if self._index >= len(self._factories):
                self._current = None
                return
            self._current = self._factories[self._index]()

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        if self._current is None:
            return only(vocab_size, ())
        return self._current.allowed_tokens(vocab_size)

    def accept(self, token_id: int) -> None:
        if self._current is None:
            return
        self._current.accept(token_id)
        if self._current.is_finished():
            self._advance()

    def is_finished(self) -> bool:
        return self._current is None


class Repeat:
    """`part` once or more, `separator` ids between two of them. After each part the sequence may end with one
    of `stop_ids` (then the engine ends it), or go on with the separator; after `max_count` parts it is
    finished."""

    __slots__ = ("_part", "_separator", "_stop_ids", "_max_count", "_count", "_current", "_between")

    def __init__(self, part: Factory, separator: Sequence[int], stop_ids: Iterable[int],
                 max_count: int | None = None):
        if not separator:
            raise ValueError("Repeat needs a separator: it is how the next part is told from the end")
        self._part = part
        self._separator = tuple(int(i) for i in separator)
        self._stop_ids = tuple(int(i) for i in stop_ids)
        self._max_count = max_count
        self._count = 0
        self._current: TokenConstraint | None = part()
        self._between = False  # a part is done: a stop id or the separator's first token comes next
        if self._current.is_finished():
            self._part_done()

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        if self._between:
            return only(vocab_size, (*self._stop_ids, self._separator[0]))
        if self._current is None:
            return only(vocab_size, ())
        return self._current.allowed_tokens(vocab_size)

    def accept(self, token_id: int) -> None:
        if self._between:
            if token_id in self._stop_ids:
                self._between, self._current = False, None  # the engine ends the sequence on the stop id
                return
            self._between = False
            self._current = Chain([lambda: ForcedTokens(self._separator[1:]), self._part])
            if self._current.is_finished():  # an empty part: count it now
                self._part_done()
            return
        if self._current is None:
            return
        self._current.accept(token_id)
        if self._current.is_finished():
            self._part_done()

    def _part_done(self) -> None:
        self._count += 1
        self._current = None
        self._between = self._max_count is None or self._count < self._max_count

    def is_finished(self) -> bool:
        return self._current is None and not self._between


class Triggered:
    """Free text (but `blocked`), where each of `triggers` (a token id) starts `part`; once the part is finished
    the text is free again. Only the part is constrained, e.g. the JSON inside a tool-call block."""

    __slots__ = ("_triggers", "_part", "_blocked", "_current")

    def __init__(self, triggers: Iterable[int], part: Factory, blocked: Iterable[int] = ()):
        self._triggers = frozenset(int(i) for i in triggers)
        self._part = part
        self._blocked = frozenset(int(i) for i in blocked)
        self._current: TokenConstraint | None = None

    @property
    def inside(self) -> bool:
        """Whether a triggered part is under way."""
        return self._current is not None

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        if self._current is None:
            return free_mask(vocab_size, self._blocked)
        return self._current.allowed_tokens(vocab_size)

    def accept(self, token_id: int) -> None:
        if self._current is None:
            if token_id in self._triggers:
                self._current = self._part()
                if self._current.is_finished():
                    self._current = None
            return
        self._current.accept(token_id)
        if self._current.is_finished():
            self._current = None

    def is_finished(self) -> bool:
        return False  # free text ends with a stop token, which the engine handles


_REASONING, _CLOSING, _ANSWER = 0, 1, 2


class ReasoningGate:
    """A reasoning block first, then the answer under `answer`'s constraint (free when None).

    The generation starts inside the reasoning (the prompt ended with the template's opening tag). The reasoning
    is free, or under `reasoning`'s constraint (e.g. tool-call blocks written while thinking); it ends when the
    model writes `end` (the reasoning parser's closing tag, as token ids). The `lead_in` ids (the newline the
    template puts after the tag) are then forced, and the answer begins.

    `limit`: the most reasoning tokens. Once that many have been generated the rest of `end` and the lead-in are
    forced, so an answer always follows (`limit` 0 closes the reasoning at once). `hold_ids`: tokens that may
    not end the reasoning (the stop ids, when the answer is required: the sequence must not stop before it).
    """

    __slots__ = ("_end", "_lead_in", "_answer_factory", "_reasoning", "_limit", "_hold", "_state", "_count",
                 "_tail", "_pending", "_answer")

    def __init__(self, end: Sequence[int], lead_in: Sequence[int] = (), answer: Factory | None = None,
                 reasoning: Factory | None = None, limit: int | None = None, hold_ids: Iterable[int] = ()):
        if not end:
            raise ValueError("ReasoningGate needs the token ids that end the reasoning")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._end = tuple(int(i) for i in end)
        self._lead_in = tuple(int(i) for i in lead_in)
        self._answer_factory = answer
        self._reasoning = reasoning() if reasoning is not None else None
        self._limit = limit
        self._hold = frozenset(int(i) for i in hold_ids)
        self._state = _REASONING
        self._count = 0          # reasoning tokens generated
        self._tail: list[int] = []  # the last reasoning tokens, to see `end` arrive
        self._pending: list[int] = []
        self._answer: TokenConstraint | None = None
        if limit == 0:
            self._close(forced=True)

    @property
    def in_reasoning(self) -> bool:
        return self._state == _REASONING

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        if self._state == _CLOSING:
            return only(vocab_size, self._pending[:1])
        if self._state == _ANSWER:
            return self._answer.allowed_tokens(vocab_size) if self._answer is not None else free_mask(vocab_size)
        if self._reasoning is None:
            return free_mask(vocab_size, self._hold)
        mask = self._reasoning.allowed_tokens(vocab_size)
        return mask & free_mask(vocab_size, self._hold) if self._hold else mask

    def accept(self, token_id: int) -> None:
        if self._state == _ANSWER:
            if self._answer is not None:
                self._answer.accept(token_id)
            return
        if self._state == _CLOSING:
            self._pending.pop(0)
            if not self._pending:
                self._open_answer()
            return
        self._count += 1
        if self._reasoning is not None and not self._reasoning.is_finished():
            self._reasoning.accept(token_id)
        self._tail = (self._tail + [token_id])[-len(self._end):]
        if tuple(self._tail) == self._end:
            self._close(forced=False)
        elif self._limit is not None and self._count >= self._limit:
            self._close(forced=True)

    def _close(self, forced: bool) -> None:
        """End the reasoning: when forced, write the rest of the end tag (completing a partial one)."""
        rest = self._end[self._matched():] if forced else ()
        self._pending = [*rest, *self._lead_in]
        self._state = _CLOSING
        if not self._pending:
            self._open_answer()

    def _matched(self) -> int:
        """How many ids of `end` the reasoning already ends with (a tag that is half written)."""
        for n in range(min(len(self._end) - 1, len(self._tail)), 0, -1):
            if tuple(self._tail[-n:]) == self._end[:n]:
                return n
        return 0

    def _open_answer(self) -> None:
        self._state = _ANSWER
        if self._answer_factory is not None:
            self._answer = self._answer_factory()

    def is_finished(self) -> bool:
        return self._state == _ANSWER and self._answer is not None and self._answer.is_finished()
