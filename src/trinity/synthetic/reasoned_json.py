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

from .example import Checkpoint, Example, assistant, system, user
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
