"""SamplingParams: what a request asks of the sampler and the stop logic (vLLM's names and meanings)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
# Below this a temperature is greedy (vLLM's rule): dividing logits by a smaller one overflows fp32 to inf, and the
# softmax of inf is NaN, which would be sampled as token 0.
GREEDY_TEMPERATURE = 1e-5


class SamplingError(ValueError):
    """An out-of-range sampling value; `param` names the field (the server maps it to OpenAI's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # below GREEDY_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    # None = up to max_model_len; 0 = compute the prompt only, for its prompt_logprobs (scoring): no token sampled
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per generated token (the sampled one is always included)
    prompt_logprobs: int | None = None
    seed: int | None = None
    skip_special_tokens: bool = True
    # Structured output: builds a TokenConstraint (see engine/constraints.py) for each generated sequence.
    constraint_factory: Callable[[], Any] | None = field(default=None, repr=False, compare=False)
    # Set by the engine from the tokenizer: the ids that end a sequence unless ignore_eos.
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # stop_ids(), read for every generated token: built once here. The fields are not changed after construction;
    # dataclasses.replace (how the engine sets eos_token_ids) runs __post_init__ again, so it stays current.
    _stop_ids: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        self._stop_ids = frozenset(self.stop_token_ids if self.ignore_eos else
                                   (*self.stop_token_ids, *self.eos_token_ids))

    def validate(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                ok = False
            if not ok:
                raise SamplingError(name, f"{name} = {value!r} is invalid: {allowed}")

        check("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1")
        check("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)")
        check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        check("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0, or -1 (off)")
        check("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]")
        check("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]")
        check("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]")
        check("repetition_penalty", 0 < self.repetition_penalty <= 2 and math.isfinite(self.repetition_penalty),
              "must be in (0, 2]")
        check("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0, "must be an integer >= 0")
        # 0 computes nothing but the prompt: useful (and allowed) only when its logprobs are asked for
        check("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int) and (
            self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None))),
              "must be an integer >= 1, or 0 with prompt_logprobs (score the prompt only)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingError("min_tokens", f"min_tokens = {self.min_tokens} is invalid: must not exceed "
                                              f"max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(name, value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                  f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.logit_bias:
            for token, bias in self.logit_bias.items():
                if not (isinstance(bias, (int, float)) and math.isfinite(bias) and -100 <= bias <= 100):
                    raise SamplingError("logit_bias", f"logit_bias[{token}] = {bias!r} is invalid: must be in "
                                                      "[-100, 100]")
        if any(not s for s in self.stop):
            raise SamplingError("stop", "stop strings must be non-empty")
        check("seed", self.seed is None or isinstance(self.seed, int), "must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def stop_ids(self) -> frozenset[int]:
        """Token ids that end generation (the eos ids unless ignore_eos, plus stop_token_ids)."""
        return self._stop_ids
