"""The Responses API request (`POST /v1/responses`) and its translation into a chat completion request.

The Responses route reuses the chat pipeline: its input items become chat messages (an assistant turn gathers
the reasoning, message and function_call items that follow one another), its flat function tools become chat
tools, `text.format` becomes `response_format`. Errors name the Responses fields, not the chat ones.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from .errors import APIError
from .protocol import ChatCompletionRequest, Temperature, _Body


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    # "auto" is accepted as a wish: nothing is dropped, and a conversation over the context is refused either way
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    # vLLM's sampling extras, passed to the chat request as they are
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(2 ** 63), lt=2 ** 63)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    priority: int = 0
    cache_salt: Annotated[str, Field(min_length=1, max_length=1024)] | None = None


_PASSED_THROUGH = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "priority",
                   "cache_salt", "user", "parallel_tool_calls", "tool_choice")


def check_supported(body: ResponsesRequest) -> None:
    """Refuse what this server cannot do rather than silently ignore it."""
    if body.background:
        raise APIError(400, "background responses are not supported by this server", param="background")
    if body.conversation is not None:
        raise APIError(400, "conversations are not supported by this server; use previous_response_id",
                       param="conversation")
    if body.input is None and body.previous_response_id is None:
        raise APIError(400, "input is required", param="input")


def input_items(body: ResponsesRequest) -> list[dict]:
    """The request's input as a list of items (a string is one user message)."""
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{i}] must be an object", param=f"input[{i}]")
    return list(body.input)


def chat_request(body: ResponsesRequest, items: list[dict]) -> ChatCompletionRequest:
    """`items`: the whole conversation (a previous response's input and output first, then this input)."""
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + \
        _Turns().messages(items)
    if not messages:
        raise APIError(400, "input has no items", param="input")
    fields = {name: getattr(body, name) for name in _PASSED_THROUGH}
    try:
        return ChatCompletionRequest(messages=messages, tools=_tools(body.tools), max_completion_tokens=
                                     body.max_output_tokens, response_format=_response_format(body.text), **fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise APIError(400, f"input: {first.get('msg', 'invalid item')}", param="input") from None


def text_config(text: dict | None) -> dict:
    """`text` as a response echoes it."""
    return {"format": {"type": "text"}, **(text or {})}


# ---------------------------------------------------------------------- tools and formats
def _tools(tools: list | None) -> list[dict] | None:
    """Responses' flat function tools -> chat tools; other tool kinds (hosted search, ...) are refused."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise APIError(400, f"tools[{i}] must be an object", param=f"tools[{i}]")
        if tool.get("type") != "function":
            raise APIError(400, f"tools[{i}].type {tool.get('type')!r} is not supported: this server runs only "
                                "'function' tools", param=f"tools[{i}].type")
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return out


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise APIError(400, "text.format must be an object with a 'type'", param="text.format")
    if fmt.get("type") != "json_schema":
        return fmt  # text and json_object are spelled as in chat; anything else is refused there
    spec = {k: v for k, v in fmt.items() if k != "type"}
    return {"type": "json_schema", "json_schema": spec}


# ---------------------------------------------------------------------- input items -> messages
class _Turns:
    """Folds input items into chat messages. Reasoning, assistant text and function calls that follow one another
    are one assistant turn (the model wrote them together); function call outputs become tool messages."""

    def __init__(self):
        self.out: list[dict] = []
        self.turn: dict | None = None  # the assistant turn being gathered

    def messages(self, items: list[dict]) -> list[dict]:
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            handler = {"message": self._message, "function_call": self._call, "reasoning": self._reasoning,
                       "function_call_output": self._call_output}.get(kind if isinstance(kind, str) else None)
            if handler is None:
                raise APIError(400, f"input[{i}].type {kind!r} is not supported; allowed: message, function_call, "
                                    "function_call_output, reasoning", param=f"input[{i}].type")
            handler(item, f"input[{i}]")
        self._flush()
        return self.out

    def _flush(self) -> None:
        if self.turn is not None:
            self.out.append(self.turn)
            self.turn = None

    def _assistant(self, accepts: str) -> dict:
        """The open assistant turn if it can still take `accepts` (the order is reasoning, text, calls)."""
        turn = self.turn
        taken = {"reasoning": ("reasoning_content", "content", "tool_calls"), "content": ("content", "tool_calls"),
                 "tool_calls": ()}[accepts]
        if turn is None or any(turn.get(k) for k in taken):
            self._flush()
            self.turn = turn = {"role": "assistant", "content": None}
        return turn

    def _message(self, item: dict, where: str) -> None:
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise APIError(400, f"{where}.role must be one of user, system, developer, assistant; got {role!r}",
                           param=f"{where}.role")
        content = _content(item.get("content"), f"{where}.content")
        if role == "assistant":
            self._assistant("content")["content"] = content
            return
        self._flush()
        self.out.append({"role": role, "content": content})

    def _reasoning(self, item: dict, where: str) -> None:
        parts = item.get("content") or item.get("summary") or []
        if not isinstance(parts, list):
            raise APIError(400, f"{where}.content must be a list of reasoning_text parts", param=f"{where}.content")
        text = "\n".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
        if text.strip():  # reasoning with only encrypted content carries nothing this model can read
            self._assistant("reasoning")["reasoning_content"] = text

    def _call(self, item: dict, where: str) -> None:
        name, arguments = item.get("name"), item.get("arguments", "{}")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise APIError(400, f"{where} needs a string name and string arguments", param=where)
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise APIError(400, f"{where}.call_id must be a string", param=f"{where}.call_id")
        try:
            json.loads(arguments or "{}")  # checked here, where the item's index is known
        except ValueError:
            raise APIError(400, f"{where}.arguments is not valid JSON", param=f"{where}.arguments") from None
        turn = self._assistant("tool_calls")
        turn.setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})

    def _call_output(self, item: dict, where: str) -> None:
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise APIError(400, f"{where}.call_id must be a string", param=f"{where}.call_id")
        output = item.get("output")
        if not isinstance(output, str):
            output = "\n".join(p["text"] for p in _content(output, f"{where}.output"))
        self._flush()
        self.out.append({"role": "tool", "tool_call_id": call_id, "content": output})


def _content(content: Any, where: str) -> str | list[dict]:
    """A message's content: a string, or its text parts (input_text, output_text; a refusal's text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("refusal" if kind == "refusal" else "text") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text", "refusal") or not isinstance(text, str):
            raise APIError(400, f"{where}[{j}]: only text parts (input_text, output_text) are supported, got "
                                f"{kind!r}", param=f"{where}[{j}]")
        parts.append({"type": "text", "text": text})
    return parts
