"""Structured output (JSON mode and JSON Schema) for the engine, on top of xgrammar.

`GrammarBackend` is built once per (tokenizer, model vocab size). It turns a JSON Schema (or "any JSON object")
into a *constraint factory*: a zero-arg callable that the engine calls once per generated sequence
(`SamplingParams.constraint_factory`), each call giving a fresh `GrammarConstraint` (the engine's
`TokenConstraint` protocol, see `trinity.engine.constraints`) with its own `xgrammar.GrammarMatcher`.

    backend = GrammarBackend(tokenizer, model.config.vocab_size)
    factory = constraint_for_response_format(backend, {"type": "json_schema", "json_schema": {...}})
    params = SamplingParams(max_tokens=200, constraint_factory=factory)

Choices:
- The xgrammar `TokenizerInfo` is built from `tokenizer.token_bytes(id)` (RAW vocab), not from a Hugging Face
  tokenizer. Added tokens (`<|im_end|>`, `<think>`, `<tool_call>`, ...) and the model's padding ids past the
  tokenizer's vocabulary get an empty encoding, which xgrammar treats as never-allowed special tokens; the
  tokenizer's EOS ids are the grammar's stop tokens (allowed only once the JSON value is complete).
- No optional whitespace: the JSON is written with fixed separators, compact ("," and ":") by default so
  constrained outputs stay short. `separators=MODEL_SEPARATORS` (", " and ": ", `json.dumps`' default) gives the
  form models are trained on: chat answers that follow a model's reasoning use it (`serve/chat_constraints.py`).
- A sequence is finished as soon as its JSON value is complete and nothing but a stop token could follow (an
  object, array, string, ... at the top level); the engine then ends it with finish_reason "stop" without
  the model having to emit EOS. A value that could still go on (a top-level number) ends at EOS instead.
- JSON Schemas are compiled in strict mode (properties / items not named by the schema are not generated)
  and compiled once per distinct schema (an LRU cache keyed by the schema's canonical JSON text; property
  order is kept in the key because it decides the order of the generated keys).
- xgrammar is imported lazily: importing this module never needs it; building a `GrammarBackend` does.
- Compiling runs in a small pool of worker threads (xgrammar's compiler releases the GIL: measured, a 66 s compile
  in a thread left the main thread's 1 ms sleeps late by at most 17 ms), so the server awaits it
  (`json_schema_async`) with a time limit and its event loop keeps serving. Identical schemas compiling at the
  same time share one compile. A compile is never cancelled (xgrammar cannot stop one), so what bounds the work is
  `SchemaLimits`, checked before compiling: schema bytes, enum values, nesting depth, object properties.
- Schemas are made to mean what JSON Schema says before compiling: a `required` property that `properties` does
  not declare is declared with any value (strict mode would otherwise never generate it), and a `$ref` outside the
  document (a URL) is refused, as xgrammar would ignore it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger("trinity.structured")

__all__ = [
    "GrammarBackend",
    "GrammarConstraint",
    "GrammarConstraintFactory",
    "SchemaLimits",
    "StructuredOutputError",
    "constraint_for_response_format",
    "constraint_for_response_format_async",
]

SCHEMA_PARAM = "response_format.json_schema.schema"

# JSON mode: any JSON object, written with the given separators and no other whitespace (xgrammar's built-in
# "any value" rules allow any whitespace). Strings take no raw control characters, as RFC 8259 requires.
_JSON_OBJECT_EBNF = r"""
root ::= object
value ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" "}" | "{" member (COMMA member)* "}"
member ::= string COLON value
array ::= "[" "]" | "[" value (COMMA value)* "]"
string ::= "\"" char* "\""
char ::= [^"\\\0-\x1f] | "\\" escape
escape ::= ["\\/bfnrt] | "u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]
number ::= "-"? integer fraction? exponent?
integer ::= "0" | [1-9] [0-9]*
fraction ::= "." [0-9]+
exponent ::= [eE] [+\-]? [0-9]+
"""


def json_object_ebnf(separators: tuple[str, str]) -> str:
    """The JSON-mode grammar with `separators` (item, key) as in `json.dumps`."""
    comma, colon = (json.dumps(s) for s in separators)
    return _JSON_OBJECT_EBNF.replace("COMMA", comma).replace("COLON", colon)


_SEPARATORS = (",", ":")  # compact JSON
# What `json.dumps` writes by default, so what chat templates render tool calls with and models learn to write:
# a model's answer after its reasoning follows its training closest in this form.
MODEL_SEPARATORS = (", ", ": ")
JSON_OBJECT_EBNF = json_object_ebnf(_SEPARATORS)
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f]")


class StructuredOutputError(ValueError):
    """A response_format / schema the backend cannot honour; `param` names the offending request field.
    `status`: the HTTP status it answers with (400: the schema's fault; 503: the compile workers were busy)."""

    def __init__(self, param: str, message: str, *, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.message = message
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """What a schema may hold before it is compiled: compile time grows faster than linearly in these (a
    20,000-value enum took 20 s, 40,000 took 66 s on 2 CPU cores), and a compile cannot be stopped once started.
    Counts are over the whole schema (all subschemas and definitions). OpenAI's structured outputs take at most
    1,000 enum values and 5,000 properties too."""

    max_bytes: int = 256 << 10  # the schema as compact JSON
    max_enum_values: int = 1000
    max_depth: int = 32  # subschemas inside subschemas
    max_properties: int = 5000

    def __post_init__(self):
        for name in ("max_bytes", "max_enum_values", "max_depth", "max_properties"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchemaLimits.{name} must be at least 1, got {getattr(self, name)}")


DEFAULT_COMPILE_SECONDS = 5.0


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("structured output (response_format json_object / json_schema) needs the xgrammar "
                           "package: pip install xgrammar") from e
    return xgrammar


# "[20:34:17] /project/cpp/json_schema_converter.cc:4944: Unsupported type "foo"" -> "Unsupported type "foo""
_LOG_PREFIX = re.compile(r"^\s*(\[[0-9:.\s]+\]\s*)?([^\s:]+\.(cc|cpp|h|hpp|py):\d+:\s*)?")
_PATH = re.compile(r"(?<![#\w])(?:[A-Za-z]:)?(?:[/\\][\w.\-]+)+\.(?:cc|cpp|cxx|h|hpp|py|so)(?::\d+)?")


def _clean_error(exc: BaseException) -> str:
    """The gist of a compiler error: its first meaningful line, without log prefixes or file paths."""
    for line in str(exc).splitlines():
        line = _LOG_PREFIX.sub("", line).strip()
        if not line or line.startswith(("Traceback", "Stack trace", "File ")):
            continue
        line = _PATH.sub("<path>", line)
        return line[:500]
    return type(exc).__name__


class GrammarConstraint:
    """One sequence's grammar state: a `TokenConstraint` over an `xgrammar.GrammarMatcher`."""

    __slots__ = ("_backend", "_matcher", "_bitmask", "_mask", "_finished", "rejected_token")

    def __init__(self, backend: GrammarBackend, compiled_grammar: Any):
        xgr = backend._xgr
        self._backend = backend
        self._matcher = xgr.GrammarMatcher(compiled_grammar)
        self._bitmask = xgr.allocate_token_bitmask(1, backend.vocab_size)
        self._mask: torch.Tensor | None = None  # bool mask for the current state, computed lazily
        self._finished = False
        self.rejected_token: int | None = None  # set when the engine fed a token the grammar refused

    def _current_mask(self) -> torch.Tensor:
        if self._mask is None:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            # Bit k of int32 word w is token 32w + k: little-endian bytes, least significant bit first.
            words = self._bitmask[0].numpy().astype("<i4", copy=False).view(np.uint8)
            bits = np.unpackbits(words, count=self._backend.vocab_size, bitorder="little")
            self._mask = torch.from_numpy(bits).view(torch.bool)
        return self._mask

    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size] (CPU). Treat it as read-only: it is this state's cached mask, not a copy."""
        mask = self._current_mask()
        n = mask.shape[0]
        if vocab_size == n:
            return mask
        if vocab_size < n:
            return mask[:vocab_size]
        out = torch.zeros(vocab_size, dtype=torch.bool)  # ids the backend does not know are never allowed
        out[:n] = mask
        return out

    def accept(self, token_id: int) -> None:
        if self._finished:
            return
        self._mask = None
        if not self._matcher.accept_token(int(token_id)):
            # Only when something overrode the mask (e.g. min_tokens blocking the stop ids the grammar wanted).
            log.warning("structured output: the grammar rejected token %d; ending the sequence", token_id)
            self.rejected_token = int(token_id)
            self._finished = True
            return
        if self._matcher.is_terminated():  # a stop token was accepted
            self._finished = True
        elif self._matcher.is_completed():
            # The JSON value is complete; finish now unless more (e.g. another digit) could follow.
            mask = self._current_mask().numpy()
            stop = self._backend._stop_ids_array
            self._finished = int(np.count_nonzero(mask)) == int(np.count_nonzero(mask[stop]))

    def is_finished(self) -> bool:
        return self._finished

    @property
    def matcher(self):
        return self._matcher


class GrammarConstraintFactory:
    """A zero-arg callable (for `SamplingParams.constraint_factory`): each call gives a fresh constraint."""

    __slots__ = ("backend", "compiled_grammar", "description")

    def __init__(self, backend: GrammarBackend, compiled_grammar: Any, description: str):
        self.backend = backend
        self.compiled_grammar = compiled_grammar
        self.description = description

    def __call__(self) -> GrammarConstraint:
        return GrammarConstraint(self.backend, self.compiled_grammar)

    def __repr__(self) -> str:
        return f"GrammarConstraintFactory({self.description})"


class GrammarBackend:
    """Compiles JSON grammars for one tokenizer and model vocabulary, and caches them."""

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = 256, max_threads: int | None = None,
                 limits: SchemaLimits | None = None, compile_seconds: float = DEFAULT_COMPILE_SECONDS,
                 compile_workers: int = 2):
        """`compile_seconds`: how long `json_schema_async` waits for a compile (then 400: too complex);
        `compile_workers`: compiles running at once (each also uses up to `max_threads` threads of xgrammar's)."""
        if compile_seconds <= 0:
            raise ValueError(f"compile_seconds must be positive, got {compile_seconds}")
        self._xgr = xgr = _import_xgrammar()
        tok_vocab = int(tokenizer.vocab_size)
        self.vocab_size = int(vocab_size)
        if self.vocab_size < tok_vocab:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's ({tok_vocab})")
        self.tokenizer = tokenizer
        self.stop_token_ids = sorted(int(i) for i in tokenizer.eos_token_ids if 0 <= int(i) < self.vocab_size)
        if not self.stop_token_ids:
            raise ValueError("structured output needs a tokenizer with an EOS token inside the vocabulary")
        # Every added token (control tokens such as <|im_end|>, and the think / tool tags) is kept out of JSON:
        # an empty encoding makes it a special token that xgrammar never allows (the stop ids are the exception,
        # and only where the grammar may end). Ids from the tokenizer's size up to vocab_size are padding.
        blocked = set(tokenizer.special_token_ids)
        backend_tok = getattr(tokenizer, "backend", None)
        if backend_tok is not None and hasattr(backend_tok, "get_added_tokens_decoder"):
            blocked.update(backend_tok.get_added_tokens_decoder().keys())
        self.blocked_token_ids = frozenset(i for i in blocked if 0 <= i < tok_vocab)
        # Tokens holding a raw control byte are blocked too: compact JSON has no place for one (whitespace is
        # off, and a string must escape them), yet xgrammar's rule for length-bounded strings would let them in.
        encoded = []
        for i in range(tok_vocab):
            data = b"" if i in self.blocked_token_ids else tokenizer.token_bytes(i)
            encoded.append(b"" if _CONTROL_BYTES.search(data) else data)
        self.tokenizer_info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                                stop_token_ids=self.stop_token_ids)
        threads = max_threads or max(1, min(8, os.cpu_count() or 1))
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads)
        self._stop_ids_array = np.array(self.stop_token_ids, dtype=np.int64)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiles = 0
        self.limits = limits or SchemaLimits()
        self.compile_seconds = float(compile_seconds)
        self._pool = ThreadPoolExecutor(max_workers=max(1, compile_workers), thread_name_prefix="grammar-compile")
        self._inflight: dict[str, Future] = {}  # key -> the compile running (or queued) for it
        self._started: dict[str, float] = {}  # key -> when its compile left the queue

    # ------------------------------------------------------------------ compiling
    def _lookup(self, key: str, compile_fn: Callable[[], Any]) -> tuple[Any, Future | None]:
        """(compiled, None) from the cache, or (None, the future of its compile): a compile of the same key already
        running is joined, so concurrent identical requests compile once."""
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, None
            future = self._inflight.get(key)
            if future is None:
                future = self._pool.submit(self._compile_into_cache, key, compile_fn)
                self._inflight[key] = future
            return None, future

    def _compile_into_cache(self, key: str, compile_fn: Callable[[], Any]) -> Any:
        with self._lock:
            self._started[key] = time.monotonic()
        try:
            compiled = compile_fn()
        except BaseException:
            with self._lock:
                self._inflight.pop(key, None)
                self._started.pop(key, None)
            raise
        # kept even when every waiter gave up on it (time limit): the work is done, and a retry then gets it at once
        with self._lock:
            self._cache[key] = compiled
            self.num_compiles += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self._inflight.pop(key, None)
            self._started.pop(key, None)
        return compiled

    def _cached(self, key: str, compile_fn: Callable[[], Any]) -> Any:
        hit, future = self._lookup(key, compile_fn)
        return hit if future is None else future.result()

    async def _cached_async(self, key: str, compile_fn: Callable[[], Any], param: str) -> Any:
        """`_cached` for the event loop: awaits the compile worker, at most `compile_seconds`."""
        hit, future = self._lookup(key, compile_fn)
        if future is None:
            return hit
        try:
            # shield: one waiter timing out must not cancel the compile that others share
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.compile_seconds)
        except (TimeoutError, asyncio.TimeoutError):
            with self._lock:
                started = key in self._started or future.done()
            limit = f"{self.compile_seconds:g} s (--max-grammar-compile-seconds)"
            if not started:  # never got a worker: the server is busy, not the schema too complex
                raise StructuredOutputError(param, f"the grammar compile workers are busy: {param} could not start "
                                                   f"compiling within {limit}; retry shortly", status=503,
                                            code="grammar_compile_busy") from None
            raise StructuredOutputError(param, f"{param} is too complex: compiling it into a grammar took longer "
                                               f"than the server's limit of {limit}", code="schema_too_complex") \
                from None

    def _object_job(self, separators: tuple[str, str]) -> tuple[str, Callable[[], Any]]:
        key = "json_object" if separators == _SEPARATORS else f"json_object:{json.dumps(separators)}"
        return key, lambda: self._compiler.compile_grammar(json_object_ebnf(separators))

    def _schema_job(self, schema: dict, param: str, best_effort: bool,
                    separators: tuple[str, str]) -> tuple[str, Callable[[], Any]]:
        """Checks a schema (StructuredOutputError(param) if unusable) -> its cache key and its compile."""
        if not isinstance(schema, dict):
            raise StructuredOutputError(param, f"{param} must be a JSON object (a JSON Schema), "
                                               f"got {_json_type(schema)}")
        try:
            text = json.dumps(schema, ensure_ascii=False, separators=_SEPARATORS, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise StructuredOutputError(param, f"{param} is not valid JSON: {_clean_error(e)}") from None
        # best-effort schemas are keyed apart: a hit skips the checks below, which refuse more without best_effort
        key = (("best-effort:" if best_effort else "")
               + ("schema:" if separators == _SEPARATORS else f"schema{json.dumps(separators)}:") + text)
        with self._lock:
            if key in self._cache or key in self._inflight:  # checked before: skip the walk
                return key, lambda: None
        size = len(text.encode())
        if size > self.limits.max_bytes:  # first: the walk below is linear in the size
            raise StructuredOutputError(param, f"{param} is too large: {size} bytes as compact JSON, over the "
                                               f"limit of {self.limits.max_bytes} bytes", code="schema_too_complex")
        compiled_schema = _SchemaCheck(param, self.limits).run(schema)
        problem = _unenforced_keyword(schema)
        if problem is not None:
            if not best_effort:
                raise StructuredOutputError(param, f"{param} is not supported for structured output: {problem}")
            log.info("structured output: %s; %s is followed on a best-effort basis", problem, param)
        compiled_text = text if compiled_schema is schema else json.dumps(compiled_schema, ensure_ascii=False,
                                                                          separators=_SEPARATORS)

        def compile_it():
            try:
                return self._compiler.compile_json_schema(compiled_text, any_whitespace=False,
                                                          separators=separators, strict_mode=True)
            except Exception as e:  # xgrammar raises RuntimeError with a C++ log prefix
                raise StructuredOutputError(param, f"{param} is invalid or not supported for structured "
                                                   f"output: {_clean_error(e)}") from None

        return key, compile_it

    def compile_json_object(self, separators: tuple[str, str] = _SEPARATORS) -> Any:
        """The compiled grammar for any JSON object (JSON mode), written with `separators`."""
        return self._cached(*self._object_job(separators))

    def compile_json_schema(self, schema: dict, param: str = SCHEMA_PARAM, *, best_effort: bool = False,
                            separators: tuple[str, str] = _SEPARATORS) -> Any:
        """The compiled grammar for a JSON Schema (cached); raises StructuredOutputError(param) if unusable.

        A schema using a keyword the grammar cannot enforce (e.g. "uniqueItems", "not") is refused, unless
        `best_effort`: then the keyword is ignored (outputs follow the rest of the schema but may break it).
        A schema over `limits` or with a `$ref` to another document is refused either way.
        `separators` (item, key): how the JSON is written (compact by default; no other whitespace)."""
        return self._cached(*self._schema_job(schema, param, best_effort, separators))

    # ------------------------------------------------------------------ factories
    def json_object(self, separators: tuple[str, str] = _SEPARATORS) -> GrammarConstraintFactory:
        return GrammarConstraintFactory(self, self.compile_json_object(separators), "json_object")

    def json_schema(self, schema: dict, param: str = SCHEMA_PARAM, *, best_effort: bool = False,
                    separators: tuple[str, str] = _SEPARATORS) -> GrammarConstraintFactory:
        compiled = self.compile_json_schema(schema, param, best_effort=best_effort, separators=separators)
        return GrammarConstraintFactory(self, compiled, "json_schema")

    # the same for the event loop: compiled in a worker, at most `compile_seconds` (StructuredOutputError beyond)
    async def json_object_async(self, separators: tuple[str, str] = _SEPARATORS) -> GrammarConstraintFactory:
        key, job = self._object_job(separators)
        return GrammarConstraintFactory(self, await self._cached_async(key, job, "response_format"), "json_object")

    async def json_schema_async(self, schema: dict, param: str = SCHEMA_PARAM, *, best_effort: bool = False,
                                separators: tuple[str, str] = _SEPARATORS) -> GrammarConstraintFactory:
        key, job = self._schema_job(schema, param, best_effort, separators)
        return GrammarConstraintFactory(self, await self._cached_async(key, job, param), "json_schema")


# Keywords xgrammar accepts but does not enforce: outputs could break them, so such schemas are refused.
_UNENFORCED = {
    "not": "negation",
    "if": "conditional subschemas", "then": "conditional subschemas", "else": "conditional subschemas",
    "uniqueItems": "unique array items",
    "contains": "array 'contains'", "minContains": "array 'contains'", "maxContains": "array 'contains'",
    "dependentRequired": "dependent properties", "dependentSchemas": "dependent schemas",
    "dependencies": "dependent properties",
}
_SUBSCHEMA = ("additionalProperties", "unevaluatedProperties", "additionalItems", "unevaluatedItems", "items",
              "propertyNames")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_MAX_SCHEMA_DEPTH = 64


class _SchemaCheck:
    """One walk over a schema: refuses it past `limits` or with a `$ref` to another document, and returns it with
    every `required` property declared (a new dict where something changed; the caller's is never modified)."""

    def __init__(self, param: str, limits: SchemaLimits):
        self.param, self.limits = param, limits
        self.enum_values = 0
        self.properties = 0

    def run(self, schema: dict) -> dict:
        return self._visit(schema, "", 0)

    def _too_complex(self, message: str) -> StructuredOutputError:
        return StructuredOutputError(self.param, f"{self.param} is too complex: {message}", code="schema_too_complex")

    def _visit(self, node: Any, where: str, depth: int) -> Any:
        if not isinstance(node, dict):
            return node
        at = f" (at {where})" if where else ""
        limits = self.limits
        if depth > limits.max_depth:
            raise self._too_complex(f"it nests subschemas deeper than the limit of {limits.max_depth} levels{at}")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            # xgrammar would warn and leave the value unconstrained; the server fetches nothing
            raise StructuredOutputError(self.param, f'{self.param} has a "$ref" to another document ({ref[:200]!r})'
                                                    f'{at}: only references inside the schema ("#/...") are '
                                                    'supported; put the referenced schema under "$defs"')
        if isinstance(node.get("enum"), list):
            self.enum_values += len(node["enum"])
            if self.enum_values > limits.max_enum_values:
                raise self._too_complex(f"it has more than {limits.max_enum_values} enum values in all, the limit "
                                        f"(reached{at})")
        if isinstance(node.get("properties"), dict):
            self.properties += len(node["properties"])
            if self.properties > limits.max_properties:
                raise self._too_complex(f"it declares more than {limits.max_properties} object properties in all, "
                                        f"the limit (reached{at})")
        prefix = f"{where}." if where else ""
        changed: dict[str, Any] = {}
        for key in _SUBSCHEMA:
            if isinstance(node.get(key), dict):
                sub = self._visit(node[key], prefix + key, depth + 1)
                if sub is not node[key]:
                    changed[key] = sub
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                subs = [self._visit(sub, f"{prefix}{key}[{i}]", depth + 1) for i, sub in enumerate(node[key])]
                if any(a is not b for a, b in zip(subs, node[key])):
                    changed[key] = subs
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                subs = {name: self._visit(sub, f"{prefix}{key}.{name}", depth + 1) for name, sub in node[key].items()}
                if any(subs[name] is not sub for name, sub in node[key].items()):
                    changed[key] = subs
        if changed:
            node = {**node, **changed}
        return self._declare_required(node, at)

    def _declare_required(self, node: dict, at: str) -> dict:
        """JSON Schema lets `required` name a property `properties` does not declare (it must be present, with any
        value allowed by additionalProperties), but xgrammar's strict mode only ever writes declared properties, so
        it would never be generated: it is declared here with that value's schema."""
        required = node.get("required")
        if not isinstance(required, list) or not required:
            return node
        types = node.get("type")
        if not (types == "object" or (isinstance(types, list) and "object" in types)
                or (types is None and "properties" in node)):
            return node
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        missing = [name for name in required if isinstance(name, str) and name not in props]
        if not missing:
            return node
        name = missing[0]
        extra = node.get("additionalProperties", node.get("unevaluatedProperties"))
        if extra is False:
            raise StructuredOutputError(self.param, f'{self.param}{at}: "required" names {name!r}, which "properties" '
                                                    'does not declare and "additionalProperties": false forbids, so '
                                                    f'no JSON value matches; declare {name!r} in "properties"')
        if "patternProperties" in node:
            raise StructuredOutputError(self.param, f'{self.param}{at}: "required" names {name!r}, which '
                                                    '"properties" does not declare; with "patternProperties" this '
                                                    f'cannot be enforced: declare {name!r} in "properties"')
        value = extra if isinstance(extra, dict) else {}
        return {**node, "properties": {**props, **{n: value for n in missing}}}


def _unenforced_keyword(schema: Any, where: str = "", depth: int = 0) -> str | None:
    """The first place a schema relies on a keyword the grammar would silently ignore, described; else None."""
    if not isinstance(schema, dict):
        return None
    at = f" (at {where})" if where else ""
    if depth > _MAX_SCHEMA_DEPTH:
        return f"the schema nests deeper than {_MAX_SCHEMA_DEPTH} levels{at}"
    for key, what in _UNENFORCED.items():
        if key in schema:
            return f'"{key}" ({what}) cannot be enforced{at}'
    if "multipleOf" in schema and schema.get("type") != "integer":
        return f'"multipleOf" is only supported with "type": "integer"{at}'
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f'"allOf" with more than one subschema cannot be enforced{at}'
    prefix = f"{where}." if where else ""
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict):
            if found := _unenforced_keyword(schema[key], prefix + key, depth + 1):
                return found
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                if found := _unenforced_keyword(sub, f"{prefix}{key}[{i}]", depth + 1):
                    return found
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                if found := _unenforced_keyword(sub, f"{prefix}{key}.{name}", depth + 1):
                    return found
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    return type(value).__name__


_RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _response_format_request(backend: GrammarBackend | None, response_format: dict | None):
    """Validates `response_format` -> None (plain text), ("json_object", None) or ("json_schema", schema)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise StructuredOutputError("response_format", "response_format must be an object with a 'type', "
                                                       f"got {_json_type(response_format)}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind is None:
        raise StructuredOutputError("response_format.type", "response_format.type is missing; allowed: "
                                                            + ", ".join(_RESPONSE_FORMAT_TYPES))
    if kind not in _RESPONSE_FORMAT_TYPES:
        shown = json.dumps(kind) if isinstance(kind, (str, int, float, bool)) or kind is None else _json_type(kind)
        raise StructuredOutputError("response_format.type", f"response_format.type {shown} is not supported; "
                                                            f"allowed: {', '.join(_RESPONSE_FORMAT_TYPES)}")
    if backend is None:
        raise StructuredOutputError("response_format", f"response_format {kind!r} is not available: this server "
                                                       "has structured output disabled")
    if kind == "json_object":
        return kind, None
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        what = "is missing" if spec is None else f"must be an object, got {_json_type(spec)}"
        raise StructuredOutputError("response_format.json_schema",
                                    f"response_format.json_schema {what} (give {{\"name\": ..., \"schema\": {{...}}}})")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise StructuredOutputError("response_format.json_schema.name",
                                    "response_format.json_schema.name must be a string")
    if "schema" not in spec:
        raise StructuredOutputError(SCHEMA_PARAM, f"{SCHEMA_PARAM} is missing")
    return kind, spec["schema"]


def constraint_for_response_format(backend: GrammarBackend | None, response_format: dict | None, *,
                                   separators: tuple[str, str] = _SEPARATORS) -> GrammarConstraintFactory | None:
    """OpenAI's `response_format` -> a constraint factory, or None for plain text.

    {"type": "text"} / None -> None; {"type": "json_object"} -> any JSON object;
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}} -> that schema.
    `backend` may be None only for text (otherwise a StructuredOutputError says structured output is off).
    `separators`: how the JSON is written (compact by default).
    """
    request = _response_format_request(backend, response_format)
    if request is None:
        return None
    kind, schema = request
    if kind == "json_object":
        return backend.json_object(separators)
    return backend.json_schema(schema, SCHEMA_PARAM, separators=separators)


async def constraint_for_response_format_async(backend: GrammarBackend | None, response_format: dict | None, *,
                                               separators: tuple[str, str] = _SEPARATORS
                                               ) -> GrammarConstraintFactory | None:
    """`constraint_for_response_format` for the event loop: compiled in a worker, within the backend's time limit."""
    request = _response_format_request(backend, response_format)
    if request is None:
        return None
    kind, schema = request
    if kind == "json_object":
        return await backend.json_object_async(separators)
    return await backend.json_schema_async(schema, SCHEMA_PARAM, separators=separators)
