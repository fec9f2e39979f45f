"""Conversations with tools: the assistant thinks briefly, calls one tool with arguments taken from the user's
words, reads the (fake) result and answers from it; or, when the tools on offer do not help, answers directly.

Arguments are normalised the way the evaluator expects: units become the schema's enum values, cities are
written as in the user's text, a search query or calculator expression is copied verbatim.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .arithmetic import answer_text
from .example import Checkpoint, Example, assistant, maybe_system, tool_result, user
from .plain import draw_plain
from .tools import TOOL_NAMES, TOOL_SCHEMAS, run_tool, timezone_of
from .words import CITIES, SEARCH_TOPICS, TIMEZONES

# How users name each unit (the first spelling is the canonical one used in answers).
UNIT_WORDS: dict[str, tuple[str, ...]] = {
    "km": ("kilometers", "km", "kilometres"), "miles": ("miles",), "kg": ("kilograms", "kg"),
    "pounds": ("pounds", "lb"), "celsius": ("degrees Celsius", "Celsius"),
    "fahrenheit": ("degrees Fahrenheit", "Fahrenheit"), "meters": ("meters", "metres"), "feet": ("feet", "ft"),
    "liters": ("liters", "litres"), "gallons": ("gallons",),
}
UNIT_PAIRS: tuple[tuple[str, str], ...] = (
    ("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"), ("celsius", "fahrenheit"),
    ("fahrenheit", "celsius"), ("meters", "feet"), ("feet", "meters"), ("liters", "gallons"), ("gallons", "liters"),
)


@dataclass(slots=True)
class ToolRequest:
    """One tool use: what the user says, the call it should produce, and how the answer reads the result."""

    text: str
    name: str
    arguments: dict[str, Any]
    reasoning: str


def _weather(rng: random.Random, city: str | None = None) -> ToolRequest:
    city = city or rng.choice(CITIES)
    unit, phrase = rng.choice([("celsius", ""), ("celsius", ""), ("celsius", " in Celsius"),
                               ("celsius", " in degrees Celsius"), ("fahrenheit", " in Fahrenheit"),
                               ("fahrenheit", " in degrees Fahrenheit")])
    text = rng.choice(("What's the weather in {c}{u}?", "How warm is it in {c} right now{u}?",
                       "Tell me the weather for {c}{u}.", "Is it cold in {c} today{u}?", "Weather in {c}{u}, please.",
                       "What is the temperature in {c}{u}?")).format(c=city, u=phrase)
    said = "no unit given, so celsius" if not phrase else f"the unit is {unit}"
    return ToolRequest(text, "weather", {"city": city, "unit": unit},
                       f"The user wants the weather in {city}; {said}. I will call weather.")


def _value(rng: random.Random) -> int | float:
    return rng.randint(1, 500) if rng.random() < 0.75 else rng.randint(1, 199) + 0.5


def _convert(rng: random.Random) -> ToolRequest:
    src, dst = rng.choice(UNIT_PAIRS)
    value = _value(rng)
    s, d = rng.choice(UNIT_WORDS[src]), rng.choice(UNIT_WORDS[dst])
    text = rng.choice(("Convert {v} {s} to {d}.", "How many {d} is {v} {s}?", "What is {v} {s} in {d}?",
                       "{v} {s} in {d}, please.", "Please change {v} {s} into {d}.")).format(v=value, s=s, d=d)
    return ToolRequest(text, "convert_units", {"value": value, "from_unit": src, "to_unit": dst},
                       f"The user wants {value} {src} in {dst}. I will call convert_units.")


def _expression(rng: random.Random) -> str:
    op = rng.choice("+-*/")
    a, b = rng.randint(10, 99999), rng.randint(2, 999)
    if rng.random() < 0.25:
        c = rng.randint(2, 99)
        return f"({a} {op} {b}) {rng.choice('+-*')} {c}"
    return f"{a} {op} {b}"


def _calculator(rng: random.Random) -> ToolRequest:
    expression = _expression(rng)
    text = rng.choice(("Use the calculator to compute {e}.", "Calculate {e} with the calculator.",
                       "Can you run {e} through the calculator?", "Please use the calculator: {e}")).format(
        e=expression)
    return ToolRequest(text, "calculator", {"expression": expression},
                       f"The user asks for {expression} with the calculator. I will call calculator.")


def _search(rng: random.Random) -> ToolRequest:
    query = f"{rng.choice(SEARCH_TOPICS)} in {rng.choice(CITIES)}"
    text = rng.choice(("Search the web for {q}.", "Look up {q}.", "Can you search for {q}?",
                       "Find me information on {q}.", "Please search: {q}")).format(q=query)
    return ToolRequest(text, "search", {"query": query},
                       f"The user wants a web search for {query}. I will call search.")


def _time(rng: random.Random, city: str | None = None) -> ToolRequest:
    city = city or rng.choice(sorted(TIMEZONES))
    zone = timezone_of(city)
    text = rng.choice(("What time is it in {c}?", "Current time in {c}?", "Tell me the time in {c}.",
                       "What's the local time in {c} now?")).format(c=city)
    return ToolRequest(text, "get_time", {"timezone": zone},
                       f"The user wants the time in {city}, whose time zone is {zone}. I will call get_time.")


_REQUESTS = {"weather": _weather, "convert_units": _convert, "calculator": _calculator, "search": _search,
             "get_time": _time}


def answer_from(name: str, result: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(reasoning, content, strings the content must hold) for a tool's result."""
    if name == "weather":
        t, unit, cond, city = result["temperature"], result["unit"], result["condition"], result["city"]
        return (f"The tool says {t} degrees {unit} and {cond} in {city}.",
                f"It is {t} degrees {unit.capitalize()} and {cond} in {city}.", [str(t), cond])
    if name == "convert_units":
        r = result["result"]
        return (f"The tool says {result['value']} {result['from_unit']} is {r} {result['to_unit']}.",
                f"{result['value']} {result['from_unit']} is {r} {result['to_unit']}.", [str(r)])
    if name == "calculator":
        r = result["result"]
        return f"The calculator returned {r}.", answer_text(r), [str(r)]
    if name == "search":
        snippet = result["results"][0]
        return "The search returned one snippet.", f"Here is what I found: {snippet}.", [snippet.split(": ", 1)[1]]
    if name == "get_time":
        return (f"The tool says it is {result['time']} in {result['timezone']}.",
                f"It is {result['time']} in {result['timezone']}.", [result["time"]])
    raise ValueError(f"unknown tool {name!r}")


def offered_tools(rng: random.Random, needed: str | None) -> list[dict[str, Any]]:
    """The needed tool plus up to two others (one to three when none is needed), in random order. The schemas
    never vary, so the rendered tools section is exactly what a client sending the same tools gets; few tools
    keep the prompt short for a small context."""
    others = [n for n in TOOL_NAMES if n != needed]
    names = rng.sample(others, rng.randint(0, 2) if needed else rng.randint(1, 3)) + ([needed] if needed else [])
    rng.shuffle(names)
    return [TOOL_SCHEMAS[n] for n in names]


def _call_and_answer(messages: list[dict], request: ToolRequest, day: int, n: int,
                     checkpoints: list[Checkpoint]) -> None:
    call_id = f"call_{n}"
    messages.append(assistant(request.reasoning, None, (call_id, request.name, request.arguments)))
    checkpoints.append(Checkpoint(len(messages) - 1, "tool_call",
                                  {"name": request.name, "arguments": request.arguments}))
    result = run_tool(request.name, request.arguments, day)
    messages.append(tool_result(call_id, result))
    reasoning, content, must = answer_from(request.name, result)
    messages.append(assistant(reasoning, content))
    checkpoints.append(Checkpoint(len(messages) - 1, "contains", {"contains": must}))


def make_tool_use(rng: random.Random) -> Example:
    name = rng.choice(TOOL_NAMES)
    request = _REQUESTS[name](rng)
    day = rng.randint(0, 999)
    messages = [*maybe_system(rng, 0.25), user(request.text)]
    checkpoints: list[Checkpoint] = []
    _call_and_answer(messages, request, day, 0, checkpoints)
    return Example("tool_use", messages, offered_tools(rng, name), checkpoints, {"day": day})


def make_tool_follow_up(rng: random.Random) -> Example:
    """Weather or time in one city, then "and in <other city>?": the second call repeats the first with the new
    city (and the same unit), so the model must read the earlier turn."""
    name = rng.choice(("weather", "get_time"))
    first_city, second_city = rng.sample(sorted(TIMEZONES) if name == "get_time" else CITIES, 2)
    first = _REQUESTS[name](rng, first_city)
    day = rng.randint(0, 999)
    messages = [*maybe_system(rng, 0.25), user(first.text)]
    checkpoints: list[Checkpoint] = []
    _call_and_answer(messages, first, day, 0, checkpoints)
    arguments = dict(first.arguments)
    if name == "weather":
        arguments["city"] = second_city
        reasoning = f"Now the weather in {second_city}, with the same unit, {arguments['unit']}. I will call weather."
    else:
        arguments["timezone"] = timezone_of(second_city)
        reasoning = (f"Now the time in {second_city}, whose time zone is {arguments['timezone']}. "
                     "I will call get_time.")
    text = rng.choice(("And in {c}?", "What about {c}?", "Now do the same for {c}.", "And for {c}?")).format(
        c=second_city)
    messages.append(user(text))
    _call_and_answer(messages, ToolRequest(text, name, arguments, reasoning), day, 1, checkpoints)
    return Example("tool_follow_up", messages, offered_tools(rng, name), checkpoints, {"day": day})


def make_tool_not_needed(rng: random.Random) -> Example:
    """Tools on offer, but the request is small talk or a fact the model knows: answer without calling."""
    plain = draw_plain(rng)
    messages = [*maybe_system(rng, 0.25), user(plain.question),
                assistant(f"No tool is needed for this. {plain.reasoning}", plain.answer)]
    return Example("tool_not_needed", messages, offered_tools(rng, None),
                   [Checkpoint(len(messages) - 1, "no_tool", {"contains": plain.must_contain})])
