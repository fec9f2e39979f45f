"""Generated tools in the synthetic corpus (issue 24): conversations render through the built-in template with
the loss on exactly the assistant turns, held-out tool names and domains never reach training, expected calls
satisfy their tool's schema with values taken from the user's words, every result agrees with its fake backend,
the corpus is reproducible, and the scorer and the evaluator's new split judge hand-made replies right."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

from trinity.synthetic.conversations import ALL_FAMILIES, FAMILIES, HELDOUT_FAMILIES, HELDOUT_MIX, TRAIN_MIX, \
    example_at, parse_mix
from trinity.jsonl import read_jsonl
from trinity.synthetic.corpus import write_corpus
from trinity.synthetic.generated_backend import ACTION_BY_NAME, ERRORS
from trinity.synthetic.generated_tools import draw_call, make_tool
from trinity.synthetic.made_up_tools import VERBS, made_up_action, made_up_pool
from trinity.synthetic.made_up_words import made_up_word
from trinity.synthetic.scoring import Reply, reference_reply, score
from trinity.synthetic.tool_domains import HELDOUT_ACTIONS, HELDOUT_DOMAINS, HELDOUT_TOOL_NAMES, HELDOUT_WORDS, \
    TRAIN_ACTIONS, TRAIN_DOMAINS, TRAIN_TOOL_NAMES, Param, name_forms
from trinity.synthetic.tools import TOOL_SCHEMAS, run_corpus_tool, run_tool
from trinity.tokenizer import TrinityTokenizer
from trinity.train.data import chat_document

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tiny_eval  # noqa: E402

NEW_TRAIN = ("gen_tool_call", "gen_tool_parallel", "gen_tool_none", "tool_choice_forced", "json_schema_reasoned")
GENERATED = (*NEW_TRAIN, *HELDOUT_FAMILIES)
# verbs and fillers any tool may use; every other word of a held-out name must be new to training
GENERIC_WORDS = {"get", "find", "book", "order", "buy", "play", "start", "run", "rent", "reserve", "set", "add",
                 "create", "search", "send", "make", "lookup", "request", "schedule", "record", "log", "open",
                 "track", "convert", "call", "now", "current"}


def _examples(family: str, count: int, seed: int = 0) -> list:
    mix = {family: 1.0}
    return [ALL_FAMILIES[family](random.Random(f"test:{seed}:{family}:{i}")) for i in range(count)] \
        if family in HELDOUT_FAMILIES else [example_at(seed, "train", i, mix) for i in range(count)]


@pytest.fixture(scope="module")
def samples() -> dict[str, list]:
    return {family: _examples(family, 150) for family in GENERATED}


@pytest.fixture(scope="module")
def tok() -> TrinityTokenizer:
    return TrinityTokenizer.from_pretrained(ROOT / "src" / "trinity" / "assets" / "trinity-tiny")


def _calls(message: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower().replace("_", " ").replace("-", " ")))


# ---------------------------------------------------------------------------------------------- rendering
def test_every_generated_conversation_renders_with_the_loss_on_the_assistant_turns(samples, tok):
    for family, examples in samples.items():
        for example in examples[:40]:
            text = tok.apply_chat_template(example.messages, tools=example.tools, add_generation_prompt=False)
            for tool in example.tools or []:
                assert json.dumps(tool) in text  # the tools section lists every offered schema
            doc = chat_document(example.messages, tok, tok.eos_token_id, tools=example.tools)
            ids, mask = doc.ids.tolist(), doc.loss_mask.tolist()
            segments, current = [], []
            for token, on in zip(ids, mask):
                if on:
                    current.append(token)
                elif current:
                    segments.append(tok.decode(current))
                    current = []
            if current:
                segments.append(tok.decode(current))
            turns = [m for m in example.messages if m["role"] == "assistant"]
            assert len(segments) == len(turns), family
            for segment, turn in zip(segments, turns):
                blocks = [f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'
                          for name, args in _calls(turn)]
                answer = "\n".join(([turn["content"]] if turn["content"] else []) + blocks)
                assert segment == f"{turn['reasoning_content']}\n</think>\n{answer}<|im_end|>\n", (family, segment)


def test_families_have_the_promised_shapes(samples):
    counts = {len(e.tools or []) for f in ("gen_tool_call", "unseen_tool_call") for e in samples[f]}
    assert counts == {2, 3, 4, 5, 6}
    assert all(len(_calls(e.messages[-4])) == 2 for f in ("gen_tool_parallel", "unseen_tool_parallel")
               for e in samples[f])
    for f in ("gen_tool_none", "unseen_tool_none"):
        assert all(not any(m.get("tool_calls") for m in e.messages) and e.tools for e in samples[f])
    errors = [e for e in samples["gen_tool_call"] if "error" in json.loads(e.messages[-2]["content"])]
    assert 5 <= len(errors) <= 40  # some tools fail, and the answer says so
    for e in errors:
        assert json.loads(e.messages[-2]["content"])["error"] in e.messages[-1]["content"]
    choices = [e.meta["tool_choice"] for e in samples["tool_choice_forced"]]
    assert "required" in choices and any(isinstance(c, dict) for c in choices)
    for e in samples["tool_choice_forced"]:
        called = _calls(e.messages[-3])[0][0]
        assert e.meta["tool_choice"] == "required" or e.meta["tool_choice"]["function"]["name"] == called
        # the reasoning knows the call is forced only when the prompt says so (tool_choice is not in the prompt)
        told = e.messages[0]["role"] == "system"
        assert e.messages[-3]["reasoning_content"].startswith(("A tool call is required.", "I must call")) == told
    kinds = {json.dumps(p["type"]) for e in samples["gen_tool_call"] for t in e.tools
             for p in t["function"]["parameters"]["properties"].values()}
    assert kinds >= {'"string"', '"integer"', '"number"', '"boolean"', '"array"', '"object"'}
    assert any("enum" in p for e in samples["gen_tool_call"] for t in e.tools
               for p in t["function"]["parameters"]["properties"].values())
    for e in samples["json_schema_reasoned"]:
        reply = e.messages[-1]
        assert e.meta["response_format"]["json_schema"]["schema"] == e.checkpoints[0].expected["schema"]
        assert reply["reasoning_content"] and json.loads(reply["content"]) == e.checkpoints[0].expected["value"]


# ---------------------------------------------------------------------------------------------- held-out split
def test_heldout_vocabulary_is_disjoint_from_training():
    assert not TRAIN_TOOL_NAMES & HELDOUT_TOOL_NAMES and not TRAIN_DOMAINS & HELDOUT_DOMAINS
    assert "get_weather" in HELDOUT_TOOL_NAMES and "weather" in HELDOUT_DOMAINS  # the probe
    assert not set(TOOL_SCHEMAS) & (TRAIN_TOOL_NAMES | HELDOUT_TOOL_NAMES)
    train_words = {w for n in TRAIN_TOOL_NAMES for w in _words(n)} - GENERIC_WORDS
    heldout_words = {w for n in HELDOUT_TOOL_NAMES for w in _words(n)} - GENERIC_WORDS
    assert not train_words & heldout_words
    keywords = {k for a in HELDOUT_ACTIONS for k in a.keywords}
    for action in TRAIN_ACTIONS:
        said = _words(" ".join([*action.names, action.purpose, *action.descriptions, *action.requests]))
        assert not said & keywords, (action.domain, said & keywords)


def test_heldout_tools_never_appear_in_training():
    names_pattern = re.compile(r"\b(%s)\b" % "|".join(sorted(map(re.escape, HELDOUT_TOOL_NAMES), key=len)[::-1]))
    keywords = {k for a in HELDOUT_ACTIONS for k in a.keywords}
    generated_names, made_up_names = set(), set()
    for i in range(3000):
        record = example_at(11, "train", i, TRAIN_MIX).record()
        text = json.dumps(record)
        assert not names_pattern.search(text), (i, names_pattern.search(text).group(0))
        for tool in record.get("tools") or []:
            name = tool["function"]["name"]
            if name in TOOL_SCHEMAS:
                continue  # the five corpus tools (among them the old `weather`) are not generated
            generated_names.add(name)
            made_up = name not in ACTION_BY_NAME
            if made_up:
                made_up_names.add(name)
            assert name in TRAIN_TOOL_NAMES or made_up and not (_words(name) - set(VERBS)) & HELDOUT_WORDS, name
            assert not _words(json.dumps(tool)) & keywords, tool
        if record["family"] in NEW_TRAIN:
            said = " ".join(m["content"] or "" for m in record["messages"])
            assert not _words(said) & keywords, said
    assert len(generated_names) > 100  # many names: the model cannot learn them by heart
    assert len(made_up_names) > 100  # made-up ones (made_up_tools.py) besides


def test_unseen_families_call_only_heldout_tools(samples):
    weather_probe = False
    for family in HELDOUT_FAMILIES:
        for example in samples[family]:
            for m in example.messages:
                for name, args in _calls(m):
                    assert name in HELDOUT_TOOL_NAMES
                    weather_probe |= ACTION_BY_NAME[name].domain == "weather" and set(args) <= {"city", "location"}
    assert weather_probe


def test_training_mix_refuses_the_heldout_families():
    with pytest.raises(ValueError, match="FAMILY=WEIGHT"):
        parse_mix("unseen_tool_call=0.5", TRAIN_MIX)
    assert parse_mix("unseen_tool_call=0.5", HELDOUT_MIX)["unseen_tool_call"] == 0.5
    assert not set(HELDOUT_FAMILIES) & set(TRAIN_MIX) and set(NEW_TRAIN) <= set(FAMILIES)


# ---------------------------------------------------------------------------------------------- arguments
def _param(name: str, key: str) -> Param | None:
    """The parameter behind `key` of a named tool; None for a made-up tool (its action lives only in its
    conversation)."""
    return next(p for p in ACTION_BY_NAME[name].params if key in p.names) if name in ACTION_BY_NAME else None


def _check_said(param: Param, value, text: str) -> None:
    """The value is in the user's words: a string or number as written, a boolean by its phrase."""
    if isinstance(value, bool):
        assert param is None or param.say(value) in text, (value, text)
    elif isinstance(value, dict):
        for v in value.values():
            assert str(v) in text, (value, text)
    elif isinstance(value, list):
        assert all(v in text for v in value), (value, text)
    else:
        assert str(value) in text, (value, text)


def test_expected_calls_satisfy_the_schema_and_come_from_the_users_words(samples):
    checked = 0
    for family, examples in samples.items():
        for example in examples:
            offered = {t["function"]["name"]: t["function"]["parameters"] for t in example.tools or []}
            for i, m in enumerate(example.messages):
                for name, args in _calls(m):
                    schema = offered[name]
                    jsonschema.Draft202012Validator(schema).validate(args)
                    assert set(schema["required"]) <= set(args) and set(args) <= set(schema["properties"])
                    assert list(args) == [k for k in schema["properties"] if k in args]  # schema order
                    user = example.messages[i - 1]["content"]
                    for key, value in args.items():
                        _check_said(_param(name, key), value, user)
                    checked += 1
    assert checked > 500
    for example in samples["json_schema_reasoned"]:
        expected = example.checkpoints[0].expected
        jsonschema.validate(expected["value"], expected["schema"])
        text = example.messages[-2]["content"]
        for value in expected["value"].values():
            if not isinstance(value, bool):
                _check_said(None, value, text)  # type: ignore[arg-type]


def test_results_agree_with_the_backends_and_the_answers_use_them(samples):
    for family in ("gen_tool_call", "gen_tool_parallel", "tool_choice_forced", "unseen_tool_call"):
        for example in samples[family]:
            messages = example.messages
            turn = next(i for i, m in enumerate(messages) if m.get("tool_calls"))
            calls = _calls(messages[turn])
            results = [json.loads(m["content"]) for m in messages[turn + 1:turn + 1 + len(calls)]]
            assert [m["tool_call_id"] for m in messages[turn + 1:turn + 1 + len(calls)]] == \
                [c["id"] for c in messages[turn]["tool_calls"]]
            answer = messages[turn + 1 + len(calls)]["content"]
            for (name, args), result in zip(calls, results):
                assert result == run_corpus_tool(name, args, example.meta["day"])
                for value in ([result["error"]] if "error" in result else result.values()):
                    assert (value if isinstance(value, str) else json.dumps(value)) in answer
    assert run_tool("get_weather", {"city": "Paris"}, 3) == run_tool("get_weather", {"city": "Paris"}, 3)
    days = [run_tool("get_weather", {"city": "Paris"}, d) for d in range(60)]
    assert len({json.dumps(r) for r in days}) > 20 and sum("error" in r for r in days) < 20
    assert all(r["error"] in ERRORS for r in days if "error" in r)


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_examples_other_seed_other_examples():
    for family in GENERATED:
        a, b, c = _examples(family, 5, 1), _examples(family, 5, 1), _examples(family, 5, 2)
        assert [e.record() for e in a] == [e.record() for e in b]
        assert [e.record() for e in a] != [e.record() for e in c]
    tool = make_tool(random.Random(4), HELDOUT_ACTIONS[0])
    assert draw_call(random.Random(5), tool).arguments == draw_call(random.Random(5), tool).arguments


def test_heldout_file_carries_what_the_evaluator_sends(tmp_path):
    write_corpus(str(tmp_path), 200, 250, seed=2)
    tasks = read_jsonl(str(tmp_path / "heldout.jsonl"))
    families = {t["family"] for t in tasks}
    assert {f for f in HELDOUT_FAMILIES if HELDOUT_MIX[f] > 0} <= families
    assert {"tool_choice_forced", "json_schema_reasoned"} <= families
    for task in tasks:
        assert score(task, reference_reply(task)).passed, task["id"]
        if task["family"] == "tool_choice_forced":
            assert task["check"] == "tool_call" and task["tool_choice"] == task["meta"]["tool_choice"]
        else:
            assert "tool_choice" not in task
        assert ("response_format" in task) == (task["family"] == "json_schema_reasoned")
        if task["family"] in HELDOUT_FAMILIES:
            assert all(t["function"]["name"] in HELDOUT_TOOL_NAMES | set(TOOL_SCHEMAS) for t in task["tools"])


# ---------------------------------------------------------------------------------------------- scoring
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather.",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}
PROBE = {"id": "probe", "family": "unseen_tool_call", "check": "tool_call", "tools": [WEATHER_TOOL],
         "prompt": [{"role": "user", "content": "What's the weather like in Paris right now?"}],
         "expected": {"name": "get_weather", "arguments": {"city": "Paris"}}}
PARALLEL = {"id": "both", "family": "unseen_tool_parallel", "check": "tool_calls", "expected": {"calls": [
    {"name": "get_weather", "arguments": {"city": "Paris"}},
    {"name": "order_pizza", "arguments": {"size": "large", "toppings": ["ham", "olives"]}}]}}


def test_scorer_judges_hand_made_calls():
    def call(name, **args):
        return (name, json.dumps(args))

    assert score(PROBE, Reply(None, tool_calls=[call("get_weather", city="Paris")])).passed
    assert score(PROBE, Reply(None, tool_calls=[call("get_weather", city=" paris ")])).passed
    assert not score(PROBE, Reply(None, tool_calls=[call("weather", city="Paris")])).passed
    assert not score(PROBE, Reply(None, tool_calls=[call("get_weather", city="Rome")])).passed
    assert not score(PROBE, Reply(None, tool_calls=[call("get_weather", city="Paris", unit="celsius")])).passed
    assert not score(PROBE, Reply("It is sunny in Paris.")).passed  # the failure: no call at all
    assert not score(PROBE, Reply(None, tool_calls=[("get_weather", '{"city": ')])).passed

    pizza = call("order_pizza", size="large", toppings=["ham", "olives"])
    weather = call("get_weather", city="Paris")
    assert score(PARALLEL, Reply(None, tool_calls=[weather, pizza])).passed
    assert score(PARALLEL, Reply(None, tool_calls=[pizza, weather])).passed  # any order
    assert not score(PARALLEL, Reply(None, tool_calls=[weather])).passed
    assert not score(PARALLEL, Reply(None, tool_calls=[weather, weather])).passed
    assert not score(PARALLEL, Reply(None, tool_calls=[weather, pizza, weather])).passed
    swapped = call("order_pizza", size="large", toppings=["olives", "ham"])  # a list's order is its meaning
    assert not score(PARALLEL, Reply(None, tool_calls=[weather, swapped])).passed
    assert not score(PARALLEL, Reply("Done.")).passed


# ---------------------------------------------------------------------------------------------- evaluator
def test_evaluator_sends_tool_choice_and_response_format_and_scores_the_new_split():
    sent = []

    def create(**kwargs):
        sent.append(kwargs)
        calls = [SimpleNamespace(function=SimpleNamespace(name="get_weather", arguments='{"city": "Paris"}'))]
        message = SimpleNamespace(content=None, tool_calls=calls, model_extra={"reasoning_content": "r"})
        return SimpleNamespace(choices=[SimpleNamespace(message=message, logprobs=None, finish_reason="tool_calls")])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    forced = {**PROBE, "id": "forced", "family": "tool_choice_forced", "tool_choice": "required"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    js = {"id": "js", "family": "json_schema_reasoned", "check": "json", "prompt": PROBE["prompt"],
          "response_format": fmt, "expected": {"schema": schema, "value": {"a": 1}}}
    replies = [tiny_eval.ask(client, "m", t, 50) for t in (PROBE, forced, js)]
    assert "tool_choice" not in sent[0] and sent[1]["tool_choice"] == "required"
    assert sent[2]["response_format"] == fmt and "tools" not in sent[2]
    tasks = [PROBE, forced, js, {**PROBE, "id": "seen", "family": "tool_use"}]
    scores = [score(t, r) for t, r in zip(tasks, replies + replies[:1])]
    metrics = tiny_eval.summarise(tasks, scores)["metrics"]
    assert metrics["unseen_tool_accuracy"] == {"value": 1.0, "n": 1, "target": 0.90, "met": True}
    assert metrics["forced_call_accuracy"]["n"] == 1 and metrics["forced_call_accuracy"]["value"] == 1.0
    assert metrics["tool_call_accuracy"]["n"] == 1  # the seen tool only: each split is measured on its own
    assert metrics["json_valid"]["value"] == 0.0 and metrics["json_schema_reasoned"]["n"] == 1


def test_evaluator_counts_a_forced_call_cut_short_as_wrong_not_as_an_error():
    import httpx
    import openai

    def create(**kwargs):
        response = httpx.Response(400, request=httpx.Request("POST", "http://test/v1/chat/completions"))
        raise openai.BadRequestError("max_tokens ran out", response=response,
                                     body={"message": "max_tokens ran out", "param": "max_tokens", "code": None})

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    forced = {**PROBE, "tool_choice": "required"}
    reply = tiny_eval.ask(client, "m", forced, 12)
    assert reply.error is None and not score(forced, reply).passed
    assert tiny_eval.ask(client, "m", PROBE, 12).error  # without a forced call the same 400 is a failed request


def test_the_makefiles_grpo_tasks_hold_no_heldout_family():
    """`make tiny-model`'s RL tasks come from the held-out split's generator with a mix of their own; the mix keeps
    the default weight of every family it does not name, so each held-out family must be named with weight 0 (it
    was not, once: 15% of the GRPO tasks were tiny_eval's unseen-tool domains)."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    line = next(x for x in makefile.splitlines() if x.startswith("TINY_RL"))
    mix = parse_mix(re.search(r"--heldout-mix (\S+)", line).group(1), HELDOUT_MIX)
    assert all(mix[name] == 0 for name in HELDOUT_FAMILIES)
    assert sum(mix.values()) > 0
    # without rest=0 the unnamed families keep their weights; with it only the named ones are drawn
    assert parse_mix("json=0.5", HELDOUT_MIX)["unseen_tool_call"] == HELDOUT_MIX["unseen_tool_call"]
    assert {k for k, w in parse_mix("json=0.5,rest=0", HELDOUT_MIX).items() if w} == {"json"}


# ---------------------------------------------------------------------------------------------- made-up tools
def test_made_up_words_are_fresh_and_never_heldout():
    rng = random.Random(4)
    words = [made_up_word(rng, HELDOUT_WORDS) for _ in range(3000)]
    assert not set(words) & HELDOUT_WORDS and all(w.isalpha() and w.islower() and len(w) >= 4 for w in words)
    assert len(set(words)) > 2500  # nearly every draw is new: nothing to learn by heart
    assert made_up_word(random.Random(9)) == made_up_word(random.Random(9))
    # a forbidden word is redrawn: forbid everything the first draws make, the next draw is still allowed
    first = {made_up_word(random.Random(s)) for s in range(5)}
    assert made_up_word(random.Random(0), frozenset(first)) not in first


def test_made_up_actions_can_only_be_copied():
    """Names, keys and (many) values of a made-up tool are words no other conversation has; the request names each
    key it gives a value for, except one place and one person said with their usual preposition."""
    rng = random.Random(2)
    for _ in range(300):
        action = made_up_action(rng)
        assert not (_words(" ".join(action.names)) - set(VERBS)) & HELDOUT_WORDS
        keys = [p.names[0] for p in action.params]
        assert len(set(keys)) == len(keys)
        prepositions = [p.phrase for p in action.params if p.phrase in ("in {v}", "for {v}")]
        assert len(set(prepositions)) == len(prepositions)  # at most one place and one person
        call = draw_call(rng, make_tool(rng, action))
        assert call.tool.name in {form for n in action.names for form in name_forms(n)}
        for key in call.arguments:
            param = next(p for p in action.params if key in p.names)
            if param.phrase not in ("in {v}", "for {v}"):
                word = param.names[-1]
                assert word in call.text, (word, call.text)  # the key's own word is said
    pool = made_up_pool(random.Random(1), TRAIN_ACTIONS)
    assert sum(a.domain.startswith("made_up:") for a in pool) == 5 and len(pool) == 8


# ----------------------------------------------------------------------------------------- tool lookup drills
HELDOUT_KEYWORDS = {k for a in HELDOUT_ACTIONS for k in a.keywords}  # as in the test of the training mix


def test_lookup_drills_are_told_apart_only_by_the_requested_word():
    """Every offered tool is about its own word, which no other tool's name or description holds; the request
    says the target's word and no other tool's; the conversation ends at the call, which fits the schema."""
    from trinity.synthetic.lookup_tools import LOOKUP_VERBS, make_lookup

    # the template words of names and descriptions; what is left of a tool's words is its verb and its noun
    common = {"a", "the", "user", "s", "use", "this", "to", "service", "handles", "requests", "for", "everything",
              "about", "it", "one", "task", "tool"}

    def noun_of(tool: dict) -> str | None:
        text = re.sub(r"([a-z])([A-Z])", r"\1 \2", tool["function"]["name"]) + " " + tool["function"]["description"]
        left = _words(text) - set(LOOKUP_VERBS) - common
        return left.pop() if len(left) == 1 else None

    for seed in range(300):
        example = make_lookup(random.Random(seed))
        request, turn = example.messages[-2]["content"], example.messages[-1]
        call = turn["tool_calls"][0]["function"]
        assert turn["role"] == "assistant" and example.messages[-2]["role"] == "user"  # the call is the last turn
        assert 3 <= len(example.tools) <= 6
        nouns = [noun_of(t) for t in example.tools]
        assert None not in nouns and len(set(nouns)) == len(nouns), example.tools
        target = next(i for i, t in enumerate(example.tools) if t["function"]["name"] == call["name"])
        said = _words(request)
        assert not re.search(r" [.?,]", request), request  # a tool without parameters leaves no gap
        assert nouns[target] in said and not (set(nouns) - {nouns[target]}) & said, (request, nouns)
        assert not set(nouns) & HELDOUT_WORDS and not _words(json.dumps(example.record())) & HELDOUT_KEYWORDS
        jsonschema.validate(json.loads(call["arguments"]), example.tools[target]["function"]["parameters"])


def test_lookup_drill_names_each_requested_tool_once_by_its_word():
    """A drill asks for most of its 8-14 tools, each once, by a request that holds that tool's word; each answer
    line names the tool of its request, in the request's order."""
    from trinity.synthetic.lookup_tools import make_lookup_drill

    for seed in range(100):
        example = make_lookup_drill(random.Random(seed))
        requests = example.messages[-2]["content"].splitlines()[1:]
        answers = example.messages[-1]["content"].splitlines()
        names = [t["function"]["name"] for t in example.tools]
        assert 8 <= len(names) <= 14 and len(requests) == len(answers) >= 3
        chosen = [re.search(r"The tool (\S+) does this\.$", line).group(1) for line in answers]
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(names)
        assert not _words(json.dumps(example.record())) & HELDOUT_KEYWORDS
        for n, (request, line) in enumerate(zip(requests, answers), 1):
            assert request.startswith(f"{n}. ") and line.startswith(f"{n}. The user wants to ")
            assert not re.search(r" [.?,]|,[.?]", request), request
            noun = line.split(". The tool")[0].split()[-1]  # "... wants to check a boiler" -> boiler
            assert noun in _words(request), (request, line)
            tool = next(t["function"] for t in example.tools if t["function"]["name"] == chosen[n - 1])
            assert noun in _words(tool["description"]), (line, tool)  # the named tool is the one about that word
