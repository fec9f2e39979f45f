"""Deciding whether a model's reply to a held-out task is right (used by benchmarks/tiny_eval.py and tests).

A reply is what an OpenAI-compatible server returned for one task, reduced to a `Reply`. Each task's `check`
(see example.py) picks the rule. Comparisons are lenient only where the meaning cannot change: letter case and
whitespace in strings, "42" for 42, 3.50 for 3.5.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_ANSWER = re.compile(r"The answer is (-?\d+(?:\.\d+)?)\.?")


@dataclass(slots=True)
class Reply:
    content: str | None
    reasoning: str | None = None
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments JSON)
    think_closed: bool = True
    error: str | None = None


@dataclass(slots=True)
class Score:
    passed: bool
    think_closed: bool
    detail: str = ""
    exact: bool | None = None  # json: the object also equals the expected value
    # tool_call: the one call names the expected tool, whatever its arguments (tells a wrong choice of tool from
    # wrong values when a model fails on tools it has never seen)
    right_tool: bool | None = None
    # a tool-listing reply (expected "names"): how many offered names it lists at their place in the list
    listed: int | None = None


def parse_answer(content: str | None) -> float | None:
    """The number in the last 'The answer is N.' of the content."""
    found = _ANSWER.findall(content or "")
    return float(found[-1]) if found else None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def same_value(expected: Any, got: Any) -> bool:
    """Equal after normalisation: numbers by value, strings by case-folded text without whitespace."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected is got
    if isinstance(expected, (int, float)):
        number = _as_number(got)
        return number is not None and abs(number - expected) <= 1e-6 * max(1.0, abs(expected))
    if isinstance(expected, str):
        return isinstance(got, str) and "".join(expected.split()).casefold() == "".join(got.split()).casefold()
    if isinstance(expected, dict):
        return isinstance(got, dict) and expected.keys() == got.keys() and all(
            same_value(v, got[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(expected) == len(got) and all(map(same_value, expected, got))
    return expected == got


def _contains_all(content: str | None, needles: list[str]) -> bool:
    text = (content or "").casefold()
    return all(n.casefold() in text for n in needles)


def validate_json(content: str | None, schema: dict[str, Any]) -> tuple[Any, str]:
    """(the parsed object or None, '' or why it failed)."""
    try:
        import jsonschema  # evaluation only (dev extra): the runtime package does not need it
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise RuntimeError("JSON checks need jsonschema: pip install 'trinity-engine[dev]'") from e
    try:
        value = json.loads((content or "").strip())
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg})"
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda err: list(err.path))
    if errors:
        return value, f"schema: {errors[0].message}"
    return value, ""


def _parsed_calls(calls: list[tuple[str, str]]) -> list[tuple[str, Any]] | None:
    try:
        return [(name, json.loads(arguments)) for name, arguments in calls]
    except json.JSONDecodeError:
        return None


def _score_parallel(expected: list[dict[str, Any]], calls: list[tuple[str, str]], closed: bool) -> Score:
    """Parallel calls: exactly the expected calls, each matched once, in any order (a client runs them all)."""
    if len(calls) != len(expected):
        return Score(False, closed, f"{len(calls)} tool calls, expected {len(expected)}")
    parsed = _parsed_calls(calls)
    if parsed is None:
        return Score(False, closed, "arguments are not JSON")
    left = list(parsed)
    for want in expected:
        match = next((c for c in left if c[0] == want["name"] and same_value(want["arguments"], c[1])), None)
        if match is None:
            return Score(False, closed, f"no call matches {want['name']} {json.dumps(want['arguments'])}")
        left.remove(match)
    return Score(True, closed)


_LISTED_NAME = re.compile(r"^- ([^:\n]+):", re.M)


def listed_in_place(names: list[str], content: str | None) -> int:
    """How many of `names` a reply's "- name: description" lines give at their own place (the first line names
    the first tool, ...): a name from elsewhere, or a right name out of place, does not count."""
    listed = _LISTED_NAME.findall(content or "")
    return sum(1 for want, got in zip(names, listed) if got.strip() == want)


def score(task: dict[str, Any], reply: Reply) -> Score:
    check, expected = task["check"], task["expected"]
    if reply.error is not None:
        return Score(False, False, f"request failed: {reply.error}")
    closed = reply.think_closed
    if check == "tool_call":
        if len(reply.tool_calls) != 1:
            return Score(False, closed, f"{len(reply.tool_calls)} tool calls", right_tool=False)
        name, arguments = reply.tool_calls[0]
        right_tool = name == expected["name"]
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return Score(False, closed, "arguments are not JSON", right_tool=right_tool)
        if not right_tool:
            return Score(False, closed, f"called {name}, expected {expected['name']}", right_tool=False)
        ok = same_value(expected["arguments"], parsed)
        return Score(ok, closed, "" if ok else f"arguments {arguments}", right_tool=True)
    if check == "tool_calls":
        return _score_parallel(expected["calls"], reply.tool_calls, closed)
    if reply.tool_calls:
        return Score(False, closed, f"unexpected tool call {reply.tool_calls[0][0]}")
    if check == "arithmetic":
        got = parse_answer(reply.content)
        ok = got is not None and got == expected["answer"]
        return Score(ok, closed, "" if ok else f"answer {got}")
    if check in ("contains", "no_tool"):
        ok = _contains_all(reply.content, expected["contains"])
        listed = listed_in_place(expected["names"], reply.content) if "names" in expected else None
        return Score(ok, closed, "" if ok else "missing expected text", listed=listed)
    if check == "json":
        value, why = validate_json(reply.content, expected["schema"])
        return Score(not why, closed, why, exact=not why and same_value(expected["value"], value))
    raise ValueError(f"unknown check {check!r}")


def reference_reply(task: dict[str, Any]) -> Reply:
    """The held-out task's own gold assistant turn as a Reply (what a perfect model would return)."""
    ref = task["reference"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in ref.get("tool_calls") or []]
    return Reply(ref.get("content"), ref.get("reasoning_content"), calls, True)
