"""Tool lookup drills: 3-6 tools that differ only by the word they are about, a request that says one of those
words, and the call of the tool that holds it. Off in the default mix (`--mix tool_lookup=W`).

Why they exist: the held-out "unseen tools" split is answered by a plain word match (the request's word that also
appears in one tool's name or description picks the right tool in 33 of 36 cases, benchmarks/README.md "tenth
try"), and the built-in model chooses near chance there. It learns each training action by heart instead of the
match. These conversations make the match the only way to the right tool:
- every offered tool shares its verb with the others (all "check_..."), so only the word it is about tells them
  apart; the word is an ordinary noun or a made-up one, fresh per conversation, so no name can be learnt;
- the request says the word in one of many phrasings, often without the verb;
- the conversation ends at the call: no tool result and no answer, so every labelled token is the choice, a copy
  of the chosen tool's name and description, or an argument.
A model that has learnt to copy (train/copy_task.py) is what these are for; a curriculum trains on them alone
first (`--mix tool_lookup=1,rest=0`), then mixes them into the corpus.
"""

from __future__ import annotations

import random

from .example import Checkpoint, Example, assistant, maybe_system, user
from .generated_conversations import calls_turn
from .generated_tools import draw_call, make_tool, say_request
from .made_up_tools import VERBS, _param
from .made_up_words import made_up_word
from .tool_domains import HELDOUT_WORDS, MADE_UP_RESULTS, Action

# ordinary nouns a tool may be about; none is a word of the held-out actions (filtered below)
_NOUNS = """
boiler fridge oven freezer heater radiator kettle toaster blender dishwasher fireplace chimney gutter roof attic
basement doorbell lock alarm thermostat fountain aquarium piano guitar violin drum trumpet camera printer scanner
router modem laptop tablet charger battery speaker headset keyboard monitor projector antenna satellite telescope
microscope compass lantern candle mirror curtain carpet sofa mattress pillow blanket wardrobe drawer shelf ladder
hammer drill saw wrench shovel rake hose bucket wheelbarrow tractor trailer caravan tent hammock canoe kayak
yacht sailboat submarine helicopter balloon glider rocket tram subway scooter motorbike truck van limousine
ambulance locker parcel envelope postcard stamp invoice receipt contract passport visa license permit voucher
coupon membership wallet budget loan mortgage pension salary donation auction lottery raffle tournament festival
parade exhibition lecture seminar workshop interview rehearsal audition haircut massage manicure checkup vaccine
pharmacy clinic bakery butcher florist tailor plumber electrician locksmith carpenter painter cleaner babysitter
tutor coach lawyer accountant translator photographer courier mover gardener chef waiter cake cookie sandwich
salad soup noodle burger taco sushi curry smoothie coffee tea juice lemonade cocktail wine cheese bread pastry
dessert breakfast lunch dinner picnic barbecue buffet menu grocery vitamin shampoo soap perfume lipstick
sunscreen umbrella raincoat jacket sweater scarf glove boot sneaker sandal backpack suitcase necklace bracelet
diamond sculpture poster album diary notebook magazine newspaper comic novel poem puzzle crossword chess domino
kite yoga pilates karate boxing fencing archery bowling golf tennis hockey rugby cricket baseball volleyball
surfing skiing skating climbing hiking fishing camping rowing diving jogging cycling dance choir orchestra theater
cinema circus zoo stadium arena school college campus dormitory apartment cottage cabin villa castle lighthouse
bridge tunnel highway parking garage elevator escalator staircase balcony terrace pool sauna spa gym playground
greenhouse orchard vineyard farm barn stable kennel aviary beehive pond lake river canal dam reservoir volcano
glacier desert jungle island beach cave valley canyon meadow forest mountain hill tide storm tornado flood
drought wildfire pollen allergy fever cough headache sunburn bruise recycling compost trash sewage electricity
heating internet broadband password backup server database website newsletter blog forum chatbot robot drone
sensor
"""
_MORE_VERBS = ("inspect", "repair", "clean", "measure", "monitor", "refill", "replace", "upgrade", "reset",
               "locate", "compare", "estimate", "price", "review", "rate", "share", "store", "sell", "adjust",
               "configure", "lend", "borrow", "deliver", "collect", "pause", "resume")
LOOKUP_VERBS: tuple[str, ...] = tuple(dict.fromkeys(v for v in VERBS + _MORE_VERBS if v not in HELDOUT_WORDS))
# a word is a noun or a verb, never both ("monitor" would leave two words a tool could be about)
NOUNS: tuple[str, ...] = tuple(w for w in dict.fromkeys(_NOUNS.split())
                               if w not in HELDOUT_WORDS | set(LOOKUP_VERBS))
FORBIDDEN: frozenset[str] = HELDOUT_WORDS | frozenset(LOOKUP_VERBS)  # what a made-up noun may not be
MADE_UP_NOUN_SHARE = 0.4  # the rest are ordinary nouns: a held-out noun is written with tokens like theirs

# {verb}/{noun} are the tool's words, {args} the parameters' phrases; 8 of the 18 never say the verb
REQUESTS = (
    "{Verb} the {noun} {args}.", "Please {verb} a {noun} {args}.", "I need to {verb} the {noun} {args}.",
    "Can you {verb} my {noun} {args}?", "Could you {verb} a {noun} {args}, please?",
    "I'd like to {verb} a {noun} {args}.", "Help me {verb} the {noun} {args}.", "I want to {verb} a {noun} {args}.",
    "Quick: {verb} the {noun} {args}.", "Time to {verb} the {noun} {args}.",
    "What's the {noun} like {args}?", "How is the {noun} {args}?", "Tell me about the {noun} {args}.",
    "My {noun} needs attention {args}.", "Something about the {noun}, {args}.", "{Noun} {args}, please.",
    "Any news on the {noun} {args}?", "It's about my {noun} {args}.",
)
DESCRIPTIONS = ("{Verb} a {noun}.", "Use this to {verb} a {noun}.", "{Verb} the user's {noun}.",
                "{Noun} service: {verb} a {noun}.", "Handles {noun} requests ({verb}).",
                "{Verb} a {noun} for the user.", "Everything about a {noun}: {verb} it.", "{Noun}: {verb} one.")
# verb_noun twice: the commonest form (the fifteenth try's corpora were drawn with this list)
NAMES = ("{verb}_{noun}", "{noun}_{verb}", "{noun}_service", "{verb}_{noun}_task", "{noun}_tool", "{verb}_{noun}")


def _fill(template: str, verb: str, noun: str) -> str:
    """The template with the tool's words; "{args}" stays for draw_call."""
    return template.format(verb=verb, noun=noun, Verb=verb.capitalize(), Noun=noun.capitalize(), args="{args}")


def _noun(rng: random.Random, taken: set[str]) -> str:
    while True:
        noun = made_up_word(rng, FORBIDDEN) if rng.random() < MADE_UP_NOUN_SHARE else rng.choice(NOUNS)
        if noun not in taken:
            taken.add(noun)
            return noun


def lookup_action(rng: random.Random, verb: str, noun: str, taken: set[str], counts: tuple[int, ...] = (0, 1, 1, 2)
                  ) -> Action:
    """An action about `noun`: `counts` draws how many parameters, with made-up keys (never another tool's noun)."""
    params = tuple(_param(rng, taken, optional=n > 0 and rng.random() < 0.3) for n in range(rng.choice(counts)))
    names = tuple(dict.fromkeys(_fill(t, verb, noun) for t in rng.sample(NAMES, 2)))
    descriptions = tuple(_fill(t, verb, noun) for t in rng.sample(DESCRIPTIONS, 2))
    requests = tuple(_fill(t, verb, noun) for t in rng.sample(REQUESTS, 3))
    return Action(f"lookup:{noun}", names, f"{verb} a {noun}", descriptions, requests, params, MADE_UP_RESULTS,
                  (noun,))


def make_lookup(rng: random.Random) -> Example:
    """3-6 tools about different words, mostly with one verb; the user asks for one; the call ends the
    conversation."""
    taken: set[str] = set()
    verbs = rng.sample(LOOKUP_VERBS, rng.choice((1, 1, 2)))
    actions = [lookup_action(rng, rng.choice(verbs), _noun(rng, taken), taken) for _ in range(rng.randint(3, 6))]
    tools = [make_tool(rng, a) for a in actions]
    target = rng.choice(tools)
    call = draw_call(rng, target)
    messages = [*maybe_system(rng, 0.2), user(call.text),
                calls_turn(call.reasoning(), [("call_0", target.name, call.arguments)])]
    checkpoint = Checkpoint(len(messages) - 1, "tool_call", {"name": target.name, "arguments": call.arguments})
    return Example("tool_lookup", messages, [t.schema() for t in tools], [checkpoint])


DRILL_QUESTIONS = ("Which tool would do each of these?", "For each request, name the tool to use.",
                   "Match every request to one of your tools.", "Which of your tools fits each one?")
DRILL_REASONING = "The user asks which tool fits each request. I find each request's word in one tool."


def make_lookup_drill(rng: random.Random) -> Example:
    """The match alone, many times over one tool list: 8-14 tools about different words (short schemas), most of
    them asked for once in a numbered list of requests, and an answer that names the tool of each ("3. The user
    wants to check a boiler. The tool check_boiler does this."). A call conversation holds one choice in ~550
    tokens; this holds one in ~60. No tool is asked for twice: a second time could copy the first answer."""
    taken: set[str] = set()
    verbs = rng.sample(LOOKUP_VERBS, rng.choice((1, 2, 2, 3)))
    actions = [lookup_action(rng, rng.choice(verbs), _noun(rng, taken), taken, (0, 0, 1))
               for _ in range(rng.randint(8, 14))]
    tools = [make_tool(rng, a) for a in actions]
    asked = rng.sample(tools, max(3, round(len(tools) * rng.uniform(0.6, 1.0))))
    requests = [say_request(rng.choice(t.action.requests), []) for t in asked]
    question = rng.choice(DRILL_QUESTIONS) + "\n" + "\n".join(f"{n}. {r}" for n, r in enumerate(requests, 1))
    lines = [f"{n}. The user wants to {t.action.purpose}. The tool {t.name} does this." for n, t in enumerate(asked, 1)]
    messages = [*maybe_system(rng, 0.2), user(question), assistant(DRILL_REASONING, "\n".join(lines))]
    return Example("tool_lookup_drill", messages, [t.schema() for t in tools],
                   [Checkpoint(len(messages) - 1, "contains", {"contains": lines})])
