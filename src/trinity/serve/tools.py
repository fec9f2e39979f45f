"""Tool-call parsers, tool validation and the JSON schema for forced tool calls.

Parsers (one instance per generated sequence and per stream, see "Sharing indices" below):

* ``hermes`` (Trinity Nano / Mini): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
  ``"parameters"`` is accepted for ``"arguments"``, and arguments given as a JSON string are decoded.
* ``qwen3_coder`` (Trinity Large-Thinking):
  ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``.
  Parameter values are text, coerced with the tool's JSON schema (see ``coerce_value``). A block written
  in the Hermes JSON form is understood too.

Common rules:

* A block runs from ``<tool_call>`` to the first ``</tool_call>`` (or to the end of the text if it never
  closes). A block that is not a valid call (bad JSON, no name, a name that is not among ``tools`` when
  tools are given) is not a call: its raw text, tags included, stays in the content. No text is lost
  except the markup of valid calls (and, for qwen3_coder, stray text inside a valid call's block).
* Content outside calls is returned verbatim (not stripped): the server decides what to do with
  whitespace-only content.
* ``ToolCall.arguments`` is a JSON object as a compact string
  (``json.dumps(args, separators=(",", ":"), ensure_ascii=False)``).

Streaming (``feed``/``flush``) follows OpenAI's delta shape: a call's first delta carries ``index``,
``id`` and ``name`` with ``arguments=""``; later deltas carry only ``index`` and an ``arguments`` chunk.
The concatenated chunks of a call equal ``extract``'s ``ToolCall.arguments`` for the same text, and the
content deltas concatenate to ``extract``'s content. Content is emitted as soon as it cannot be the
start of ``<tool_call>``. Hermes calls are emitted when their block closes (name delta, then one
arguments delta); qwen3_coder calls are emitted as soon as ``<function=NAME>`` is complete, then one
arguments chunk per completed parameter and a closing chunk at the end of the block.

Sharing indices: the server runs one parser on the reasoning stream and one on the content stream of
the same choice (calls may be written inside ``<think>``). Give both the same counter so that call
indices run 0, 1, 2, ... across the two::

    counter = itertools.count()
    in_reasoning = parser_cls(tools, counter=counter)
    in_content = parser_cls(tools, counter=counter)

Any object that ``next()`` accepts works as a counter; an index is drawn when a call's first delta is
emitted. ``extract`` neither uses nor advances the counter.
"""

from __future__ import annotations

import abc

import itertools
import json
import math
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Iterator

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ALNUM = string.ascii_letters + string.digits


# ---------------------------------------------------------------------------------------------------
# data


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, compact, ensure_ascii=False


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


class ToolSchemaError(ValueError):
    """A bad ``tools`` / ``tool_choice`` value; ``param`` names the offending field (OpenAI style)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message = message
        self.param = param


def new_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


# ---------------------------------------------------------------------------------------------------
# JSON helpers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"{text} is out of range")
    return value


def _loads(text: str) -> Any:
    """Strict ``json.loads``: NaN / Infinity (also by overflow) are rejected: they cannot be written back
    as JSON."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _args_json(pairs: list[tuple[str, Any]]) -> str:
    """The compact JSON object for ordered ``(key, value)`` pairs; identical to ``_dumps(dict(pairs))``
    when keys are unique, and built the same way as the streamed chunks."""
    return "".join(_arg_chunks(pairs, 0, True))


def _arg_chunks(pairs: list[tuple[str, Any]], start: int, close: bool) -> Iterator[str]:
    for i in range(start, len(pairs)):
        key, value = pairs[i]
        yield ("{" if i == 0 else ",") + _dumps(key) + ":" + _dumps(value)
    if close:
        yield "}" if pairs else "{}"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------------------------------
# schema-driven coercion


def _schema_types(schema: Any) -> list[str] | None:
    """The JSON types a (sub)schema allows, or None when it does not say (no usable "type")."""
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list) and all(isinstance(x, str) for x in t) and t:
        return list(t)
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            types: list[str] = []
            for b in branches:
                bt = _schema_types(b)
                if bt is None:
                    return None
                types += [x for x in bt if x not in types]
            return types or None
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return sorted({_json_type(v) for v in schema["enum"]})
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_ok(value: Any, types: list[str]) -> bool:
    t = _json_type(value)
    if t in types:
        return True
    if t == "integer" and "number" in types:
        return True
    if t == "number" and "integer" in types and float(value).is_integer():
        return True
    return False


_LITERAL_RE = re.compile(r"^(?:-?\d|true$|false$|null$|[\[{])")


def coerce_value(raw: str, schema: Any = None) -> Any:
    """A qwen3_coder parameter value (text) as a JSON value.

    With a schema type: "string" keeps the text verbatim except exactly one leading and one trailing
    newline; integer/number/boolean/null/object/array are parsed as JSON from the stripped text (booleans
    case-insensitively, "None" for null), falling back to the string when that fails or gives another
    type. Without a usable schema, text that looks like a JSON number, literal, object or array is
    parsed, everything else is a string.
    """
    text = raw.removeprefix("\n").removesuffix("\n")
    types = _schema_types(schema)
    s = text.strip()
    if types is None:
        if _LITERAL_RE.match(s):
            try:
                return _loads(s)
            except ValueError:
                pass
        return text
    if "string" in types:
        if "null" in types and s == "null":
            return None
        return text
    low = s.lower()
    if "boolean" in types and low in ("true", "false"):
        return low == "true"
    if "null" in types and low in ("null", "none"):
        return None
    try:
        value = _loads(s)
    except ValueError:
        return text
    if _type_ok(value, types):
        if "integer" in types and isinstance(value, float) and value.is_integer() and "number" not in types:
            return int(value)
        return value
    return text


def _coerce_json_args(args: dict, properties: dict) -> dict:
    """Hermes arguments: string values whose schema does not allow a string are parsed as JSON."""
    out = {}
    for key, value in args.items():
        schema = properties.get(key)
        types = _schema_types(schema)
        if isinstance(value, str) and types is not None and "string" not in types:
            value = coerce_value(value, schema)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# parsers


class ToolParser(abc.ABC):
    """Base class: splits text into content and ``<tool_call>`` blocks; subclasses parse the blocks.

    ``tools``: OpenAI-style tool definitions (``{"type": "function", "function": {...}}``; bare function
    objects are accepted too). When given, a call to an unknown name is not a call, and argument values
    are coerced with the tool's parameter schemas. ``counter``: shared index source (see module doc).
    """

    name = "base"

    def __init__(self, tools: list[dict] | None = None, counter: Iterator[int] | None = None):
        self.tools = tools
        self._schemas: dict[str, dict] | None = None
        if tools:
            self._schemas = {}
            for tool in tools:
                fn = tool.get("function", tool) if isinstance(tool, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    params = fn.get("parameters")
                    self._schemas[fn["name"]] = params if isinstance(params, dict) else {}
        self.counter = counter if counter is not None else itertools.count()
        self._in_block = False
        self._buf = ""           # outside a block: held partial tag; inside: the block text so far
        self._scanned = 0        # inside a block: where to resume looking for the closing tag

    # -- helpers for subclasses -----------------------------------------------------------------------

    def _name_ok(self, name: Any) -> bool:
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            return False
        return self._schemas is None or name in self._schemas

    def _properties(self, name: str) -> dict:
        if self._schemas is None:
            return {}
        props = self._schemas.get(name, {}).get("properties")
        return props if isinstance(props, dict) else {}

    # -- block hooks (override) -----------------------------------------------------------------------

    @abc.abstractmethod
    def _parse_block(self, inner: str) -> tuple[str, str] | None:
        """A finished block's text (between the tags) -> (name, arguments JSON), or None if not a call."""

    def _block_start(self) -> None:
        """Streaming: a block has just opened."""

    def _block_progress(self, blk: str) -> list[ToolCallDelta]:
        """Streaming: the (still open) block's text so far; may commit and emit deltas early."""
        return []

    def _block_end(self, inner: str) -> list[ToolCallDelta] | None:
        """Streaming: the block is finished; its deltas, or None when it is not a call."""
        parsed = self._parse_block(inner)
        if parsed is None:
            return None
        name, arguments = parsed
        index = next(self.counter)
        return [ToolCallDelta(index, id=new_tool_call_id(), name=name, arguments=""),
                ToolCallDelta(index, arguments=arguments)]

    # -- streaming ------------------------------------------------------------------------------------

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        self._buf += delta
        while True:
            if not self._in_block:
                buf = self._buf
                i = buf.find(TOOL_CALL_OPEN)
                if i >= 0:
                    content.append(buf[:i])
                    self._buf = buf[i + len(TOOL_CALL_OPEN):]
                    self._in_block, self._scanned = True, 0
                    self._block_start()
                    continue
                keep = _partial_suffix(buf, TOOL_CALL_OPEN)
                content.append(buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                break
            blk = self._buf
            j = blk.find(TOOL_CALL_CLOSE, self._scanned)
            if j >= 0:
                inner = blk[:j]
                self._buf = blk[j + len(TOOL_CALL_CLOSE):]
                self._in_block = False
                out = self._block_end(inner)
                if out is None:
                    content.append(TOOL_CALL_OPEN + inner + TOOL_CALL_CLOSE)
                else:
                    calls += out
                continue
            self._scanned = max(0, len(blk) - len(TOOL_CALL_CLOSE) + 1)
            calls += self._block_progress(blk)
            break
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        buf, self._buf = self._buf, ""
        if not self._in_block:
            return buf, []
        self._in_block = False
        out = self._block_end(buf)
        if out is None:
            return TOOL_CALL_OPEN + buf, []
        return "", out

    # -- whole text -----------------------------------------------------------------------------------

    def extract(self, text: str) -> tuple[str, list[ToolCall]]:
        content: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while True:
            i = text.find(TOOL_CALL_OPEN, pos)
            if i < 0:
                content.append(text[pos:])
                break
            content.append(text[pos:i])
            start = i + len(TOOL_CALL_OPEN)
            j = text.find(TOOL_CALL_CLOSE, start)
            end = len(text) if j < 0 else j
            parsed = self._parse_block(text[start:end])
            if parsed is None:
                content.append(text[i:end] + (TOOL_CALL_CLOSE if j >= 0 else ""))
            else:
                calls.append(ToolCall(new_tool_call_id(), *parsed))
            if j < 0:
                break
            pos = j + len(TOOL_CALL_CLOSE)
        return "".join(content), calls


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; each call is emitted when its block
    closes (or at the end of the text, when a final unclosed block holds a valid call)."""

    name = "hermes"

    def _parse_block(self, inner: str) -> tuple[str, str] | None:
        return _parse_json_call(self, inner)


def _parse_json_call(parser: ToolParser, inner: str) -> tuple[str, str] | None:
    try:
        obj = _loads(inner.strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not parser._name_ok(obj.get("name")):
        return None
    if "arguments" in obj:
        args = obj["arguments"]
    else:
        args = obj.get("parameters")
    if args is None:
        args = {}
    if isinstance(args, str):
        if not args.strip():
            args = {}
        else:
            try:
                args = _loads(args)
            except ValueError:
                return None
    if not isinstance(args, dict):
        return None
    name = obj["name"]
    args = _coerce_json_args(args, parser._properties(name))
    return name, _dumps(args)


class _XmlParams:
    """Incremental scanner for the ``<parameter=KEY>VALUE</parameter>`` list of a qwen3_coder call.

    ``scan(blk, final)`` may be called repeatedly with a growing block text; it only completes a
    parameter once its end is certain (``final``: the text is complete). Work is linear in the text."""

    def __init__(self, pos: int, props: dict):
        self.pos = pos            # where the next parameter (or </function>) is looked for
        self.props = props
        self.pairs: list[tuple[str, Any]] = []
        self.keys: set[str] = set()
        self.done = False         # </function> seen, or nothing more can follow
        self._key_at = -1         # start of the current <parameter= tag, or -1 between parameters
        self._key = ""
        self._vstart = -1         # start of the current value, or -1 while the key is read
        self._search = pos        # resume point of the pending search

    def scan(self, blk: str, final: bool) -> None:
        while not self.done:
            if self._key_at < 0:
                p = blk.find(PARAMETER_OPEN, self._search)
                f = blk.find(FUNCTION_CLOSE, self._search)
                if f >= 0 and (p < 0 or f < p):
                    self.done = True
                    return
                if p < 0:
                    if final:
                        self.done = True
                    else:  # a partial tag can only start in the last len(tag) - 1 characters
                        self._search = max(self._search, len(blk) - len(PARAMETER_OPEN) + 1)
                    return
                self._key_at = p
                self._search = p + len(PARAMETER_OPEN)
            if self._vstart < 0:
                k = blk.find(">", self._search)
                if k < 0:
                    if final:
                        self.done = True
                    else:
                        self._search = len(blk)
                    return
                self._key = blk[self._key_at + len(PARAMETER_OPEN):k].strip()
                self._vstart = self._search = k + 1
            ends = [(e, tag) for tag in (PARAMETER_CLOSE, PARAMETER_OPEN, FUNCTION_CLOSE)
                    if (e := blk.find(tag, self._search)) >= 0]
            if ends:
                e, tag = min(ends)
                nxt = e + len(PARAMETER_CLOSE) if tag == PARAMETER_CLOSE else e
            elif final:
                e = nxt = len(blk)
            else:
                self._search = max(self._search, len(blk) - len(PARAMETER_CLOSE) + 1)
                return
            if self._key and self._key not in self.keys:
                self.keys.add(self._key)
                self.pairs.append((self._key, coerce_value(blk[self._vstart:e], self.props.get(self._key))))
            self.pos = self._search = nxt
            self._key_at = self._vstart = -1


class Qwen3CoderToolParser(ToolParser):
    """Qwen3-Coder XML calls. A block is a call when, after optional blank text, it starts with
    ``<function=NAME>`` and NAME is valid; it is then streamed: first delta at ``<function=NAME>``, one
    arguments chunk per completed parameter, the closing ``}`` when the block ends.

    A parameter's value ends at the first ``</parameter>``, ``<parameter=`` or ``</function>`` (the
    latter two tolerate a missing ``</parameter>``); in a block cut off by the end of the text the last
    value runs to the end. Parameters stop at ``</function>``; other text inside the block is ignored.
    A repeated key keeps its first value. A block whose text starts with ``{`` is parsed as a Hermes
    JSON call instead (emitted when the block ends).
    """

    name = "qwen3_coder"

    def _header(self, blk: str, final: bool) -> tuple[str, str, int] | None:
        """Classify a block by its start: (kind, name, end of the function tag) with kind "call", "json"
        or "invalid"; None while undecided (never when final)."""
        stripped = blk.lstrip()
        if stripped.startswith("{"):
            return "json", "", 0
        if not stripped.startswith(FUNCTION_OPEN):
            if not final and FUNCTION_OPEN.startswith(stripped):
                return None
            return "invalid", "", 0
        k = stripped.find(">", len(FUNCTION_OPEN))
        if k < 0:
            return None if not final else ("invalid", "", 0)
        name = stripped[len(FUNCTION_OPEN):k]
        if not self._name_ok(name):
            return "invalid", "", 0
        return "call", name, len(blk) - len(stripped) + k + 1

    def _parse_block(self, inner: str) -> tuple[str, str] | None:
        kind, name, end = self._header(inner, True)
        if kind == "json":
            return _parse_json_call(self, inner)
        if kind != "call":
            return None
        params = _XmlParams(end, self._properties(name))
        params.scan(inner, True)
        return name, _args_json(params.pairs)

    # -- streaming --------------------------------------------------------------------------------------

    def _block_start(self) -> None:
        self._kind: str | None = None      # None while undecided, then call | json | invalid
        self._index = -1
        self._params: _XmlParams | None = None
        self._emitted = 0                  # parameters already streamed

    def _advance(self, blk: str, final: bool) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if self._kind is None:
            head = self._header(blk, final)
            if head is None:
                return out
            self._kind, name, end = head
            if self._kind == "call":
                self._index = next(self.counter)
                self._params = _XmlParams(end, self._properties(name))
                out.append(ToolCallDelta(self._index, id=new_tool_call_id(), name=name, arguments=""))
        if self._kind == "call":
            self._params.scan(blk, final)
            chunk = "".join(_arg_chunks(self._params.pairs, self._emitted, final))
            self._emitted = len(self._params.pairs)
            if chunk:
                out.append(ToolCallDelta(self._index, arguments=chunk))
        return out

    def _block_progress(self, blk: str) -> list[ToolCallDelta]:
        return self._advance(blk, False)

    def _block_end(self, inner: str) -> list[ToolCallDelta] | None:
        out = self._advance(inner, True)
        if self._kind == "call":
            return out
        if self._kind == "json":
            return super()._block_end(inner)
        return None


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tool parser {name!r}; choose one of: " + ", ".join(sorted(TOOL_PARSERS))) \
            from None


# ---------------------------------------------------------------------------------------------------
# request validation


def validate_tools(tools: Any) -> None:
    """Check OpenAI-style tool definitions; raise ToolSchemaError(param=...) on the first problem.

    An empty list is allowed (it means no tools)."""
    if not isinstance(tools, list):
        raise ToolSchemaError("tools must be a list of tool objects", "tools")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ToolSchemaError(f"{where} must be an object", where)
        if tool.get("type") != "function":
            raise ToolSchemaError(f"{where}.type must be 'function'", f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolSchemaError(f"{where}.function must be an object", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ToolSchemaError(f"{where}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                                  f"{where}.function.name")
        if name in seen:
            raise ToolSchemaError(f"{where}.function.name {name!r} duplicates tools[{seen[name]}]",
                                  f"{where}.function.name")
        seen[name] = i
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolSchemaError(f"{where}.function.description must be a string", f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ToolSchemaError(f"{where}.function.parameters must be a JSON schema object",
                                      f"{where}.function.parameters")
            if "type" in params and params["type"] != "object":
                raise ToolSchemaError(f"{where}.function.parameters must describe an object (type 'object')",
                                      f"{where}.function.parameters")
            props = params.get("properties")
            if props is not None and not isinstance(props, dict):
                raise ToolSchemaError(f"{where}.function.parameters.properties must be an object",
                                      f"{where}.function.parameters")


def _tool_names(tools: Any) -> list[str]:
    names = []
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names


def parse_tool_choice(tool_choice: Any, tools: list | None) -> str | tuple[str, str]:
    """-> "none" | "auto" | "required" | ("named", name). ``None`` means the default: "auto" when tools
    are given, else "none". An empty tools list counts as no tools."""
    has_tools = bool(tools)
    if tool_choice is None:
        return "auto" if has_tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice == "none":
            return "none"
        if tool_choice not in ("auto", "required"):
            raise ToolSchemaError(f"tool_choice must be 'none', 'auto', 'required' or a function object, "
                                  f"got {tool_choice!r}", "tool_choice")
        if not has_tools:
            raise ToolSchemaError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return tool_choice
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") != "function":
            raise ToolSchemaError("tool_choice.type must be 'function'", "tool_choice")
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
        if not isinstance(name, str) or not name:
            raise ToolSchemaError("tool_choice.function.name must be a non-empty string", "tool_choice")
        if not has_tools:
            raise ToolSchemaError("tool_choice names a function but no tools were given", "tool_choice")
        if name not in _tool_names(tools):
            raise ToolSchemaError(f"tool_choice names function {name!r}, which is not among the tools",
                                  "tool_choice")
        return ("named", name)
    raise ToolSchemaError("tool_choice must be a string or an object", "tool_choice")


# ---------------------------------------------------------------------------------------------------
# constrained decoding


def _parameters_schema(tool: dict) -> dict:
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    schema = dict(params) if isinstance(params, dict) else {}
    schema.setdefault("type", "object")
    if schema["type"] == "object" and "properties" not in schema and "additionalProperties" not in schema:
        schema.setdefault("properties", {})
    return schema


def _call_schema(tool: dict) -> dict:
    name = tool.get("function", tool)["name"]
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "const": name}, "arguments": _parameters_schema(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_object_schema(tools: list, name: str | None = None) -> dict:
    """JSON schema of one call's object, ``{"name": NAME, "arguments": {...}}`` (the JSON inside a Hermes
    ``<tool_call>`` block): the tool called ``name``, or any of ``tools`` (``anyOf`` one branch per tool, so
    each name pairs with its own parameters)."""
    chosen = [t for t in tools if name is None or t.get("function", t).get("name") == name]
    if not chosen:
        raise ValueError(f"no tool named {name!r}" if name is not None else "no tools to call")
    branches = [_call_schema(t) for t in chosen]
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def tool_calls_json_schema(tools: list, mode: str | tuple[str, str]) -> dict:
    """JSON schema for forced tool calls.

    ``"required"``: an array of one or more ``{"name", "arguments"}`` objects, ``anyOf`` one branch per
    tool so each name pairs with its own parameters. ``("named", name)``: a single such object.
    (A tool's parameters schema is embedded as is: ``$ref``s into its own ``$defs`` would not resolve.)
    Use ``tool_calls_from_json`` to turn the generated JSON into ``ToolCall``s.
    """
    if mode == "required":
        branches = [_call_schema(t) for t in tools]
        if not branches:
            raise ValueError("tool_choice 'required' needs at least one tool")
        items = branches[0] if len(branches) == 1 else {"anyOf": branches}
        return {"type": "array", "items": items, "minItems": 1}
    if isinstance(mode, tuple) and len(mode) == 2 and mode[0] == "named":
        for t in tools:
            if t.get("function", t).get("name") == mode[1]:
                return _call_schema(t)
        raise ValueError(f"no tool named {mode[1]!r}")
    raise ValueError(f"no tool-call schema for tool_choice mode {mode!r}")


def tool_calls_from_json(text: str, mode: str | tuple[str, str]) -> list[ToolCall]:
    """Parse constrained output (see ``tool_calls_json_schema``) into ToolCalls (new ids).
    Raises ValueError when the text does not have the expected shape."""
    value = _loads(text)
    items = value if mode == "required" else [value]
    if not isinstance(items, list):
        raise ValueError("expected a JSON array of tool calls")
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("arguments", {}), dict):
            raise ValueError("expected {'name': str, 'arguments': object}")
        calls.append(ToolCall(new_tool_call_id(), item["name"], _dumps(item.get("arguments", {}))))
    return calls
