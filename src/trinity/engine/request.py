"""Requests as the engine tracks them, and the vLLM-shaped outputs it returns (plain Python, no torch)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams

_arrival_counter = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
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
    # outputs gathered as it runs
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    cumulative_logprob: float = 0.0
    detokenizer: Any = None
    constraint: Any = None  # a TokenConstraint when the request asked for structured output
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        """The token at a position of prompt + output, without building `all_token_ids` (a per-step copy of the
        whole context, which at long contexts cost more than the decode step's other host work)."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_ids_between(self, lo: int, hi: int) -> list[int]:
        """Tokens lo..hi-1 of prompt + output, without building `all_token_ids`."""
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
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.max_tokens

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


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


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
