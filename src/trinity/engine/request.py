"""Requests as the engine tracks them, and the vLLM-shaped outputs it returns (plain Python, no torch)."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams

_arrival_counter = itertools.count()


class ContextLengthError(ValueError):
    """A request that can never run: its prompt and max_tokens exceed max_model_len (`limit="max_model_len"`), or
    can never fit in the KV cache (`limit="kv_cache"`). `max_tokens` is None when the request asked for the rest
    of the context; the message states the same numbers."""

    def __init__(self, message: str, *, prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                 limit: str = "max_model_len"):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        self.limit = limit


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # set aside by the fair share: keeps its blocks and computed tokens, takes no slot
    FINISHED = "finished"


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: {token_id: Logprob} holding the chosen token and the top-N alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass(eq=False)
class Sequence:
    """One generated sequence. A request with n > 1 has n sequences sharing its prompt."""

    seq_id: str
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against max_model_len
    priority: int = 0
    sampling_seed: int | None = None  # per-sequence seed (derived from the request's seed when n > 1)
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    error: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens its first admission took from the prefix cache
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its leading blocks, as computed
    cache_salt: str | None = None  # shares cached blocks only with requests of the same salt
    # sequences sharing a key (the server's: one per HTTP request) take turns with other keys in the scheduler, so
    # that one request's many sequences cannot hold the others back; None: ordered by priority and arrival alone
    fairness_key: str | None = None
    # scored prompt positions, when the request asks for prompt_logprobs (text and outputs are built by the
    # output processor, not kept here)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    constraint: Any = None  # a TokenConstraint when the request asked for structured output
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, lo: int, hi: int) -> list[int]:
        """Tokens lo..hi-1 of prompt + output, without building `all_token_ids` (a copy of the whole context: per
        step, at long contexts, it cost more than the decode step's other host work)."""
        prompt, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if hi <= n:
            return prompt[lo:hi]
        if lo >= n:
            return self.output_token_ids[lo - n:hi - n]
        return prompt[lo:] + self.output_token_ids[:hi - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: lower priority value first, then first come first served."""
        return (self.priority, self.arrival_order)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason


class Prefix(Sequence_):
    """The first `n` items of a list that keeps growing, without copying it: an output shares its sequence's
    token ids and logprobs with the output processor (a copy per step would make a long stream quadratic), and
    still reads as it was when it was made."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int | None = None):
        self._items, self._n = items, len(items) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            return self._items[start:stop] if step == 1 else [self._items[j] for j in range(start, stop, step)]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._items[i % self._n]

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, Prefix)) else NotImplemented

    def __add__(self, other) -> list:
        return self[:] + list(other)

    def __radd__(self, other) -> list:
        return list(other) + self[:]

    def __repr__(self) -> str:
        return repr(self._items[:self._n])


class CompletionOutput:
    """One sequence of a request's output. `text` may be given as a function that builds it: it is then built
    on first read (a stream that reads only `new_text` never joins the whole text)."""

    __slots__ = ("index", "_text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason", "stop_reason",
                 "new_text")

    def __init__(self, index: int, text: str | Callable[[], str], token_ids: list[int] | Prefix,
                 cumulative_logprob: float | None, logprobs: list[PositionLogprobs] | Prefix | None,
                 finish_reason: str | None = None, stop_reason: int | str | None = None, new_text: str = ""):
        self.index = index
        self._text = text
        self.token_ids = token_ids
        self.cumulative_logprob = cumulative_logprob
        self.logprobs = logprobs
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.new_text = new_text  # the text this output adds to the one before it (what a stream sends)

    @property
    def text(self) -> str:
        if not isinstance(self._text, str):
            self._text = self._text()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids!r}, "
                f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})")


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed


@dataclass(slots=True)
class SeqUpdate:
    """What one step added to one sequence: its sampled token (none when it only finished) and whether it ended."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None  # per token, when the request asked for logprobs
    token_logprobs: list[float] | None = None  # the sampled tokens' own logprobs (for the cumulative sum)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class CoreOutput:
    """The engine core's delta for one request in one step; `output_processor` turns it into a RequestOutput."""

    request_id: str
    seqs: list[SeqUpdate]
    finished: bool
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # once the prompt is scored (its logprob tokens
    # not yet decoded to strings)
