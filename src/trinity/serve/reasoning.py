"""Reasoning parsers: split generated text into reasoning (``<think>...</think>``) and content.

One parser instance per generated sequence. ``feed`` takes text deltas and returns
``(reasoning_delta, content_delta)``; a tag split across deltas is held back until it is decided.
``extract`` does the same for a whole response at once; streaming always reproduces it exactly
(``extract``'s ``None`` reasoning corresponds to a stream that emitted no reasoning text).

Rules shared by the ``<think>`` parsers:

* At most one reasoning block. Outside it, reasoning starts only at an explicit ``<think>`` (text before
  it is content); once ``</think>`` closes the block, everything after it is content, tags included.
* The single newline right after ``<think>`` and right after ``</think>`` belongs to neither part.
* When the generation starts inside the reasoning (the prompt ended with the ``<think>\\n`` prefill),
  a redundant ``<think>`` that the model writes before any non-blank reasoning is swallowed, together
  with the blank text before it.
* A block that never closes is all reasoning; the content is then only what came before ``<think>``.
* Reasoning that is blank (empty after ``str.strip``) is reported as ``None`` by ``extract``; while
  streaming, blank reasoning is held back until non-blank reasoning text arrives, and dropped if none does.

Pure Python, no server dependencies.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_BEFORE, _REASONING, _AFTER = 0, 1, 2


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """The "trinity" parser: ``<think>...</think>``, optionally prefilled by the chat template."""

    name = "trinity"

    def __init__(self, starts_in_reasoning: bool):
        self._state = _REASONING if starts_in_reasoning else _BEFORE
        # a redundant opening tag is swallowed only when the generation starts inside the reasoning
        self._open_allowed = self._state == _REASONING
        self._skip_newline = False
        self._held = ""          # undecided text (a possible partial tag)
        self._blank = ""         # blank reasoning not yet emitted
        self._started = False    # some non-blank reasoning has been emitted

    # -- streaming ------------------------------------------------------------------------------------

    def feed(self, delta: str) -> tuple[str, str]:
        buf = self._held + delta
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while buf:
            if self._skip_newline:
                self._skip_newline = False
                buf = buf.removeprefix("\n")
                continue
            if self._state == _AFTER:
                content.append(buf)
                break
            if self._state == _BEFORE:
                i = buf.find(THINK_OPEN)
                if i >= 0:
                    content.append(buf[:i])
                    buf = buf[i + len(THINK_OPEN):]
                    self._state, self._skip_newline = _REASONING, True
                    continue
                keep = _partial_suffix(buf, THINK_OPEN)
                content.append(buf[:len(buf) - keep])
                self._held = buf[len(buf) - keep:]
                break
            # inside the reasoning
            if self._open_allowed:
                stripped = buf.lstrip()
                if not stripped:                      # still blank: it is blank reasoning so far
                    self._emit_reasoning(buf, reasoning)
                    break
                if stripped.startswith(THINK_OPEN):   # redundant opening tag: swallow it and the blank
                    self._blank = ""
                    self._open_allowed = False
                    buf = stripped[len(THINK_OPEN):]
                    self._skip_newline = True
                    continue
                if THINK_OPEN.startswith(stripped):   # could still become the opening tag
                    self._held = buf
                    break
                self._open_allowed = False
            i = buf.find(THINK_CLOSE)
            if i >= 0:
                self._emit_reasoning(buf[:i], reasoning)
                self._blank = ""                      # blank reasoning is dropped
                buf = buf[i + len(THINK_CLOSE):]
                self._state, self._skip_newline = _AFTER, True
                continue
            keep = _partial_suffix(buf, THINK_CLOSE)
            self._emit_reasoning(buf[:len(buf) - keep], reasoning)
            self._held = buf[len(buf) - keep:]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state == _REASONING:
            out: list[str] = []
            self._emit_reasoning(held, out)
            self._blank = ""
            return "".join(out), ""
        return "", held

    def _emit_reasoning(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if self._started:
            out.append(text)
        elif text.strip():
            out.append(self._blank + text)
            self._blank = ""
            self._started = True
        else:
            self._blank += text

    # -- whole response -------------------------------------------------------------------------------

    @classmethod
    def extract(cls, text: str, starts_in_reasoning: bool) -> tuple[str | None, str]:
        """Split a whole response: ``(reasoning or None when there was none/only blank, content)``."""
        content = ""
        if starts_in_reasoning:
            rest = text
            stripped = text.lstrip()
            if stripped.startswith(THINK_OPEN):
                rest = stripped[len(THINK_OPEN):].removeprefix("\n")
        else:
            i = text.find(THINK_OPEN)
            if i < 0:
                return None, text
            content = text[:i]
            rest = text[i + len(THINK_OPEN):].removeprefix("\n")
        j = rest.find(THINK_CLOSE)
        if j < 0:
            reasoning = rest
        else:
            reasoning = rest[:j]
            content += rest[j + len(THINK_CLOSE):].removeprefix("\n")
        return (reasoning if reasoning.strip() else None), content


class DeepSeekR1ReasoningParser(ReasoningParser):
    """R1-style models often omit the opening tag: the output always starts inside the reasoning
    (a leading explicit ``<think>`` is swallowed)."""

    name = "deepseek_r1"

    def __init__(self, starts_in_reasoning: bool = True):
        super().__init__(True)

    @classmethod
    def extract(cls, text: str, starts_in_reasoning: bool = True) -> tuple[str | None, str]:
        return super().extract(text, True)


class NoReasoningParser(ReasoningParser):
    """Everything is content."""

    name = "none"

    def __init__(self, starts_in_reasoning: bool = False):
        super().__init__(False)

    def feed(self, delta: str) -> tuple[str, str]:
        return "", delta

    def flush(self) -> tuple[str, str]:
        return "", ""

    @classmethod
    def extract(cls, text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
        return None, text


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "trinity": ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "none": NoReasoningParser,
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: "
                         + ", ".join(sorted(REASONING_PARSERS))) from None
