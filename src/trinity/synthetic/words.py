"""Word lists and small fact tables for the synthetic corpus, written for this project.

Everything the generators say comes from here or from numbers they draw, so the corpus is licence-clean.
The tables are deliberately small: a ~5M-parameter model has to be able to learn all of them.
"""

from __future__ import annotations

FIRST_NAMES: tuple[str, ...] = (
    "Mara", "Tomas", "Ines", "Kofi", "Lena", "Ravi", "Sofia", "Jonas", "Amara", "Pedro", "Yuki", "Nadia", "Omar",
    "Elsa", "Hugo", "Priya", "Lucas", "Zara", "Felix", "Ada", "Mateo", "Hana", "Ivan", "Leila", "Noah", "Greta",
    "Samir", "Clara", "Diego", "Freya", "Arjun", "Mina", "Oscar", "Rosa", "Emil", "Tara", "Bruno", "Lina", "Kai",
    "Vera",
)
LAST_NAMES: tuple[str, ...] = (
    "Quinn", "Silva", "Novak", "Mensah", "Berg", "Patel", "Rossi", "Weber", "Okafor", "Costa", "Tanaka", "Haddad",
    "Larsen", "Moreau", "Kumar", "Fischer", "Rahman", "Lopez", "Ivanova", "Nilsson", "Sato", "Duarte", "Keller",
    "Abara", "Hoffman", "Reyes", "Lind", "Varga", "Chen", "Mbeki",
)

# Real countries and capitals (facts, not text); also the cities the tools talk about.
CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin", "Hungary": "Budapest", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Ghana": "Accra", "Nigeria": "Abuja", "Morocco": "Rabat", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Mexico": "Mexico City",
    "Canada": "Ottawa", "Australia": "Canberra", "Turkey": "Ankara", "Iceland": "Reykjavik",
    "Netherlands": "Amsterdam", "Belgium": "Brussels", "Czechia": "Prague", "Indonesia": "Jakarta",
    "South Korea": "Seoul", "Brazil": "Brasilia", "Cuba": "Havana",
}

CITIES: tuple[str, ...] = (
    "Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Warsaw", "Vienna",
    "Athens", "Dublin", "Budapest", "Cairo", "Nairobi", "Accra", "Tokyo", "Beijing", "Bangkok", "Hanoi", "Lima",
    "Santiago", "Bogota", "Ottawa", "Canberra", "Ankara", "Reykjavik", "Amsterdam", "Brussels", "Prague", "Seoul",
    "Havana", "London", "New York", "Chicago", "Toronto", "Sydney", "Mumbai", "Istanbul", "Barcelona", "Munich",
    "Zurich", "Lagos", "Cape Town", "Osaka", "Denver", "Boston", "Porto", "Milan", "Seattle", "Vancouver",
    "Melbourne", "Dubai", "Singapore", "Manila", "Kyoto", "Hamburg", "Lyon", "Valencia",
)

# City -> IANA time zone, for get_time. Only cities whose zone is unambiguous.
TIMEZONES: dict[str, str] = {
    "Paris": "Europe/Paris", "Berlin": "Europe/Berlin", "Rome": "Europe/Rome", "Madrid": "Europe/Madrid",
    "Lisbon": "Europe/Lisbon", "Oslo": "Europe/Oslo", "London": "Europe/London", "Dublin": "Europe/Dublin",
    "Athens": "Europe/Athens", "Warsaw": "Europe/Warsaw", "Cairo": "Africa/Cairo", "Nairobi": "Africa/Nairobi",
    "Lagos": "Africa/Lagos", "Tokyo": "Asia/Tokyo", "Seoul": "Asia/Seoul", "Bangkok": "Asia/Bangkok",
    "Singapore": "Asia/Singapore", "Dubai": "Asia/Dubai", "Mumbai": "Asia/Kolkata", "New York": "America/New_York",
    "Chicago": "America/Chicago", "Denver": "America/Denver", "Toronto": "America/Toronto", "Lima": "America/Lima",
    "Sydney": "Australia/Sydney",
}

WEATHER_CONDITIONS: tuple[str, ...] = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy")

# Short definitions, in this project's own words.
DEFINITIONS: dict[str, str] = {
    "a planet": "a large body that orbits a star",
    "a river": "a stream of fresh water that flows to a sea or a lake",
    "a library": "a place that lends books to its members",
    "a verb": "a word that names an action or a state",
    "a noun": "a word that names a person, place or thing",
    "an island": "a piece of land with water all around it",
    "a bridge": "a structure that carries a road or a path over an obstacle",
    "a recipe": "a list of steps and ingredients for making a dish",
    "a battery": "a device that stores energy and gives it out as electricity",
    "a volcano": "a mountain where hot rock from deep below comes to the surface",
    "a desert": "a dry area that gets very little rain",
    "a compass": "a tool whose needle points north",
    "a prime number": "a whole number above 1 that only 1 and itself divide",
    "an even number": "a whole number that 2 divides exactly",
    "a triangle": "a flat shape with three straight sides",
    "a square": "a flat shape with four equal sides and four right angles",
    "a week": "a period of seven days",
    "a century": "a period of one hundred years",
    "a mammal": "an animal that feeds its young with milk",
    "photosynthesis": "the way plants turn light, water and air into sugar",
    "gravity": "the pull that bodies with mass have on each other",
    "a thermometer": "a tool that measures temperature",
    "an orchestra": "a large group of musicians playing together",
    "a glacier": "a slow river of ice",
    "a password": "a secret word that proves who you are",
    "a map": "a drawing of an area seen from above",
    "an algorithm": "a list of exact steps that solves a problem",
    "a function": "a rule that gives one output for each input",
    "a server": "a computer program that answers requests from other programs",
    "a tokenizer": "a tool that splits text into pieces a model can read",
}

OPPOSITES: dict[str, str] = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed", "early": "late", "light": "dark",
    "happy": "sad", "old": "new", "full": "empty", "long": "short", "high": "low", "strong": "weak", "wet": "dry",
    "loud": "quiet", "easy": "hard", "near": "far", "first": "last", "rich": "poor", "clean": "dirty",
}

# Sentiment sentences: a subject and an adjective with a label and how sure we are of it.
SENTIMENT_SUBJECTS: tuple[str, ...] = (
    "The food", "The movie", "The hotel room", "The service", "The new phone", "The concert", "The book",
    "The train ride", "The coffee", "The game", "The weather today", "The class", "The delivery", "The app",
)
SENTIMENT_WORDS: dict[str, tuple[str, float]] = {
    "wonderful": ("positive", 0.95), "excellent": ("positive", 0.95), "great": ("positive", 0.9),
    "lovely": ("positive", 0.9), "good": ("positive", 0.8), "pleasant": ("positive", 0.75),
    "terrible": ("negative", 0.95), "awful": ("negative", 0.95), "bad": ("negative", 0.85),
    "disappointing": ("negative", 0.85), "boring": ("negative", 0.8), "too slow": ("negative", 0.75),
    "okay": ("neutral", 0.7), "average": ("neutral", 0.7), "fine": ("neutral", 0.65), "as expected": ("neutral", 0.6),
}

ITEMS: tuple[str, ...] = (
    "apples", "notebooks", "pencils", "mugs", "tickets", "lamps", "shirts", "books", "plates", "candles", "chairs",
    "batteries", "cables", "towels", "bottles of water",
)
EVENTS: tuple[str, ...] = ("meeting", "concert", "dinner", "lecture", "football match", "party", "interview",
                           "workshop", "birthday party", "team call")
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

SEARCH_TOPICS: tuple[str, ...] = (
    "opening hours of the city museum", "best coffee shops", "train times to the airport", "history of the old bridge",
    "public holidays", "bike rental prices", "farmers market days", "swimming pools", "night buses",
    "library events", "parking rules", "recycling days", "cheap restaurants", "hiking trails", "jazz clubs",
)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are Trinity Tiny, a small helpful assistant.",
    "Answer briefly and exactly.",
    "You are a friendly assistant. Keep answers short.",
)
