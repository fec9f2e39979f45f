"""POST /v1/chat/completions: template, sampling, reasoning and tool-call parsing, whole or streamed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat_template import ChatTemplateError
from ..engine.request import CompletionOutput, RequestOutput
from .chat_constraints import ChatTokens, auto_tool_calls_async, forces_calls, generation_constraint, \
    json_answer_async, tool_call_answer_async
from .errors import APIError, structured_output_error
from .formatting import chat_logprobs, sse_stream, usage
from .protocol import ChatCompletionRequest
from .reasoning import get_reasoning_parser
from .state import ServerState
from .structured import StructuredOutputError
from .tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, HermesToolParser, ToolCall, ToolCallDelta, ToolSchemaError, \
    get_tool_parser, parse_tool_choice, validate_tools

log = logging.getLogger("trinity.serve")


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
    # the request field whose stops could cut a forced tool call short ("stop" / "stop_token_ids"), if any
    client_stop: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def constrained_tools(self) -> bool:
        return forces_calls(self.tool_choice)


@dataclass
class ChatRun:
    """A chat request made ready to run: the engine, how its text is read back, and the prepared request."""

    engine: object
    plan: _Plan
    prepared: object


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, raw: Request):
    run = await prepare_chat(state, body)
    if body.stream:
        events = _stream_events(state, run.plan, state.run(run.engine, run.prepared), body.n)
        return StreamingResponse(sse_stream(events), media_type="text/event-stream")
    out = await state.collect(run.engine, run.prepared, raw)
    return JSONResponse(_response(state, run.plan, out))


async def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> ChatRun:
    """Validate, template and admit one chat request (shared with the other chat-shaped routes). Grammars compile
    and the prompt is tokenized in worker threads, so a large schema or prompt does not stall the event loop."""
    engine = state.admit(body.model)
    settings = state.settings
    tools, choice = _tools_and_choice(state, body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    answer = await _answer_constraint(state, body, choice, tools)
    prompt = _render(state, body, tools if choice != "none" else None, constrained=answer is not None)
    prompt_ids = await state.encode(prompt, "messages")
    starts_in_reasoning = settings.reasoning_parser != "none" and prompt.endswith("<think>\n")
    max_tokens = body.max_completion_tokens or body.max_tokens
    room = max_tokens if max_tokens is not None else max(0, state.max_model_len - len(prompt_ids))
    constraint = await _decoding_constraint(state, body, choice, tools, answer, starts_in_reasoning, room)
    params = state.sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                   constraint)
    plan = _Plan(state.new_id("chatcmpl"), settings.served_model_name, choice, tools, starts_in_reasoning,
                 body.top_logprobs or 0, bool(body.stream_options and body.stream_options.include_usage),
                 "stop" if body.stop else "stop_token_ids" if body.stop_token_ids else None)
    prepared = state.prepare(engine, plan.request_id, prompt_ids, params, body.priority, "messages",
                             body.cache_salt)
    return ChatRun(engine, plan, prepared)


async def prompt_tokens(state: ServerState, body: ChatCompletionRequest) -> int:
    """How many tokens `prepare_chat` would prompt the model with for this request, validated as there but with no
    grammar compiled (whether the answer is constrained is read from the request)."""
    state.admit(body.model)
    tools, choice = _tools_and_choice(state, body)
    fmt = body.response_format
    constrained = forces_calls(choice) or bool(fmt and fmt.get("type") != "text")
    prompt = _render(state, body, tools if choice != "none" else None, constrained)
    return len(await state.encode(prompt, "messages"))


def _tools_and_choice(state: ServerState, body: ChatCompletionRequest) -> tuple[list[dict] | None, object]:
    """The request's tools (validated; None when it has none) and its parsed tool_choice."""
    tools = body.tools or None
    try:
        if body.tools is not None:
            validate_tools(body.tools)
        choice = parse_tool_choice(body.tool_choice, tools)
    except ToolSchemaError as e:
        raise APIError(400, str(e), param=e.param) from None
    settings = state.settings
    if choice == "auto" and tools and not (settings.enable_auto_tool_choice and settings.tool_call_parser):
        raise APIError(400, '"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                            "--tool-call-parser", param="tool_choice")
    return tools, choice


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


async def _answer_constraint(state: ServerState, body: ChatCompletionRequest, choice, tools):
    """The constraint a required answer is under (forced tool calls, or response_format's JSON), or None."""
    try:
        if forces_calls(choice):
            return await tool_call_answer_async(await state.grammar_async(), ChatTokens.of(state.tokenizer), tools,
                                                choice, body.parallel_tool_calls)
        if body.response_format:
            return await json_answer_async(await state.grammar_async(), body.response_format)
    except StructuredOutputError as e:
        raise structured_output_error(e) from None
    return None


async def _decoding_constraint(state: ServerState, body: ChatCompletionRequest, choice, tools, answer,
                               starts_in_reasoning: bool, room: int):
    """The whole generation's constraint: the reasoning free (up to its budget), then the answer's; tool-call
    blocks checked wherever they open under "auto" with the hermes parser."""
    tokens = ChatTokens.of(state.tokenizer)
    calls = await _auto_calls(state, tokens, tools) if choice == "auto" and tools else None
    return generation_constraint(tokens, answer, calls, starts_in_reasoning, body.thinking_token_budget, room)


async def _auto_calls(state: ServerState, tokens: ChatTokens, tools: list[dict]):
    """Hermes blocks under "auto" are checked when the grammar library is there and the tools compile (within the
    schema limits and time limit); otherwise they stay free text (auto tool choice never needed the grammar)."""
    if state.settings.tool_call_parser != "hermes":
        return None
    try:
        return await auto_tool_calls_async(await state.grammar_async(), tokens, tools)
    except RuntimeError:
        return None
    except StructuredOutputError as e:
        log.warning("tool_choice auto: tool calls are not constrained for this request: %s", e.message)
        return None


# ---------------------------------------------------------------------- reading the text back
_UNKNOWN = object()  # a ChoiceReader caller that does not pass the output's stop_reason


class ChoiceReader:
    """Turns one sequence's growing text into reasoning, content and tool calls (whole or as deltas).

    Forced tool calls (tool_choice "required" / named) are Hermes blocks after the reasoning: they are read with
    the hermes parser from the content, of which nothing else is kept (the grammar leaves only the newlines
    between blocks). Under "auto", calls are read from the reasoning and the content with the server's parser.

    A forced call that does not parse is never a server error. The grammar holds the stop tokens back until the
    calls are complete, so an output that ends before that (still in the reasoning, or inside a `<tool_call>`
    block) was cut short by the request's own limits: its stop strings / stop tokens (as max_tokens running out,
    which the routes check first): a 400 naming the field when known. Blocks that are complete but do not parse
    (the grammar should not allow it) come back as content with no tool calls, logged as a warning.
    `stop_reason` (the output's, where the caller has it) says whether a stop cut the output; without it, any
    stop the request set is taken as the cause."""

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
        self._held = []  # forced calls: the content held back, returned if no call parses

    def whole(self, text: str, stop_reason=_UNKNOWN) -> tuple[str | None, str | None, list[ToolCall]]:
        reasoning, content = type(self.reasoning).extract(text, self.plan.starts_in_reasoning)
        raw_content = content
        calls: list[ToolCall] = []
        if self.tool_parser_cls:
            if reasoning and self.calls_in_reasoning:
                reasoning, found = self.tool_parser_cls(self.plan.tools).extract(reasoning)
                calls += found
            content, found = self.tool_parser_cls(self.plan.tools).extract(content)
            calls += found
        if self.plan.constrained_tools:
            if calls:
                content = None
            else:
                self._unparsed(stop_reason, raw_content)
                content = raw_content
        return reasoning or None, content, calls

    def delta(self, new: str, final: bool, stop_reason=_UNKNOWN) -> tuple[str, str, list[ToolCallDelta]]:
        """`new`: the text this output adds (`CompletionOutput.new_text`)."""
        r, c = self.reasoning.feed(new)
        if final:
            fr, fc = self.reasoning.flush()
            r, c = r + fr, c + fc
        if self.plan.constrained_tools:
            self._held.append(c)
        deltas: list[ToolCallDelta] = []
        if self.tool_parser_cls:
            if self.calls_in_reasoning:
                r, deltas = self._through(self.tools_in_reasoning, r, final)
            c, more = self._through(self.tools_in_content, c, final)
            deltas += more
        self.saw_tool_call |= bool(deltas)
        if self.plan.constrained_tools:
            c = ""
            if final and not self.saw_tool_call:
                c = "".join(self._held)
                self._unparsed(stop_reason, c)
        return r, c, deltas

    def _unparsed(self, stop_reason, content: str | None) -> None:
        """A forced tool call that did not parse: 400 when the output was cut short (see the class doc)."""
        cause = self.plan.client_stop if stop_reason is _UNKNOWN else \
            "stop" if isinstance(stop_reason, str) else "stop_token_ids" if stop_reason is not None else None
        content = content or ""
        cut = not content.strip() or content.rfind(TOOL_CALL_OPEN) > content.rfind(TOOL_CALL_CLOSE)
        if cause is not None:
            what = "stop string" if cause == "stop" else "stop token"
            raise APIError(400, f"a {what} of the request ({cause}) ended the output before the forced tool call "
                                f"was complete; leave {cause} out with tool_choice \"required\" or a named tool",
                           param=cause, code="tool_call_incomplete")
        if cut:
            raise APIError(400, "the output ended before the forced tool call was complete (cut short by the "
                                "request's limits: max_tokens, min_tokens, stop)", code="tool_call_incomplete")
        log.warning("a forced tool call did not parse; its text is returned as content")

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
        reasoning, content, calls = ChoiceReader(state, plan).whole(c.text, c.stop_reason)
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
            r, text, deltas = reader.delta(c.new_text, final, c.stop_reason)
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
