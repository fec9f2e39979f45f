"""One streamed chat completion, timed: what `trinity bench` records per request.

Any failure becomes an error kind on the record (`http_<status>`, `timeout`, `connection`, `stream_error`)
instead of an exception, so that a bad request never stops a load run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

try:  # the HTTP client the openai package is built on (renamed in newer releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - environments with the original name
    import httpx  # type: ignore[no-redef]


@dataclass(slots=True)
class RequestRecord:
    """Timings are seconds since the start of the run (`start`, `token_times`) or durations."""

    index: int
    prompt_index: int
    start: float
    level: int | None = None  # sweep: the concurrency this request ran at
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server says
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    error: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def end(self) -> float | None:
        return None if self.e2e is None else self.start + self.e2e

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output-carrying chunks."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return {"index": self.index, "prompt_index": self.prompt_index, "level": self.level, "start": self.start,
                "ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e, "output_tokens": self.output_tokens,
                "prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": self.cached_prompt_tokens,
                "chunks": len(self.token_times), "error": self.error,
                "error_message": self.error_message}


class StreamError(Exception):
    """The server answered 200 but the event stream was broken or carried an error event."""


class StreamReader:
    """Reads the `data:` lines of one chat-completion event stream and keeps what the timings need."""

    def __init__(self) -> None:
        self.chunk_tokens = 0  # chunks that carried output (content, reasoning or tool-call text)
        self.usage_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.cached_prompt_tokens: int | None = None
        self.done = False

    def feed(self, line: str) -> bool:
        """One line of the stream; True when it carried output. Raises StreamError on an error event."""
        if not line.startswith("data:"):
            return False  # blank separators, comments (": keep-alive"), `event:` lines
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return False
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            raise StreamError(f"undecodable event {payload[:80]!r}") from None
        if not isinstance(event, dict):
            raise StreamError(f"unexpected event {payload[:80]!r}")
        if "error" in event:
            err = event["error"]
            raise StreamError(str(err.get("message", err) if isinstance(err, dict) else err))
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage_tokens = usage.get("completion_tokens", self.usage_tokens)
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.cached_prompt_tokens = details["cached_tokens"]
        carried = any(_has_output(choice.get("delta") or {}) for choice in event.get("choices") or ())
        self.chunk_tokens += carried
        return carried

    @property
    def output_tokens(self) -> int:
        # usage is exact; one token per chunk is the fallback for servers that do not send it
        return self.usage_tokens if self.usage_tokens is not None else self.chunk_tokens


def _has_output(delta: dict) -> bool:
    # Our server and vLLM send the reasoning under `reasoning_content` (ours also under `reasoning`, same text).
    if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
        return True
    return any((call.get("function") or {}).get("arguments") or (call.get("function") or {}).get("name")
               for call in delta.get("tool_calls") or ())


def chat_body(model: str, prompt: str, max_tokens: int, temperature: float) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, record: RequestRecord,
                      clock_zero: float) -> RequestRecord:
    """POST `body` to `url` with streaming and fill `record` (never raises for request failures)."""
    reader = StreamReader()
    sent = time.perf_counter()
    streaming = False  # a network failure after the 200 is a broken stream, not a failed connection
    try:
        async with client.stream("POST", url, json=body) as response:
            streaming = response.status_code == 200
            if not streaming:
                text = (await response.aread()).decode("utf-8", "replace")
                record.error, record.error_message = f"http_{response.status_code}", _error_message(text)
                return record
            async for line in response.aiter_lines():
                if reader.feed(line):
                    now = time.perf_counter()
                    if record.ttft is None:
                        record.ttft = now - sent
                    record.token_times.append(now - clock_zero)
            if not reader.done:
                raise StreamError("the stream ended without [DONE]")
        record.e2e = time.perf_counter() - sent
        record.output_tokens = reader.output_tokens
        record.prompt_tokens = reader.prompt_tokens
        record.cached_prompt_tokens = reader.cached_prompt_tokens
    except StreamError as e:
        record.error, record.error_message = "stream_error", str(e)
    except httpx.TimeoutException as e:
        record.error, record.error_message = "timeout", type(e).__name__
    except (httpx.RemoteProtocolError, httpx.NetworkError) as e:
        record.error = "stream_error" if streaming else "connection"
        record.error_message = f"{type(e).__name__}: {e}"[:200]
    except httpx.HTTPError as e:
        record.error, record.error_message = "http_error", f"{type(e).__name__}: {e}"[:200]
    return record


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI-style body when there is one, else the start of the body."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    except (json.JSONDecodeError, AttributeError):
        pass
    return text[:300]
