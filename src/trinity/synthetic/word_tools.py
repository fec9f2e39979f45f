"""Actions about real English nouns, drawn per conversation: "check the boiler" with a tool named
check_boiler, asked in many phrasings ("What's the boiler like in Oslo?", "My boiler needs a look ...").

Made-up tools (made_up_tools.py) teach the model to copy a name from the tool list, but always in the same few
sentences about a syllable string; against the held-out split's plain requests ("What's the weather like in
Paris right now?") the model still recalls a training action. Here the word that links a request to its tool is
an ordinary noun, written with the tokens a held-out noun is written with, and the request says it in phrasings
of the kind users write, so matching the request's noun to the offered tool's name and description is the only
way to the right tool. No noun, key or name word is a word of the held-out actions (HELDOUT_WORDS).
"""

from __future__ import annotations

import random

from .made_up_tools import VERBS, param_of
from .tool_domains import HELDOUT_WORDS, MADE_UP_RESULTS, Action

_NOUNS = """
boiler fridge oven freezer heater radiator kettle toaster blender dishwasher fireplace chimney gutter roof attic
basement doorbell lock alarm thermostat fountain aquarium piano guitar violin drum trumpet camera printer scanner
router modem laptop tablet phone charger battery speaker headset keyboard monitor projector antenna satellite
telescope microscope compass lantern candle mirror curtain carpet sofa mattress pillow blanket wardrobe drawer
shelf ladder hammer drill saw wrench shovel rake hose bucket wheelbarrow tractor trailer caravan tent hammock
canoe kayak yacht sailboat submarine helicopter balloon glider rocket tram subway scooter motorbike truck van
limousine ambulance locker parcel package envelope letter postcard stamp invoice receipt contract passport visa
license permit ticket voucher coupon membership subscription account wallet budget loan mortgage pension salary
donation auction lottery raffle tournament match concert festival parade exhibition lecture seminar workshop
interview appointment meeting rehearsal audition haircut massage manicure checkup vaccine prescription dentist
pharmacy clinic hospital bakery butcher florist tailor plumber electrician locksmith carpenter painter cleaner
babysitter tutor coach trainer lawyer accountant translator photographer courier mover gardener chef waiter
recipe cake cookie sandwich salad soup noodle burger taco sushi curry smoothie coffee tea juice lemonade cocktail
wine cheese bread pastry dessert breakfast lunch dinner picnic barbecue buffet menu grocery vitamin shampoo soap
perfume lipstick sunscreen umbrella raincoat jacket sweater scarf glove boot sneaker sandal backpack suitcase
necklace bracelet ring watch diamond painting sculpture poster photo album diary notebook magazine newspaper comic
novel poem puzzle crossword chess domino kite yoga pilates karate boxing fencing archery bowling golf tennis
hockey rugby cricket baseball volleyball surfing skiing skating climbing hiking fishing hunting camping rowing
diving jogging cycling dance choir orchestra theater cinema circus zoo aquarium stadium arena library school
college campus dormitory apartment cottage cabin villa castle lighthouse bridge tunnel highway parking garage
elevator escalator staircase balcony terrace pool sauna spa gym playground greenhouse orchard vineyard farm barn
stable kennel aviary beehive pond lake river canal dam reservoir volcano glacier desert jungle island beach cave
valley canyon meadow forest mountain hill tide earthquake storm tornado hurricane flood drought wildfire pollen
allergy fever cough headache sunburn bruise recycling compost trash sewage electricity gas heating plumbing
internet broadband password backup server database website newsletter blog forum chatbot robot drone sensor
"""
# nouns a tool is about: ordinary words, none of them said by a held-out action
NOUNS: tuple[str, ...] = tuple(w for w in dict.fromkeys(_NOUNS.split()) if w not in HELDOUT_WORDS)
# what a tool does to its noun; a verb that a held-out action says is kept out of names (VERBS may be, as before)
_EXTRA_VERBS = ("inspect", "repair", "clean", "measure", "monitor", "refill", "replace", "upgrade", "reset",
                "lookup", "locate", "compare", "estimate", "price", "review", "rate", "share", "store", "sell",
                "report", "adjust", "configure", "lend", "borrow", "deliver", "collect", "pause", "resume")
NAME_VERBS: tuple[str, ...] = VERBS + tuple(v for v in _EXTRA_VERBS if v not in HELDOUT_WORDS)
# words a parameter key is made of (its value is said after it: "with colour Brevita")
_KEY_WORDS = """
colour level mode label amount weight length speed volume brand model serial quantity floor room seat row gate
platform channel station voltage budget limit deadline priority language theme style material pattern flavour
shape grade rank version region zone code pin note comment reason topic category owner contact phone email
"""
KEY_WORDS: tuple[str, ...] = tuple(w for w in dict.fromkeys(_KEY_WORDS.split()) if w not in HELDOUT_WORDS)

# how a user asks: {verb} and {noun} are the action's words, {args} the parameters' phrases
REQUESTS = (
    "{Verb} the {noun} {args}.", "Please {verb} a {noun} {args}.", "I need to {verb} the {noun} {args}.",
    "Can you {verb} my {noun} {args}?", "Could you {verb} a {noun} {args}, please?", "I'd like to {verb} a {noun} "
    "{args}.", "Help me {verb} the {noun} {args}.", "What's the {noun} like {args}?", "How is the {noun} {args}?",
    "Tell me about the {noun} {args}.", "My {noun} needs attention {args}.", "Something about the {noun}, {args}.",
    "Is the {noun} ready {args}?", "{Noun} {args}, please.", "I want to {verb} a {noun} {args}.",
    "The {noun} {args}: {verb} it, please.", "Any news on the {noun} {args}?", "Quick: {verb} the {noun} {args}.",
)
DESCRIPTIONS = ("{Verb} a {noun}.", "Use this to {verb} a {noun}.", "{Verb} the user's {noun}.",
                "{Noun} service: {verb} a {noun}.", "Handles {noun} requests ({verb}).", "{Verb} a {noun} "
                "for the user.", "Everything about a {noun}: {verb} it.")
NAMES = ("{verb}_{noun}", "{noun}_{verb}", "{noun}_service", "{verb}_{noun}_task", "{noun}_{verb}_request")


def _fill(template: str, verb: str, noun: str) -> str:
    return template.format(verb=verb, noun=noun, Verb=verb.capitalize(), Noun=noun.capitalize(), args="{args}")


def word_action(rng: random.Random) -> Action:
    """One action about a real noun: a verb and a noun, two of the name shapes, two descriptions, four phrasings
    of the request and 1-3 parameters whose keys are real words."""
    noun, verb = rng.choice(NOUNS), rng.choice(NAME_VERBS)
    taken = {noun}
    params = tuple(param_of(rng, taken, n > 0 and rng.random() < 0.3, lambda r: r.choice(KEY_WORDS))
                   for n in range(rng.choice((1, 2, 2, 3))))
    names = tuple(_fill(t, verb, noun) for t in rng.sample(NAMES, 2))
    return Action(f"word:{noun}", names, f"{verb} the {noun}",
                  tuple(_fill(t, verb, noun) for t in rng.sample(DESCRIPTIONS, 2)),
                  tuple(_fill(t, verb, noun) for t in rng.sample(REQUESTS, 4)), params, MADE_UP_RESULTS, (noun,))
