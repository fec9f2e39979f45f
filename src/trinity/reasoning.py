"""Split a streamed completion into reasoning (inside <think>...</think>) and answer text."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Feed text deltas; get (reasoning_delta, content_delta) pairs.

    `starts_in_reasoning`: the prompt ended with the thinking prefill `<think>\\n`, so generated text begins
    inside the reasoning. A tag split across deltas is held back until it is complete; the newline the
    template writes after a tag belongs to neither part.
    """

    def __init__(self, starts_in_reasoning: bool = False):
        self.in_reasoning = starts_in_reasoning
        self._held = ""
        self._skip_newline = False

    def feed(self, text: str) -> tuple[str, str]:
        buf = self._held + text
        self._held = ""
        reasoning, content = [], []
        while buf:
            if self._skip_newline:
                self._skip_newline = False
                buf = buf.removeprefix("\n")
                continue
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            out = reasoning if self.in_reasoning else content
            i = buf.find(tag)
            if i >= 0:
                out.append(buf[:i])
                buf = buf[i + len(tag):]
                self.in_reasoning = not self.in_reasoning
                self._skip_newline = True
                continue
            keep = _partial_suffix(buf, tag)
            out.append(buf[:len(buf) - keep])
            self._held = buf[len(buf) - keep:]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.in_reasoning else ("", held)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
