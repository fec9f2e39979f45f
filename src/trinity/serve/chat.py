"""POST /v1/chat/completions: template, sampling, reasoning and tool-call parsing, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat_template import ChatTemplateError
from ..engine.request import CompletionOutput, RequestOutput
from .chat_constraints import ChatTokens, auto_tool_calls, json_answer, reasoning_first, tool_call_answer
from .errors import APIError
from .formatting import chat_logprobs, sse_stream, usage
from .protocol import ChatCompletionRequest
from .reasoning import get_reasoning_parser
from .state import ServerState
from .structured import StructuredOutputError
from .tools import HermesToolParser, ToolCall, ToolCallDelta, ToolSchemaError, get_tool_parser, parse_tool_choice, \
    validate_tools


@dataclass
class _Plan:
    """How one chat request is generated and how its text is read back."""

    request_id: str
    model: str
    tool_choice: str | tuple
    tools: list[dict] | None
    starts_in_reasoning: bool
    top_logprobs: int
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def constrained_tools(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, tuple)


@dataclass
class ChatRun:
    """A chat request made ready to run: the engine, how its text is read back, and the prepared request."""

    engine: object
    plan: _Plan
    prepared: object


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, raw: Request):
    run = prepare_chat(state, body)
    if body.stream:
        events = _stream_events(state, run.plan, state.run(run.engine, run.prepared), body.n)
        return StreamingResponse(sse_stream(events), media_type="text/event-stream")
    out = await state.collect(run.engine, run.prepared, raw)
    return JSONResponse(_response(state, run.plan, out))


def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> ChatRun:
    """Validate, template and admit one chat request (shared with the other chat-shaped routes)."""
    engine = state.admit(body.model)
    settings = state.settings
    tools = body.tools or None
    try:
        if body.tools is not None:
            validate_tools(body.tools)
        choice = parse_tool_choice(body.tool_choice, tools)
    except ToolSchemaError as e:
        raise APIError(400, str(e), param=e.param) from None
    if choice == "auto" and tools and not (settings.enable_auto_tool_choice and settings.tool_call_parser):
        raise APIError(400, '"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                            "--tool-call-parser", param="tool_choice")
    answer = _answer_constraint(state, body, choice, tools)
    prompt = _render(state, body, tools if choice != "none" else None, constrained=answer is not None)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    prompt_ids = state.tokenizer.encode(prompt)
    starts_in_reasoning = settings.reasoning_parser != "none" and prompt.endswith("<think>\n")
    max_tokens = body.max_completion_tokens or body.max_tokens
    room = max_tokens if max_tokens is not None else max(0, state.max_model_len - len(prompt_ids))
    constraint = _decoding_constraint(state, body, choice, tools, answer, starts_in_reasoning, room)
    params = state.sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                   constraint)
    plan = _Plan(state.new_id("chatcmpl"), settings.served_model_name, choice, tools, starts_in_reasoning,
                 body.top_logprobs or 0, bool(body.stream_options and body.stream_options.include_usage))
    prepared = state.prepare(engine, plan.request_id, prompt_ids, params, body.priority, "messages",
                             body.cache_salt)
    return ChatRun(engine, plan, prepared)


def _render(state: ServerState, body: ChatCompletionRequest, tools: list[dict] | None, constrained: bool) -> str:
    """The prompt: the chat template over the messages, with the thinking prefill unless the request turns it off
    (or the answer is constrained and no reasoning parser would split the reasoning off it)."""
    template_kwargs = dict(body.chat_template_kwargs or {})
    reserved = sorted(set(template_kwargs) & {"messages", "tools", "add_generation_prompt", "tokenize"})
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}: they are request fields",
                       param="chat_template_kwargs")
    enable_thinking = bool(template_kwargs.pop("enable_thinking", True))
    if constrained and state.settings.reasoning_parser == "none":
        enable_thinking = False
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        return state.tokenizer.apply_chat_template(messages, tools=tools,
                                                   add_generation_prompt=body.add_generation_prompt,
                                                   enable_thinking=enable_thinking, **template_kwargs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None


def _answer_constraint(state: ServerState, body: ChatCompletionRequest, choice, tools):
    """The constraint a required answer is under (forced tool calls, or response_format's JSON), or None."""
    try:
        if choice == "required" or isinstance(choice, tuple):
            return tool_call_answer(state.grammar(), ChatTokens.of(state.tokenizer), tools, choice,
                                    body.parallel_tool_calls)
        if body.response_format:
            return json_answer(state.grammar(), body.response_format)
    except StructuredOutputError as e:
        raise APIError(400, str(e), param=e.param) from None
    return None


def _decoding_constraint(state: ServerState, body: ChatCompletionRequest, choice, tools, answer,
                         starts_in_reasoning: bool, room: int):
    """The whole generation's constraint: the reasoning free (up to its budget), then the answer's; tool-call
    blocks checked wherever they open under "auto" with the hermes parser."""
    tokens = ChatTokens.of(state.tokenizer)
    calls = _auto_calls(state, tokens, tools) if choice == "auto" and tools else None
    if starts_in_reasoning:
        return reasoning_first(tokens, answer, calls, body.thinking_token_budget, room)
    return answer or calls


def _auto_calls(state: ServerState, tokens: ChatTokens, tools: list[dict]):
    """Hermes blocks under "auto" are checked when the grammar library is there; without it they stay free text
    (auto tool choice never needed it)."""
    if state.settings.tool_call_parser != "hermes":
        return None
    try:
        grammar = state.grammar()
    except RuntimeError:
        return None
    return auto_tool_calls(grammar, tokens, tools)


# ---------------------------------------------------------------------- reading the text back
class ChoiceReader:
    """Turns one sequence's growing text into reasoning, content and tool calls (whole or as deltas).

    Forced tool calls (tool_choice "required" / named) are Hermes blocks after the reasoning: they are read with
    the hermes parser from the content, of which nothing else is kept (the grammar leaves only the newlines
    between blocks). Under "auto", calls are read from the reasoning and the content with the server's parser."""

    def __init__(self, state: ServerState, plan: _Plan):
        self.plan = plan
        parser_name = state.settings.reasoning_parser
        self.reasoning = get_reasoning_parser(parser_name)(plan.starts_in_reasoning)
        self.tool_parser_cls = None
        if plan.constrained_tools:
            self.tool_parser_cls = HermesToolParser
        elif plan.tool_choice == "auto" and plan.tools and state.settings.tool_call_parser:
            self.tool_parser_cls = get_tool_parser(state.settings.tool_call_parser)
        self.calls_in_reasoning = self.tool_parser_cls is not None and not plan.constrained_tools
        self.counter = _Counter()
        if self.tool_parser_cls:
            self.tools_in_reasoning = self.tool_parser_cls(plan.tools, counter=self.counter)
            self.tools_in_content = self.tool_parser_cls(plan.tools, counter=self.counter)
        self.tokens_sent = 0
        self.saw_tool_call = False

    def whole(self, text: str) -> tuple[str | None, str | None, list[ToolCall]]:
        reasoning, content = type(self.reasoning).extract(text, self.plan.starts_in_reasoning)
        calls: list[ToolCall] = []
        if self.tool_parser_cls:
            if reasoning and self.calls_in_reasoning:
                reasoning, found = self.tool_parser_cls(self.plan.tools).extract(reasoning)
                calls += found
            content, found = self.tool_parser_cls(self.plan.tools).extract(content)
            calls += found
        if self.plan.constrained_tools:
            self._require_calls(calls)
            content = None
        return reasoning or None, content, calls

    def delta(self, new: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """`new`: the text this output adds (`CompletionOutput.new_text`)."""
        r, c = self.reasoning.feed(new)
        if final:
            fr, fc = self.reasoning.flush()
            r, c = r + fr, c + fc
        deltas: list[ToolCallDelta] = []
        if self.tool_parser_cls:
            if self.calls_in_reasoning:
                r, deltas = self._through(self.tools_in_reasoning, r, final)
            c, more = self._through(self.tools_in_content, c, final)
            deltas += more
        self.saw_tool_call |= bool(deltas)
        if self.plan.constrained_tools:
            if final:
                self._require_calls(self.saw_tool_call)
            c = ""
        return r, c, deltas

    @staticmethod
    def _require_calls(found) -> None:
        if not found:
            raise APIError(500, "the constrained tool call output did not parse (was it cut off by max_tokens?)",
                           code="tool_call_parse_error")

    @staticmethod
    def _through(parser, text: str, final: bool):
        out, deltas = parser.feed(text) if text else ("", [])
        if final:
            more, more_deltas = parser.flush()
            out, deltas = out + more, deltas + more_deltas
        return out, deltas


class _Counter:
    """Shared call index for the reasoning and content tool parsers of one sequence."""

    def __init__(self):
        self.value = 0

    def __next__(self) -> int:
        self.value += 1
        return self.value - 1

    def __iter__(self):
        return self


def _finish_reason(c: CompletionOutput, has_calls: bool) -> str | None:
    if has_calls and c.finish_reason == "stop":
        return "tool_calls"
    return c.finish_reason


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _response(state: ServerState, plan: _Plan, out: RequestOutput) -> dict:
    if out.error:
        raise APIError(500, out.error, code="engine_error")
    choices = []
    for c in out.outputs:
        if c.finish_reason == "length" and plan.constrained_tools:
            raise APIError(400, "max_tokens ran out before the tool call was complete; raise max_tokens",
                           param="max_tokens")
        reasoning, content, calls = ChoiceReader(state, plan).whole(c.text)
        # with tool calls, whitespace left between the call blocks is no content
        message = {"role": "assistant", "content": None if calls and not (content or "").strip() else content}
        if reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if calls:
            message["tool_calls"] = [_call_json(call) for call in calls]
        choices.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(c, 0, len(c.token_ids), plan.top_logprobs, state.tokenizer),
                        "finish_reason": _finish_reason(c, bool(calls)), "stop_reason": c.stop_reason})
    return {"id": plan.request_id, "object": "chat.completion", "created": plan.created, "model": plan.model,
            "choices": choices, "usage": usage([out])}


async def _stream_events(state: ServerState, plan: _Plan, outputs: AsyncIterator[RequestOutput], n: int):
    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": plan.request_id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model, "choices": choices, **extra}

    readers = [ChoiceReader(state, plan) for _ in range(n)]
    done = [False] * n
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(n)])
    last = None
    async for out in outputs:
        last = out
        if out.error:
            raise APIError(500, out.error, code="engine_error")
        for c in out.outputs:
            i, reader = c.index, readers[c.index]
            if done[i]:
                continue
            final = c.finish_reason is not None
            if final and c.finish_reason == "length" and plan.constrained_tools:
                raise APIError(400, "max_tokens ran out before the tool call was complete; raise max_tokens",
                               param="max_tokens")
            r, text, deltas = reader.delta(c.new_text, final)
            delta: dict = {}
            if r:
                delta["reasoning_content"] = delta["reasoning"] = r
            if text:
                delta["content"] = text
            if deltas:
                delta["tool_calls"] = [_delta_json(d) for d in deltas]
            logprobs = chat_logprobs(c, reader.tokens_sent, len(c.token_ids), plan.top_logprobs, state.tokenizer)
            reader.tokens_sent = len(c.token_ids)
            if delta or (logprobs and logprobs["content"]):
                yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
            if final:
                done[i] = True
                yield chunk([{"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": _finish_reason(c, reader.saw_tool_call),
                              "stop_reason": c.stop_reason}])
    if plan.include_usage and last is not None:
        yield chunk([], usage=usage([last]))


def _delta_json(d: ToolCallDelta) -> dict:
    out: dict = {"index": d.index}
    if d.id is not None:
        out["id"] = d.id
        out["type"] = "function"
    function = {}
    if d.name is not None:
        function["name"] = d.name
    if d.arguments is not None:
        function["arguments"] = d.arguments
    out["function"] = function
    return out
