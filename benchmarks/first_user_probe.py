"""The first thing a new user tries (issue 24): offer one tool of their own, `get_weather(city)`, and ask about the
weather in a city the built-in corpus never names (50 of them). Counts the replies that call the tool, and those
that call it with the city the user said (a model that learnt tools and cities by heart calls a city it knows instead).

    python benchmarks/first_user_probe.py                                  # the built-in model
    python benchmarks/first_user_probe.py --model out/tiny/grpo_json/export --model src/trinity/assets/trinity-tiny

Each model is served by `trinity serve` on 127.0.0.1 (tiny_eval.py's Server) and asked through the `openai`
client at temperature 0, with auto tool choice. Prints one line per model, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys

import openai

from tiny_eval import Server

# real cities, none of them in trinity/synthetic/words.py's CITIES (the corpus' only real city names). The first 10
# are the probe (`first_10` in the output); the other 40 make a difference of a few cities measurable.
CITIES = ("Krakow", "Marseille", "Nagoya", "Quito", "Tbilisi", "Valparaiso", "Winnipeg", "Gdansk", "Bergen",
          "Adelaide",
          "Antwerp", "Bordeaux", "Cordoba", "Dakar", "Edinburgh", "Florence", "Glasgow", "Hobart", "Innsbruck",
          "Jaipur", "Kampala", "Leipzig", "Luanda", "Montreal", "Naples", "Odessa", "Perth", "Riga", "Salzburg",
          "Tallinn", "Utrecht", "Vilnius", "Wellington", "Yokohama", "Zagreb", "Aarhus", "Bilbao", "Cusco", "Durban",
          "Eindhoven", "Fukuoka", "Granada", "Halifax", "Ibiza", "Juneau", "Kyiv", "Lhasa", "Mombasa", "Nantes",
          "Oaxaca")
FIRST = 10
GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}


def probe(base_url: str) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    replies = []
    for city in CITIES:
        message = client.chat.completions.create(
            model=model, temperature=0, max_tokens=256, tools=[GET_WEATHER],
            messages=[{"role": "user", "content": f"What's the weather like in {city} right now?"}]).choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        replies.append({"city": city, "calls": calls, "content": message.content})
    # replies are in CITIES' order, so the issue's 10 are the first replies
    return {**_tally(replies), "asked": len(CITIES), "first_10": _tally(replies[:FIRST]), "replies": replies}


def _tally(replies: list[dict]) -> dict:
    """Replies that call get_weather, those with the user's city, and those with the city then more letters
    ("Zagrebwhereb": a copy that did not stop)."""
    def cities(reply: dict) -> list[str | None]:
        return [_city(args) for name, args in reply["calls"] if name == "get_weather"]
    called = [r for r in replies if cities(r)]
    right = sum(r["city"] in cities(r) for r in called)
    whole = sum(any((c or "").startswith(r["city"]) for c in cities(r)) for r in called)
    return {"called": len(called), "right_city": right, "city_then_more": whole - right}


def _city(arguments: str) -> str | None:
    try:
        return json.loads(arguments).get("city")
    except (ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=None, help="checkpoint folder (repeat to compare)")
    args = p.parse_args(argv)
    results = {}
    for model in args.model or [None]:
        server = Server(model, [], startup_timeout=300)
        try:
            results[model or "built-in"] = probe(server.base_url)
        finally:
            server.stop()
        r = results[model or "built-in"]
        print(f"{model or 'built-in'}: called get_weather {r['called']}/{r['asked']}, right city {r['right_city']}/"
              f"{r['asked']} (the first 10: {r['first_10']['right_city']}), the city then more letters "
              f"{r['city_then_more']}", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
