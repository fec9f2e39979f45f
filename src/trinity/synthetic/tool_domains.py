"""The vocabulary generated tools are made from: value kinds, parameters and actions, split by domain into a
training part and a disjoint held-out part.

An `Action` is one thing a tool can do in one domain ("book a hotel room"): the names a tool for it may have,
its descriptions, how a user asks for it, its parameters and what its (fake) backend returns. A generated tool
is one action with one name, one description and one spelling of each parameter (see generated_tools.py).

The held-out domains (weather, pizza, ferries, ...) never appear in training: no name, description or request
template of theirs is drawn by a training family, so the evaluation's "unseen tools" are really unseen. Their
names are checked to share no distinctive word with the training actions (tests/test_synthetic_generated_tools).
Values (cities, people, numbers) are shared: the split is about tools, not about the world. The training actions
also name made-up towns now and then (TRAIN_CITY), so that a city is copied from the request, not recalled.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .made_up_words import made_up_place
from .words import CITIES, FIRST_NAMES, LAST_NAMES, WEEKDAYS


# ------------------------------------------------------------------------------------ value kinds
@dataclass(frozen=True, slots=True)
class Kind:
    """How a parameter's value is typed (JSON Schema), drawn, and written in a user's words."""

    schema: dict[str, Any]
    draw: Callable[[random.Random], Any]
    # the words for a value; a phrase template's {v} becomes this (objects fill the template's own fields)
    words: Callable[[Any], str] = str


def _pool(options: tuple[str, ...]) -> Kind:
    return Kind({"type": "string"}, lambda rng: rng.choice(options))


def _enum(options: tuple[str, ...]) -> Kind:
    return Kind({"type": "string", "enum": list(options)}, lambda rng: rng.choice(options))


def _integer(lo: int, hi: int) -> Kind:
    return Kind({"type": "integer"}, lambda rng: rng.randint(lo, hi))


def _money(rng: random.Random) -> int | float:
    return rng.randint(5, 900) + rng.choice((0, 0, 0.5, 0.25, 0.75))


def _list_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _array(options: tuple[str, ...]) -> Kind:
    return Kind({"type": "array", "items": {"type": "string"}},
                lambda rng: rng.sample(options, rng.randint(1, 3)), _list_words)


def _object(fields: dict[str, Kind]) -> Kind:
    schema = {"type": "object", "properties": {k: v.schema for k, v in fields.items()}, "required": list(fields)}
    return Kind(schema, lambda rng: {k: v.draw(rng) for k, v in fields.items()})


BOOLEAN = Kind({"type": "boolean"}, lambda rng: rng.random() < 0.5)
CITY = _pool(CITIES)
PERSON = Kind({"type": "string"}, lambda rng: f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}")
FIRST_NAME = _pool(FIRST_NAMES)
WEEKDAY = _enum(WEEKDAYS)
MONEY = Kind({"type": "number"}, _money)
CLOCK = Kind({"type": "string"}, lambda rng: f"{rng.randint(7, 22):02d}:{rng.choice((0, 15, 30, 45)):02d}")
DATE = Kind({"type": "string"}, lambda rng: f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
CURRENCY = _enum(("USD", "EUR", "GBP", "JPY", "CHF"))
LANGUAGE = _enum(("French", "German", "Spanish", "Italian", "Japanese"))
ROOM = _enum(("kitchen", "bedroom", "living room", "office", "hallway"))
PRIORITY = _enum(("low", "medium", "high"))
NOTE_TEXTS = ("buy milk", "call the bank", "finish the slides", "pay the rent", "water the plants",
              "book the dentist", "send the invoice", "renew the passport", "clean the garage", "plan the trip")
SONGS = ("Blue Harbor", "Night Train", "Paper Moon Road", "Silver Rain", "Golden Hour", "Quiet Storm",
         "Northern Lights", "Summer Engine", "Velvet Sky", "Open Window")
MOVIES = ("The Last Lantern", "Iron Orchard", "Midnight Atlas", "The Glass Valley", "Echo Park Heist",
          "Seven Bridges", "The Long Tide", "Copper Crown")
BOOKS = ("The Salt Road", "A House of Maps", "Winter Letters", "The Clockmaker", "Rivers of Ash",
         "The Quiet Garden", "Stone and Feather")
TEAMS = ("Harbor City FC", "Red Falcons", "Northside United", "Blue Lions", "Mountain Rovers", "River Kings")
SYMBOLS = ("ACME", "GLOBX", "NOVA", "ZEPH", "KRAN", "ORBI", "TALC")
WORDS_TO_DEFINE = ("serendipity", "ephemeral", "ubiquitous", "meticulous", "resilient", "candid", "lucid")
INGREDIENTS = ("rice", "tomatoes", "garlic", "beans", "spinach", "eggs", "cheese", "lentils", "carrots", "basil")
TAGS = ("work", "home", "urgent", "ideas", "travel", "family", "money")
SUBJECTS = ("login problem", "broken link", "missing invoice", "slow page", "wrong address", "payment failed")
TRACKING = Kind({"type": "string"}, lambda rng: f"TRK{rng.randint(100000, 999999)}")
EMAIL_SUBJECTS = ("lunch on Friday", "the new budget", "holiday plans", "project update", "meeting notes")
# held-out values (strings only the held-out tools ask for; numbers and cities are shared)
PET_NAMES = ("Biscuit", "Pepper", "Luna", "Milo", "Ziggy", "Coco", "Rocket")
SHOWS = ("Deep Space Notes", "The History Hour", "Kitchen Talk", "Money Matters", "Night Science")
MUSEUMS = ("city museum", "art gallery", "science centre", "history museum")
CAR_MAKES = ("Volvo", "Toyota", "Fiat", "Skoda", "Honda", "Renault")
TOPPINGS = ("olives", "mushrooms", "ham", "peppers", "onions", "pineapple", "salami")


# ------------------------------------------------------------------------------------ parameters and actions
@dataclass(frozen=True, slots=True)
class Param:
    names: tuple[str, ...]  # spellings a generated schema may use; the first is the plainest
    kind: Kind
    # how a user says it: "{v}" is the value's words; a boolean gives (said when true, said when false);
    # an object's template names its fields
    phrase: str | tuple[str, str]
    optional: bool = False
    description: str = ""  # a short property description, shown in some generated schemas

    def say(self, value: Any) -> str:
        if isinstance(self.phrase, tuple):
            return self.phrase[0] if value else self.phrase[1]
        if isinstance(value, dict):
            return self.phrase.format(**value)
        return self.phrase.format(v=self.kind.words(value))


@dataclass(frozen=True, slots=True)
class Action:
    domain: str
    names: tuple[str, ...]  # snake_case; generated tools may write them camelCase or kebab-case
    purpose: str  # "book a hotel room": what the reasoning says the user wants
    descriptions: tuple[str, ...]
    requests: tuple[str, ...]  # how users ask; "{args}" is where the parameters' phrases go
    params: tuple[Param, ...]
    results: tuple[tuple[str, Kind], ...]  # what the fake backend returns (besides an error now and then)
    keywords: tuple[str, ...] = field(default=())  # distinctive words (held-out disjointness is checked on them)


def P(names: str, kind: Kind, phrase: str | tuple[str, str], optional: bool = False, description: str = "") -> Param:
    return Param(tuple(names.split()), kind, phrase, optional, description)


CODE = Kind({"type": "string"}, lambda rng: f"{rng.choice('ABCDEFGHJK')}{rng.randint(1000, 9999)}")
PRICE = MONEY
COUNT = _integer(0, 60)
STATUS = _enum(("confirmed", "scheduled", "done", "queued"))
MINUTES = _integer(2, 90)
TEMPERATURE = _integer(-5, 35)
CONDITION = _enum(("sunny", "cloudy", "rainy", "windy", "foggy", "clear"))
# Results every made-up action returns (made_up_tools.py): the backend can run such a tool by its name alone.
MADE_UP_RESULTS: tuple[tuple[str, Kind], ...] = (("confirmation", CODE), ("status", STATUS))
MADE_UP_CITY_SHARE = 0.3


def _train_city(rng: random.Random) -> str:
    """A corpus city, or now and then a made-up town (never a held-out word: HELDOUT_WORDS is defined below, read
    at draw time): a model that saw only the 60 cities writes one of them for any city it is asked about (issue
    24's get_weather probe); a made-up town can only be copied. Held-out actions keep CITY."""
    return made_up_place(rng, HELDOUT_WORDS) if rng.random() < MADE_UP_CITY_SHARE else rng.choice(CITIES)


TRAIN_CITY = Kind({"type": "string"}, _train_city)


def _train_actions() -> tuple[Action, ...]:
    return (
        Action("hotel", ("book_hotel", "reserve_hotel_room", "hotel_booking"), "book a hotel room",
               ("Book a hotel room in a city.", "Reserve a hotel room for some nights."),
               ("Book a hotel room {args}.", "Please reserve a hotel room {args}.", "I need a hotel room {args}."),
               (P("city location", TRAIN_CITY, "in {v}"), P("nights num_nights", _integer(1, 14), "for {v} nights"),
                P("breakfast include_breakfast", BOOLEAN, ("with breakfast", "without breakfast"), True)),
               (("confirmation", CODE), ("price", PRICE)), ("hotel",)),
        Action("flight", ("search_flights", "find_flights", "flight_search"), "find flights",
               ("Search for flights between two cities.", "Find flights from one city to another."),
               ("Find flights {args}.", "Search flights {args}, please.", "Are there flights {args}?"),
               (P("origin from_city", TRAIN_CITY, "from {v}"), P("destination to_city", TRAIN_CITY, "to {v}"),
                P("day departure_day", WEEKDAY, "on {v}", True)),
               (("flights", COUNT), ("cheapest", PRICE)), ("flight", "flights")),
        Action("restaurant", ("reserve_table", "book_table", "restaurant_reservation"), "reserve a restaurant table",
               ("Reserve a table at a restaurant.", "Book a restaurant table for a group."),
               ("Reserve a table {args}.", "Book a restaurant table {args}.", "Can you get us a table {args}?"),
               (P("people party_size guests", _integer(1, 12), "for {v} people"), P("time at", CLOCK, "at {v}"),
                P("city", TRAIN_CITY, "in {v}", True)),
               (("confirmation", CODE), ("status", STATUS)), ("restaurant", "table")),
        Action("taxi", ("order_taxi", "call_cab", "request_ride"), "order a taxi",
               ("Order a taxi to an address.", "Request a cab ride."),
               ("Order a taxi {args}.", "Call me a cab {args}.", "I need a ride {args}."),
               (P("destination address", _object({"street": _pool(("Main Street", "Oak Avenue", "Harbor Road",
                                                                     "Station Square", "Mill Lane")),
                                                  "city": TRAIN_CITY}), "to {street} in {city}"),
                P("passengers riders", _integer(1, 6), "for {v} passengers", True)),
               (("eta_minutes", MINUTES), ("fare", PRICE)), ("taxi", "cab", "ride")),
        Action("email", ("send_email", "email_send", "compose_email"), "send an email",
               ("Send an email to a person.", "Compose and send an email."),
               ("Send an email {args}.", "Email {args}, please.", "Write an email {args}."),
               (P("to recipient", PERSON, "to {v}"), P("subject topic", _pool(EMAIL_SUBJECTS), "about {v}"),
                P("urgent high_priority", BOOLEAN, ("marked urgent", "not urgent"), True)),
               (("message_id", CODE), ("status", STATUS)), ("email",)),
        Action("calendar", ("create_event", "add_calendar_event", "schedule_event"), "add a calendar event",
               ("Add an event to the calendar.", "Create a calendar event on a weekday."),
               ("Add an event {args} to my calendar.", "Create a calendar event {args}.", "Schedule {args}."),
               (P("title name", _pool(("team meeting", "dentist visit", "yoga class", "budget review")), "called {v}"),
                P("day weekday", WEEKDAY, "on {v}"), P("hour start_hour", _integer(7, 20), "at {v} o'clock", True)),
               (("event_id", CODE), ("status", STATUS)), ("calendar", "event")),
        Action("reminder", ("set_reminder", "create_reminder", "remind_me"), "set a reminder",
               ("Set a reminder after some minutes.", "Create a reminder with a text."),
               ("Remind me {args}.", "Set a reminder {args}.", "Please create a reminder {args}."),
               (P("text message", _pool(NOTE_TEXTS), "to {v}"),
                P("minutes delay_minutes", _integer(5, 180), "in {v} minutes")),
               (("reminder_id", CODE), ("status", STATUS)), ("reminder", "remind")),
        Action("shopping", ("add_to_cart", "cart_add", "add_items"), "add items to the shopping cart",
               ("Add items to the shopping cart.", "Put products in the cart."),
               ("Add {args} to my cart.", "Put {args} in the shopping cart.", "Please add {args} to the cart."),
               (P("items products", _array(("apples", "notebooks", "pencils", "mugs", "lamps", "towels", "cables")),
                  "{v}"),),
               (("cart_size", COUNT), ("total", PRICE)), ("cart", "shopping")),
        Action("stocks", ("get_stock_price", "stock_quote", "lookup_stock"), "get a stock price",
               ("Get the latest price of a stock.", "Look up a stock quote by symbol."),
               ("What is the stock price of {args}?", "Get me a quote for {args}.", "How is {args} trading?"),
               (P("symbol ticker", _pool(SYMBOLS), "{v}"),),
               (("price", PRICE), ("change_percent", _integer(-9, 9))), ("stock", "quote")),
        Action("currency", ("convert_currency", "exchange_money", "currency_exchange"), "convert money",
               ("Convert an amount between currencies.", "Exchange money from one currency to another."),
               ("Convert {args}.", "Please change {args}.", "Exchange {args}, please."),
               (P("amount sum", MONEY, "{v}"), P("from_currency source", CURRENCY, "{v}"),
                P("to_currency target", CURRENCY, "into {v}")),
               (("converted", PRICE), ("rate", _integer(1, 150))), ("currency", "exchange")),
        Action("translation", ("translate_text", "translate", "text_translation"), "translate text",
               ("Translate a text into another language.", "Translate words to a target language."),
               ("Translate {args}.", "Please translate {args}.", "Translate {args}, please."),
               (P("text phrase", _pool(("good morning", "thank you very much", "where is the station",
                                         "see you tomorrow", "how much is it")), "'{v}'"),
                P("target_language language", LANGUAGE, "into {v}")),
               (("translation_id", CODE),), ("translate", "translation")),
        Action("music", ("play_song", "play_music", "start_track"), "play a song",
               ("Play a song by title.", "Start playing a music track."),
               ("Play {args}.", "Put on {args}.", "I want to hear {args}."),
               (P("title song", _pool(SONGS), "{v}"), P("shuffle", BOOLEAN, ("on shuffle", "without shuffle"), True)),
               (("status", STATUS), ("length_minutes", MINUTES)), ("song", "music", "track")),
        Action("news", ("get_headlines", "latest_news", "news_headlines"), "get news headlines",
               ("Get the latest news headlines on a topic.", "Fetch top news stories."),
               ("Show me the news {args}.", "Get headlines {args}.", "What's new {args}?"),
               (P("topic section", _enum(("sports", "science", "business", "politics", "travel")), "about {v}"),
                P("count limit", _integer(1, 10), "({v} stories)", True)),
               (("stories", COUNT), ("top_story_id", CODE)), ("news", "headlines")),
        Action("parcel", ("track_package", "parcel_status", "track_shipment"), "track a package",
               ("Track a package by its tracking number.", "Get the status of a shipment."),
               ("Where is my package {args}?", "Track the parcel {args}.", "Check shipment {args}."),
               (P("tracking_number tracking_id", TRACKING, "{v}"),),
               (("status", _enum(("in transit", "delivered", "at the depot"))), ("days_left", _integer(0, 7))),
               ("package", "parcel", "shipment")),
        Action("bank", ("transfer_money", "send_payment", "bank_transfer"), "transfer money",
               ("Transfer money to a person.", "Send a bank payment to someone."),
               ("Transfer {args}.", "Send {args}.", "Pay {args}, please."),
               (P("amount", MONEY, "{v} dollars"), P("recipient payee to", PERSON, "to {v}")),
               (("transaction_id", CODE), ("balance", PRICE)), ("transfer", "payment", "bank")),
        Action("fitness", ("log_workout", "record_exercise", "add_workout"), "log a workout",
               ("Log a workout with its length.", "Record an exercise session."),
               ("Log {args}.", "Record a workout: {args}.", "I did {args}, please log it."),
               (P("activity exercise", _enum(("running", "cycling", "swimming", "yoga", "rowing")), "{v}"),
                P("minutes duration", _integer(10, 120), "for {v} minutes")),
               (("calories", _integer(50, 900)), ("streak_days", _integer(1, 30))), ("workout", "exercise")),
        Action("recipes", ("find_recipe", "search_recipes", "recipe_lookup"), "find a recipe",
               ("Find recipes that use some ingredients.", "Search recipes by ingredient."),
               ("Find a recipe with {args}.", "What can I cook with {args}?", "Search recipes using {args}."),
               (P("ingredients", _array(INGREDIENTS), "{v}"),
                P("vegetarian veggie", BOOLEAN, ("(vegetarian)", "(meat is fine)"), True)),
               (("recipes", COUNT), ("best_match_id", CODE)), ("recipe", "recipes", "cook")),
        Action("cinema", ("book_movie_tickets", "buy_cinema_tickets", "movie_tickets"), "buy cinema tickets",
               ("Buy tickets for a film at the cinema.", "Book movie tickets."),
               ("Book {args}.", "Get me cinema tickets: {args}.", "I'd like movie tickets, {args}."),
               (P("tickets seats", _integer(1, 8), "{v} tickets"), P("movie film", _pool(MOVIES), "for {v}")),
               (("booking_code", CODE), ("total", PRICE)), ("movie", "cinema", "film")),
        Action("trains", ("train_times", "find_trains", "rail_schedule"), "find train times",
               ("Find train departures between two cities.", "Look up rail connections."),
               ("When are the trains {args}?", "Find trains {args}.", "Show rail times {args}."),
               (P("from_station origin", TRAIN_CITY, "from {v}"), P("to_station destination", TRAIN_CITY, "to {v}")),
               (("next_departure", CLOCK), ("trains_today", COUNT)), ("train", "trains", "rail")),
        Action("thermostat", ("set_thermostat", "set_temperature", "heating_control"), "set the thermostat",
               ("Set the thermostat of a room.", "Change the heating temperature in a room."),
               ("Set the {args}.", "Please heat the {args}.", "Change the heating: {args}."),
               (P("room", ROOM, "{v}"), P("degrees target", _integer(15, 28), "to {v} degrees")),
               (("status", STATUS),), ("thermostat", "heating")),
        Action("lights", ("toggle_lights", "set_lights", "light_switch"), "switch the lights",
               ("Switch the lights of a room on or off.", "Turn room lights on or off."),
               ("Turn the lights {args}.", "Lights {args}, please.", "Switch the lamps {args}."),
               (P("room area", ROOM, "in the {v}"), P("on power", BOOLEAN, ("on", "off"))),
               (("status", STATUS),), ("lights", "lamps", "light")),
        Action("dictionary", ("define_word", "dictionary_lookup", "word_definition"), "define a word",
               ("Look up the meaning of a word.", "Give a dictionary definition."),
               ("What does {args} mean?", "Define {args}.", "Look up the word {args}."),
               (P("word term", _pool(WORDS_TO_DEFINE), "{v}"),),
               (("definitions", _integer(1, 5)), ("entry_id", CODE)), ("dictionary", "define", "word")),
        Action("sports", ("get_score", "match_result", "latest_score"), "get a team's latest score",
               ("Get the latest match score of a team.", "Look up a sports result."),
               ("What was the score of {args}?", "How did {args} do?", "Latest result for {args}, please."),
               (P("team club", _pool(TEAMS), "{v}"),),
               (("goals_for", _integer(0, 6)), ("goals_against", _integer(0, 6))), ("score", "match", "team")),
        Action("car_rental", ("rent_car", "car_rental", "book_rental_car"), "rent a car",
               ("Rent a car in a city for some days.", "Book a rental car."),
               ("Rent a car {args}.", "I need a rental car {args}.", "Book me a car {args}."),
               (P("city pickup_city", TRAIN_CITY, "in {v}"), P("days", _integer(1, 21), "for {v} days"),
                P("automatic", BOOLEAN, ("with automatic gears", "with manual gears"), True)),
               (("booking_code", CODE), ("price", PRICE)), ("car", "rental")),
        Action("doctor", ("book_appointment", "schedule_checkup", "doctor_appointment"), "book a doctor's appointment",
               ("Book an appointment with a doctor.", "Schedule a medical checkup."),
               ("Book a doctor's appointment {args}.", "I need to see a doctor {args}.", "Schedule a checkup {args}."),
               (P("doctor physician", PERSON, "with Dr. {v}"), P("day", WEEKDAY, "on {v}"),
                P("time", CLOCK, "at {v}", True)),
               (("appointment_id", CODE), ("status", STATUS)), ("doctor", "appointment", "checkup")),
        Action("notes", ("create_note", "add_note", "save_note"), "save a note",
               ("Save a note with tags.", "Create a new note."),
               ("Make a note {args}.", "Save a note {args}.", "Note this down {args}."),
               (P("text content", _pool(NOTE_TEXTS), "to {v}"), P("tags labels", _array(TAGS), "tagged {v}", True)),
               (("note_id", CODE),), ("note", "notes")),
        Action("todo", ("add_task", "create_todo", "todo_add"), "add a task to the to-do list",
               ("Add a task to the to-do list.", "Create a to-do item with a priority."),
               ("Add a task {args}.", "Put {args} on my to-do list.", "New to-do: {args}."),
               (P("task title", _pool(NOTE_TEXTS), "to {v}"), P("priority", PRIORITY, "with {v} priority"),
                P("due_day due", WEEKDAY, "due {v}", True)),
               (("task_id", CODE), ("open_tasks", COUNT)), ("task", "todo")),
        Action("contacts", ("lookup_contact", "find_contact", "contact_search"), "look up a contact",
               ("Find a person in the address book.", "Look up someone's contact details."),
               ("Find the contact {args}.", "Look up {args} in my contacts.", "What are the details of {args}?"),
               (P("name person", PERSON, "{v}"),),
               (("phone", CODE), ("city", CITY)), ("contact", "contacts")),
        Action("parking", ("find_parking", "parking_search", "reserve_parking"), "find a parking spot",
               ("Find a parking spot in a city for some hours.", "Reserve parking."),
               ("Find parking {args}.", "I need a parking spot {args}.", "Reserve a parking place {args}."),
               (P("city area", TRAIN_CITY, "in {v}"), P("hours duration_hours", _integer(1, 12), "for {v} hours")),
               (("spots", COUNT), ("price", PRICE)), ("parking",)),
        Action("support", ("open_ticket", "create_support_ticket", "report_issue"), "open a support ticket",
               ("Open a support ticket about a problem.", "Report an issue to support."),
               ("Open a support ticket {args}.", "Report {args} to support.", "File a ticket {args}."),
               (P("subject issue", _pool(SUBJECTS), "about a {v}"),
                P("severity level", _enum(("minor", "major", "critical")), "({v})")),
               (("ticket_id", CODE), ("status", STATUS)), ("ticket", "support", "issue")),
    )


def _heldout_actions() -> tuple[Action, ...]:
    return (
        # the probe: get_weather(city), asked "What's the weather like in Paris right now?"
        Action("weather", ("get_weather", "current_weather", "weather_now"), "know the current weather",
               ("Get the current weather for a city.", "Current weather conditions in a city."),
               ("What's the weather like {args} right now?", "How is the weather {args}?",
                "Tell me the current weather {args}."),
               (P("city location", CITY, "in {v}"),),
               (("temperature", TEMPERATURE), ("condition", CONDITION)), ("weather",)),
        Action("forecast", ("get_forecast", "weather_forecast", "forecast_days"), "get a weather forecast",
               ("Forecast the weather in a city for the next days.", "Multi-day weather forecast."),
               ("What's the forecast {args}?", "Give me the forecast {args}.", "Forecast {args}, please."),
               (P("city place", CITY, "for {v}"), P("days num_days", _integer(1, 7), "over the next {v} days")),
               (("high", TEMPERATURE), ("low", TEMPERATURE)), ("forecast",)),
        Action("pizza", ("order_pizza", "pizza_order", "buy_pizza"), "order a pizza",
               ("Order a pizza with toppings.", "Place a pizza delivery order."),
               ("Order a pizza, {args}.", "I want a pizza: {args}.", "Get me a pizza, {args}, please."),
               (P("size", _enum(("small", "medium", "large")), "{v}"),
                P("toppings extras", _array(TOPPINGS), "with {v}", True)),
               (("order_number", CODE), ("minutes", MINUTES)), ("pizza",)),
        Action("vet", ("book_vet_visit", "vet_visit", "pet_clinic_visit"), "book a vet visit",
               ("Book a visit at the vet for a pet.", "Schedule a pet checkup at the veterinarian."),
               ("Book a vet visit {args}.", "My pet needs the vet {args}.", "Schedule the vet {args}."),
               (P("pet_name pet", _pool(PET_NAMES), "for {v}"),
                P("species animal", _enum(("dog", "cat", "rabbit", "parrot")), "(a {v})"),
                P("day", WEEKDAY, "on {v}")),
               (("visit_id", CODE), ("status", STATUS)), ("vet", "pet", "veterinarian")),
        Action("ferry", ("ferry_schedule", "find_ferry", "ferry_departures"), "find ferry departures",
               ("Ferry departures from a port.", "Look up ferry sailings from a harbour."),
               ("When does the ferry leave {args}?", "Find a ferry {args}.", "Ferry times {args}, please."),
               (P("port harbour", CITY, "from {v}"), P("day", WEEKDAY, "on {v}", True)),
               (("next_sailing", CLOCK), ("sailings", COUNT)), ("ferry", "sailing", "port")),
        Action("laundry", ("start_laundry", "run_washing_machine", "laundry_cycle"), "start the washing machine",
               ("Start a washing machine program.", "Run a laundry cycle at a temperature."),
               ("Start a wash: {args}.", "Run the washing machine: {args}.", "Do a laundry cycle, {args}."),
               (P("program cycle", _enum(("cotton", "delicate", "quick", "wool")), "{v}"),
                P("temperature degrees", _integer(20, 90), "at {v} degrees")),
               (("done_in_minutes", MINUTES),), ("laundry", "wash", "washing")),
        Action("garden", ("water_garden", "garden_sprinkler", "irrigate_garden"), "water the garden",
               ("Water a garden zone for some minutes.", "Run the garden sprinklers."),
               ("Water the {args}.", "Turn on the sprinklers for the {args}.", "Irrigate the {args}."),
               (P("zone bed", _enum(("lawn", "roses", "vegetables", "hedge")), "{v}"),
                P("minutes duration", _integer(5, 60), "for {v} minutes")),
               (("litres", _integer(10, 400)),), ("garden", "sprinkler", "irrigate")),
        Action("podcast", ("play_podcast", "podcast_episode", "listen_podcast"), "play a podcast episode",
               ("Play an episode of a podcast.", "Start a podcast episode."),
               ("Play {args}.", "Put on the podcast {args}.", "I want to listen to {args}."),
               (P("show podcast", _pool(SHOWS), "{v}"), P("episode number", _integer(1, 250), "episode {v}")),
               (("length_minutes", MINUTES),), ("podcast", "episode")),
        Action("museum", ("museum_entry", "buy_museum_entry", "museum_visit"), "buy museum tickets",
               ("Buy entry tickets for a museum.", "Book a museum visit."),
               ("Get tickets for {args}.", "Buy entry to {args}.", "Book a visit to {args}."),
               (P("venue museum", _pool(MUSEUMS), "the {v}"), P("visitors people", _integer(1, 9), "for {v} visitors"),
                P("guided_tour guided", BOOLEAN, ("with a guided tour", "without a tour"), True)),
               (("entry_code", CODE), ("total", PRICE)), ("museum", "gallery")),
        Action("insurance", ("insurance_premium", "get_insurance_premium", "insure_vehicle"),
               "get a car insurance quote",
               ("Quote car insurance for a car and driver.", "Get a price for car insurance."),
               ("How much is insurance {args}?", "Get an insurance quote {args}.", "Quote insurance {args}."),
               (P("vehicle auto", _object({"make": _pool(CAR_MAKES), "year": _integer(2005, 2026)}),
                  "for a {year} {make}"), P("driver_age age", _integer(18, 80), "for a driver aged {v}")),
               (("yearly_premium", PRICE),), ("insurance", "premium")),
        Action("bikes", ("rent_bike", "bike_share", "reserve_bicycle"), "rent a bicycle",
               ("Rent a bicycle in a city for some hours.", "Reserve a shared bike."),
               ("Rent a bike {args}.", "I need a bicycle {args}.", "Reserve a bike {args}."),
               (P("city", CITY, "in {v}"), P("hours", _integer(1, 10), "for {v} hours"),
                P("electric e_bike", BOOLEAN, ("(electric)", "(not electric)"), True)),
               (("bike_code", CODE), ("price", PRICE)), ("bike", "bicycle")),
    )


TRAIN_ACTIONS: tuple[Action, ...] = _train_actions()
HELDOUT_ACTIONS: tuple[Action, ...] = _heldout_actions()
TRAIN_DOMAINS: frozenset[str] = frozenset(a.domain for a in TRAIN_ACTIONS)


def words_of(action: Action) -> set[str]:
    """The lower-case words of an action's names, purpose, descriptions, requests and keywords."""
    text = " ".join([*action.names, action.purpose, *action.descriptions, *action.requests, *action.keywords])
    return set(re.findall(r"[a-z]+", text.lower().replace("_", " ").replace("{args}", " ")))


# no made-up word (made_up_words.py) may be one of these: the held-out vocabulary stays unseen
HELDOUT_WORDS: frozenset[str] = frozenset().union(*(words_of(a) for a in HELDOUT_ACTIONS))
HELDOUT_DOMAINS: frozenset[str] = frozenset(a.domain for a in HELDOUT_ACTIONS)


def name_forms(snake: str) -> tuple[str, str, str]:
    """The spellings a generated tool name may take: book_hotel, bookHotel, book-hotel."""
    head, *rest = snake.split("_")
    return snake, head + "".join(w.capitalize() for w in rest), snake.replace("_", "-")


def all_names(actions: tuple[Action, ...]) -> frozenset[str]:
    return frozenset(form for a in actions for n in a.names for form in name_forms(n))


TRAIN_TOOL_NAMES: frozenset[str] = all_names(TRAIN_ACTIONS)
HELDOUT_TOOL_NAMES: frozenset[str] = all_names(HELDOUT_ACTIONS)
