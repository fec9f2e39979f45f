"""The constraint a chat request decodes under, from its response_format, tool_choice and reasoning.

A reasoning model thinks before it answers, and a constrained request keeps the template's thinking prefill:
the reasoning is free, and the grammar applies from the token after the reasoning parser's end tag (`</think>`)
and the newline the template writes after it (as vLLM does with a reasoning parser and structured outputs).
The answer is then:

- response_format json_schema / json_object: that JSON, with `json.dumps`' separators (", ", ": "), the form
  models are trained to write;
- tool_choice "required" / named: Hermes tool-call blocks, `<tool_call>\\n{"name": NAME, "arguments": {...}}
  \\n</tool_call>`, the JSON a call of one offered tool (the named one) with arguments matching its parameters
  schema; exactly one block for a named tool or `parallel_tool_calls: false`, else one or more separated by
  newlines and ended by the stop token;
- tool_choice "auto" (with the hermes parser): free text, but once a `<tool_call>` block opens (while thinking
  or in the answer) the JSON inside must be a valid call of one of the tools.

The reasoning is closed (its end tag and the newline forced) after `thinking_token_budget` reasoning tokens
(vLLM's field), and for a constrained answer also early enough to leave `answer_reserve(room)` of the request's
max_tokens for the answer. While a constrained answer is still to come the stop tokens are held back, so the
sequence cannot end inside the reasoning. A request rendered without the prefill (`enable_thinking: false`) is
constrained from its first token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..engine.constraints import Chain, ForcedTokens, ReasoningGate, Repeat, Triggered
from .reasoning import THINK_CLOSE
from .structured import (
    MODEL_SEPARATORS,
    GrammarBackend,
    GrammarConstraintFactory,
    constraint_for_response_format,
    constraint_for_response_format_async,
)
from .tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, call_object_schema

Factory = Callable[[], object]

# The most a constrained answer is guaranteed: the reasoning stops this many tokens before max_tokens (at most
# half of max_tokens, so a short request still thinks). Enough for a JSON reply or a few tool calls; a longer
# answer needs a larger max_tokens or a thinking_token_budget.
ANSWER_RESERVE = 256


@dataclass(frozen=True, slots=True)
class ChatTokens:
    """The token ids of the markup the constraints force or watch for, in one tokenizer."""

    think_end: tuple[int, ...]
    newline: tuple[int, ...]
    call_open: tuple[int, ...]
    call_close: tuple[int, ...]
    stop: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> ChatTokens:
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text))

        return cls(ids(THINK_CLOSE), ids("\n"), ids(TOOL_CALL_OPEN), ids(TOOL_CALL_CLOSE),
                   tuple(sorted(tokenizer.eos_token_ids)))


def answer_reserve(room: int) -> int:
    return min(ANSWER_RESERVE, room // 2)


def reasoning_limit(budget: int | None, room: int | None, constrained: bool, closing: int) -> int | None:
    """The most reasoning tokens: the budget, and for a constrained answer what leaves it its reserve of `room`
    (the tokens the sequence may generate) after the `closing` tokens that end the reasoning. None: no limit."""
    limits = [] if budget is None else [budget]
    if constrained and room is not None:
        limits.append(max(0, room - answer_reserve(room) - closing))
    return min(limits) if limits else None


def json_answer(grammar: GrammarBackend, response_format: dict | None) -> GrammarConstraintFactory | None:
    """response_format -> the answer's JSON constraint (None for text); StructuredOutputError when unusable."""
    return constraint_for_response_format(grammar, response_format, separators=MODEL_SEPARATORS)


async def json_answer_async(grammar: GrammarBackend, response_format: dict | None) -> GrammarConstraintFactory | None:
    """`json_answer` for the event loop: compiled in a worker, within the backend's time limit."""
    return await constraint_for_response_format_async(grammar, response_format, separators=MODEL_SEPARATORS)


# a tool schema keyword the grammar cannot enforce is ignored rather than refused
_CALL_SCHEMA = dict(param="tools", best_effort=True, separators=MODEL_SEPARATORS)


def _call_json(grammar: GrammarBackend, tools: list[dict], name: str | None) -> GrammarConstraintFactory:
    return grammar.json_schema(call_object_schema(tools, name), **_CALL_SCHEMA)


async def _call_json_async(grammar: GrammarBackend, tools: list[dict], name: str | None) -> GrammarConstraintFactory:
    return await grammar.json_schema_async(call_object_schema(tools, name), **_CALL_SCHEMA)


def _call_blocks(call: Factory, tokens: ChatTokens, name: str | None, parallel: bool) -> Factory:
    block = partial(Chain, (partial(ForcedTokens, tokens.call_open + tokens.newline), call,
                            partial(ForcedTokens, tokens.newline + tokens.call_close)))
    if name is not None or not parallel:
        return block
    return partial(Repeat, block, tokens.newline, tokens.stop)


def _choice_name(choice: str | tuple) -> str | None:
    return choice[1] if isinstance(choice, tuple) else None


def tool_call_answer(grammar: GrammarBackend, tokens: ChatTokens, tools: list[dict], choice: str | tuple,
                     parallel: bool) -> Factory:
    """tool_choice "required" / ("named", NAME) -> Hermes call blocks (see the module doc)."""
    name = _choice_name(choice)
    return _call_blocks(_call_json(grammar, tools, name), tokens, name, parallel)


async def tool_call_answer_async(grammar: GrammarBackend, tokens: ChatTokens, tools: list[dict],
                                 choice: str | tuple, parallel: bool) -> Factory:
    """`tool_call_answer` for the event loop: compiled in a worker, within the backend's time limit."""
    name = _choice_name(choice)
    return _call_blocks(await _call_json_async(grammar, tools, name), tokens, name, parallel)


def _triggered_calls(call: Factory, tokens: ChatTokens) -> Factory:
    inside = partial(Chain, (partial(ForcedTokens, tokens.newline), call,
                             partial(ForcedTokens, tokens.newline + tokens.call_close)))
    return partial(Triggered, tokens.call_open, inside)


def auto_tool_calls(grammar: GrammarBackend, tokens: ChatTokens, tools: list[dict]) -> Factory | None:
    """tool_choice "auto": free text where each `<tool_call>` token starts a call's JSON (None when the tag is
    not one token: there is then nothing to trigger on)."""
    if len(tokens.call_open) != 1:
        return None
    return _triggered_calls(_call_json(grammar, tools, None), tokens)


async def auto_tool_calls_async(grammar: GrammarBackend, tokens: ChatTokens, tools: list[dict]) -> Factory | None:
    """`auto_tool_calls` for the event loop: compiled in a worker, within the backend's time limit."""
    if len(tokens.call_open) != 1:
        return None
    return _triggered_calls(await _call_json_async(grammar, tools, None), tokens)


def forces_calls(choice: str | tuple) -> bool:
    """Whether a parsed tool_choice ("required" or ("named", NAME)) makes the answer tool calls."""
    return choice == "required" or isinstance(choice, tuple)


def generation_constraint(tokens: ChatTokens, answer: Factory | None, auto_calls: Factory | None,
                          starts_in_reasoning: bool, budget: int | None, room: int | None) -> Factory | None:
    """A request's whole constraint from its compiled parts: after the reasoning when the reply starts in it,
    otherwise the answer's (or the auto calls') from the first token. The server and GRPO's rollouts both compose
    through here, so a rollout decodes as the served reply would."""
    if starts_in_reasoning:
        return reasoning_first(tokens, answer, auto_calls, budget, room)
    return answer or auto_calls


def reasoning_first(tokens: ChatTokens, answer: Factory | None, auto_calls: Factory | None, budget: int | None,
                    room: int | None) -> Factory | None:
    """The constraint of a generation that starts inside the reasoning: `answer` (a required JSON or tool-call
    answer) after it, `auto_calls` (tool-call blocks anywhere) during it and, without `answer`, after it too.
    None when nothing is constrained and no budget is set."""
    if answer is None and auto_calls is None and budget is None:
        return None
    required = answer is not None
    limit = reasoning_limit(budget, room, required, len(tokens.think_end) + len(tokens.newline))
    return partial(ReasoningGate, tokens.think_end, tokens.newline, answer=answer or auto_calls,
                   reasoning=auto_calls, limit=limit, hold_ids=tokens.stop if required else ())
