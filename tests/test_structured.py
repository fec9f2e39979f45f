"""Structured output (trinity.serve.structured): JSON mode and JSON Schema through the engine, on random models."""

from __future__ import annotations

import copy
import json
import random
import sys

import pytest
import torch

pytest.importorskip("xgrammar")

from trinity import LLM, SamplingParams, TrinityForCausalLM, preset  # noqa: E402
from trinity.serve.structured import (  # noqa: E402
    GrammarBackend,
    StructuredOutputError,
    constraint_for_response_format,
)
from trinity.tokenizer import build_byte_level_tokenizer, train_bpe_tokenizer  # noqa: E402

SEEDS = range(8)

WORDS = ["name", "age", "ok", "items", "color", "red", "green", "blue", "true", "false", "null", "id", "value",
         "tags", "pt", "x", "y", "<|im_end|>", "<think>"]

# Bounded outputs: every string is an enum or short, every array has maxItems, integers are bounded.
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "level": {"type": "integer", "enum": [1, 2, 3]},
        "pt": {"type": "object", "properties": {"x": {"type": "integer", "enum": [-1, 0, 1]},
                                                "label": {"type": "string", "maxLength": 6}},
               "required": ["x", "label"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["color", "ok", "n", "level", "pt", "tags"],
    "additionalProperties": False,
}


def _json_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def value(depth: int = 0):
        r = rng.random()
        if depth > 2 or r < 0.35:
            return rng.choice([rng.randint(-5, 100), rng.choice(WORDS), True, False, None])
        if r < 0.6:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(WORDS): value(depth + 1) for _ in range(rng.randint(0, 3))}

    return [json.dumps(value(), separators=(",", ":")) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    # Multi-character tokens that straddle JSON punctuation (`":"`, `","`, `{"`), so the grammar sees real BPE.
    return train_bpe_tokenizer(_json_corpus(), vocab_size=420)


@pytest.fixture(scope="module")
def model():
    return TrinityForCausalLM.random(preset("tiny"), seed=0)  # vocab 512 > the tokenizer's 420: padding ids


@pytest.fixture(scope="module")
def backend(tok, model):
    return GrammarBackend(tok, model.config.vocab_size)


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model, tokenizer=tok)


def _prompts(k: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 266) for _ in range(rng.randint(2, 8))] for _ in range(k)]


def _run(llm, factory, greedy: bool, max_tokens: int = 200, k: int = len(SEEDS), **extra):
    """k (8) sequences: greedy over k prompts, or sampling over k seeds (and k prompts)."""
    prompts = _prompts(k)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, seed=s,
                             constraint_factory=factory, **extra) for s in SEEDS[:k]]
    return [o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]


# ---------------------------------------------------------------------------------------------- validation
def validate(value, schema: dict, path: str = "$") -> None:
    """A JSON Schema check for the keywords these tests use (jsonschema is not a dependency)."""
    if path == "$":
        try:
            import jsonschema
        except ImportError:
            jsonschema = None
        if jsonschema is not None:
            jsonschema.validate(value, schema)
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool}
    t = schema.get("type")
    if t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), (path, value)
    elif t == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (path, value)
    elif t is not None:
        assert isinstance(value, kinds[t]), (path, value)
    if "enum" in schema:
        assert value in schema["enum"] and type(value) in {type(e) for e in schema["enum"]}, (path, value)
    if "minimum" in schema:
        assert value >= schema["minimum"], (path, value)
    if "maximum" in schema:
        assert value <= schema["maximum"], (path, value)
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], (path, value)
    if "maxItems" in schema:
        assert len(value) <= schema["maxItems"], (path, value)
    if t == "object":
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), (path, value)
        assert set(value) <= set(props), (path, value)  # strict: nothing the schema does not name
        for key, sub in value.items():
            validate(sub, props[key], f"{path}.{key}")
    if t == "array" and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


def _check_clean_tokens(out, tok, backend) -> None:
    for t in out.token_ids:
        assert t < tok.vocab_size, f"padding id {t} generated"
        assert t not in backend.blocked_token_ids or t in tok.eos_token_ids, f"special id {t} generated"
    assert all(t not in tok.eos_token_ids for t in out.token_ids[:-1])


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_json_schema_outputs_validate(llm, backend, tok, greedy):
    outs = _run(llm, backend.json_schema(SCHEMA), greedy)
    texts = set()
    for out in outs:
        assert out.finish_reason == "stop", (out.finish_reason, out.text)
        value = json.loads(out.text)
        validate(value, SCHEMA)
        assert out.text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # compact
        _check_clean_tokens(out, tok, backend)
        assert out.token_ids[-1] not in tok.eos_token_ids  # finished by the grammar, not by an EOS token
        texts.add(out.text)
    assert len(texts) > 1  # the model really chose (different prompts / seeds, different objects)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_json_object_mode(llm, backend, tok, greedy):
    # Any object is unbounded, and a random model wanders: most sequences close their object well within
    # max_tokens, the others stop at "length" holding a prefix the grammar accepts.
    factory = constraint_for_response_format(backend, {"type": "json_object"})
    outs = _run(llm, factory, greedy, max_tokens=128)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert len(stopped) >= len(outs) // 2, [o.finish_reason for o in outs]
    for out in outs:
        _check_clean_tokens(out, tok, backend)
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict), out.text
            assert not any(c.isspace() for c in _outside_strings(out.text)), out.text  # compact
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 128
            replay = factory()
            for t in out.token_ids:
                assert replay.allowed_tokens(backend.vocab_size)[t]
                replay.accept(t)
            assert replay.rejected_token is None and not replay.is_finished()
    assert any(len(o.token_ids) > 5 for o in stopped)  # not only "{}"


def _outside_strings(text: str) -> str:
    out, in_str, esc = [], False, False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        else:
            out.append(c)
    return "".join(out)


def test_top_level_string_schema(llm, backend, tok):
    schema = {"type": "string", "maxLength": 8}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    outs = _run(llm, constraint_for_response_format(backend, fmt), greedy=False, max_tokens=64)
    for out in outs:
        assert out.finish_reason == "stop", (out.finish_reason, out.text)
        value = json.loads(out.text)  # strict json.loads: no raw control characters in the string
        validate(value, schema)
        _check_clean_tokens(out, tok, backend)


def test_top_level_bounded_integer_ends_on_eos_or_when_complete(llm, backend):
    # "5" may go on to "50", so the grammar offers EOS there; "7" cannot, so it ends by itself.
    schema = {"type": "integer", "minimum": 0, "maximum": 50}
    outs = _run(llm, backend.json_schema(schema), greedy=False, max_tokens=16)
    for out in outs:
        assert out.finish_reason == "stop", (out.finish_reason, out.text)
        validate(json.loads(out.text), schema)


def test_n2_each_sequence_gets_its_own_matcher(llm, backend):
    factory = backend.json_schema(SCHEMA)
    made = []

    def counting():
        c = factory()
        made.append(c)
        return c

    params = SamplingParams(n=2, max_tokens=200, temperature=1.0, seed=11, constraint_factory=counting)
    out = llm.generate(prompt_token_ids=[[40, 50, 60]], sampling_params=params)[0]
    assert len(out.outputs) == 2 and len(made) == 2 and made[0] is not made[1]
    assert made[0].matcher is not made[1].matcher
    for o in out.outputs:
        assert o.finish_reason == "stop", o.text
        validate(json.loads(o.text), SCHEMA)
    assert all(c.is_finished() for c in made)


def test_biased_towards_special_and_padding_ids_still_valid(llm, backend, tok, model):
    # The mask must win over any logit_bias: push <|im_end|>, <think> and the padding ids as hard as possible.
    im_end, think = tok.token_to_id("<|im_end|>"), tok.token_to_id("<think>")
    pads = range(tok.vocab_size, model.config.vocab_size, 7)
    bias = {im_end: 100.0, think: 100.0, **{p: 100.0 for p in pads}}
    outs = _run(llm, backend.json_schema(SCHEMA), greedy=False, logit_bias=bias)
    for out in outs:
        assert out.finish_reason == "stop" and im_end not in out.token_ids and think not in out.token_ids
        validate(json.loads(out.text), SCHEMA)
        _check_clean_tokens(out, tok, backend)


# ---------------------------------------------------------------------------------------------- masks
def test_masks_forbid_special_and_padding_tokens(backend, tok, model):
    V = model.config.vocab_size
    c = backend.json_schema({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})()
    specials = sorted(tok.special_token_ids | {tok.token_to_id(t) for t in ("<think>", "<tool_call>")})
    text = '{"s":"<|im_end|> <think>"}'
    ids = [10 + b for b in text.encode()]  # spelled with byte tokens (ids 10..265 are the bytes)
    for i, t in enumerate(ids):
        mask = c.allowed_tokens(V)
        assert mask.dtype == torch.bool and mask.shape == (V,)
        assert not mask[tok.vocab_size:].any(), "a padding id is allowed"
        assert not mask[specials].any(), "a special token is allowed"
        if i < len(ids) - 1:
            assert not mask[sorted(tok.eos_token_ids)].any(), "EOS allowed before the JSON is complete"
        assert mask[t], (i, text[:i])
        if 6 <= i < len(ids) - 2:  # inside the string: the bytes of "<|im_end|>" are fine, its id is not
            assert mask[10 + ord("<")] and not mask[tok.token_to_id("<|im_end|>")]
        c.accept(t)
        assert c.is_finished() == (i == len(ids) - 1)
    assert json.loads(tok.decode(ids)) == {"s": "<|im_end|> <think>"}


def test_mask_matches_a_naive_per_token_check(tok):
    # Byte-level tokenizer, vocab == model vocab: after '{"a":' the allowed tokens are exactly the value starts.
    bl = build_byte_level_tokenizer()
    be = GrammarBackend(bl, bl.vocab_size)
    c = be.json_schema({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})()
    for b in b'{"a":':
        c.accept(10 + b)
    allowed = c.allowed_tokens(bl.vocab_size).nonzero().flatten().tolist()
    assert allowed == [10 + ord("f"), 10 + ord("t")]
    # A model vocab larger than the backend's: the extra ids come back False.
    bigger = c.allowed_tokens(bl.vocab_size + 40)
    assert bigger.shape == (bl.vocab_size + 40,) and not bigger[bl.vocab_size:].any()


def test_rejected_token_ends_the_sequence(backend, tok):
    c = backend.json_object()()
    c.accept(10 + ord("x"))  # not '{': the grammar refuses it
    assert c.is_finished() and c.rejected_token == 10 + ord("x")


# ---------------------------------------------------------------------------------------------- API & errors
def test_response_format_shapes(backend):
    assert constraint_for_response_format(backend, None) is None
    assert constraint_for_response_format(backend, {"type": "text"}) is None
    assert constraint_for_response_format(None, {"type": "text"}) is None
    assert callable(constraint_for_response_format(backend, {"type": "json_object"}))
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "boolean"}, "strict": False}}
    assert callable(constraint_for_response_format(backend, fmt))


@pytest.mark.parametrize("fmt, param", [
    ({"type": "xml"}, "response_format.type"),
    ({}, "response_format.type"),
    ({"type": None}, "response_format.type"),
    ("json", "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": "schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                    "maximum": 1}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema.schema"),
])
def test_bad_response_formats(backend, fmt, param):
    with pytest.raises(StructuredOutputError) as info:
        constraint_for_response_format(backend, fmt)
    err = info.value
    assert isinstance(err, ValueError) and err.param == param
    msg = str(err)
    assert msg and "Traceback" not in msg and "\n" not in msg
    assert ".cc:" not in msg and "/project" not in msg and "/work" not in msg, msg


@pytest.mark.parametrize("schema, words", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ['"uniqueItems"']),
    ({"type": "object", "properties": {"tags": {"type": "array", "contains": {"const": 1}}}},
     ['"contains"', "properties.tags"]),
    ({"not": {"type": "string"}}, ['"not"']),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 6}}, ['"if"']),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, ['"allOf"']),
    ({"type": "number", "multipleOf": 0.5}, ['"multipleOf"']),
    ({"$defs": {"p": {"type": "object", "dependentRequired": {"a": ["b"]}}}, "$ref": "#/$defs/p"},
     ['"dependentRequired"', "$defs.p"]),
])
def test_keywords_the_grammar_would_ignore_are_refused(backend, schema, words):
    # xgrammar accepts these but does not enforce them; refusing keeps "the output validates" true.
    with pytest.raises(StructuredOutputError) as info:
        backend.json_schema(schema)
    assert info.value.param == "response_format.json_schema.schema"
    for w in words:
        assert w in str(info.value), str(info.value)
    # Opt-in best effort (e.g. a tool's parameters): the keyword is ignored, the rest still holds.
    assert callable(backend.json_schema(schema, param="tools", best_effort=True))
    with pytest.raises(StructuredOutputError):  # a cached grammar does not skip the check
        backend.json_schema(schema)


def test_enforced_keywords_are_accepted(backend):
    for schema in [{"type": "integer", "multipleOf": 3}, {"allOf": [{"type": "string"}]},
                   {"type": "string", "format": "email"}, {"enum": ["not", "if", "uniqueItems"]},
                   {"type": "object", "properties": {"not": {"type": "boolean"}}, "required": ["not"]}]:
        assert callable(backend.json_schema(schema))


def test_property_order_is_kept(llm, backend):
    props = {"b": {"type": "boolean"}, "a": {"type": "integer", "enum": [7]}}
    ba = backend.json_schema({"type": "object", "properties": props, "required": ["b", "a"]})
    ab = backend.json_schema({"type": "object", "properties": dict(reversed(props.items())), "required": ["a", "b"]})
    assert ba.compiled_grammar is not ab.compiled_grammar  # equal as dicts, different key order in the output
    outs = llm.generate(prompt_token_ids=[[30, 40], [30, 40]], sampling_params=[
        SamplingParams(max_tokens=32, temperature=0, constraint_factory=f) for f in (ba, ab)])
    assert outs[0].outputs[0].text.startswith('{"b":') and outs[1].outputs[0].text.startswith('{"a":7,')


def test_valid_under_preemption(model, tok, backend):
    # A tight KV cache forces preemption (recompute): the constraint state must carry over untouched.
    llm = LLM(model, tokenizer=tok, num_kv_blocks=56, block_size=4)
    outs = _run(llm, backend.json_schema(SCHEMA), greedy=False, k=8)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        assert out.finish_reason == "stop", out.text
        validate(json.loads(out.text), SCHEMA)


def test_invalid_schema_message_is_clear(backend):
    with pytest.raises(StructuredOutputError) as info:
        backend.json_schema({"type": "foo"})
    assert 'Unsupported type "foo"' in str(info.value)
    assert str(info.value).startswith("response_format.json_schema.schema ")
    with pytest.raises(StructuredOutputError) as info:
        backend.json_schema({"type": "foo"}, param="tools[0].function.parameters")
    assert info.value.param == "tools[0].function.parameters"


def test_grammar_cache(backend):
    schema = {"type": "object", "properties": {"k": {"type": "integer", "enum": [1, 2]}}, "required": ["k"]}
    before = backend.num_compiles
    a = backend.json_schema(schema)
    b = backend.json_schema(copy.deepcopy(schema))
    assert a.compiled_grammar is b.compiled_grammar
    assert backend.num_compiles == before + 1
    assert backend.json_object().compiled_grammar is backend.json_object().compiled_grammar
    other = backend.json_schema({**schema, "required": []})
    assert other.compiled_grammar is not a.compiled_grammar
    # Each call of a factory gives a fresh matcher over the shared compiled grammar.
    assert a() is not a() and a().matcher is not a().matcher


def test_backend_without_xgrammar(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now fails
    with pytest.raises(RuntimeError, match="xgrammar"):
        GrammarBackend(tok, tok.vocab_size)
