"""AsyncEngine: the engine stepping on a background thread, with an `async for` stream per request.

Requests are validated in the caller (so errors surface before any streaming starts), then handed to the
stepping thread through a queue; so are aborts. The thread owns the engine: nothing else mutates it.
Leaving a stream early (the consumer stops iterating or is cancelled) aborts its request and frees its blocks.

The thread only schedules and runs steps: it hands each request its step's delta (`request.CoreOutput`), and the
request's output processor (detokenizing, stop strings, logprob strings) runs in the consumer's coroutine. A stop
string found there goes back to the thread as a command that finishes the sequence.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import LLMEngine
from .request import CoreOutput, RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("trinity.engine")


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.stats: dict = engine.stats()
        self.expert_load: dict | None = None
        self._stats_time = 0.0
        self.errored: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trinity-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for request_id in list(self._streams):  # nobody will step these any more: end their streams
            self._deliver(request_id, RuntimeError("the engine was shut down"))

    def fail(self, reason: str) -> None:
        """The engine can no longer run (a tensor-parallel worker died): every stream in flight ends with an error,
        from any thread; the stepping thread may be stuck in a collective and is not waited for."""
        self.errored = RuntimeError(reason)
        for request_id in list(self._streams):
            self._deliver(request_id, RuntimeError(f"engine failure: {reason}"))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ the API
    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                       request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative RequestOutputs as tokens arrive; the last one has `finished` set.
        Raises ValueError at once for a request that cannot run."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.engine.prepare_request(request_id, prompt, params, prompt_token_ids, priority, cache_salt)
        async for out in self.submit(request):
            yield out

    async def submit(self, request) -> AsyncIterator[RequestOutput]:
        """Stream a request built by `engine.prepare_request` (validated already)."""
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        processor = self.engine.output_processor(request)
        self._commands.put(("add", request))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                stops = []
                out = processor.process(item, stops)
                if stops:
                    self._commands.put(("stop", stops))
                    self._wake.set()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------ the stepping thread
    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if arg.request_id not in self._streams:  # cancelled before it was queued
                    continue
                try:
                    self.engine.enqueue(arg, process_outputs=False)
                except Exception as e:  # noqa: BLE001 - reported to that request only
                    self._deliver(arg.request_id, e)
            elif kind == "stop":
                self.engine.finish_sequences(arg)
            else:
                self.engine.abort_core(arg)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._refresh_stats(force=True)
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs: list[CoreOutput] = self.engine.step_core()
            except Exception as e:  # noqa: BLE001 - the engine itself is broken: fail everything in flight
                log.exception("engine step failed")
                self.errored = e
                for request_id in list(self.engine.requests):
                    self.engine.abort_core(request_id)
                    self._deliver(request_id, RuntimeError(f"engine failure: {type(e).__name__}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            self._refresh_stats()

    def _refresh_stats(self, force: bool = False) -> None:
        """Snapshots for readers on other threads (metrics, admission); expert load at most twice a second."""
        self.stats = self.engine.stats()
        now = time.monotonic()
        if force or now - self._stats_time > 0.5:
            self.expert_load = self.engine.expert_load()
            self._stats_time = now
