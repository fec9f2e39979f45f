"""POST /v1/completions: raw-text prompts (one or many), whole or streamed."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .errors import APIError
from .formatting import completion_logprobs, sse_stream, usage
from .protocol import CompletionRequest
from .state import ServerState


def _prompts(state: ServerState, prompt) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        return [(prompt, state.tokenizer.encode(prompt))]
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, state.tokenizer.encode(p)) for p in prompt]
    return [(None, list(p)) for p in prompt]


async def create_completion(state: ServerState, body: CompletionRequest, raw: Request):
    engine = state.admit(body.model)
    constraint = None
    if body.response_format:
        from .structured import StructuredOutputError, constraint_for_response_format

        try:
            constraint = constraint_for_response_format(state.grammar(), body.response_format)
        except StructuredOutputError as e:
            raise APIError(400, str(e), param=e.param) from None
    params = state.sampling_params(body, body.max_tokens, body.logprobs, constraint)
    base_id = state.new_id("cmpl")
    prompts = _prompts(state, body.prompt)
    prepared = [state.prepare(engine, f"{base_id}-{i}", ids, params, body.priority, "prompt", body.cache_salt)
                for i, (_, ids) in enumerate(prompts)]
    created, name = int(time.time()), state.settings.served_model_name
    top = body.logprobs or 0

    def echo_text(i: int) -> str:
        text, ids = prompts[i]
        return (text if text is not None else state.tokenizer.decode(ids)) if body.echo else ""

    if not body.stream:
        outs = await asyncio.gather(*(state.collect(engine, p, raw) for p in prepared))
        choices = []
        for i, out in enumerate(outs):
            if out.error:
                raise APIError(500, out.error, code="engine_error")
            for c in out.outputs:
                prefix = echo_text(i)
                choices.append({"index": i * body.n + c.index, "text": prefix + c.text,
                                "logprobs": completion_logprobs(c, 0, len(c.token_ids), top, state.tokenizer,
                                                                len(prefix)),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({"id": base_id, "object": "text_completion", "created": created, "model": name,
                             "choices": choices, "usage": usage(list(outs))})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
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
        sent = {}  # (prompt, seq) -> (chars, tokens) already sent
        finals = {}
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
                    if (i, c.index) in finished:
                        continue
                    if c.finish_reason is not None:
                        finished.add((i, c.index))
                    chars, tokens = sent.get((i, c.index), (None, 0))  # generated text and tokens sent so far
                    new_text = c.new_text if chars is not None else echo_text(i) + c.new_text
                    logprobs = completion_logprobs(c, tokens, len(c.token_ids), top, state.tokenizer,
                                                   chars if chars is not None else len(echo_text(i)))
                    sent[(i, c.index)] = ((chars or 0) + len(c.new_text), len(c.token_ids))
                    if new_text or c.finish_reason or (logprobs and logprobs["tokens"]):
                        yield {"id": base_id, "object": "text_completion", "created": created, "model": name,
                               "choices": [{"index": i * body.n + c.index, "text": new_text, "logprobs": logprobs,
                                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
            if include_usage:
                yield {"id": base_id, "object": "text_completion", "created": created, "model": name,
                       "choices": [], "usage": usage([finals[i] for i in sorted(finals)])}
        finally:
            for t in tasks:
                t.cancel()

    return StreamingResponse(sse_stream(events()), media_type="text/event-stream")
