"""The fake backend of every generated tool: its result depends only on the tool's name, its arguments and the
conversation's `day` (like tools.py's backends), so `tools.run_tool` re-runs any call in the corpus and gets the
same result the conversation shows.

Now and then (ERROR_PERCENT of calls, decided by the same hash) a tool fails and returns `{"error": ...}`:
the conversations then show the assistant reporting the failure instead of inventing a result.
"""

from __future__ import annotations

import json
import random
import zlib
from typing import Any

from .tool_domains import HELDOUT_ACTIONS, TRAIN_ACTIONS, Action, Kind, name_forms

ERROR_PERCENT = 12
ERRORS: tuple[str, ...] = ("the service is unavailable", "no results were found", "the request was rejected",
                           "the server timed out", "the limit for today is reached")

ACTION_BY_NAME: dict[str, Action] = {form: action for action in TRAIN_ACTIONS + HELDOUT_ACTIONS
                                     for snake in action.names for form in name_forms(snake)}


def is_generated_tool(name: str) -> bool:
    return name in ACTION_BY_NAME


def run_generated_tool(name: str, arguments: dict[str, Any], day: int,
                       results: tuple[tuple[str, Kind], ...] | None = None) -> dict[str, Any]:
    """The result of one call; `results` (the result keys and kinds) defaults to the named action's, and a
    made-up tool (made_up_tools.py, not in ACTION_BY_NAME) passes MADE_UP_RESULTS."""
    if results is None:
        results = ACTION_BY_NAME[name].results
    # crc32 of the canonical call: the same in every process (str hash() is salted per run)
    h = zlib.crc32(f"{name}|{json.dumps(arguments, sort_keys=True)}|{day}".encode())
    rng = random.Random(h)
    if h % 100 < ERROR_PERCENT:
        return {"error": rng.choice(ERRORS)}
    return {key: kind.draw(rng) for key, kind in results}
