"""The tools the tiny model learns to call: OpenAI schemas and deterministic fake backends.

A backend's answer depends only on its arguments and a `day` number drawn per conversation (so the same city
has different weather on different days and the model must read the tool's result instead of remembering it).
`run_tool(name, arguments, day)` is what the conversations put in their tool messages, and what the tests
re-run to check that every call and result in the corpus agree.
"""

from __future__ import annotations

import ast
import operator
import zlib
from collections.abc import Callable
from typing import Any

from .generated_backend import is_generated_tool, run_generated_tool
from .tool_domains import MADE_UP_RESULTS
from .words import TIMEZONES, WEATHER_CONDITIONS


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


UNITS: tuple[str, ...] = ("km", "miles", "kg", "pounds", "celsius", "fahrenheit", "meters", "feet", "liters",
                          "gallons")

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "weather": _function("weather", "Current weather in a city.", {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city", "unit"]),
    # the units are listed once in the description rather than as two enums: half the prompt tokens
    "convert_units": _function("convert_units", f"Convert a value between units ({', '.join(UNITS)}).", {
        "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
        ["value", "from_unit", "to_unit"]),
    "calculator": _function("calculator", "Evaluate an arithmetic expression.", {
        "expression": {"type": "string"}}, ["expression"]),
    "search": _function("search", "Search the web and return short snippets.", {
        "query": {"type": "string"}}, ["query"]),
    "get_time": _function("get_time", "Current local time in a time zone.", {
        "timezone": {"type": "string"}}, ["timezone"]),
}
TOOL_NAMES: tuple[str, ...] = tuple(TOOL_SCHEMAS)


def _stable(*parts: Any) -> int:
    """A hash that is the same in every process (Python's hash() of str is salted per run)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


# ------------------------------------------------------------------------------------ backends
def weather(city: str, unit: str, day: int) -> dict[str, Any]:
    h = _stable("weather", city.lower(), day)
    celsius = h % 36 - 5
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "temperature": temperature, "unit": unit,
            "condition": WEATHER_CONDITIONS[(h >> 8) % len(WEATHER_CONDITIONS)]}


# factor and offset to a base unit per dimension: value_in_base = value * factor + offset
_UNIT_BASE: dict[str, tuple[str, float, float]] = {
    "km": ("length", 1000.0, 0.0), "miles": ("length", 1609.344, 0.0), "meters": ("length", 1.0, 0.0),
    "feet": ("length", 0.3048, 0.0), "kg": ("mass", 1.0, 0.0), "pounds": ("mass", 0.45359237, 0.0),
    "liters": ("volume", 1.0, 0.0), "gallons": ("volume", 3.785411784, 0.0),
    "celsius": ("temperature", 1.0, 0.0), "fahrenheit": ("temperature", 5 / 9, -32 * 5 / 9),
}


def convert(value: float, from_unit: str, to_unit: str) -> float:
    (dim_a, fa, oa), (dim_b, fb, ob) = _UNIT_BASE[from_unit], _UNIT_BASE[to_unit]
    if dim_a != dim_b:
        raise ValueError(f"cannot convert {from_unit} ({dim_a}) to {to_unit} ({dim_b})")
    return round((value * fa + oa - ob) / fb, 2)


def convert_units(value: float, from_unit: str, to_unit: str, day: int) -> dict[str, Any]:
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": convert(value, from_unit, to_unit)}


_BINARY: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                   ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> int | float:
    """+ - * / and parentheses over numbers; anything else is refused (never Python's eval)."""
    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression: {expression!r}")
    value = walk(ast.parse(expression, mode="eval"))
    if isinstance(value, float):
        value = round(value, 4)
        if value.is_integer():
            value = int(value)
    return value


def calculator(expression: str, day: int) -> dict[str, Any]:
    return {"expression": expression, "result": evaluate(expression)}


_SNIPPET_FACTS: tuple[str, ...] = (
    "open from {h} to {h2} every day", "rated {r} out of 5 by visitors", "about {n} places listed",
    "updated {d} days ago", "prices start at {n} dollars", "{n} results near the centre",
)


def search(query: str, day: int) -> dict[str, Any]:
    h = _stable("search", query.lower(), day)
    fact = _SNIPPET_FACTS[h % len(_SNIPPET_FACTS)].format(h=8 + h % 4, h2=16 + (h >> 4) % 6, r=1 + (h >> 6) % 5,
                                                          n=2 + (h >> 9) % 40, d=1 + (h >> 12) % 9)
    return {"query": query, "results": [f"{query}: {fact}"]}


def get_time(timezone: str, day: int) -> dict[str, Any]:
    h = _stable("time", timezone, day)
    return {"timezone": timezone, "time": f"{h % 24:02d}:{(h >> 5) % 60:02d}"}


BACKENDS: dict[str, Callable[..., dict[str, Any]]] = {
    "weather": weather, "convert_units": convert_units, "calculator": calculator, "search": search,
    "get_time": get_time,
}


def run_tool(name: str, arguments: dict[str, Any], day: int) -> dict[str, Any]:
    if is_generated_tool(name):  # the tools generated_tools.py makes up (tool_domains.py's actions)
        return run_generated_tool(name, arguments, day)
    if name not in BACKENDS:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name](**arguments, day=day)


def run_corpus_tool(name: str, arguments: dict[str, Any], day: int) -> dict[str, Any]:
    """What any call in the corpus got back: `run_tool` for the named tools, and for a name no backend knows, a
    made-up tool's result (made_up_tools.py: those exist only in their conversation, all with the same result
    keys). For checking a corpus; the names a server or an evaluator meets go through `run_tool`."""
    if is_generated_tool(name) or name in BACKENDS:
        return run_tool(name, arguments, day)
    return run_generated_tool(name, arguments, day, MADE_UP_RESULTS)


def timezone_of(city: str) -> str:
    return TIMEZONES[city]
