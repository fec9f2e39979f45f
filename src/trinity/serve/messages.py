"""POST /v1/messages: Anthropic's Messages API, so Claude-Code-style agents can use a Trinity server.

Not a second pipeline: the request is translated into a `ChatCompletionRequest` and run by the chat route's
`prepare_chat` and `ChoiceReader`, so templating, sampling, admission, reasoning and tool parsing are the chat
route's own; this module only changes the shapes on the way in and out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..engine.request import CompletionOutput, RequestOutput
from .chat import ChatRun, ChoiceReader, prepare_chat, prompt_tokens
from .errors import APIError
from .messages_protocol import Message, MessagesCountTokensRequest, MessagesRequest, Tool, ToolChoice, \
    ToolResultBlock
from .protocol import ChatCompletionRequest
from .state import ServerState
from .tools import ToolCall, ToolCallDelta


async def create_message(state: ServerState, body: MessagesRequest, raw: Request):
    run = await prepare_chat(state, to_chat_request(body))
    if body.stream:
        events = _stream_events(state, run, state.run(run.engine, run.prepared))
        return StreamingResponse(_sse_stream(events), media_type="text/event-stream")
    out = await state.collect(run.engine, run.prepared, raw)
    return JSONResponse(_message(state, run, out))


async def count_message_tokens(state: ServerState, body: MessagesCountTokensRequest) -> dict:
    """The prompt's tokens as `/v1/messages` would render them for the same messages, system, tools and thinking:
    its response's `usage.input_tokens`."""
    request = MessagesRequest.model_validate({**body.model_dump(exclude_none=True), "max_tokens": 1})
    return {"input_tokens": await prompt_tokens(state, to_chat_request(request))}


# ---------------------------------------------------------------------- the request, as a chat request
def to_chat_request(body: MessagesRequest) -> ChatCompletionRequest:
    if body.messages[-1].role == "assistant":
        # Anthropic continues a final assistant turn (prefill); the chat template can only open a new one
        raise APIError(400, "a final assistant message (prefill) is not supported: end with a user message",
                       param="messages")
    messages = _system(body.system) + [m for message in body.messages for m in _chat_messages(message)]
    fields: dict = {"model": body.model, "messages": messages, "max_tokens": body.max_tokens,
                    "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                    "stop": body.stop_sequences, "stream": body.stream}
    if body.tools:
        fields["tools"] = [_chat_tool(t) for t in body.tools]
        if body.tool_choice is not None:
            fields["tool_choice"] = _chat_tool_choice(body.tool_choice)
            fields["parallel_tool_calls"] = not body.tool_choice.disable_parallel_tool_use
    elif body.tool_choice is not None and body.tool_choice.type not in ("auto", "none"):
        raise APIError(400, f"tool_choice {body.tool_choice.type!r} needs tools", param="tool_choice")
    if body.thinking is not None and body.thinking.type == "disabled":
        fields["chat_template_kwargs"] = {"enable_thinking": False}
    elif body.thinking is not None and body.thinking.type == "enabled":
        # the most reasoning tokens, then the reasoning is closed and the answer follows (within max_tokens)
        fields["thinking_token_budget"] = body.thinking.budget_tokens
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:  # a value Anthropic allows that the chat pipeline does not
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where or None) from None


def _system(system) -> list[dict]:
    if system is None:
        return []
    text = system if isinstance(system, str) else "\n".join(block.text for block in system)
    return [{"role": "system", "content": text}]


def _chat_messages(message: Message) -> list[dict]:
    """One Anthropic message as chat messages: a user message's tool results become tool messages."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant(message)]
    out, texts = [], []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _tool_result_text(block)})
        else:
            raise APIError(400, f"a user message cannot hold a {block.type} block", param="messages")
    if texts:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(message: Message) -> dict:
    texts, thoughts, calls = [], [], []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "thinking":
            thoughts.append(block.thinking)  # the reasoning of that turn: agent loops need it kept
        elif block.type == "tool_use":
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif block.type == "tool_result":
            raise APIError(400, "an assistant message cannot hold a tool_result block", param="messages")
    out: dict = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
    if thoughts:
        out["reasoning_content"] = "\n".join(thoughts)
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_result_text(block: ToolResultBlock) -> str:
    content = block.content
    text = content if isinstance(content, str) else "\n".join(b.text for b in content or [])
    # the chat format has no error flag: the model can only read that the tool failed
    return f"Error: {text}" if block.is_error else text


def _chat_tool(tool: Tool) -> dict:
    function = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: ToolChoice):
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice of type 'tool' needs a name", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


# ---------------------------------------------------------------------- the response
def _message(state: ServerState, run: ChatRun, out: RequestOutput) -> dict:
    c = _only_output(run, out)
    reasoning, content, calls = ChoiceReader(state, run.plan).whole(c.text)
    blocks = [_thinking_block(reasoning)] if reasoning else []
    # whitespace between the reasoning and the tool calls is no answer (as the chat route reads it)
    if content and content.strip():
        blocks.append({"type": "text", "text": content})
    blocks += [_tool_use_block(call) for call in calls]
    stop_reason, stop_sequence = _stop(c, bool(calls))
    return {**_envelope(run), "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": len(out.prompt_token_ids), "output_tokens": len(c.token_ids)}}


def _only_output(run: ChatRun, out: RequestOutput) -> CompletionOutput:
    if out.error:
        raise APIError(500, out.error, code="engine_error")
    c = out.outputs[0]  # Anthropic has no n: one sequence
    if c.finish_reason == "length" and run.plan.constrained_tools:
        raise APIError(400, "max_tokens ran out before the tool call was complete; raise max_tokens",
                       param="max_tokens")
    return c


def _envelope(run: ChatRun) -> dict:
    return {"id": "msg_" + run.plan.request_id.rsplit("-", 1)[-1], "type": "message", "role": "assistant",
            "model": run.plan.model}


def _stop(c: CompletionOutput, has_calls: bool) -> tuple[str, str | None]:
    if c.finish_reason == "length":
        return "max_tokens", None
    if has_calls:
        return "tool_use", None
    if isinstance(c.stop_reason, str):  # the stop string that matched (a token id means a stop token)
        return "stop_sequence", c.stop_reason
    return "end_turn", None


def _signature(thinking: str) -> str:
    # Anthropic signs thinking so it can be passed back unaltered; ours is opaque and never checked, but stable
    # (a digest of the text), so a streamed and a whole response to the same request carry the same one
    return "trinity-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _thinking_block(thinking: str) -> dict:
    return {"type": "thinking", "thinking": thinking, "signature": _signature(thinking)}


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _tool_use_block(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name, "input": json.loads(call.arguments)}


# ---------------------------------------------------------------------- streaming
class _Blocks:
    """Anthropic content-block events from the chat reader's deltas: one block open at a time, in the order the
    model wrote them (thinking, then text, then tool calls, as a whole response lists them)."""

    def __init__(self):
        self.index = -1
        self.open: str | None = None  # "thinking" | "text" | "tool_use"
        self.thinking = ""  # the open thinking block's text, for its signature
        self.blank = ""  # whitespace-only text held back: it opens a text block only if real text follows

    def thinking_delta(self, text: str) -> list[tuple[str, dict]]:
        events = [] if self.open == "thinking" else self._start({"type": "thinking", "thinking": "",
                                                                  "signature": ""})
        self.thinking += text
        return events + [self._delta({"type": "thinking_delta", "thinking": text})]

    def text_delta(self, text: str) -> list[tuple[str, dict]]:
        if self.open != "text":
            text, self.blank = self.blank + text, ""
            if not text.strip():
                self.blank = text
                return []
        events = [] if self.open == "text" else self._start({"type": "text", "text": ""})
        return events + [self._delta({"type": "text_delta", "text": text})]

    def tool_delta(self, d: ToolCallDelta) -> list[tuple[str, dict]]:
        events = []
        if d.id is not None:  # a new call: its id and name come first, its arguments after
            self.blank = ""
            events = self._start({"type": "tool_use", "id": _tool_use_id(d.id), "name": d.name, "input": {}})
        if d.arguments:
            events.append(self._delta({"type": "input_json_delta", "partial_json": d.arguments}))
        return events

    def close(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append(self._delta({"type": "signature_delta", "signature": _signature(self.thinking)}))
            self.thinking = ""
        self.open = None
        return events + [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _start(self, block: dict) -> list[tuple[str, dict]]:
        events = self.close()
        self.index += 1
        self.open = block["type"]
        return events + [("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}


async def _stream_events(state: ServerState, run: ChatRun,
                         outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[tuple[str, dict]]:
    prompt_tokens = len(run.prepared.prompt_token_ids)
    yield "message_start", {"type": "message_start", "message": {
        **_envelope(run), "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}
    reader, blocks, called = ChoiceReader(state, run.plan), _Blocks(), False
    async for out in outputs:
        c = _only_output(run, out)
        final = c.finish_reason is not None
        reasoning, text, deltas = reader.delta(c.new_text, final)
        called |= bool(deltas)
        for event in _block_events(blocks, reasoning, text, deltas):
            yield event
        if final:
            for event in blocks.close():
                yield event
            stop_reason, stop_sequence = _stop(c, called)
            yield "message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                    "usage": {"input_tokens": prompt_tokens, "output_tokens": len(c.token_ids)}}
            yield "message_stop", {"type": "message_stop"}
            return


def _block_events(blocks: _Blocks, reasoning: str, text: str, deltas: list[ToolCallDelta]):
    # within one engine output the reader's pieces are in this order: reasoning comes before the answer's text,
    # and a call closes the text written before it
    events = blocks.thinking_delta(reasoning) if reasoning else []
    if text:
        events += blocks.text_delta(text)
    for d in deltas:
        events += blocks.tool_delta(d)
    return events


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse_stream(events: AsyncIterator[tuple[str, dict]]) -> AsyncIterator[str]:
    """Frame events as Anthropic's SSE; an error after the stream began becomes an `error` event."""
    try:
        async for name, data in events:
            yield _sse(name, data)
    except APIError as e:
        yield _sse("error", e.anthropic_body())
    except Exception as e:  # noqa: BLE001 - the client gets a clean error event, the log gets the trace
        import logging

        logging.getLogger("trinity.serve").exception("error while streaming /v1/messages")
        yield _sse("error", APIError(500, f"internal error while streaming ({type(e).__name__})").anthropic_body())
