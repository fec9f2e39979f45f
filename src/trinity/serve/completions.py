"""POST /v1/completions: raw-text prompts (one or many), whole or streamed.

With `echo`, each choice's text starts with its prompt; with `echo` and `logprobs`, its logprobs cover the prompt
tokens too (the first one null: nothing comes before it), then the generated ones, and `text_offset`s index the
returned text. `max_tokens=0` with `echo` computes the prompt only: how lm-eval and other harnesses score text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.request import CompletionOutput, RequestOutput
from ..engine.sampling_params import SamplingError, SamplingParams
from .errors import APIError, structured_output_error
from .formatting import completion_logprobs, join_logprobs, next_offset, prompt_logprobs, sse_stream, usage
from .protocol import CompletionRequest
from .state import ServerState


async def _prompts(state: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        return [(prompt, await state.encode(prompt, "prompt"))]
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, await state.encode(p, "prompt")) for p in prompt]
    return [(None, list(p)) for p in prompt]


def _params(state: ServerState, body: CompletionRequest, constraint) -> SamplingParams:
    """The engine's sampling params. An echoed prompt is scored when logprobs are asked for (vLLM's rule: the
    prompt's logprobs at the same top-N), and always with max_tokens=0, which has nothing else to compute."""
    if body.max_tokens == 0 and not body.echo:
        # vLLM's answer too: with nothing generated and nothing echoed there is nothing to return
        raise APIError(400, "max_tokens must be at least 1, got 0 (0 is allowed only with echo: the prompt is "
                            "scored and nothing is generated)", param="max_tokens", code="invalid_value")
    score_prompt = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    # built with a placeholder max_tokens, which SamplingParams accepts as 0 only together with prompt_logprobs
    params = state.sampling_params(body, None if body.max_tokens == 0 else body.max_tokens, body.logprobs, constraint)
    if not score_prompt:
        return params
    try:
        return dataclasses.replace(params, max_tokens=body.max_tokens, prompt_logprobs=body.logprobs or 0)
    except SamplingError as e:  # e.g. min_tokens over a max_tokens of 0
        raise APIError(400, str(e), param=e.param) from None


def _check_prompt_count(state: ServerState, prompt) -> None:
    """Refuse a prompt list over the server's cap before tokenizing it: each prompt (times n) becomes its own engine
    request, so an unbounded list is unbounded work and memory from one call (vLLM bounds it the same way)."""
    count = 1 if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt) else len(prompt)
    limit = state.settings.max_completion_prompts
    if count > limit:
        raise APIError(400, f"prompt lists {count} prompts; this server takes at most {limit} per request "
                            f"(--max-completion-prompts): split them over several requests", param="prompt",
                       code="invalid_value")


async def create_completion(state: ServerState, body: CompletionRequest, raw: Request):
    engine = state.admit(body.model)
    _check_prompt_count(state, body.prompt)
    constraint = None
    if body.response_format:
        from .structured import StructuredOutputError, constraint_for_response_format_async

        try:  # compiled in a worker thread, within --max-grammar-compile-seconds
            grammar = await state.grammar_async()
            constraint = await constraint_for_response_format_async(grammar, body.response_format)
        except StructuredOutputError as e:
            raise structured_output_error(e) from None
    params = _params(state, body, constraint)
    base_id = state.new_id("cmpl")
    prompts = await _prompts(state, body.prompt)
    # the whole request's sequences are admitted or refused together, before any is counted as queued
    state.check_queue(len(prompts) * body.n, "prompt" if len(prompts) > 1 else "n")
    prepared = []
    try:
        for i, (_, ids) in enumerate(prompts):
            # the prompts share one fairness key: together they take one turn in the scheduler, as one prompt would
            prepared.append(state.prepare(engine, f"{base_id}-{i}", ids, params, body.priority, "prompt",
                                          body.cache_salt, fairness_key=base_id))
    except APIError:
        for p in prepared:  # the request is refused as a whole: what was counted for it stops counting
            state.release(p)
        raise
    echo = _Echo(state, body, prompts)
    if not body.stream:
        outs = await asyncio.gather(*(state.collect(engine, p, raw) for p in prepared))
        return JSONResponse(_whole_response(state, body, base_id, echo, list(outs)))
    return StreamingResponse(sse_stream(_stream_events(state, body, engine, base_id, echo, prepared)),
                             media_type="text/event-stream")


class _Echo:
    """What `echo` puts before each prompt's choices: the prompt's text and, with logprobs, the prompt's logprobs
    (the same for every choice of a prompt: built once)."""

    def __init__(self, state: ServerState, body: CompletionRequest, prompts: list[tuple[str | None, list[int]]]):
        self.state, self.body, self.prompts = state, body, prompts
        self._logprobs: dict[int, dict] = {}

    def text(self, i: int) -> str:
        if not self.body.echo:
            return ""
        text, ids = self.prompts[i]
        return text if text is not None else self.state.tokenizer.decode(ids)

    def logprobs(self, i: int, out: RequestOutput) -> dict | None:
        if not self.body.echo or self.body.logprobs is None:
            return None
        if i not in self._logprobs:
            self._logprobs[i] = prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs, self.body.logprobs,
                                                self.state.tokenizer)
        return self._logprobs[i]


def _generated_logprobs(state: ServerState, body: CompletionRequest, c: CompletionOutput, start: int,
                        offset: int) -> dict | None:
    """A choice's logprobs for its generated tokens from `start`, the first at `offset` in the returned text."""
    return completion_logprobs(c, start, len(c.token_ids), body.logprobs or 0, state.tokenizer, offset)


def _first_part(echo: _Echo, i: int, out: RequestOutput, generated: dict | None) -> dict | None:
    """The logprobs of a choice's first part: the echoed prompt's (if any) in front of its generated tokens'."""
    prompt = echo.logprobs(i, out)
    return join_logprobs(prompt, generated) if prompt is not None and generated is not None else generated


def _whole_response(state: ServerState, body: CompletionRequest, base_id: str, echo: _Echo,
                    outs: list[RequestOutput]) -> dict:
    choices = []
    for i, out in enumerate(outs):
        if out.error:
            raise APIError(500, out.error, code="engine_error")
        prefix = echo.text(i)
        for c in out.outputs:
            choices.append({"index": i * body.n + c.index, "text": prefix + c.text,
                            "logprobs": _first_part(echo, i, out, _generated_logprobs(state, body, c, 0, len(prefix))),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": base_id, "object": "text_completion", "created": int(time.time()),
            "model": state.settings.served_model_name, "choices": choices, "usage": usage(outs)}


async def _stream_events(state: ServerState, body: CompletionRequest, engine, base_id: str, echo: _Echo, prepared):
    created, name = int(time.time()), state.settings.served_model_name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, p) -> None:
        try:
            async for out in state.run(engine, p):
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - reported in the stream
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(prepared)]
    # per (prompt, choice): tokens sent so far and the text offset of the next token (counted as whole responses
    # count them, from the tokens' strings, so that the streamed offsets are the whole response's)
    sent: dict[tuple[int, int], tuple[int, int]] = {}
    finals: dict[int, RequestOutput] = {}
    finished: set[tuple[int, int]] = set()
    remaining = len(tasks)
    try:
        while remaining:
            i, out = await queue.get()
            if out is None:
                remaining -= 1
                continue
            if isinstance(out, Exception):
                raise out
            if out.error:
                raise APIError(500, out.error, code="engine_error")
            finals[i] = out
            for c in out.outputs:
                key = (i, c.index)
                if key in finished:
                    continue
                if c.finish_reason is not None:
                    finished.add(key)
                first = key not in sent
                tokens, offset = sent.get(key, (0, len(echo.text(i))))
                text = echo.text(i) + c.new_text if first else c.new_text
                generated = _generated_logprobs(state, body, c, tokens, offset)
                logprobs = _first_part(echo, i, out, generated) if first else generated
                sent[key] = (len(c.token_ids), next_offset(generated, offset))
                if text or c.finish_reason or (logprobs and logprobs["tokens"]):
                    yield {"id": base_id, "object": "text_completion", "created": created, "model": name,
                           "choices": [{"index": i * body.n + c.index, "text": text, "logprobs": logprobs,
                                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
        if include_usage:
            yield {"id": base_id, "object": "text_completion", "created": created, "model": name,
                   "choices": [], "usage": usage([finals[i] for i in sorted(finals)])}
    finally:
        for t in tasks:
            t.cancel()
