"""Request body of Anthropic's Messages API (`POST /v1/messages`), as pydantic models.

Only the block types a text model can honour are accepted (text, tool_use, tool_result, thinking); an image or a
server tool fails validation with a 400 that names the field, rather than being dropped without a word.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from .protocol import _Body


def _known_types(blocks, allowed: tuple[str, ...]):
    """A block list's types checked before pydantic's union does: its own message for an image would be about
    the string branch ("Input should be a valid string"), not the block that is wrong."""
    if isinstance(blocks, list):
        for i, block in enumerate(blocks):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in allowed:
                raise ValueError(f"block {i} has type {kind!r}; this server takes {', '.join(allowed)} blocks "
                                 "(no images, documents or server tools: the model reads text only)")
    return blocks


def _message_blocks(blocks):
    _known_types(blocks, ("text", "tool_use", "tool_result", "thinking", "redacted_thinking"))
    for block in blocks if isinstance(blocks, list) else []:
        if block.get("type") == "tool_result":  # checked here too, or pydantic's first error is the outer union's
            _known_types(block.get("content"), ("text",))
    return blocks


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content):
        return _known_types(content, ("text",))


class ThinkingBlock(_Body):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Body):
    # we never send one, but a client replaying a Claude conversation may: it carries nothing we can read
    type: Literal["redacted_thinking"]
    data: str = ""


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class Message(_Body):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, content):
        return _message_blocks(content)


class Tool(_Body):
    # "custom" is the only client-run tool type; Anthropic's server tools (web search, ...) have other types
    type: Literal["custom"] | None = None
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Body):
    # "adaptive" (the model decides how much to think) is read as enabled: Trinity always may think
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None


class MessagesRequest(_Body):
    model: str
    max_tokens: Annotated[int, Field(ge=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    metadata: dict[str, Any] | None = None  # accepted and ignored (Anthropic's user_id for abuse tracking)



class MessagesCountTokensRequest(_Body):
    """`POST /v1/messages/count_tokens`: what the model would read for a Messages request (no sampling fields)."""

    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
