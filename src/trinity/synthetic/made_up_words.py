"""Words nobody has seen: pronounceable syllable strings ("velkora", "dumisat") for tool names, parameter keys and
argument values that cannot be learnt by heart.

A model trained only on tools from fixed lists learns those tools' names and values, and against a new schema
writes a name or a city it knows (the get_weather probe of issue 24: the tool right, the city never). With
made-up words in the corpus, copying from the prompt is the only way to get a name or a value right, so the
model has to learn to copy. Words start with a consonant and are 2-3 syllables long (4+ letters); callers pass
the words a made-up word may not be (the held-out split's vocabulary must stay unseen).
"""

from __future__ import annotations

import random

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "", "l", "n", "r", "s")
PLACE_ENDINGS = ("", "", "", "a", "ia", "ton", "burg", "ville", "mouth")


def made_up_word(rng: random.Random, forbidden: frozenset[str] = frozenset()) -> str:
    """A lower-case made-up word of 2-3 syllables, never one of `forbidden`."""
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                       for _ in range(rng.choice((2, 2, 2, 3))))
        if word not in forbidden:
            return word


def made_up_place(rng: random.Random, forbidden: frozenset[str] = frozenset()) -> str:
    """A capitalised made-up town ("Dravinton", "Kelo")."""
    while True:
        word = (made_up_word(rng, forbidden) + rng.choice(PLACE_ENDINGS)).capitalize()
        if word.lower() not in forbidden:
            return word
