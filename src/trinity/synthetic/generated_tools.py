"""Tools made up per conversation from tool_domains.py's actions, and requests that need them.

A generated tool is one action with one of its names (in snake_case, camelCase or kebab-case), one of its
descriptions, one spelling of each parameter, its optional parameters sometimes left out of the schema and its
properties sometimes in another order. So the model cannot learn tools by heart: it has to read the schema in
the prompt, pick the tool whose name and description match the request, and copy each value the user gave into
the parameter the schema names. A request says every required value and some of the optional ones; an
optional value the user did not give is left out of the call (never guessed).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from .tool_domains import Action, Param, name_forms
from .tools import TOOL_SCHEMAS

NAME_STYLES = (0.6, 0.25, 0.15)  # snake_case, camelCase, kebab-case
# tools offered at once: mostly few, since every tool costs ~90 tokens of a 512-token training sequence
TOOL_COUNTS = ((2, 0.40), (3, 0.35), (4, 0.15), (5, 0.06), (6, 0.04))
LEGACY_DISTRACTOR = 0.25  # chance that one of the five corpus tools is among the distractors
WEATHER_DOMAINS = frozenset({"weather", "forecast"})
OPENINGS = ("", "", "", "", "Hi! ", "Please help: ", "Quick one. ")


@dataclass(slots=True)
class GeneratedTool:
    action: Action
    name: str
    description: str
    keys: list[tuple[Param, str]]  # the parameters in the schema, in schema order, with their spelling

    def schema(self) -> dict[str, Any]:
        """The OpenAI tool, as a client would send it."""
        properties = {key: dict(param.kind.schema) for param, key in self.keys}
        required = [key for param, key in self.keys if not param.optional]
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": {
            "type": "object", "properties": properties, "required": required}}}


@dataclass(slots=True)
class Call:
    """One request for one tool: the user's words and the call they mean."""

    tool: GeneratedTool
    text: str
    arguments: dict[str, Any]
    left_out: list[str]  # optional parameters of the schema the user did not give

    def argument_words(self) -> str:
        """'city Paris, nights 3' for the reasoning (JSON for lists, objects and booleans)."""
        parts = [f"{k} {v if isinstance(v, str) else json.dumps(v)}" for k, v in self.arguments.items()]
        return ", ".join(parts) if parts else "no arguments"

    def reasoning(self) -> str:
        """Why this tool and these arguments: the request matched against the name and description."""
        tool = self.tool
        text = (f"The user wants to {tool.action.purpose}. The tool {tool.name} does this: {tool.description} "
                f"Arguments from the request: {self.argument_words()}.")
        if self.left_out:
            text += f" Not given, so left out: {', '.join(self.left_out)}."
        return text


def make_tool(rng: random.Random, action: Action) -> GeneratedTool:
    name = rng.choices(name_forms(rng.choice(action.names)), NAME_STYLES)[0]
    params = [p for p in action.params if not p.optional or rng.random() < 0.7]
    keys = [(p, p.names[0] if rng.random() < 0.5 else rng.choice(p.names)) for p in params]
    if rng.random() < 0.3:  # the text keeps its natural order, so the model cannot copy by position alone
        rng.shuffle(keys)
    return GeneratedTool(action, name, rng.choice(action.descriptions), keys)


def _distinct_values(rng: random.Random, given: list[Param]) -> dict[str, Any]:
    """A value per given parameter; two parameters never share a value (from Paris to Paris would leave the
    model guessing which is which)."""
    values: dict[str, Any] = {}  # by the parameter's plain name (Param holds dicts: not hashable)
    seen: set[str] = set()
    for param in given:
        for _ in range(20):
            value = param.kind.draw(rng)
            if json.dumps(value) not in seen:
                break
        values[param.names[0]] = value
        seen.add(json.dumps(value))
    return values


def say_request(template: str, phrases: list[str]) -> str:
    """A request template with the parameters' phrases at "{args}"; with none, "{args}" goes with the space or
    comma before it ("What's the boiler like {args}?" -> "What's the boiler like?")."""
    if not phrases:
        return re.sub(r",? ?\{args\}", "", template)
    return template.format(args=" ".join(phrases))


def draw_call(rng: random.Random, tool: GeneratedTool, opening: bool = True) -> Call:
    given = [p for p, _ in tool.keys if not p.optional or rng.random() < 0.5]
    values = _distinct_values(rng, given)
    # phrases in the action's natural order; arguments in the schema's order (the order the model writes keys)
    phrases = [p.say(values[p.names[0]]) for p in tool.action.params if p.names[0] in values]
    text = (rng.choice(OPENINGS) if opening else "") + say_request(rng.choice(tool.action.requests), phrases)
    arguments = {key: values[p.names[0]] for p, key in tool.keys if p.names[0] in values}
    left_out = [key for p, key in tool.keys if p.names[0] not in values]
    return Call(tool, text, arguments, left_out)


def offered(rng: random.Random, needed: list[GeneratedTool], pool: tuple[Action, ...], count: int | None = None,
            avoid: frozenset[str] = frozenset(), legacy: bool = True) -> list[dict[str, Any]]:
    """The needed tools plus distractors from other actions of `pool` (none of the domains in `avoid`; sometimes
    a corpus tool when `legacy`), shuffled: 2-6 tools in all unless `count` says otherwise."""
    if count is None:
        counts, weights = zip(*TOOL_COUNTS)
        count = rng.choices(counts, weights)[0]
    count = max(count, len(needed))
    taken = {t.action.domain for t in needed} | avoid
    if taken & WEATHER_DOMAINS:  # the corpus' weather tool would do a weather request as well as the right tool
        legacy = False
    others = [a for a in pool if a.domain not in taken]
    schemas = [t.schema() for t in needed]
    extra = count - len(schemas)
    if legacy and extra > 0 and rng.random() < LEGACY_DISTRACTOR:
        schemas.append(TOOL_SCHEMAS[rng.choice(sorted(TOOL_SCHEMAS))])
        extra -= 1
    schemas += [make_tool(rng, a).schema() for a in rng.sample(others, max(0, extra))]
    rng.shuffle(schemas)
    return schemas


def lower_first(text: str) -> str:
    """'What is ...' -> 'what is ...' to continue a sentence ('I need ...' keeps its capital)."""
    return text if text.startswith(("I ", "I'")) else text[:1].lower() + text[1:]
