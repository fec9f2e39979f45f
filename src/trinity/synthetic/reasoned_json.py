"""JSON answers for `response_format: json_schema`, reasoning first: the model thinks in `<think>`, writing each
value it found on its own line, then answers with the JSON object alone.

The server decodes the answer under the schema only after `</think>` (chat_constraints.py), so the reasoning
is where the model finds the values; the prompt names the keys (a client asking for JSON says what it wants),
and the task carries the `response_format` the evaluator sends. Schemas are generated from the training
actions' parameters (tool_domains.py): strings, integers, numbers, booleans, enums, arrays and nested objects.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .arithmetic import draw_problem, question, solve
from .example import Checkpoint, Example, assistant, maybe_system, system, user
from .generated_tools import draw_call, make_tool
from .json_replies import describe, object_schema
from .tool_domains import Action

INSTRUCTIONS = ("Extract the details of this request as JSON with the keys {keys}.",
                "Fill in a JSON object with {keys} from this request.",
                "Reply with JSON ({keys}) for this request.")


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "request_details", "schema": schema, "strict": True}}


def make_reasoned_json(rng: random.Random, actions: tuple[Action, ...], family: str) -> Example:
    tool = make_tool(rng, rng.choice(actions))
    call = draw_call(rng, tool, opening=False)
    kinds = {key: param.kind.schema for param, key in tool.keys}
    schema = object_schema({key: dict(kinds[key]) for key in call.arguments})
    keys = describe(schema) if rng.random() < 0.5 else ", ".join(call.arguments)
    instruction = rng.choice(INSTRUCTIONS).format(keys=keys)
    if rng.random() < 0.4:
        messages = [system(instruction), user(call.text)]
    else:
        messages = [user(f"{instruction}\n{call.text}")]
    reasoning = "\n".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in call.arguments.items())
    messages.append(assistant(reasoning, json.dumps(call.arguments)))
    return Example(family, messages, None,
                   [Checkpoint(len(messages) - 1, "json", {"schema": schema, "value": call.arguments})],
                   {"response_format": response_format(schema)})


# Keys a client might name for one computed number.
NUMBER_KEYS = ("value", "result", "answer", "total", "sum", "number")
NUMBER_INSTRUCTIONS = ("Answer in JSON with the key {key}.", "Reply with a JSON object with one integer, {key}.",
                       "Give the result as JSON: {key} (integer).")


def _arithmetic_json(rng: random.Random, family: str, asked: bool) -> Example:
    a, op, b = draw_problem(rng, allow_negative=False)
    lines, value = solve(a, op, b)
    key = rng.choice(NUMBER_KEYS)
    schema = object_schema({key: {"type": "integer"}})
    messages = maybe_system(rng)
    text = question(rng, a, op, b)
    if asked:
        instruction = rng.choice(NUMBER_INSTRUCTIONS).format(key=key)
        messages, text = ([system(instruction)], text) if rng.random() < 0.4 else (messages, f"{text} {instruction}")
    messages += [user(text), assistant("\n".join(lines), json.dumps({key: value}))]
    return Example(family, messages, None,
                   [Checkpoint(len(messages) - 1, "json", {"schema": schema, "value": {key: value}})],
                   {"response_format": response_format(schema)})


def make_arithmetic_json(rng: random.Random) -> Example:
    """An arithmetic question under `response_format` {KEY: integer}, the question alone as a client sends it (the
    server does not show the schema to the model): the column work in the reasoning, then the object with the
    number, closed. A model that learnt `"value": N` only as the start of a longer object (convert_units'
    arguments) wants `,` after N, which the schema forbids; the number then runs on in digits until max_tokens
    (what this family measures). For evaluation and RL only: in a supervised corpus the same bare question would
    have two answers, plain and JSON."""
    return _arithmetic_json(rng, "arithmetic_json", asked=False)


def make_arithmetic_json_asked(rng: random.Random) -> Example:
    """The same, with the prompt asking for the JSON object (system message or after the question): a supervised
    family that teaches the single-key object closed after its number."""
    return _arithmetic_json(rng, "arithmetic_json_asked", asked=True)
