"""The task families, their mixing weights, and the one rule that makes a corpus reproducible: example `i` of a
split is drawn from its own RNG seeded by `(seed, split, i)`, so it does not depend on any other example, on
the mix of the other families' counts, or on the process.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from .arithmetic import draw_problem, make_arithmetic, make_arithmetic_chain, question, solved_turn
from .example import Checkpoint, Example, assistant, maybe_system, user
from .json_replies import make_json_reply
from .plain import draw_plain, make_plain, make_plain_chain
from .tool_use import make_tool_follow_up, make_tool_not_needed, make_tool_use


def make_mixed_chain(rng: random.Random) -> Example:
    """A plain question, then an arithmetic one: switching task inside one conversation."""
    qa = draw_plain(rng)
    messages = [*maybe_system(rng), user(qa.question), assistant(qa.reasoning, qa.answer)]
    checkpoints = [Checkpoint(len(messages) - 1, "contains", {"contains": qa.must_contain})]
    a, op, b = draw_problem(rng)
    reply, value = solved_turn(a, op, b)
    messages += [user(question(rng, a, op, b)), reply]
    checkpoints.append(Checkpoint(len(messages) - 1, "arithmetic", {"answer": value}))
    return Example("mixed_chain", messages, None, checkpoints)


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": make_arithmetic,
    "arithmetic_chain": make_arithmetic_chain,
    "tool_use": make_tool_use,
    "tool_follow_up": make_tool_follow_up,
    "tool_not_needed": make_tool_not_needed,
    "json": make_json_reply,
    "plain": make_plain,
    "plain_chain": make_plain_chain,
    "mixed_chain": make_mixed_chain,
}

TRAIN_MIX: dict[str, float] = {"arithmetic": 0.25, "arithmetic_chain": 0.10, "tool_use": 0.24,
                               "tool_follow_up": 0.06, "tool_not_needed": 0.07, "json": 0.15, "plain": 0.07,
                               "plain_chain": 0.03, "mixed_chain": 0.03}
# The evaluation leans on the four things the issue measures: arithmetic, tool calls, JSON, closed thinking.
HELDOUT_MIX: dict[str, float] = {"arithmetic": 0.22, "arithmetic_chain": 0.07, "tool_use": 0.30,
                                 "tool_follow_up": 0.08, "tool_not_needed": 0.06, "json": 0.20, "plain": 0.03,
                                 "plain_chain": 0.02, "mixed_chain": 0.02}


def parse_mix(text: str | None, default: Mapping[str, float]) -> dict[str, float]:
    """'arithmetic=0.3,json=0.2' changes those weights and keeps the others; a weight of 0 drops a family."""
    mix = dict(default)
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in FAMILIES:
            raise ValueError(f"mix entry {part!r}: expected FAMILY=WEIGHT with FAMILY one of {', '.join(FAMILIES)}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"mix entry {part!r}: weight {value!r} is not a number") from None
        if weight < 0:
            raise ValueError(f"mix entry {part!r}: weights must be >= 0")
        mix[name] = weight
    if sum(mix.values()) <= 0:
        raise ValueError("the mix gives every family weight 0")
    return mix


def _rng(seed: int, split: str, index: int, attempt: int = 0) -> random.Random:
    # str seeds hash the same in every process (unlike hash()), so files are identical across runs
    return random.Random(f"trinity-synthetic:{seed}:{split}:{index}:{attempt}")


def family_at(seed: int, split: str, index: int, mix: Mapping[str, float]) -> str:
    names = [n for n, w in mix.items() if w > 0]
    return _rng(seed, split, index, -1).choices(names, [mix[n] for n in names])[0]


def example_at(seed: int, split: str, index: int, mix: Mapping[str, float], attempt: int = 0) -> Example:
    """Example `index` of `split`: the same arguments always give the same conversation. `attempt` redraws the
    conversation within the same family (the held-out set uses it to avoid prompts seen in training)."""
    return FAMILIES[family_at(seed, split, index, mix)](_rng(seed, split, index, attempt))
