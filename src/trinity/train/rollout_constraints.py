"""The decoding constraint of a GRPO task, the one the server would apply to the same chat request.

A task carries what a client would send: "tools", and "tool_choice" / "response_format" where it asks for a forced
call or a JSON answer. Served, such a request decodes under a constraint (serve/chat_constraints.py): the reasoning
free, then the forced calls or the JSON; under tool_choice "auto" every `<tool_call>` block is a valid call of an
offered tool. Rollouts sampled without it would be scored on replies the deployed model can never give (a named
tool that the prompt does not name, a misspelled tool name), so the reward would measure something else than the
evaluation does, and the tasks whose answer depends on the request's fields alone would be noise.

Needs the grammar library the server uses (xgrammar); `rollout_constraints = false` samples free text."""

from __future__ import annotations

from typing import Any

from ..serve.chat_constraints import ChatTokens, auto_tool_calls, forces_calls, generation_constraint, json_answer, \
    tool_call_answer
from ..serve.structured import GrammarBackend
from ..serve.tools import parse_tool_choice


class RolloutConstraints:
    """Constraint factories for tasks, over one tokenizer and model vocabulary (grammars compiled once, cached)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.tokens = ChatTokens.of(tokenizer)
        self._grammar: GrammarBackend | None = None

    @property
    def grammar(self) -> GrammarBackend:
        """Built on first use: tasks without tools or a response_format never need the grammar library."""
        if self._grammar is None:
            try:
                self._grammar = GrammarBackend(self.tokenizer, self.vocab_size)
            except RuntimeError as e:
                raise RuntimeError(f"{e}; or set rollout_constraints = false to sample rollouts as free text "
                                   "(rewards then score replies the server would have constrained)") from e
        return self._grammar

    def for_task(self, task: dict[str, Any], starts_in_reasoning: bool, max_tokens: int):
        """The factory the server would build for this request with max_tokens (None: free text), as `trinity
        serve --tool-call-parser hermes --enable-auto-tool-choice` with parallel calls allowed."""
        tools = task.get("tools") or None
        if not tools and not task.get("response_format"):
            return None
        choice = parse_tool_choice(task.get("tool_choice"), tools)
        answer = None
        if forces_calls(choice):
            answer = tool_call_answer(self.grammar, self.tokens, tools, choice, parallel=True)
        elif task.get("response_format"):
            answer = json_answer(self.grammar, task["response_format"])
        calls = auto_tool_calls(self.grammar, self.tokens, tools) if choice == "auto" and tools else None
        return generation_constraint(self.tokens, answer, calls, starts_in_reasoning, None, max_tokens)
