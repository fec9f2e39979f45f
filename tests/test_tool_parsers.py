import itertools
import json
import random
import re

import pytest

from trinity.serve.reasoning import ReasoningParser
from trinity.serve.tools import (ToolCall, ToolCallDelta, ToolSchemaError, get_tool_parser, new_tool_call_id,
                                 parse_tool_choice, tool_calls_from_json, tool_calls_json_schema, validate_tools)

ID_RE = re.compile(r"^call_[A-Za-z0-9]{24}$")


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TYPED = {"type": "function", "function": {
    "name": "typed", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "flag": {"type": "boolean"},
        "obj": {"type": "object"}, "arr": {"type": "array", "items": {"type": "integer"}},
        "text": {"type": "string"}, "maybe": {"type": ["integer", "null"]}, "num_str": {"type": "string"}}}}}
NOARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, TYPED, NOARGS]


def collect(parser, deltas):
    """Stream `deltas`; check the OpenAI delta shape; return (content, [(name, arguments)]) by index."""
    content, events = [], []
    for d in deltas:
        c, ds = parser.feed(d)
        content.append(c)
        events += ds
    c, ds = parser.flush()
    content.append(c)
    events += ds
    return "".join(content), calls_from_events(events)


def calls_from_events(events, first_index=0):
    calls = {}
    order = []
    for ev in events:
        assert isinstance(ev, ToolCallDelta)
        if ev.index not in calls:
            assert ev.id is not None and ID_RE.match(ev.id), ev
            assert ev.name, ev
            assert ev.arguments in (None, ""), ev
            calls[ev.index] = [ev.name, ""]
            order.append(ev.index)
        else:
            assert ev.id is None and ev.name is None, ev
            assert ev.arguments, ev
            calls[ev.index][1] += ev.arguments
    assert order == list(range(first_index, first_index + len(order)))
    return [tuple(calls[i]) for i in order]


def extracted(parser, text):
    content, calls = parser.extract(text)
    for call in calls:
        assert isinstance(call, ToolCall) and ID_RE.match(call.id)
        assert isinstance(json.loads(call.arguments), dict)
        assert call.arguments == compact(json.loads(call.arguments))
    return content, [(c.name, c.arguments) for c in calls]


def splits(text, seed=0):
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 10))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def hermes(obj):
    return "<tool_call>\n" + json.dumps(obj, ensure_ascii=False) + "\n</tool_call>"


# (parser name, tools, text, expected content, expected [(name, arguments object)])
HERMES_CASES = [
    ("single", None,
     "Let me check.\n" + hermes({"name": "get_weather", "arguments": {"city": "Paris"}}),
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    ("multiple with content around", None,
     "A " + hermes({"name": "a", "arguments": {"k": 1}}) + " between " + hermes({"name": "b", "arguments": {}})
     + " after", "A  between  after", [("a", {"k": 1}), ("b", {})]),
    ("parallel", TOOLS,
     hermes({"name": "get_weather", "arguments": {"city": "Paris"}}) + "\n"
     + hermes({"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}),
     "\n", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "days": 2})]),
    ("arguments as a JSON string", None,
     hermes({"name": "f", "arguments": json.dumps({"q": "x", "n": [1, 2]})}), "", [("f", {"q": "x", "n": [1, 2]})]),
    ("parameters alias", None,
     hermes({"name": "f", "parameters": {"q": "y"}}), "", [("f", {"q": "y"})]),
    ("no arguments", None, hermes({"name": "now"}), "", [("now", {})]),
    ("invalid JSON is content", None,
     'x <tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call> y',
     'x <tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call> y', []),
    ("no name is content", None,
     hermes({"arguments": {"a": 1}}) + hermes({"name": "ok"}), hermes({"arguments": {"a": 1}}), [("ok", {})]),
    ("arguments not an object is content", None,
     hermes({"name": "f", "arguments": [1]}), hermes({"name": "f", "arguments": [1]}), []),
    ("NaN is not JSON", None,
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ("float overflow is not JSON", None,
     '<tool_call>{"name": "f", "arguments": {"x": 1e400}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": 1e400}}</tool_call>', []),
    ("unicode arguments", None,
     hermes({"name": "get_weather", "arguments": {"city": "Zürich 東京 🚀", "q": "a\"b\\c\n"}}),
     "", [("get_weather", {"city": "Zürich 東京 🚀", "q": "a\"b\\c\n"})]),
    ("unknown name with tools is content", TOOLS,
     hermes({"name": "rm_rf", "arguments": {}}), hermes({"name": "rm_rf", "arguments": {}}), []),
    ("schema coercion of string values", TOOLS,
     hermes({"name": "get_weather", "arguments": {"city": "123", "days": "3"}}),
     "", [("get_weather", {"city": "123", "days": 3})]),
    ("unclosed final valid block", None,
     'ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', "ok ", [("f", {"a": 1})]),
    ("unclosed invalid block is content", None,
     'ok <tool_call>\n{"name": "f", "argu', 'ok <tool_call>\n{"name": "f", "argu', []),
    ("tag-like text is content", None,
     "a < b <tool_ca ll> <tool_call <tool_call", "a < b <tool_ca ll> <tool_call <tool_call", []),
    ("close tag alone is content", None, "x </tool_call> y", "x </tool_call> y", []),
]

XML_TYPED = ("Writing it now.\n<tool_call>\n<function=typed>\n"
             "<parameter=n>\n42\n</parameter>\n"
             "<parameter=x>\n3.5\n</parameter>\n"
             "<parameter=flag>\ntrue\n</parameter>\n"
             "<parameter=obj>\n{\"a\": {\"b\": [1, \"ü\"]}}\n</parameter>\n"
             "<parameter=arr>\n[1, 2, 3]\n</parameter>\n"
             "<parameter=text>\ndef f():\n    return 1\n\n</parameter>\n"
             "<parameter=maybe>\nnull\n</parameter>\n"
             "<parameter=num_str>\n007\n</parameter>\n"
             "</function>\n</tool_call>")


def xml_call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


QWEN_CASES = [
    ("typed with schema", TOOLS, XML_TYPED, "Writing it now.\n",
     [("typed", {"n": 42, "x": 3.5, "flag": True, "obj": {"a": {"b": [1, "ü"]}}, "arr": [1, 2, 3],
                 "text": "def f():\n    return 1\n", "maybe": None, "num_str": "007"})]),
    ("typed without schema", None, XML_TYPED, "Writing it now.\n",
     [("typed", {"n": 42, "x": 3.5, "flag": True, "obj": {"a": {"b": [1, "ü"]}}, "arr": [1, 2, 3],
                 "text": "def f():\n    return 1\n", "maybe": None, "num_str": "007"})]),
    ("schema string keeps numbers and newlines", TOOLS,
     xml_call("get_weather", city="\n123\n", days="x7"), "",
     [("get_weather", {"city": "\n123\n", "days": "x7"})]),
    ("bad typed values fall back to the string", TOOLS,
     xml_call("typed", n="4.5", flag="maybe", obj="{not json}", arr="[1,"), "",
     [("typed", {"n": "4.5", "flag": "maybe", "obj": "{not json}", "arr": "[1,"})]),
    ("two calls with content around", TOOLS,
     "A\n" + xml_call("get_weather", city="Paris") + "\nB\n" + xml_call("get_weather", city="Oslo", days=5) + "\nC",
     "A\n\nB\n\nC", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo", "days": 5})]),
    ("no parameters", TOOLS, "<tool_call>\n<function=now>\n</function>\n</tool_call>", "", [("now", {})]),
    ("overflowing number stays a string", TOOLS, xml_call("typed", x="1e400"), "", [("typed", {"x": "1e400"})]),
    ("missing </parameter> tolerated", None,
     "<tool_call><function=f><parameter=a>1<parameter=b>two</function></tool_call>", "",
     [("f", {"a": 1, "b": "two"})]),
    ("duplicate key keeps the first", None, xml_call("f", a="1") .replace("</function>",
                                                                        "<parameter=a>\n2\n</parameter>\n</function>"),
     "", [("f", {"a": 1})]),
    ("unicode and markup in values", None, xml_call("f", s="<b>東京</b> & 🚀 \"q\""), "",
     [("f", {"s": "<b>東京</b> & 🚀 \"q\""})]),
    ("not a function is content", None,
     "x <tool_call>\nhello\n</tool_call> y", "x <tool_call>\nhello\n</tool_call> y", []),
    ("unknown function with tools is content", TOOLS, xml_call("rm_rf", path="/"), xml_call("rm_rf", path="/"), []),
    ("hermes JSON inside qwen3_coder", None, hermes({"name": "f", "arguments": {"a": 1}}), "", [("f", {"a": 1})]),
    ("bad JSON block is content", None, "<tool_call>{bad</tool_call>", "<tool_call>{bad</tool_call>", []),
    ("unclosed call at end of text", TOOLS,
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3",
     "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("unclosed header is content", None, "<tool_call>\n<function=get_wea", "<tool_call>\n<function=get_wea", []),
]


def _expect(content, calls):
    return content, [(n, compact(a)) for n, a in calls]


@pytest.mark.parametrize("kind,cases", [("hermes", HERMES_CASES), ("qwen3_coder", QWEN_CASES)])
def test_extract(kind, cases):
    for label, tools, text, content, calls in cases:
        assert extracted(get_tool_parser(kind)(tools), text) == _expect(content, calls), label


@pytest.mark.parametrize("kind,case", [("hermes", c) for c in HERMES_CASES] + [("qwen3_coder", c) for c in QWEN_CASES],
                         ids=lambda x: x[0] if isinstance(x, tuple) else x)
def test_stream_equals_extract_for_every_split(kind, case):
    label, tools, text, _, _ = case
    cls = get_tool_parser(kind)
    want = extracted(cls(tools), text)
    for deltas in splits(text):
        assert collect(cls(tools), deltas) == want, deltas


def random_text(rng):
    """Content, valid calls of both formats, and damaged ones (cut short, a character dropped)."""
    def block():
        name = rng.choice(["get_weather", "f", "typed", "bad name"])
        params = {rng.choice(["city", "days", "n", "a"]): rng.choice(["Paris", "1", "{\"k\": [1]}", "x\ny", "true"])
                  for _ in range(rng.randint(0, 3))}
        if rng.random() < 0.5:
            return hermes({"name": name, rng.choice(["arguments", "parameters"]): params})
        return xml_call(name, **params)
    segs = []
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.3:
            segs.append(rng.choice(["Hi ", "\n", "a < b", "<tool_", "</tool_call>", "x <tool_call y", "é🚀"]))
        else:
            b = block()
            if r < 0.45:
                b = b[:rng.randint(0, len(b))]
            elif r < 0.6:
                k = rng.randrange(len(b))
                b = b[:k] + b[k + 1:]
            segs.append(b)
    return "".join(segs)


def test_random_texts_stream_equals_extract():
    rng = random.Random(99)
    n_calls = 0
    for kind in ("hermes", "qwen3_coder"):
        for tools in (None, TOOLS):
            cls = get_tool_parser(kind)
            for _ in range(40):
                text = random_text(rng)
                want = extracted(cls(tools), text)
                n_calls += len(want[1])
                assert collect(cls(tools), list(text)) == want, (kind, text)
                for deltas in itertools.islice(splits(text, seed=rng.random()), 0, None, 3):
                    assert collect(cls(tools), deltas) == want, (kind, deltas)
    assert n_calls > 50


def test_hermes_delta_shape():
    p = get_tool_parser("hermes")()
    text = "Hi <tool_call>\n" + '{"name": "a", "arguments": {"x": 1}}' + "\n</tool_call>"
    content, events = p.feed(text)
    assert content == "Hi "
    assert [(e.index, e.name, e.arguments) for e in events] == [(0, "a", ""), (0, None, '{"x":1}')]
    assert ID_RE.match(events[0].id) and events[1].id is None
    assert p.flush() == ("", [])


def test_content_is_emitted_early_and_partial_tag_held():
    p = get_tool_parser("hermes")()
    assert p.feed("Hello wor") == ("Hello wor", [])
    assert p.feed("ld <tool_") == ("ld ", [])
    assert p.feed("box>") == ("<tool_box>", [])
    assert p.feed("<tool_call>{") == ("", [])
    assert p.flush() == ("<tool_call>{", [])


def test_qwen3_coder_streams_per_parameter():
    p = get_tool_parser("qwen3_coder")(TOOLS)
    events = []
    assert p.feed("Ok\n<tool_call>\n<function=get_wea") == ("Ok\n", [])
    _, ev = p.feed("ther>\n<parameter=city>\nPar")
    assert [(e.index, e.name, e.arguments) for e in ev] == [(0, "get_weather", "")]
    events += ev
    _, ev = p.feed("is\n</parameter>\n<parameter=days>\n2\n</para")
    assert [e.arguments for e in ev] == ['{"city":"Paris"']
    events += ev
    _, ev = p.feed("meter>\n</function>\n</tool_call>\nbye")
    assert [e.arguments for e in ev] == [',"days":2}']
    events += ev
    assert calls_from_events(events) == [("get_weather", '{"city":"Paris","days":2}')]
    assert p.flush() == ("", [])


def test_shared_counter_across_reasoning_and_content_streams():
    text = ("I should look this up.\n" + hermes({"name": "a", "arguments": {}}) + "\n</think>\n"
            "Calling more.\n" + hermes({"name": "b", "arguments": {"i": 1}}) + hermes({"name": "c", "arguments": {}}))
    for deltas in (list(text), [text], [text[:40], text[40:]]):
        reasoning = ReasoningParser(starts_in_reasoning=True)
        counter = itertools.count()
        in_reasoning = get_tool_parser("hermes")(None, counter=counter)
        in_content = get_tool_parser("hermes")(None, counter=counter)
        events, r_text, c_text = [], [], []
        for d in deltas + [None]:
            r, c = reasoning.feed(d) if d is not None else reasoning.flush()
            for parser, piece, sink, last in ((in_reasoning, r, r_text, d is None), (in_content, c, c_text, d is None)):
                out, ev = parser.feed(piece)
                sink.append(out)
                events += ev
                if last:
                    out, ev = parser.flush()
                    sink.append(out)
                    events += ev
        assert calls_from_events(events) == [("a", "{}"), ("b", '{"i":1}'), ("c", "{}")]
        assert "".join(r_text) == "I should look this up.\n\n"
        assert "".join(c_text) == "Calling more.\n"


def test_default_counters_are_per_parser():
    for _ in range(2):
        p = get_tool_parser("hermes")()
        _, ev = p.feed(hermes({"name": "a"}))
        assert ev[0].index == 0


def test_new_tool_call_id():
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(ID_RE.match(i) for i in ids)


def test_get_tool_parser_unknown():
    with pytest.raises(ValueError, match="hermes.*qwen3_coder"):
        get_tool_parser("mistral")


# -- validation ---------------------------------------------------------------------------------------


def fn(name="f", **extra):
    return {"type": "function", "function": {"name": name, **extra}}


@pytest.mark.parametrize("tools,param", [
    ({"a": 1}, "tools"),
    ([fn(), "x"], "tools[1]"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([fn(), fn("g"), {"type": "function", "function": {"description": "no name"}}], "tools[2].function.name"),
    ([fn("")], "tools[0].function.name"),
    ([fn("has space")], "tools[0].function.name"),
    ([fn("x" * 65)], "tools[0].function.name"),
    ([fn(name=3)], "tools[0].function.name"),
    ([fn("f"), fn("f")], "tools[1].function.name"),
    ([fn(parameters=[1])], "tools[0].function.parameters"),
    ([fn(parameters={"type": "array"})], "tools[0].function.parameters"),
    ([fn(description=5)], "tools[0].function.description"),
])
def test_validate_tools_errors(tools, param):
    with pytest.raises(ToolSchemaError) as e:
        validate_tools(tools)
    assert e.value.param == param
    assert isinstance(e.value, ValueError)


def test_validate_tools_ok():
    validate_tools(TOOLS)
    validate_tools([])
    validate_tools([fn("a-b_C9", parameters={"properties": {}}), fn("x" * 64, parameters=None)])


def test_parse_tool_choice():
    assert parse_tool_choice(None, TOOLS) == "auto"
    assert parse_tool_choice(None, None) == "none"
    assert parse_tool_choice("none", None) == "none"
    assert parse_tool_choice("none", TOOLS) == "none"
    assert parse_tool_choice("auto", TOOLS) == "auto"
    assert parse_tool_choice("required", TOOLS) == "required"
    assert parse_tool_choice({"type": "function", "function": {"name": "typed"}}, TOOLS) == ("named", "typed")
    for choice, tools in [("sometimes", TOOLS), ("auto", None), ("required", []),
                          ({"type": "function", "function": {"name": "nope"}}, TOOLS),
                          ({"type": "function", "function": {"name": "typed"}}, None),
                          ({"type": "function"}, TOOLS), ({"type": "x", "function": {"name": "typed"}}, TOOLS),
                          (3, TOOLS)]:
        with pytest.raises(ToolSchemaError) as e:
            parse_tool_choice(choice, tools)
        assert e.value.param == "tool_choice", choice


# -- the constrained-decoding schema ------------------------------------------------------------------

GOOD_REQUIRED = [
    [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "now", "arguments": {}}],
    [{"name": "typed", "arguments": {"n": 1, "arr": [1, 2]}}],
]
BAD_REQUIRED = [
    [],
    {"name": "now", "arguments": {}},
    [{"name": "nope", "arguments": {}}],
    [{"name": "get_weather", "arguments": {}}],                  # misses required "city"
    [{"name": "get_weather", "arguments": {"city": 3}}],         # wrong type
    [{"name": "typed", "arguments": {"n": "one"}}],              # typed's own parameters, not another tool's
    [{"name": "now"}],
    [{"name": "now", "arguments": {}, "extra": 1}],
    [{"name": "now", "arguments": []}],
]
GOOD_NAMED = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
BAD_NAMED = [{"name": "now", "arguments": {}}, [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
             {"name": "get_weather", "arguments": {"days": 1}}]


def mini_validate(inst, schema):
    """The subset of JSON Schema that tool_calls_json_schema uses (fallback when jsonschema is absent)."""
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
             "boolean": bool, "null": type(None)}
    allowed = set(schema) - {"description", "title"}
    assert allowed <= {"type", "properties", "required", "const", "anyOf", "items", "minItems",
                       "additionalProperties", "enum"}, allowed
    t = schema.get("type")
    if t is not None:
        ts = [t] if isinstance(t, str) else t
        if not any(isinstance(inst, types[x]) and not (isinstance(inst, bool) and x in ("integer", "number"))
                   for x in ts):
            return False
    if "const" in schema and inst != schema["const"]:
        return False
    if "enum" in schema and inst not in schema["enum"]:
        return False
    if "anyOf" in schema and not any(mini_validate(inst, s) for s in schema["anyOf"]):
        return False
    if isinstance(inst, dict):
        props = schema.get("properties", {})
        if any(k not in inst for k in schema.get("required", [])):
            return False
        for k, v in inst.items():
            if k in props:
                if not mini_validate(v, props[k]):
                    return False
            elif schema.get("additionalProperties") is False:
                return False
    if isinstance(inst, list):
        if len(inst) < schema.get("minItems", 0):
            return False
        if "items" in schema and not all(mini_validate(v, schema["items"]) for v in inst):
            return False
    return True


def _check_schema(is_valid):
    required = tool_calls_json_schema(TOOLS, "required")
    named = tool_calls_json_schema(TOOLS, ("named", "get_weather"))
    for inst in GOOD_REQUIRED:
        assert is_valid(inst, required), inst
    for inst in BAD_REQUIRED:
        assert not is_valid(inst, required), inst
    for inst in GOOD_NAMED:
        assert is_valid(inst, named), inst
    for inst in BAD_NAMED:
        assert not is_valid(inst, named), inst


def test_tool_calls_json_schema_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    for schema in (tool_calls_json_schema(TOOLS, "required"), tool_calls_json_schema(TOOLS, ("named", "now"))):
        jsonschema.Draft202012Validator.check_schema(schema)
    _check_schema(lambda inst, schema: jsonschema.Draft202012Validator(schema).is_valid(inst))


def test_tool_calls_json_schema_structure():
    _check_schema(mini_validate)
    s = tool_calls_json_schema(TOOLS, "required")
    assert s["type"] == "array" and s["minItems"] == 1 and len(s["items"]["anyOf"]) == 3
    json.dumps(s)  # plain JSON
    assert tool_calls_json_schema([WEATHER], "required")["items"]["properties"]["name"]["const"] == "get_weather"
    with pytest.raises(ValueError):
        tool_calls_json_schema(TOOLS, ("named", "missing"))
    with pytest.raises(ValueError):
        tool_calls_json_schema(TOOLS, "auto")


def test_tool_calls_from_json():
    calls = tool_calls_from_json(json.dumps(GOOD_REQUIRED[1]), "required")
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris","days":2}'), ("now", "{}")]
    calls = tool_calls_from_json('{"name": "get_weather", "arguments": {"city": "Zürich"}}', ("named", "get_weather"))
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Zürich"}')]
    with pytest.raises(ValueError):
        tool_calls_from_json("[1]", "required")
