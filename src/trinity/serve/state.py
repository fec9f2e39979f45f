"""What the server holds: settings, the engine once loaded, metrics; and the request plumbing both
completion routes share (sampling parameters, admission, running a request, recording its metrics)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..engine.async_engine import AsyncEngine
from ..engine.request import ContextLengthError, RequestOutput
from ..engine.sampling_params import SamplingError, SamplingParams
from .errors import APIError
from .metrics import ServerMetrics
from .protocol import SamplingFields

log = logging.getLogger("trinity.serve")


@dataclass
class ServerSettings:
    served_model_name: str | None = None  # None: the loaded model's name
    api_key: str | None = None
    max_queued_requests: int | None = None
    max_request_bytes: int = 4 << 20
    reasoning_parser: str = "trinity"
    tool_call_parser: str | None = "hermes"
    enable_auto_tool_choice: bool = False
    chat_template: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    shutdown_timeout: float = 30.0
    responses_store_size: int = 1000  # /v1/responses kept for previous_response_id (LRU); 0: none
    # "fcfs": a request's `priority` other than 0 is refused (vLLM's rule: any client could otherwise put itself
    # first); "priority": the scheduler orders by it (lower first), then fairly between requests, then by arrival
    scheduling_policy: str = "fcfs"
    max_completion_prompts: int = 1024  # prompts one /v1/completions request may list (vLLM's default)
    # how long a request waits for its JSON Schema / tools grammar to compile (then 400: the schema is too complex)
    max_grammar_compile_seconds: float = 5.0

    def __post_init__(self):
        if not self.max_grammar_compile_seconds > 0:
            raise ValueError(f"--max-grammar-compile-seconds must be positive, got {self.max_grammar_compile_seconds}")


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.tokenizer = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.load_error: str | None = None
        self.failure: str | None = None  # the engine cannot run any more (a tensor-parallel worker died)
        self.draining = False
        self.in_flight = 0
        # --max-queued-requests counts sequences admitted that have not started generating: counted here, on the
        # event loop, when a request is admitted, so a burst sees its own admissions (the engine's stats are a
        # snapshot refreshed after each step). request id -> [sequences, admitted at, run started]
        self.queued = 0
        self._queued: dict[str, list] = {}
        self.shutting_down = False  # set when --shutdown-timeout ends the streams still running
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        self._grammar = None
        self._grammar_build: asyncio.Future | None = None
        self._ids = itertools.count()

    # ------------------------------------------------------------------ lifecycle
    def attach(self, engine: AsyncEngine) -> None:
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model.config.vocab_size
        self._prepare_grammar()
        self.engine = engine.start()

    def _prepare_grammar(self) -> None:
        """Build the structured-output backend before the server is ready: importing xgrammar holds the GIL for
        about half a second (benchmarks/README.md, fairness), which stalled every stream when the first request with
        a schema came in."""
        try:
            self.grammar()
        except Exception as e:  # noqa: BLE001 - e.g. no xgrammar: the first request that needs it says why
            log.info("structured output not prepared: %s", e)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def grammar(self):
        if self._grammar is None:
            from .structured import GrammarBackend

            self._grammar = GrammarBackend(self.tokenizer, self.vocab_size,
                                           compile_seconds=self.settings.max_grammar_compile_seconds)
        return self._grammar

    async def grammar_async(self):
        """`grammar()` for the event loop: the first build (importing xgrammar, indexing the vocabulary: about a
        second) runs in a worker thread, once however many requests wait for it."""
        if self._grammar is None:
            if self._grammar_build is None:
                self._grammar_build = asyncio.ensure_future(asyncio.to_thread(self.grammar))
            build = self._grammar_build
            try:
                await asyncio.shield(build)
            except RuntimeError:  # e.g. no xgrammar: the next request tries (and says so) again
                if self._grammar_build is build:
                    self._grammar_build = None
                raise
        return self._grammar

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    # ------------------------------------------------------------------ admission
    def admit(self, model: str | None) -> AsyncEngine:
        """Checks that hold for every inference request before any work is done."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "5"})
        if self.failure is not None:
            raise APIError(503, f"the engine failed: {self.failure}", code="engine_failed")
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading", code="loading",
                           headers={"Retry-After": "5"})
        if model is not None and model != self.settings.served_model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")
        self.check_queue(1, None)
        return self.engine

    # A request prepared (counted) whose run never started, e.g. a stream whose client left before its body was
    # sent, stops counting after this long: starting a run takes milliseconds after admission.
    UNSTARTED_EXPIRY_S = 30.0

    def check_queue(self, sequences: int, param: str | None) -> None:
        """503 queue_full when admitting `sequences` more would put more than --max-queued-requests sequences in
        the queue; 400 when one request alone asks for more than the limit (it could never be admitted)."""
        limit = self.settings.max_queued_requests
        if limit is None:
            return
        if self._queued:
            now = time.monotonic()
            for request_id, (_, admitted, started) in list(self._queued.items()):
                if not started and now - admitted > self.UNSTARTED_EXPIRY_S:
                    self._leave(request_id)
        if sequences > limit:
            raise APIError(400, f"this request asks for {sequences} sequences (n x prompts) but the server queues at "
                                f"most {limit} (--max-queued-requests)", param=param, code="invalid_value")
        if self.queued + sequences > limit:
            raise APIError(503, f"the request queue is full ({self.queued} sequences waiting, limit {limit}); "
                                "retry shortly", code="queue_full", headers={"Retry-After": "1"})

    def _enqueue(self, request_id: str, sequences: int) -> None:
        self._queued[request_id] = [sequences, time.monotonic(), False]
        self.queued += sequences

    def _leave(self, request_id: str) -> None:
        """The request's sequences stop counting as queued (they started generating, or the request ended)."""
        entry = self._queued.pop(request_id, None)
        if entry is not None:
            self.queued -= entry[0]

    def release(self, prepared) -> None:
        """A prepared request that will not be run (a later part of the same HTTP request failed)."""
        self._leave(prepared.request_id)

    def sampling_params(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        constraint_factory=None) -> SamplingParams:
        bias = None
        if body.logit_bias:
            bias = {}
            for key, value in body.logit_bias.items():
                try:
                    token = int(key)
                except ValueError:
                    raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
                if not 0 <= token < self.vocab_size:
                    raise APIError(400, f"logit_bias token id {token} is out of range [0, {self.vocab_size})",
                                   param="logit_bias")
                bias[token] = value
        bad = [t for t in body.stop_token_ids or [] if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids: {bad[0]} is out of range [0, {self.vocab_size})",
                           param="stop_token_ids")
        try:
            return SamplingParams(
                n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias, min_tokens=body.min_tokens,
                max_tokens=max_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
                include_stop_str_in_output=body.include_stop_str_in_output, ignore_eos=body.ignore_eos,
                logprobs=logprobs, seed=body.seed, skip_special_tokens=body.skip_special_tokens,
                constraint_factory=constraint_factory)
        except SamplingError as e:
            raise APIError(400, str(e), param=e.param) from None

    def check_fits(self, text: str, param: str) -> None:
        """Refuse a text that cannot fit the context whatever its tokens (`TrinityTokenizer.fewest_tokens`), before
        it is tokenized: a multi-megabyte prompt takes seconds to tokenize."""
        fewest = self.tokenizer.fewest_tokens(text)
        if fewest > self.max_model_len:
            raise APIError(400, f"the prompt ({len(text)} characters) has at least {fewest} tokens, more than "
                                f"max_model_len ({self.max_model_len})", param=param, code="context_length_exceeded")

    async def encode(self, text: str, param: str) -> list[int]:
        """A prompt's ids, tokenized in a worker thread (`tokenizers` releases the GIL while it encodes): a long
        prompt does not stall the event loop, and with it every other request's stream."""
        self.check_fits(text, param)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    def prepare(self, engine: AsyncEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                priority: int, prompt_param: str, cache_salt: str | None = None, fairness_key: str | None = None):
        """`fairness_key`: what the scheduler takes turns between (default: the request id; a completion with many
        prompts gives all of them its one id, so together they get one turn, not one per prompt)."""
        if priority and self.settings.scheduling_policy != "priority":
            raise APIError(400, f"got priority {priority} but priority scheduling is not enabled (the server runs "
                                f"with --scheduling-policy {self.settings.scheduling_policy}; start it with "
                                f"--scheduling-policy priority to use it)", param="priority", code="invalid_value")
        room = self.max_model_len - len(prompt_ids)
        if params.max_tokens is None and 1 <= room < params.min_tokens:
            # without max_tokens the request may generate up to the rest of the context: min_tokens must fit there
            # (a prompt that leaves no room at all is the engine's context_length_exceeded)
            raise APIError(400, f"min_tokens = {params.min_tokens} is more than the prompt ({len(prompt_ids)} tokens) "
                                f"leaves of max_model_len ({self.max_model_len}): at most {room}",
                           param="min_tokens", code="invalid_value")
        # counted per prepared request, so the sequences admitted so far in this event-loop turn count too
        self.check_queue(params.n, "n" if params.n > 1 else prompt_param)
        try:
            prepared = engine.engine.prepare_request(request_id, None, params, prompt_ids, priority, cache_salt,
                                                     fairness_key or request_id)
        except ContextLengthError as e:
            # prompt + max_tokens over max_model_len: the max_tokens the client chose is the field to change
            blame_max_tokens = e.limit == "max_model_len" and e.max_tokens is not None and params.max_tokens is not None
            raise APIError(400, str(e), param="max_tokens" if blame_max_tokens else prompt_param,
                           code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=prompt_param, code="invalid_value") from None
        self._enqueue(request_id, params.n)
        return prepared

    # ------------------------------------------------------------------ running
    async def run(self, engine: AsyncEngine, prepared) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs, recording metrics; leaving the stream early aborts the request."""
        self.in_flight += 1
        last_tokens = 0
        last_time = None
        final: RequestOutput | None = None
        entry = self._queued.get(prepared.request_id)
        if entry is not None:
            entry[2] = True
        try:
            async for out in engine.submit(prepared):
                if final is None:  # its first output: the request is generating, no longer waiting
                    self._leave(prepared.request_id)
                now = time.monotonic()
                produced = sum(len(c.token_ids) for c in out.outputs)
                if produced > last_tokens and last_time is not None:
                    gap = (now - last_time) / (produced - last_tokens)
                    for _ in range(produced - last_tokens):
                        self.metrics.itl.observe(gap)
                if produced > last_tokens:
                    last_tokens, last_time = produced, now
                final = out
                yield out
        except RuntimeError as e:
            if self.shutting_down:  # end_streams: the stream ends with an error event rather than being cut
                raise APIError(503, "the server shut down before this request finished (--shutdown-timeout)",
                               code="server_shutdown") from e
            raise
        finally:
            self._leave(prepared.request_id)
            self.in_flight -= 1
            if final is not None and final.finished:
                self._record(final)

    def end_streams(self) -> None:
        """At the end of --shutdown-timeout (from any thread): every request still running ends with a
        server_shutdown error, so streams send their error event and terminator instead of being cut."""
        self.shutting_down = True
        if self.engine is not None:
            self.engine.fail("the server is shutting down")

    def _record(self, out: RequestOutput) -> None:
        m, t = out.metrics, time.monotonic()
        arrival = m.get("arrival_time")
        if arrival is not None:
            self.metrics.e2e.observe(t - arrival)
            if "first_token_time" in m:
                self.metrics.ttft.observe(m["first_token_time"] - arrival)
            if "first_scheduled_time" in m:
                self.metrics.queue.observe(m["first_scheduled_time"] - arrival)
        self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
        for c in out.outputs:
            self.metrics.generation_tokens.inc(len(c.token_ids))
            self.metrics.request_success.inc(finished_reason=c.finish_reason or "unknown")

    async def collect(self, engine: AsyncEngine, prepared, raw_request) -> RequestOutput:
        """Run to completion for a non-streaming response, aborting if the client goes away."""
        async def consume() -> RequestOutput:
            final = None
            async for out in self.run(engine, prepared):
                final = out
            return final

        task = asyncio.ensure_future(consume())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and raw_request is not None and await raw_request.is_disconnected():
                task.cancel()  # leaving the stream aborts the request and frees its blocks
                raise APIError(499, "client disconnected")
        return task.result()
