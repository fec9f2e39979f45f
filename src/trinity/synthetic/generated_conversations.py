"""Conversations with generated tools (generated_tools.py), one maker per behaviour, each drawn from a given set
of actions: the training actions for training families, the held-out actions for the "unseen tools" families.

- call: one request, the matching tool among 2-6 (distractors included), the call, its result (or an error) and
  an answer that reports it;
- parallel: two requests in one message, two calls in one assistant turn, two results, one answer;
- none: a request no offered tool can do (or a plain question): no call, a direct answer;
- forced: tool_choice "required" or a named tool (the request says so in `meta["tool_choice"]`, which the
  evaluator sends; the system message often says so too): the call is mandatory;
- tool list: "Which tools do you have?", answered with every offered name and description in order (off in the
  default mixes: a probe of the long-range copy from the tool list).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from .example import Checkpoint, Example, assistant, maybe_system, system, tool_result, user
from .generated_backend import run_generated_tool
from .generated_tools import Call, draw_call, lower_first, make_tool, offered
from .made_up_tools import made_up_pool
from .plain import draw_plain
from .tool_domains import Action

# domains close enough that "none of my tools can do that" would be arguable if one were offered
RELATED: tuple[frozenset[str], ...] = (frozenset({"reminder", "todo", "notes", "calendar"}),
                                       frozenset({"weather", "forecast"}), frozenset({"flight", "trains"}),
                                       frozenset({"taxi", "car_rental", "bikes"}))
REQUIRED_SYSTEM = ("Always answer by calling one of the tools.", "You must call a tool for every request.",
                   "Reply only with a tool call.")
NAMED_SYSTEM = ("Use the {name} tool.", "Answer by calling {name}.", "Always call {name}.")


def calls_turn(reasoning: str, calls: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """An assistant turn with one or more calls (example.assistant makes single calls the same way)."""
    message = assistant(reasoning)
    message["tool_calls"] = [{"id": call_id, "type": "function",
                              "function": {"name": name, "arguments": json.dumps(arguments)}}
                             for call_id, name, arguments in calls]
    return message


def _words(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def read_result(name: str, result: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(reasoning, a sentence for the answer, strings the answer must hold) for one tool result."""
    if "error" in result:
        error = result["error"]
        return f"{name} returned an error: {error}.", f"Sorry, {name} failed: {error}.", [error]
    summary = ", ".join(f"{key.replace('_', ' ')} {_words(value)}" for key, value in result.items())
    return f"{name} returned {summary}.", f"From {name}: {summary}.", [_words(v) for v in result.values()]


def _call_answer_turns(messages: list[dict], calls: list[Call], day: int) -> list[str]:
    """The tool results and the answer after a turn that made `calls`; returns what the answer must hold."""
    reasons, sentences, must = [], [], []
    for n, call in enumerate(calls):
        result = run_generated_tool(call.tool.name, call.arguments, day, call.tool.action.results)
        messages.append(tool_result(f"call_{n}", result))
        reasoning, sentence, needles = read_result(call.tool.name, result)
        reasons.append(reasoning)
        sentences.append(sentence)
        must += needles
    messages.append(assistant(" ".join(reasons), " ".join(sentences)))
    return must


def make_call(rng: random.Random, actions: tuple[Action, ...], family: str) -> Example:
    tool = make_tool(rng, rng.choice(actions))
    call = draw_call(rng, tool)
    day = rng.randint(0, 999)
    messages = [*maybe_system(rng, 0.2), user(call.text), calls_turn(call.reasoning(),
                                                                    [("call_0", tool.name, call.arguments)])]
    checkpoints = [Checkpoint(len(messages) - 1, "tool_call", {"name": tool.name, "arguments": call.arguments})]
    must = _call_answer_turns(messages, [call], day)
    checkpoints.append(Checkpoint(len(messages) - 1, "contains", {"contains": must}))
    return Example(family, messages, offered(rng, [tool], actions), checkpoints, {"day": day})


def make_parallel(rng: random.Random, actions: tuple[Action, ...], family: str) -> Example:
    """Two requests at once: two different tools, or one tool twice with other values."""
    if rng.random() < 0.7:
        first_action, second_action = rng.sample(actions, 2)
        tools = [make_tool(rng, first_action), make_tool(rng, second_action)]
    else:
        tools = [make_tool(rng, rng.choice(actions))] * 2
    first = draw_call(rng, tools[0])
    second = draw_call(rng, tools[1], opening=False)
    for _ in range(10):
        if second.arguments != first.arguments:
            break
        second = draw_call(rng, tools[1], opening=False)
    text = f"{first.text} {rng.choice(('Also, ', 'And ', 'Then '))}{lower_first(second.text)}"
    day = rng.randint(0, 999)
    reasoning = f"Two requests. First: {first.reasoning()} Second: {second.reasoning()} I will make both calls."
    calls = [("call_0", first.tool.name, first.arguments), ("call_1", second.tool.name, second.arguments)]
    messages = [*maybe_system(rng, 0.2), user(text), calls_turn(reasoning, calls)]
    expected = [{"name": name, "arguments": arguments} for _, name, arguments in calls]
    checkpoints = [Checkpoint(len(messages) - 1, "tool_calls", {"calls": expected})]
    must = _call_answer_turns(messages, [first, second], day)
    checkpoints.append(Checkpoint(len(messages) - 1, "contains", {"contains": must}))
    unique = tools if tools[0] is not tools[1] else tools[:1]
    return Example(family, messages, offered(rng, unique, actions), checkpoints, {"day": day})


def make_none(rng: random.Random, actions: tuple[Action, ...], family: str) -> Example:
    """No offered tool fits: a request for something none of them does, or a question the model answers."""
    messages = maybe_system(rng, 0.2)
    if rng.random() < 0.5:
        action = rng.choice(actions)
        call = draw_call(rng, make_tool(rng, action))
        avoid = frozenset({action.domain}.union(*(g for g in RELATED if action.domain in g)))
        tools = offered(rng, [], actions, avoid=avoid, legacy=False)
        names = ", ".join(t["function"]["name"] for t in tools)
        reasoning = (f"The user wants to {action.purpose}. None of the tools ({names}) does that, so I will not "
                     "call one.")
        messages += [user(call.text), assistant(reasoning, f"Sorry, none of my tools can {action.purpose}.")]
        must = ["none of my tools"]
    else:
        plain = draw_plain(rng)
        tools = offered(rng, [], actions)
        messages += [user(plain.question), assistant(f"No tool is needed for this. {plain.reasoning}", plain.answer)]
        must = plain.must_contain
    return Example(family, messages, tools, [Checkpoint(len(messages) - 1, "no_tool", {"contains": must})])


def make_forced(rng: random.Random, actions: tuple[Action, ...], family: str) -> Example:
    """tool_choice "required" or named: the server forces a call after the reasoning, so the reasoning must end
    knowing the tool and its arguments. Only the call is a checkpoint: the evaluator sends the task's
    tool_choice, which would force a call on the answer turn too."""
    tool = make_tool(rng, rng.choice(actions))
    call = draw_call(rng, tool)
    day = rng.randint(0, 999)
    if rng.random() < 0.5:
        choice: Any = "required"
        tools = offered(rng, [tool], actions)
        said, why = rng.choice(REQUIRED_SYSTEM), "A tool call is required. "
    else:
        choice = {"type": "function", "function": {"name": tool.name}}
        tools = offered(rng, [tool], actions, count=rng.randint(1, 4))
        said, why = rng.choice(NAMED_SYSTEM).format(name=tool.name), f"I must call {tool.name}. "
    # tool_choice itself never reaches the prompt: only a system message that says so lets the reasoning know
    messages, reasoning = ([system(said)], why + call.reasoning()) if rng.random() < 0.6 else ([], call.reasoning())
    messages += [user(call.text), calls_turn(reasoning, [("call_0", tool.name, call.arguments)])]
    checkpoints = [Checkpoint(len(messages) - 1, "tool_call", {"name": tool.name, "arguments": call.arguments})]
    _call_answer_turns(messages, [call], day)
    return Example(family, messages, tools, checkpoints, {"day": day, "tool_choice": choice})


LIST_QUESTIONS = ("Which tools do you have?", "What tools can you use?", "List your tools.",
                  "What can you do with your tools?", "Which functions are available?")


def make_tool_list(rng: random.Random, actions: tuple[Action, ...], family: str) -> Example:
    """The user asks which tools there are; the answer lists every offered name with its description, in the
    list's order. A copy of the whole tool list from the system turn, hundreds of tokens back: the long-range copy
    that calling an unseen tool needs (its name and keys are only in that list), asked for on its own."""
    tools = offered(rng, [], actions, count=rng.randint(2, 6))
    names = [t["function"]["name"] for t in tools]
    lines = [f"{name}: {t['function'].get('description', '')}" for name, t in zip(names, tools)]
    messages = [*maybe_system(rng, 0.2), user(rng.choice(LIST_QUESTIONS)),
                assistant(f"The user asks which tools I have. There are {len(tools)}: I list them in order.",
                          "I can use these tools:\n" + "\n".join(f"- {line}" for line in lines))]
    expected = {"contains": lines, "names": names}
    return Example(family, messages, tools, [Checkpoint(len(messages) - 1, "no_tool", expected)])


def family(maker: Callable[[random.Random, tuple[Action, ...], str], Example], actions: tuple[Action, ...],
           name: str, made_up: float = 0.0) -> Callable[[random.Random], Example]:
    """A corpus family (rng -> Example) from a maker, the actions it draws from and the family's name. In a
    `made_up` share of the conversations the maker draws from made-up actions mixed with a few of `actions`
    (made_up_tools.py), so names, keys and values must be copied from the prompt."""
    def make(rng: random.Random) -> Example:
        if made_up and rng.random() < made_up:
            return maker(rng, made_up_pool(rng, actions), name)
        return maker(rng, actions, name)
    make.__name__ = f"make_{name}"
    return make
