"""The shape every generator returns: one conversation in OpenAI chat format plus what can be checked in it.

A conversation is what the trainer reads (`{"messages": [...], "tools": [...]}`); a checkpoint marks an
assistant turn whose correctness a program can decide (the evaluator sends the messages before it and checks
the model's reply against `expected`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from .words import SYSTEM_PROMPTS

# What a checkpoint's `expected` holds, per check kind:
#   arithmetic  {"answer": int}                       content states "The answer is N."
#   tool_call   {"name": str, "arguments": dict}      exactly one call with these (normalised) arguments
#   tool_calls  {"calls": [{"name", "arguments"}]}    parallel calls: exactly these, in any order
#   no_tool     {"contains": [str, ...]}              no call; content holds every string (any case); a tool
#                                                     listing also gives "names", the offered names in order
#   json        {"schema": dict, "value": dict}       content is one JSON object valid under schema
#   contains    {"contains": [str, ...]}              content holds every string (any case)
CHECKS = ("arithmetic", "tool_call", "tool_calls", "no_tool", "json", "contains")


@dataclass(slots=True)
class Checkpoint:
    index: int  # messages[index] is the assistant turn under test
    check: str
    expected: dict[str, Any]

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"check {self.check!r}: allowed {', '.join(CHECKS)}")


@dataclass(slots=True)
class Example:
    family: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the fake backends' "day"

    def record(self) -> dict[str, Any]:
        """The training record (one JSONL line)."""
        out: dict[str, Any] = {"family": self.family, "messages": self.messages}
        if self.tools:
            out["tools"] = self.tools
        if self.meta:
            out["meta"] = self.meta
        return out


# ------------------------------------------------------------------------------------ message builders
def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(reasoning: str, content: str | None = None,
              tool_call: tuple[str, str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """An assistant turn. Every turn carries reasoning: the server always prefills `<think>\\n`, so the model
    must always have something to think and a `</think>` to close it with."""
    if not reasoning or reasoning != reasoning.strip():
        raise ValueError("reasoning must be non-empty and carry no outer whitespace (the template trims it)")
    message: dict[str, Any] = {"role": "assistant", "reasoning_content": reasoning, "content": content}
    if tool_call is not None:
        call_id, name, arguments = tool_call
        # OpenAI sends arguments as a JSON string; the key order here is the order the model learns to write
        message["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": json.dumps(arguments)}}]
    return message


def tool_result(call_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps(payload)}


def maybe_system(rng: random.Random, p: float = 0.3) -> list[dict[str, Any]]:
    """A system message some of the time, so the model sees conversations with and without one."""
    return [system(rng.choice(SYSTEM_PROMPTS))] if rng.random() < p else []
