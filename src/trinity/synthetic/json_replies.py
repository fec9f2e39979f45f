"""Replies that must be one JSON object with given keys: extraction and classification tasks.

The prompt states the keys and their types in words derived from the task's JSON Schema (so the prompt and the
schema the evaluator validates against can never disagree); the reply is the object alone, compact, keys in
the order asked for. No constrained decoding: the model has to learn to write valid JSON.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from .example import Checkpoint, Example, assistant, system, user
from .words import (CAPITALS, CITIES, EVENTS, FIRST_NAMES, ITEMS, LAST_NAMES, SENTIMENT_SUBJECTS, SENTIMENT_WORDS,
                    WEEKDAYS)

Task = tuple[str, dict[str, Any], dict[str, Any], str]  # (text, schema, value, reasoning)


def object_schema(properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def describe(schema: dict[str, Any]) -> str:
    """'name (string), age (integer), label ("positive", "negative" or "neutral")' from the schema."""
    parts = []
    for key, prop in schema["properties"].items():
        if "enum" in prop:
            options = [json.dumps(v) for v in prop["enum"]]
            kind = ", ".join(options[:-1]) + " or " + options[-1]
        elif prop["type"] == "number" and "minimum" in prop and "maximum" in prop:
            kind = f"a number from {prop['minimum']} to {prop['maximum']}"
        else:
            kind = prop["type"]
        parts.append(f"{key} ({kind})")
    return ", ".join(parts)


def _person(rng: random.Random) -> Task:
    name, age, city = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice(("{n} is {a} years old and lives in {c}.", "{n}, aged {a}, lives in {c}.",
                       "Meet {n} from {c}, who is {a}.", "My neighbour {n} is {a} and comes from {c}.")).format(
        n=name, a=age, c=city)
    schema = object_schema({"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}})
    return text, schema, {"name": name, "age": age, "city": city}, f"Name: {name}. Age: {age}. City: {city}."


def _sentiment(rng: random.Random) -> Task:
    subject, word = rng.choice(SENTIMENT_SUBJECTS), rng.choice(sorted(SENTIMENT_WORDS))
    label, confidence = SENTIMENT_WORDS[word]
    text = rng.choice(("{S} was {w}.", "{S} was really {w}.", "Honestly, {s} was {w}.")).format(
        S=subject, s=subject[0].lower() + subject[1:], w=word)
    schema = object_schema({"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                            "confidence": {"type": "number", "minimum": 0, "maximum": 1}})
    return text, schema, {"label": label, "confidence": confidence}, f"The key word is '{word}', which is {label}."


def _order(rng: random.Random) -> Task:
    item, quantity = rng.choice(ITEMS), rng.randint(2, 40)
    price = rng.randint(1, 300) + rng.choice((0, 0, 0.5, 0.25, 0.99))
    text = rng.choice(("I bought {q} {i} for {p} dollars.", "Order: {q} {i}, total {p} dollars.",
                       "We paid {p} dollars for {q} {i}.")).format(q=quantity, i=item, p=price)
    schema = object_schema({"item": {"type": "string"}, "quantity": {"type": "integer"}, "price": {"type": "number"}})
    return text, schema, {"item": item, "quantity": quantity, "price": price}, \
        f"Item: {item}. Quantity: {quantity}. Price: {price}."


def _event(rng: random.Random) -> Task:
    event, day, hour, place = rng.choice(EVENTS), rng.choice(WEEKDAYS), rng.randint(1, 12), rng.choice(CITIES)
    text = rng.choice(("The {e} is on {d} at {h} o'clock in {p}.", "Remember: {e} in {p}, {d}, {h} o'clock.",
                       "On {d} there is a {e} in {p} at {h}.")).format(e=event, d=day, h=hour, p=place)
    schema = object_schema({"event": {"type": "string"}, "day": {"type": "string", "enum": list(WEEKDAYS)},
                            "hour": {"type": "integer"}, "place": {"type": "string"}})
    return text, schema, {"event": event, "day": day, "hour": hour, "place": place}, \
        f"Event: {event}. Day: {day}. Hour: {hour}. Place: {place}."


def _capital_check(rng: random.Random) -> Task:
    country = rng.choice(sorted(CAPITALS))
    truth = CAPITALS[country]
    claimed = truth if rng.random() < 0.5 else rng.choice(sorted(set(CAPITALS.values()) - {truth}))
    text = f"Is {claimed} the capital of {country}?"
    schema = object_schema({"answer": {"type": "boolean"}, "capital": {"type": "string"}})
    verdict = "yes" if claimed == truth else "no"
    return text, schema, {"answer": claimed == truth, "capital": truth}, \
        f"The capital of {country} is {truth}, so the answer is {verdict}."


_TASKS: tuple[tuple[Callable[[random.Random], Task], int], ...] = (
    (_person, 3), (_sentiment, 3), (_order, 2), (_event, 2), (_capital_check, 2))

_INSTRUCTIONS = ("Reply with a JSON object with the keys {keys}.", "Answer only with JSON, keys: {keys}.",
                 "Return a JSON object with {keys}.")


def make_json_reply(rng: random.Random) -> Example:
    tasks, weights = zip(*_TASKS)
    text, schema, value, reasoning = rng.choices(tasks, weights)[0](rng)
    instruction = rng.choice(_INSTRUCTIONS).format(keys=describe(schema))
    if rng.random() < 0.5:  # the format asked for in the system message or in the user's own message
        messages = [system(instruction), user(text)]
    else:
        messages = [user(f"{instruction}\n{text}" if rng.random() < 0.5 else f"{text}\n{instruction}")]
    messages.append(assistant(reasoning, json.dumps(value)))
    return Example("json", messages, None,
                   [Checkpoint(len(messages) - 1, "json", {"schema": schema, "value": value})])
