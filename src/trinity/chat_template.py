"""Chat-template rendering for Trinity tokenizers.

Templates are Jinja2 (the format HF tokenizers ship), rendered in an immutable sandbox because a
template comes with a downloaded checkpoint and must not be able to reach Python internals.
Messages are validated and normalised here, before rendering, so every template (the built-in
one or a checkpoint's) sees the same shapes:

- ``content`` is a plain string (text parts are joined with ``"\\n"``), or ``None`` only on an
  assistant message (one that just calls tools);
- assistant reasoning is always under ``reasoning_content`` (``reasoning`` is accepted as input);
- every tool call is ``{"type": "function", "function": {"name": str, "arguments": dict}}``,
  with ``id`` kept when given; ``arguments`` given as a JSON string is parsed so templates can
  ``tojson`` it;
- every tool is ``{"type": "function", "function": {...}}`` (a bare function schema is wrapped).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "BUILTIN_CHAT_TEMPLATE",
    "ChatTemplateError",
    "KNOWN_ROLES",
    "compile_chat_template",
    "normalize_messages",
    "normalize_tools",
    "render_chat_template",
]

KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Part types that carry plain text (Chat Completions uses "text"; the Responses API the other two).
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or the messages given to it are malformed."""


def _load_builtin_template() -> str:
    return (resources.files("trinity") / "templates" / "trinity_chatml.jinja").read_text(encoding="utf-8")


BUILTIN_CHAT_TEMPLATE: str = _load_builtin_template()


# ----------------------------------------------------------------------------------------------
# Jinja environment
# ----------------------------------------------------------------------------------------------


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ', which would corrupt tool schemas and arguments.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template raised: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template once; tokenizers sharing a template string share the compiled form."""
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from exc


def render_chat_template(template: jinja2.Template, variables: Mapping[str, Any]) -> str:
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:  # includes SecurityError from the sandbox
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # Filters and Python-level operations inside the template surface as plain exceptions.
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Message normalisation
# ----------------------------------------------------------------------------------------------


def _content_to_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ChatTemplateError(f"{where}: content part {j} must be an object, got {type(part).__name__}")
        kind = part.get("type", "text")
        if kind not in _TEXT_PART_TYPES:
            raise ChatTemplateError(f"{where}: content part {j} has type {kind!r}; only text parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError(f"{where}: text part {j} has no string 'text'")
        texts.append(text)
    return "\n".join(texts)


def _parse_arguments(arguments: Any, where: str) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}  # a call with no parameters is often sent as ""
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(f"{where}: arguments is not valid JSON ({exc.msg} at char {exc.pos})") from exc
    if not isinstance(arguments, Mapping):
        raise ChatTemplateError(f"{where}: arguments must be a JSON object, got {type(arguments).__name__}")
    return dict(arguments)


def _normalize_tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ChatTemplateError(f"{where}: must be an object, got {type(call).__name__}")
    # Accept both the OpenAI shape {"function": {...}} and a flat {"name", "arguments"}.
    function = call.get("function", call)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ChatTemplateError(f"{where}: needs a function with a string 'name'")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": function["name"], "arguments": _parse_arguments(function.get("arguments"), where)},
    }
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _normalize_message(message: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"{where} must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in KNOWN_ROLES:
        raise ChatTemplateError(f"{where} has unknown role {role!r}; expected one of {sorted(KNOWN_ROLES)}")
    out = dict(message)  # shallow copy: the caller's message is never modified
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise ChatTemplateError(f"{where} ({role}) has no content")
        out["content"] = None
    else:
        out["content"] = _content_to_text(content, where)

    if role == "assistant":
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            reasoning = message.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatTemplateError(f"{where}: reasoning must be a string, got {type(reasoning).__name__}")
        out.pop("reasoning", None)
        out["reasoning_content"] = reasoning
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ChatTemplateError(f"{where}: tool_calls must be a list")
        out["tool_calls"] = [_normalize_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate ``messages`` and return normalised copies (see the module docstring)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatTemplateError(f"messages must be a list, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty; at least one message is required")
    return [_normalize_message(m, i) for i, m in enumerate(messages)]


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Validate tools; wrap bare function schemas in the OpenAI ``{"type": "function"}`` envelope."""
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ChatTemplateError(f"tools must be a list, got {type(tools).__name__}")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        if "function" in tool:
            out.append(dict(tool) if "type" in tool else {"type": "function", **tool})
        elif isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": dict(tool)})
        else:
            raise ChatTemplateError(f"tools[{i}] needs a 'function' object or a string 'name'")
    return out or None  # an empty list means "no tools", not an empty tools section
