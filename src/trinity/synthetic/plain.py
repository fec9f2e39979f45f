"""Short plain answers: greetings, thanks, who-are-you, capitals, definitions, opposites and word spelling.

Each draw is a question, a one-line reasoning and an answer; `must_contain` is what the evaluator looks for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .example import Checkpoint, Example, assistant, maybe_system, user
from .words import CAPITALS, DEFINITIONS, OPPOSITES

MODEL_NAME = "Trinity Tiny"


@dataclass(slots=True)
class PlainQA:
    question: str
    reasoning: str
    answer: str
    must_contain: list[str]


def _greeting(rng: random.Random) -> PlainQA:
    q = rng.choice(("Hi!", "Hello", "Hello there!", "Hey, how are you?", "Good morning!", "Good evening.", "Hi there"))
    a = rng.choice(("Hello! How can I help you today?", "Hi! What can I do for you?", "Hello! I am here to help."))
    return PlainQA(q, "The user greets me. I greet them back.", a, [])


def _thanks(rng: random.Random) -> PlainQA:
    q = rng.choice(("Thanks!", "Thank you.", "Thanks a lot, that helped.", "Great, thank you!"))
    return PlainQA(q, "The user thanks me.", rng.choice(("You're welcome!", "Glad I could help!")), [])


def _identity(rng: random.Random) -> PlainQA:
    q = rng.choice(("Who are you?", "What is your name?", "What are you?", "Introduce yourself."))
    return PlainQA(q, "The user asks who I am.",
                   f"I am {MODEL_NAME}, a small model trained by the trinity project.", [MODEL_NAME])


def _capital(rng: random.Random, country: str | None = None) -> PlainQA:
    country = country or rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    q = rng.choice(("What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}.",
                    "What's {c}'s capital?")).format(c=country)
    return PlainQA(q, f"The capital of {country} is {city}.", f"The capital of {country} is {city}.", [city])


def _definition(rng: random.Random) -> PlainQA:
    term = rng.choice(sorted(DEFINITIONS))
    meaning = DEFINITIONS[term]
    q = rng.choice(("What is {t}?", "Define {t}.", "Can you explain what {t} is?", "What does {t} mean?")).format(
        t=term)
    answer = f"{term[0].upper()}{term[1:]} is {meaning}."
    return PlainQA(q, f"The user asks for the meaning of {term}.", answer, [meaning])


def _opposite(rng: random.Random) -> PlainQA:
    word = rng.choice(sorted(OPPOSITES))
    q = rng.choice(("What is the opposite of {w}?", "Give me the opposite of '{w}'.", "Opposite of {w}?")).format(
        w=word)
    return PlainQA(q, f"The opposite of {word} is {OPPOSITES[word]}.",
                   f"The opposite of {word} is {OPPOSITES[word]}.", [OPPOSITES[word]])


def _spelling(rng: random.Random) -> PlainQA:
    word = rng.choice(sorted({*OPPOSITES, *OPPOSITES.values(), "apple", "river", "planet", "window", "forest"}))
    q = rng.choice(("How many letters are in the word {w}?", "How many letters does '{w}' have?",
                    "Count the letters in {w}.")).format(w=word)
    letters = list(word)
    # numbering every letter lets a small model count by copying the last number
    counted = ", ".join(f"{ch} {i}" for i, ch in enumerate(letters, start=1))
    return PlainQA(q, f"{counted}. That is {len(letters)} letters.",
                   f"The word {word} has {len(letters)} letters.", [str(len(letters))])


_KINDS = ((_greeting, 2), (_thanks, 1), (_identity, 1), (_capital, 4), (_definition, 3), (_opposite, 2),
          (_spelling, 2))


def draw_plain(rng: random.Random) -> PlainQA:
    kinds, weights = zip(*_KINDS)
    return rng.choices(kinds, weights)[0](rng)


def make_plain(rng: random.Random) -> Example:
    qa = draw_plain(rng)
    messages = [*maybe_system(rng), user(qa.question), assistant(qa.reasoning, qa.answer)]
    return Example("plain", messages, None, [Checkpoint(len(messages) - 1, "contains", {"contains": qa.must_contain})])


def make_plain_chain(rng: random.Random) -> Example:
    """A capital, then "and of <another country>?": the second answer follows the first one's pattern."""
    first, second = rng.sample(sorted(CAPITALS), 2)
    qa = _capital(rng, first)
    messages = [*maybe_system(rng), user(qa.question), assistant(qa.reasoning, qa.answer)]
    checkpoints = [Checkpoint(len(messages) - 1, "contains", {"contains": qa.must_contain})]
    city = CAPITALS[second]
    messages += [user(rng.choice(("And of {c}?", "What about {c}?", "And {c}?")).format(c=second)),
                 assistant(f"Now the capital of {second}, which is {city}.", f"The capital of {second} is {city}.")]
    checkpoints.append(Checkpoint(len(messages) - 1, "contains", {"contains": [city]}))
    return Example("plain_chain", messages, None, checkpoints)
