"""POST /v1/responses (OpenAI's Responses API, the subset vLLM serves), GET and DELETE /v1/responses/{id}.

A Responses request is translated into a chat completion request and runs through the chat pipeline
(`prepare_chat`, `ChoiceReader`); this module only reshapes what the reader returns into output items
(reasoning, message, function_call) and, when streaming, into the typed events that build them.
Whole and streamed responses assemble their items through the same `_Output`, so they are the same items.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.request import RequestOutput
from .chat import ChoiceReader, prepare_chat
from .errors import APIError
from .responses_protocol import ResponsesRequest, chat_request, check_supported, input_items, text_config
from .responses_store import ResponseStore, StoredResponse, owner_of
from .state import ServerState
from .tools import ToolCallDelta

log = logging.getLogger("trinity.serve")


def responses_router(state: ServerState, dependencies: list) -> APIRouter:
    store = ResponseStore(state.settings.responses_store_size)
    router = APIRouter(dependencies=dependencies)

    @router.post("/v1/responses")
    async def create(body: ResponsesRequest, request: Request):
        return await create_response(state, store, body, request)

    @router.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request):
        return JSONResponse(_stored(store, response_id, request, None).response)

    @router.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request):
        if not store.delete(response_id, owner_of(request.headers)):
            raise _not_found(response_id, None)
        return {"id": response_id, "object": "response", "deleted": True}

    return router


def _stored(store: ResponseStore, response_id: str, request: Request, param: str | None) -> StoredResponse:
    stored = store.get(response_id, owner_of(request.headers))
    if stored is None:
        raise _not_found(response_id, param)
    return stored


def _not_found(response_id: str, param: str | None) -> APIError:
    return APIError(404, f"no stored response with id {response_id!r} (unknown, evicted, deleted, or created "
                         "with another API key)", param=param, code="response_not_found")


async def create_response(state: ServerState, store: ResponseStore, body: ResponsesRequest, raw: Request):
    check_supported(body)
    conversation = input_items(body)
    if body.previous_response_id is not None:
        previous = _stored(store, body.previous_response_id, raw, "previous_response_id")
        conversation = previous.history + conversation
    try:
        run = await prepare_chat(state, chat_request(body, conversation))
    except APIError as e:
        raise _renamed(e) from None
    envelope = _Envelope(body, state.settings.served_model_name)
    owner = owner_of(raw.headers)

    def keep(response: dict) -> None:
        if body.store:
            store.put(response["id"], StoredResponse(owner, response, conversation))

    if body.stream:
        events = _stream(state, run, envelope, keep)
        return StreamingResponse(events, media_type="text/event-stream")
    out = await state.collect(run.engine, run.prepared, raw)
    if out.error:
        raise APIError(500, out.error, code="engine_error")
    c = out.outputs[0]
    reasoning, content, calls = _read(lambda: ChoiceReader(state, run.plan).whole(c.text), c.finish_reason)
    output = _Output(body.parallel_tool_calls)
    output.add(reasoning or "", content or "", [ToolCallDelta(i, call.id, call.name, call.arguments)
                                                for i, call in enumerate(calls)])
    output.finish(c.finish_reason == "length")
    response = envelope.final(output, out, state.tokenizer)
    keep(response)
    return JSONResponse(response)


def _read(parse, finish_reason: str | None):
    """The reader's (reasoning, content, calls); a forced tool call cut off by the token limit has nothing to
    parse, which is an incomplete response rather than an error."""
    try:
        return parse()
    except APIError:
        if finish_reason == "length":
            return "", "", []
        raise


# ---------------------------------------------------------------------- streaming
async def _stream(state: ServerState, run, envelope: "_Envelope", keep) -> AsyncIterator[str]:
    sequence = itertools.count()

    def frame(event: dict) -> str:
        event["sequence_number"] = next(sequence)
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    yield frame({"type": "response.created", "response": envelope.snapshot("in_progress")})
    yield frame({"type": "response.in_progress", "response": envelope.snapshot("in_progress")})
    reader, output, last = ChoiceReader(state, run.plan), _Output(envelope.body.parallel_tool_calls), None
    try:
        async for out in state.run(run.engine, run.prepared):
            if out.error:
                raise APIError(500, out.error, code="engine_error")
            c, last = out.outputs[0], out
            final = c.finish_reason is not None
            for event in output.add(*_read(lambda: reader.delta(c.new_text, final), c.finish_reason)):
                yield frame(event)
        if last is None:
            raise APIError(500, "the engine returned no output", code="engine_error")
        for event in output.finish(last.outputs[0].finish_reason == "length"):
            yield frame(event)
        response = envelope.final(output, last, state.tokenizer)
        keep(response)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield frame({"type": kind, "response": response})
    except Exception as e:  # noqa: BLE001 - the stream has begun: the client learns it failed from the stream
        if not isinstance(e, APIError):
            log.exception("error while streaming a response")
            e = APIError(500, f"internal error while streaming ({type(e).__name__})")
        yield frame({"type": "response.failed", "response": envelope.snapshot(
            "failed", output.items, error={"code": e.code or "server_error", "message": e.message})})


# ---------------------------------------------------------------------- output items
class _Stripped:
    """A text stream without its leading and trailing whitespace, i.e. str.strip() of the whole text (the blank
    lines around </think> and tool call blocks are layout, not content)."""

    def __init__(self):
        self.started = False
        self.held = ""  # trailing whitespace, sent only if more text follows

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        kept = text.rstrip()
        self.held = text[len(kept):]
        return kept


# per text item kind: id prefix, content part type, event name prefix
_TEXT_KINDS = {"reasoning": ("rs", "reasoning_text", "response.reasoning_text"),
               "message": ("msg", "output_text", "response.output_text")}


class _Output:
    """A response's output items, built from the chat reader's (reasoning, content, tool call deltas) pieces;
    `add` and `finish` return the stream events that build the same items on the client. Items come in the
    order reasoning, message, function calls: calls are held until the end, so text written after a call still
    lands in the message before it, as in a whole response."""

    def __init__(self, parallel_tool_calls: bool):
        self.items: list[dict] = []
        self.parallel = parallel_tool_calls
        self.open: dict[str, dict] = {}  # kind -> the text item being written
        self.strip = {"reasoning": _Stripped(), "message": _Stripped()}
        self.calls: dict[int, dict] = {}

    def add(self, reasoning: str, content: str, deltas: list[ToolCallDelta]) -> list[dict]:
        events = self._text("reasoning", reasoning)
        events += self._text("message", content)
        for d in deltas:
            call = self.calls.setdefault(d.index, {"call_id": None, "name": None, "arguments": ""})
            call["call_id"] = d.id or call["call_id"]
            call["name"] = d.name or call["name"]
            call["arguments"] += d.arguments or ""
        return events

    def finish(self, cut_off: bool) -> list[dict]:
        """`cut_off`: the token limit ended it; the item being written then is incomplete."""
        events = []
        for kind in ("reasoning", "message"):
            if kind in self.open:
                events += self._close(kind, "incomplete" if cut_off else "completed")
        calls = [self.calls[i] for i in sorted(self.calls)]
        for call in calls[:None if self.parallel else 1]:  # at most one call when parallel calls are off
            events += self._function_call(call)
        return events

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": next(i for i, x in enumerate(self.items) if x is item)}

    # ------------------------------------------------------------------ text items
    def _text(self, kind: str, text: str) -> list[dict]:
        text = self.strip[kind].feed(text) if text else ""
        if not text:
            return []
        events = []
        if kind == "message" and "reasoning" in self.open:  # the answer has begun: the thinking is done
            events += self._close("reasoning", "completed")
        if kind not in self.open:
            events += self._open(kind)
        item = self.open[kind]
        item["content"][0]["text"] += text
        events.append({"type": f"{_TEXT_KINDS[kind][2]}.delta", **self._where(item), "content_index": 0,
                       "delta": text, **({"logprobs": []} if kind == "message" else {})})
        return events

    def _open(self, kind: str) -> list[dict]:
        prefix, part_type, _ = _TEXT_KINDS[kind]
        item = {"id": f"{prefix}_{uuid.uuid4().hex}", "type": kind, "status": "in_progress", "content": []}
        item.update({"role": "assistant"} if kind == "message" else {"summary": []})
        part = {"type": part_type, "text": ""} | ({"annotations": []} if kind == "message" else {})
        self.items.append(item)
        added = {"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": _copy(item)}
        item["content"].append(part)
        self.open[kind] = item
        return [added, {"type": "response.content_part.added", **self._where(item), "content_index": 0,
                        "part": _copy(part)}]

    def _close(self, kind: str, status: str) -> list[dict]:
        item = self.open.pop(kind)
        item["status"] = status
        part, where = item["content"][0], self._where(item)
        done = {"type": f"{_TEXT_KINDS[kind][2]}.done", **where, "content_index": 0, "text": part["text"]}
        if kind == "message":
            done["logprobs"] = []
        return [done, {"type": "response.content_part.done", **where, "content_index": 0, "part": _copy(part)},
                {"type": "response.output_item.done", "output_index": where["output_index"], "item": _copy(item)}]

    # ------------------------------------------------------------------ function calls
    def _function_call(self, call: dict) -> list[dict]:
        item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                "call_id": call["call_id"] or f"call_{uuid.uuid4().hex[:24]}", "name": call["name"] or "",
                "arguments": ""}
        self.items.append(item)
        where = self._where(item)
        events = [{"type": "response.output_item.added", "output_index": where["output_index"], "item": _copy(item)},
                  {"type": "response.function_call_arguments.delta", **where, "delta": call["arguments"]},
                  {"type": "response.function_call_arguments.done", **where, "arguments": call["arguments"]}]
        item.update(arguments=call["arguments"], status="completed")
        return events + [{"type": "response.output_item.done", "output_index": where["output_index"],
                          "item": _copy(item)}]


def _copy(value):
    """A deep copy (events and snapshots must not change as the items they show grow)."""
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------- the response object
class _Envelope:
    """The fields of a response that echo the request, around its output, status and usage."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def snapshot(self, status: str, output: list | None = None, **extra) -> dict:
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": None, "incomplete_details": None, "instructions": b.instructions,
                "max_output_tokens": b.max_output_tokens, "metadata": b.metadata or {}, "model": self.model,
                "output": _copy(output or []), "parallel_tool_calls": b.parallel_tool_calls,
                "previous_response_id": b.previous_response_id,
                "reasoning": b.reasoning or {"effort": None, "summary": None}, "store": b.store,
                "temperature": 1.0 if b.temperature is None else b.temperature, "text": text_config(b.text),
                "tool_choice": b.tool_choice if b.tool_choice is not None else "auto", "tools": b.tools or [],
                "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": b.truncation or "disabled",
                "usage": None, "user": b.user, **extra}

    def final(self, output: _Output, out: RequestOutput, tokenizer) -> dict:
        cut_off = out.outputs[0].finish_reason == "length"
        return self.snapshot("incomplete" if cut_off else "completed", output.items,
                             incomplete_details={"reason": "max_output_tokens"} if cut_off else None,
                             usage=_usage(out, output.items, tokenizer), completed_at=int(time.time()))


def _usage(out: RequestOutput, items: list[dict], tokenizer) -> dict:
    prompt, generated = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    thinking = "".join(i["content"][0]["text"] for i in items if i["type"] == "reasoning")
    # the reader gives back text, not where </think> fell among the generated ids: encoding the reasoning again
    # counts it (to within a token or two at its edges)
    reasoning = min(generated, len(tokenizer.encode(thinking))) if thinking else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + generated}


# ---------------------------------------------------------------------- errors in the Responses' names
_RENAMES = ((r"response_format\.json_schema", "text.format"), (r"response_format", "text.format"),
            (r"max_completion_tokens|max_tokens", "max_output_tokens"), (r"tools\[(\d+)\]\.function", r"tools[\1]"),
            (r"messages(\[\d+\])?", "input"))


def _renamed(e: APIError) -> APIError:
    """An error from the chat pipeline, with the chat request's field names turned into this request's."""
    def rename(text: str | None) -> str | None:
        if text is None:
            return None
        for pattern, new in _RENAMES:
            text = re.sub(rf"\b{pattern}", new, text)
        return text

    return APIError(e.status, rename(e.message), param=rename(e.param), code=e.code, type=e.type, headers=e.headers)
