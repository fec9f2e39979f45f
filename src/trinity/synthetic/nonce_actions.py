"""Actions about made-up things ("order a dorvak"), so that reading the offered tools is the only way to call one.

The second edition trained on 30 real domains and scored 10% on held-out ones: its reasoning recalled a
training action ("The user wants to play a song") whatever the request said, because 30 domains can be learnt
by heart. Here the thing an action is about is a pronounceable nonsense word drawn from thousands, so no name is
seen often enough to memorise: the model has to copy the word from the request into the reasoning and find the
tool whose name and description contain it. That is the same skill a held-out request needs ("I want a pizza"
-> `buy_pizza`), on words the model has never seen.

A nonce action's parameters are the training domains' own parameters (their phrases: "in {v}", "for {v} nights")
or nonce ones ("shade lumora"), and its (fake) backend returns results that depend only on the name's nonce word,
so `tools.run_tool` can re-run any call in the corpus from its name alone (`nonce_word_in`).
"""

from __future__ import annotations

import random
import re
import zlib

from .tool_domains import (CODE, HELDOUT_ACTIONS, COUNT, MINUTES, PRICE, STATUS, TRAIN_ACTIONS, Action, Kind, Param, _enum,
                           _integer, _pool)

ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z", "br",
          "ch", "cl", "cr", "dr", "fl", "fr", "gr", "kr", "ph", "pl", "pr", "qu", "sh", "sk", "sn", "sp", "st", "sw",
          "th", "tr", "wh")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ee", "ei", "oo", "ou", "y")
CODAS = ("", "", "", "n", "r", "l", "s", "k", "x", "m", "t", "d", "p", "ck", "nd", "ng", "sh", "st", "th", "ry")
HELDOUT_WORDS = frozenset(w for a in HELDOUT_ACTIONS for n in a.names for w in re.split(r"[_\-]", n.lower())) | \
    frozenset(k for a in HELDOUT_ACTIONS for k in a.keywords)


def nonce_word(rng: random.Random) -> str:
    """A fresh pronounceable word: drawn per tool from an open-ended set, so no word is seen often enough to learn
    by heart and every letter sequence a real word uses turns up in the copied role."""
    while True:
        syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice((1, 2, 2, 3)))]
        word = "".join(syllables) + rng.choice(CODAS)
        if 3 <= len(word) <= 12 and word not in HELDOUT_WORDS and word not in NOT_WORDS:
            return word

# (the verb a tool name uses, its description, how users ask): the request's verb is often not the name's
VERBS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("get", "Get the {n} for the user.", ("What is the {n} {args}?", "Get me the {n} {args}.", "Show the {n} {args}.")),
    ("book", "Book a {n}.", ("Book a {n} {args}.", "I need a {n} {args}.", "Reserve a {n} {args}.")),
    ("order", "Order a {n} for delivery.", ("Order a {n} {args}.", "I want a {n} {args}.", "Get me a {n}, {args}.")),
    ("find", "Find {n}s that match.", ("Find a {n} {args}.", "Are there any {n}s {args}?", "Look for a {n} {args}.")),
    ("start", "Start the {n}.", ("Start the {n} {args}.", "Turn on the {n} {args}.", "Run the {n} {args}.")),
    ("check", "Check the {n} status.", ("Check the {n} {args}.", "How is the {n} {args}?", "What's the {n} like {args}?")),
    ("cancel", "Cancel a {n}.", ("Cancel the {n} {args}.", "Please cancel my {n} {args}.", "Stop the {n} {args}.")),
    ("send", "Send a {n} to someone.", ("Send a {n} {args}.", "Please send the {n} {args}.", "Ship a {n} {args}.")),
    ("play", "Play a {n}.", ("Play the {n} {args}.", "Put on a {n} {args}.", "I want to listen to the {n} {args}.")),
    ("track", "Track a {n}.", ("Track the {n} {args}.", "Where is my {n} {args}?", "Follow the {n} {args}.")),
    ("rent", "Rent a {n} for a while.", ("Rent a {n} {args}.", "I need to rent a {n} {args}.", "Hire a {n} {args}.")),
    ("schedule", "Schedule a {n}.", ("Schedule a {n} {args}.", "Plan a {n} {args}.", "Set up a {n} {args}.")),
)
# Tools named after their word can be called without reading the offered list ("order a dorvak" -> order_dorvak,
# name made up from the request): the first model trained on them did exactly that and called `order_pizeil` for a
# pizza. Most nonce tools get a name with another word, which only the list connects to the request (through
# the description, which always says the word).
NAME_HAS_WORD = 0.8
SUFFIXES = ("lookup", "request", "status", "info", "order", "booking", "now", "search", "service", "control")
# Requests phrased the way the real domains' are: the word anywhere, capitalised at the start, in the plural, with
# no "<verb> a <word>" for the reasoning to lean on.
PHRASINGS = ("{N} {args}, please.", "{N}s {args}?", "When does the {n} go {args}?", "Any {n}s {args}?",
             "I'd like {n}s {args}.", "Hi! {N} {args}.", "The {n}, {args}.", "Need the {n} thing {args}.",
             "What about {n}s {args}?", "{N} now {args}.")
NOT_WORDS = frozenset(v[0] for v in VERBS) | frozenset(SUFFIXES)  # the other parts of a nonce tool's name
RESULTS: tuple[tuple[tuple[str, Kind], ...], ...] = (
    (("status", STATUS), ("reference", CODE)), (("count", COUNT), ("price", PRICE)),
    (("minutes", MINUTES),), (("confirmation", CODE), ("total", PRICE)), (("status", STATUS), ("count", COUNT)),
)


def _plain(phrase: str | tuple[str, str]) -> str:
    """A phrase without its value: two parameters saying the same words would leave the value's slot unknowable."""
    return "|".join(phrase) if isinstance(phrase, tuple) else phrase


TRAIN_PARAMS: tuple[Param, ...] = tuple({_plain(p.phrase): p for a in TRAIN_ACTIONS for p in a.params}.values())


def _nonce_param(rng: random.Random, word: str) -> Param:
    kind = rng.random()
    names = (word, f"{word}_value") if rng.random() < 0.8 else (word,)
    if kind < 0.35:
        return Param(names, _integer(1, 99), f"with {{v}} {word}s")
    values = tuple([nonce_word(rng) for _ in range(rng.randint(3, 5))])
    if kind < 0.7:
        return Param(names, _enum(values), f"{word} {{v}}")
    return Param(names, _pool(values), f"with {word} {{v}}")


def nonce_action(rng: random.Random) -> Action:
    """An action about a made-up word: its descriptions and requests contain the word, its names sometimes."""
    word = nonce_word(rng)
    verb, description, requests = rng.choice(VERBS)
    if rng.random() < NAME_HAS_WORD:
        named = word
        names = (f"{verb}_{word}", f"{word}_{rng.choice(SUFFIXES)}", f"{verb}_{word}_{rng.choice(SUFFIXES)}")
    else:  # a name the request does not predict: only the offered list says which tool orders a dorvak
        named = nonce_word(rng)
        names = (named, f"{rng.choice(VERBS)[0]}_{named}", f"{named}_{rng.choice(SUFFIXES)}")
    params: dict[str, Param] = {}
    while len(params) < rng.choice((1, 2, 2, 3)) or all(p.optional for p in params.values()):
        param = rng.choice(TRAIN_PARAMS) if rng.random() < 0.6 else _nonce_param(rng, nonce_word(rng))
        params.setdefault(_plain(param.phrase), param)
    descriptions = (description.format(n=word), f"{verb.capitalize()} a {word} for the user.")
    return Action(f"nonce:{word}", names, f"{verb} a {word}", descriptions,
                  tuple(r.replace("{n}", word).replace("{N}", word.capitalize())
                        for r in requests + tuple(rng.sample(PHRASINGS, 3))), tuple(params.values()), nonce_results(named),
                  (word,))


def nonce_results(word: str) -> tuple[tuple[str, Kind], ...]:
    return RESULTS[zlib.crc32(word.encode()) % len(RESULTS)]


def nonce_word_in(name: str) -> str | None:
    """The made-up word of a nonce tool's name in any of its spellings (order_dorvak, orderDorvak, order-dorvak),
    or None for any other name."""
    for part in re.split(r"[_\-]|(?=[A-Z])", name):
        if part and part.lower() not in NOT_WORDS and part.isalpha():
            return part.lower()
    return None


def training_pool(rng: random.Random, real: int = 12, nonce: int = 12) -> tuple[Action, ...]:
    """The actions one training conversation draws from: some real training domains and as many nonce ones, so
    about half of the needed tools and half of the distractors are about words never seen before."""
    return tuple(rng.sample(TRAIN_ACTIONS, real)) + tuple(nonce_action(rng) for _ in range(nonce))
