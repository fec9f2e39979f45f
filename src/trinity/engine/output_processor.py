"""From the engine's per-step deltas to the outputs users read: text, stop strings, logprob strings (no torch).

The engine core returns, per step, only what is new: each sequence's sampled token, its logprobs and whether it
finished (`request.CoreOutput`). Turning that into text is the output processor's job, outside the engine's
step: detokenizing, stop strings, and the strings of logprob tokens. The async engine runs one per request in
the consumer's coroutine (the server's event loop), not on the thread that steps the model.

Every step costs the same at a stream's end as at its start: text is kept as a list of pieces plus the unsent
tail (the part that may still turn into a stop string), token ids and logprobs are appended, and an output
carries what is new (`CompletionOutput.new_text`) beside lists it shares with the processor instead of copies;
the whole text is joined when asked for.

A stop string ends a sequence here; `StopHit`s tell the engine core to finish it (in the async engine a step or
two later: the tokens it produced meanwhile are dropped here, as vLLM does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .request import CompletionOutput, CoreOutput, PositionLogprobs, Prefix, RequestOutput, SeqUpdate
from .sampling_params import SamplingParams


@dataclass(slots=True)
class StopHit:
    """A sequence that a stop string ended; the engine core must finish it."""

    request_id: str
    index: int
    stop: str


@dataclass(slots=True)
class _Text:
    """A growing text as pieces, with the tail not yet sent: the last `hold` characters of a running sequence
    with stop strings may still become the start of one."""

    pieces: list[str] = field(default_factory=list)  # sent
    sent_length: int = 0
    unsent: str = ""

    def sent(self, length: int) -> str:
        """The first `length` characters of the sent text (it only grows: an earlier output's text stays valid)."""
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0][:length] if self.pieces else ""

    def send(self, hold: int) -> str:
        """Move all but the last `hold` unsent characters to the sent text; -> what moved."""
        cut = max(0, len(self.unsent) - hold)
        out, self.unsent = self.unsent[:cut], self.unsent[cut:]
        if out:
            self.pieces.append(out)
            self.sent_length += len(out)
        return out


class _SeqState:
    def __init__(self, index: int, params: SamplingParams, detokenizer: Any):
        self.index = index
        self.params = params
        self.detokenizer = detokenizer
        self.text = _Text()
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.hold = max((len(s) for s in params.stop), default=1) - 1 if params.stop else 0

    def output(self, new_text: str) -> CompletionOutput:
        text, length = self.text, self.text.sent_length
        # a running sequence's outputs share its lists (one per step: copies would cost the stream's length each
        # step); its last output has lists of its own
        share = Prefix if self.finish_reason is None else list
        return CompletionOutput(index=self.index, text=lambda: text.sent(length), token_ids=share(self.token_ids),
                                cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
                                logprobs=share(self.logprobs) if self.logprobs is not None else None,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason, new_text=new_text)


class OutputProcessor:
    """One request's outputs, built from the engine core's deltas."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer=None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.tokenizer = tokenizer
        self.seqs = [_SeqState(i, params, tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens)
                               if tokenizer is not None else None) for i in range(params.n)]
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.finished = False

    def process(self, core: CoreOutput, stops: list[StopHit] | None = None) -> RequestOutput:
        """Apply one step's delta; a stop string found here is appended to `stops` for the engine core."""
        if core.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = core.prompt_logprobs
            for lps in core.prompt_logprobs:
                if lps is not None:
                    self._decode_logprob_tokens(lps, False)
        new_texts = {}
        for update in core.seqs:
            state = self.seqs[update.index]
            if state.finish_reason is not None:
                continue  # ended by a stop string here: the core's tokens after it are dropped
            new_texts[update.index] = self._apply(state, update, stops)
        outputs = [s.output(new_texts.get(s.index, "")) for s in self.seqs]
        self.finished = all(s.finish_reason is not None for s in self.seqs)
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             prompt_logprobs=self.prompt_logprobs, outputs=outputs, finished=self.finished,
                             error=core.error, metrics=core.metrics, num_cached_tokens=core.num_cached_tokens)

    def _apply(self, state: _SeqState, update: SeqUpdate, stops: list[StopHit] | None) -> str:
        p = state.params
        text = state.text
        stop = None
        for token, lps, token_lp in zip(update.token_ids, update.logprobs or [None] * len(update.token_ids),
                                        update.token_logprobs or [None] * len(update.token_ids)):
            state.token_ids.append(token)
            if lps is not None and state.logprobs is not None:
                # the same special-token rule as the text, so that the tokens' strings add up to the text
                self._decode_logprob_tokens(lps, p.skip_special_tokens)
                state.logprobs.append(lps)
                state.cumulative_logprob += token_lp
            if state.detokenizer is None or token in p.stop_ids():
                continue  # a stop token adds no text
            piece = state.detokenizer.add(token)
            text.unsent += piece
            if p.stop and len(state.token_ids) >= p.min_tokens:  # min_tokens holds stop strings back too
                stop = self._find_stop(state, len(piece))
                if stop is not None:
                    break
        if stop is not None:
            state.finish_reason, state.stop_reason = "stop", stop
            if stops is not None:
                stops.append(StopHit(self.request_id, state.index, stop))
        elif update.finish_reason is not None:
            state.finish_reason, state.stop_reason = update.finish_reason, update.stop_reason
            if (state.detokenizer is not None and update.finish_reason in ("length", "stop")
                    and update.stop_reason is None):
                text.unsent += state.detokenizer.flush()
        return text.send(0 if state.finish_reason is not None else state.hold)

    @staticmethod
    def _find_stop(state: _SeqState, new_chars: int) -> str | None:
        """The stop string that now appears, the unsent text cut before it (after it, if asked). A new match must
        end in the `new_chars` just added, so it starts at most `hold` characters before them: in the unsent
        tail, which holds those back."""
        p, unsent = state.params, state.text.unsent
        start = max(0, len(unsent) - new_chars - state.hold)
        hits = [(i, s) for i, s in ((unsent.find(s, start), s) for s in p.stop) if i >= 0]
        if not hits:
            return None
        i, s = min(hits)
        state.text.unsent = unsent[:i + len(s)] if p.include_stop_str_in_output else unsent[:i]
        return s

    def _decode_logprob_tokens(self, lps: PositionLogprobs, skip_special_tokens: bool) -> None:
        if self.tokenizer is not None:
            for tid, lp in lps.items():
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=skip_special_tokens)
