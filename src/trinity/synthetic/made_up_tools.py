"""Actions made of made-up words (made_up_words.py), drawn per conversation: "book a kelmosa" with a tool
named book_kelmosa, parameters such as `tosal_count` and values such as "Brevita".

The training families (conversations.py) mix them with the training actions, so a generated tool's name, its
parameter keys and many of its values can only be written by copying them from the prompt: the skill the held-out
"unseen tools" split measures. Every made-up action returns the same result keys (MADE_UP_RESULTS), which lets
the fake backend run any made-up tool by name. No word of the held-out actions is ever made up.
"""

from __future__ import annotations

import random

from .made_up_words import made_up_word
from .tool_domains import (BOOLEAN, HELDOUT_WORDS, MADE_UP_RESULTS, MONEY, PERSON, TRAIN_CITY, Action, Kind,
                           Param, _enum, _integer)

VERBS = ("book", "order", "check", "find", "start", "cancel", "reserve", "track", "rent", "update", "register",
         "renew", "request", "schedule", "send", "open")
# endings a key may take, by the shape of its value ("tosal_count": 12, "brevin_code": "Kelmo")
KEY_ENDINGS = {"string": ("", "", "_id", "_name", "_code"), "integer": ("", "", "_count")}


# a made-up word may not be a held-out word nor a verb (a verb never doubles as a noun)
FORBIDDEN: frozenset[str] = HELDOUT_WORDS | frozenset(VERBS)


def _word(rng: random.Random) -> str:
    return made_up_word(rng, FORBIDDEN)


def _made_up_value(rng: random.Random) -> str:
    return _word(rng).capitalize()


# (share, shape): a shape names how the value is typed and said; "place" and "person" use a fixed preposition,
# so an action has at most one of each (two "in {v}" would leave the model guessing which key is which)
SHAPES = ((0.3, "string"), (0.2, "integer"), (0.1, "number"), (0.1, "boolean"), (0.1, "enum"), (0.1, "place"),
          (0.1, "person"))


def _param(rng: random.Random, taken: set[str], optional: bool) -> Param:
    """A parameter with a made-up key; the user names it by that key ("with tosal 12"), or says a place or a
    person with the usual preposition."""
    word = _word(rng)
    while word in taken:
        word = _word(rng)
    taken.add(word)
    shares, shapes = zip(*[(w, s) for w, s in SHAPES if s not in taken])
    shape = rng.choices(shapes, shares)[0]
    key = word + rng.choice(KEY_ENDINGS.get(shape, ("",)))
    names = (key, word) if key != word else (key,)
    if shape in ("place", "person"):
        taken.add(shape)
    kinds = {"string": (Kind({"type": "string"}, _made_up_value), f"with {word} {{v}}"),
             "integer": (_integer(1, rng.choice((9, 60, 500))), f"with {word} {{v}}"),
             "number": (MONEY, f"with {word} {{v}}"),
             "boolean": (BOOLEAN, (f"with {word}", f"without {word}")),
             "place": (TRAIN_CITY, "in {v}"),
             "person": (PERSON, "for {v}")}
    if shape == "enum":
        kind, phrase = _enum(tuple(dict.fromkeys(_word(rng) for _ in range(3)))), f"{word} {{v}}"
    else:
        kind, phrase = kinds[shape]
    return Param(names, kind, phrase, optional)


def made_up_action(rng: random.Random) -> Action:
    noun, verb = _word(rng), rng.choice(VERBS)
    taken = {noun}
    params = tuple(_param(rng, taken, optional=n > 0 and rng.random() < 0.3) for n in range(rng.choice((1, 2, 2, 3))))
    purpose = f"{verb} a {noun}"
    return Action(
        f"made_up:{noun}", (f"{verb}_{noun}", f"{noun}_{verb}"), purpose,
        (f"{verb.capitalize()} a {noun}.", f"Use this to {purpose}.", f"{verb.capitalize()} a {noun} for the user."),
        (f"{verb.capitalize()} a {noun} {{args}}.", f"Please {purpose} {{args}}.", f"I need to {purpose} {{args}}.",
         f"Can you {purpose} {{args}}?"),
        params, MADE_UP_RESULTS, (noun,))


def made_up_pool(rng: random.Random, actions: tuple[Action, ...], made_up: int = 5, known: int = 3
                 ) -> tuple[Action, ...]:
    """`made_up` fresh made-up actions and `known` of `actions`: the families draw the needed tools and the
    distractors from this pool, so most targets are made up and the distractors are of both kinds."""
    return tuple(made_up_action(rng) for _ in range(made_up)) + tuple(rng.sample(actions, known))
