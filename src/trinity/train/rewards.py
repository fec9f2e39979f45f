"""Rewards computed by code from a generated reply and the task's verifier fields.

A task is one line of the synthetic corpus's task format (`python -m trinity.synthetic`, heldout.jsonl):
"check" names the rule and "expected" holds what the rule compares with. The pass/fail decision is the
evaluator's own (`synthetic.scoring.score`), so a reward of 1 means exactly what tiny_eval counts as right:

- arithmetic: the last "The answer is N." equals the expected N;
- tool_call: exactly one Hermes `<tool_call>{json}</tool_call>` of the expected tool with the expected
  arguments, and (checked here too) the arguments validate against that tool's parameter schema;
- json: the content is one JSON value that validates against the task's schema (with `json_exact`, and equals
  the task's expected value: for answers whose value is checkable, such as arithmetic under a schema);
- contains / no_tool: the content holds every expected string (and no_tool: no call).

The reply text is split the way the server splits it: reasoning (`<think>...</think>`) first, then tool calls
out of the content. A reply that fails but is well formed (an answer line, a parsed call, valid JSON) earns
`format_reward` (default 0 in GRPOConfig): a little shaping for a model that has not learned the format yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..serve.reasoning import THINK_CLOSE, ReasoningParser
from ..serve.tools import HermesToolParser
from ..synthetic.scoring import Reply, parse_answer, score, validate_json


@dataclass(slots=True)
class RewardResult:
    reward: float
    passed: bool
    well_formed: bool
    detail: str = ""


def parse_reply(text: str, tools: list[dict] | None = None, starts_in_reasoning: bool = True) -> Reply:
    """Generated text -> the Reply the server would have returned (reasoning, content, Hermes tool calls)."""
    reasoning, content = ReasoningParser.extract(text, starts_in_reasoning)
    content, calls = HermesToolParser(tools).extract(content)
    closed = THINK_CLOSE in text if starts_in_reasoning else (reasoning is None or THINK_CLOSE in text)
    return Reply(content.strip() or None, reasoning, [(c.name, c.arguments) for c in calls], closed)


def _tool_schema(tools: list[dict] | None, name: str) -> dict | None:
    for tool in tools or []:
        fn = tool.get("function", tool)
        if fn.get("name") == name:
            params = fn.get("parameters")
            return params if isinstance(params, dict) else {}
    return None


def _arguments_fit_schema(task: dict[str, Any], reply: Reply) -> str:
    """'' when the single call's arguments validate against its tool's parameter schema, else why not."""
    name, arguments = reply.tool_calls[0]
    schema = _tool_schema(task.get("tools"), name)
    if schema is None:
        return f"no tool {name} offered"
    _, why = validate_json(arguments, schema)
    return why


def _well_formed(task: dict[str, Any], reply: Reply) -> bool:
    check = task["check"]
    if check == "arithmetic":
        return parse_answer(reply.content) is not None
    if check == "tool_call":
        return len(reply.tool_calls) == 1
    if check == "json":
        try:
            json.loads((reply.content or "").strip())
        except json.JSONDecodeError:
            return False
        return True
    return reply.content is not None and not reply.tool_calls


def task_reward(task: dict[str, Any], text: str, format_reward: float = 0.0,
                starts_in_reasoning: bool = True, json_exact: bool = False) -> RewardResult:
    """The reward of one generated reply to `task`: 1 if right, `format_reward` if only well formed, else 0."""
    reply = parse_reply(text, task.get("tools"), starts_in_reasoning)
    result = score(task, reply)
    passed, detail = result.passed, result.detail
    if passed and json_exact and task["check"] == "json" and not result.exact:
        # valid but another value: under a schema that forbids what the model wanted next, validity alone rewards
        # closing the object early (a number cut short) as much as closing it at the right place
        passed, detail = False, "valid JSON, not the expected value"
    if passed and task["check"] == "tool_call":
        why = _arguments_fit_schema(task, reply)
        passed, detail = not why, why
    well_formed = passed or _well_formed(task, reply)
    reward = 1.0 if passed else (format_reward if well_formed else 0.0)
    return RewardResult(reward, passed, well_formed, detail)
