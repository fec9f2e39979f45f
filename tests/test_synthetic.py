"""The synthetic corpus, its tokenizer and its scoring: determinism, held-out disjointness, rendering exactly as the
server prompts, assistant-only loss, tool calls that agree with the fake backends, correct arithmetic, JSON that
validates, and a tokenizer that round-trips, splits digits and keeps special tokens whole."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trinity.chat_template import BUILTIN_CHAT_TEMPLATE
from trinity.synthetic.arithmetic import add_steps, multiply_steps, solve, subtract_steps
from trinity.synthetic.conversations import FAMILIES, HELDOUT_MIX, TRAIN_MIX, example_at, parse_mix
from trinity.jsonl import read_jsonl
from trinity.synthetic.corpus import heldout_task, prompt_key, write_corpus
from trinity.synthetic.json_replies import describe
from trinity.synthetic.scoring import Reply, reference_reply, score
from trinity.synthetic.tokenizer_train import train_from_corpus
from trinity.synthetic.tool_domains import HELDOUT_TOOL_NAMES
from trinity.synthetic.tool_use import UNIT_PAIRS, UNIT_WORDS
from trinity.synthetic.tools import TOOL_SCHEMAS, UNITS, convert, evaluate, run_corpus_tool, run_tool
from trinity.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, TrinityTokenizer
from trinity.train.data import chat_document, load_documents

TRAIN, HELDOUT = 600, 120
# families whose whole prompt space is small enough that a held-out prompt may have been seen in training
SMALL_SPACE = {"plain", "tool_not_needed", "plain_chain"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(str(out), TRAIN, HELDOUT, seed=3)
    return out


@pytest.fixture(scope="module")
def train(corpus) -> list[dict]:
    return read_jsonl(str(corpus / "train.jsonl"))


@pytest.fixture(scope="module")
def heldout(corpus) -> list[dict]:
    return read_jsonl(str(corpus / "heldout.jsonl"))


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_from_corpus(str(corpus), str(out), vocab_size=1200)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> TrinityTokenizer:
    return TrinityTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def bare_tok(corpus, tmp_path_factory) -> TrinityTokenizer:
    out = tmp_path_factory.mktemp("bare_tokenizer")
    train_from_corpus(str(corpus), str(out), vocab_size=1200, split="bare")
    return TrinityTokenizer.from_pretrained(out)


# ---------------------------------------------------------------------------------------------- corpus files
def test_same_seed_same_files_other_seed_other_files(corpus, tmp_path):
    write_corpus(str(tmp_path / "again"), TRAIN, HELDOUT, seed=3)
    write_corpus(str(tmp_path / "other"), TRAIN, HELDOUT, seed=4)
    for name in ("train.jsonl", "heldout.jsonl", "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (corpus / name).read_bytes(), name
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (corpus / "train.jsonl").read_bytes()


def test_example_does_not_depend_on_the_corpus_size(train):
    # example i is drawn from its own seed: a larger corpus starts with the same conversations
    for i in (0, 17, TRAIN - 1):
        assert example_at(3, "train", i, TRAIN_MIX).record() == train[i]


def test_every_family_appears_and_mix_is_configurable(train):
    assert {r["family"] for r in train} == {f for f in FAMILIES if TRAIN_MIX[f] > 0}
    only = parse_mix("json=1," + ",".join(f"{f}=0" for f in FAMILIES if f != "json"), TRAIN_MIX)
    assert {example_at(0, "train", i, only).family for i in range(20)} == {"json"}
    with pytest.raises(ValueError, match="FAMILY=WEIGHT"):
        parse_mix("nonsense=1", TRAIN_MIX)
    with pytest.raises(ValueError, match="not a number"):
        parse_mix("json=x", TRAIN_MIX)


def test_heldout_prompts_are_disjoint_from_training(train, heldout):
    seen = {prompt_key(r["messages"][:i], r.get("tools")) for r in train for i in range(len(r["messages"]) + 1)}
    keys = [prompt_key(t["prompt"], t.get("tools")) for t in heldout]
    assert len(set(keys)) == len(keys), "held-out tasks repeat"
    for task, key in zip(heldout, keys):
        if task.get("seen_in_train"):
            assert task["family"] in SMALL_SPACE, task
        else:
            assert key not in seen, task["id"]
    fresh = [t for t in heldout if not t.get("seen_in_train")]
    assert len(fresh) >= 0.9 * len(heldout)
    assert {t["check"] for t in heldout} == {"arithmetic", "tool_call", "tool_calls", "no_tool", "json", "contains"}


def test_heldout_task_is_a_prefix_of_a_full_conversation(heldout):
    for task in heldout:
        ref = task["reference"]
        assert ref["role"] == "assistant" and ref["reasoning_content"]
        assert task["prompt"][-1]["role"] in ("user", "tool")


def test_trainer_loader_reads_the_training_file(corpus, tok):
    docs = load_documents([str(corpus / "train.jsonl")], tok, tok.eos_token_id)
    assert len(docs) == TRAIN and all(d.loss_mask.any() for d in docs)


# ---------------------------------------------------------------------------------------------- rendering
def _masked_segments(tok: TrinityTokenizer, ids, mask) -> list[str]:
    segments, current = [], []
    for token, on in zip(list(ids), list(mask)):
        if on:
            current.append(int(token))
        elif current:
            segments.append(tok.decode(current))
            current = []
    if current:
        segments.append(tok.decode(current))
    return segments


def test_loss_covers_exactly_the_assistant_turns(train, tok):
    for record in train:
        doc = chat_document(record["messages"], tok, tok.eos_token_id, tools=record.get("tools"))
        segments = _masked_segments(tok, doc.ids, doc.loss_mask)
        turns = [m for m in record["messages"] if m["role"] == "assistant"]
        assert len(segments) == len(turns)
        for segment, turn in zip(segments, turns):
            # the model writes its reasoning (after the server's <think>\n prefill), closes it, then answers
            expected = turn["reasoning_content"] + "\n</think>\n" + (turn["content"] or "")
            for n, call in enumerate(turn.get("tool_calls") or []):
                args = json.dumps(json.loads(call["function"]["arguments"]))
                # parallel calls: one block each, a newline between blocks (as after content)
                expected += "\n" if n or turn["content"] else ""
                expected += f'<tool_call>\n{{"name": "{call["function"]["name"]}", "arguments": {args}}}\n</tool_call>'
            # the template's newline after <|im_end|> comes with the turn (generation stops at <|im_end|>)
            assert segment == expected + "<|im_end|>\n", (segment, expected)
        unmasked = tok.decode([int(t) for t, on in zip(doc.ids, doc.loss_mask) if not on])
        for m in record["messages"]:
            if m["role"] in ("user", "system", "tool"):
                assert m["content"] in unmasked


def test_training_text_continues_the_server_prompt(heldout, tok):
    """What the server sends the model for a task (template + tools + generation prompt + <think>\\n prefill) is
    exactly the token prefix the trainer puts before that turn's loss."""
    for task in heldout:
        tools = task.get("tools")
        prompt = tok.apply_chat_template(task["prompt"], tools=tools, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        doc = chat_document(task["prompt"] + [task["reference"]], tok, tok.eos_token_id, tools=tools)
        prompt_ids = tok.encode(prompt)
        assert doc.ids[:len(prompt_ids)].tolist() == prompt_ids
        # loss starts right after the prefill and runs to the end of the turn (earlier turns have their own)
        assert not doc.loss_mask[len(prompt_ids) - 1] and doc.loss_mask[len(prompt_ids):-1].all()


def test_most_conversations_fit_the_context(train, tok):
    lengths = sorted(len(chat_document(r["messages"], tok, tok.eos_token_id, tools=r.get("tools")).ids)
                     for r in train)
    assert lengths[len(lengths) // 2] < 300, lengths[len(lengths) // 2]
    assert lengths[int(0.95 * len(lengths))] < 700


# ---------------------------------------------------------------------------------------------- tools
def test_tool_calls_agree_with_backends_and_schemas(train):
    calls = 0
    for record in train:
        messages, offered = record["messages"], {t["function"]["name"]: t for t in record.get("tools") or []}
        for i, m in enumerate(messages):
            for k, call in enumerate(m.get("tool_calls") or []):  # parallel calls: results in the calls' order
                name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
                assert name in offered, "called a tool that was not offered"
                jsonschema.validate(args, offered[name]["function"]["parameters"])
                result = messages[i + 1 + k]
                assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
                assert json.loads(result["content"]) == run_corpus_tool(name, args, record["meta"]["day"])
                calls += 1
        if record["family"] == "tool_not_needed":
            assert not any(m.get("tool_calls") for m in messages)
    assert calls > 50


def test_tool_arguments_come_from_the_users_words(train):
    for record in train:
        for i, m in enumerate(record["messages"]):
            for call in m.get("tool_calls") or []:
                text = record["messages"][i - 1]["content"]
                args = json.loads(call["function"]["arguments"])
                for key in ("city", "query", "expression"):
                    if key in args:
                        assert args[key] in text, (args, text)
                if "value" in args:
                    assert str(args["value"]) in text


def test_fake_backends():
    assert run_tool("weather", {"city": "Oslo", "unit": "celsius"}, 5) == \
        run_tool("weather", {"city": "Oslo", "unit": "celsius"}, 5)
    days = {run_tool("weather", {"city": "Oslo", "unit": "celsius"}, d)["temperature"] for d in range(30)}
    assert len(days) > 5  # the weather changes with the day: the model must read the result
    c = run_tool("weather", {"city": "Lima", "unit": "celsius"}, 9)["temperature"]
    assert run_tool("weather", {"city": "Lima", "unit": "fahrenheit"}, 9)["temperature"] == round(c * 9 / 5 + 32)
    assert convert(100, "celsius", "fahrenheit") == 212 and convert(1, "miles", "km") == 1.61
    assert convert(10, "kg", "pounds") == 22.05
    with pytest.raises(ValueError, match="cannot convert"):
        convert(1, "km", "kg")
    assert evaluate("(12 + 3) * 4") == 60 and evaluate("7 / 2") == 3.5 and evaluate("10 / 4 * 2") == 5
    with pytest.raises(ValueError, match="unsupported"):
        evaluate("__import__('os')")
    assert all(u in UNITS for pair in UNIT_PAIRS for u in pair) and set(UNIT_WORDS) == set(UNITS)
    assert set(TOOL_SCHEMAS) == {"weather", "convert_units", "calculator", "search", "get_time"}


# ---------------------------------------------------------------------------------------------- arithmetic
_COLUMN = re.compile(r"^[a-z ]+: (\d+) ([-+x]) (\d+) ([-+]) (\d+) = (\d+), write (\d), (carry|borrow) (\d+)$")


def _check_columns(lines: list[str]) -> None:
    carry = 0
    for line in lines:
        m = _COLUMN.match(line)
        if not m:
            continue
        a, op, b, _, c, total, write, _, out = m.groups()
        a, b, c, total, write, out = map(int, (a, b, c, total, write, out))
        assert c == carry, line
        if op == "+":
            assert total == a + b + c and write == total % 10 and out == total // 10, line
        elif op == "x":
            assert total == a * b + c and write == total % 10 and out == total // 10, line
        else:
            assert total == a - b - c == write and out == (a >= 10), line
        carry = out


def test_arithmetic_answers_are_right(train):
    checked = 0
    for record in train:
        if record["family"] not in ("arithmetic", "arithmetic_chain", "mixed_chain"):
            continue
        for m in record["messages"]:
            if m["role"] != "assistant" or not m["content"].startswith("The answer is"):
                continue
            lines = m["reasoning_content"].split("\n")
            problem = next(line for line in lines if re.fullmatch(r"-?\d+ [-+x] \d+", line))
            a, op, b = problem.split(" ")
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
            assert m["content"] == f"The answer is {value}."
            assert lines[-1] == f"result: {value}"
            _check_columns(lines)
            checked += 1
    assert checked > 100


def test_arithmetic_questions_name_the_numbers_solved(train):
    for record in train:
        if record["family"] != "arithmetic":
            continue
        question, reply = record["messages"][-2]["content"], record["messages"][-1]["reasoning_content"]
        a, _, b = reply.split("\n")[0].split(" ")
        assert re.search(rf"\b{a}\b", question) and re.search(rf"\b{b}\b", question), (question, reply)


def test_chain_follow_ups_use_the_previous_answer(train):
    chains = [r for r in train if r["family"] == "arithmetic_chain"]
    assert chains
    for record in chains:
        answers = [m for m in record["messages"] if m["role"] == "assistant"]
        for before, after in zip(answers, answers[1:]):
            previous = before["content"].removeprefix("The answer is ").removesuffix(".")
            assert after["reasoning_content"].startswith(f"The previous answer is {previous}.\n{previous} ")


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 99_999), b=st.integers(0, 99_999), d=st.integers(0, 9))
def test_column_methods_match_python(a, b, d):
    for lines, value in ((add_steps(a, b), a + b), (subtract_steps(a, b), a - b), (multiply_steps(a, d), a * d)):
        assert lines[-1] == f"result: {value}"
        _check_columns(lines)
    # the written digits, read from the top column down, spell the result from the right
    written = [int(line.rsplit("write ", 1)[1].split(",")[0]) for line in add_steps(a, b) if "write" in line]
    assert int("".join(map(str, reversed(written)))) == a + b
    with pytest.raises(ValueError):
        solve(a, "/", b)


# ---------------------------------------------------------------------------------------------- JSON
def test_json_replies_validate_and_the_prompt_states_the_schema(train):
    replies = 0
    for record in train:
        if record["family"] != "json":
            continue
        reply = record["messages"][-1]["content"]
        value = json.loads(reply)
        prompt = " ".join(m["content"] for m in record["messages"][:-1])
        schema = next(s for s in _schemas() if set(s["properties"]) == set(value))
        jsonschema.validate(value, schema)
        assert describe(schema) in prompt
        assert list(value) == list(schema["properties"])  # keys in the order asked for
        replies += 1
    assert replies > 30


def _schemas() -> list[dict]:
    return [example_at(0, "train", i, parse_mix(",".join(f"{f}=0" for f in FAMILIES if f != "json"), TRAIN_MIX))
            .checkpoints[0].expected["schema"] for i in range(60)]


# ---------------------------------------------------------------------------------------------- scoring
def test_gold_replies_pass_and_wrong_ones_fail(heldout):
    for task in heldout:
        assert score(task, reference_reply(task)).passed, task["id"]
    arithmetic = next(t for t in heldout if t["check"] == "arithmetic")
    wrong = arithmetic["expected"]["answer"] + 1
    assert not score(arithmetic, Reply(f"The answer is {wrong}.")).passed
    assert not score(arithmetic, Reply("I do not know.")).passed
    call = next(t for t in heldout if t["check"] == "tool_call")
    name, args = call["expected"]["name"], dict(call["expected"]["arguments"])
    loud = {k: v.upper() if isinstance(v, str) else str(v) for k, v in args.items()}
    assert score(call, Reply(None, tool_calls=[(name, json.dumps(loud))])).passed  # case and "42" vs 42 are fine
    key = next(iter(args))
    args[key] = "something else" if isinstance(args[key], str) else args[key] + 1
    wrong_values = score(call, Reply(None, tool_calls=[(name, json.dumps(args))]))
    assert not wrong_values.passed and wrong_values.right_tool  # the right tool, a wrong value
    other_tool = score(call, Reply(None, tool_calls=[(name + "_other", json.dumps(call["expected"]["arguments"]))]))
    assert not other_tool.passed and other_tool.right_tool is False
    assert not score(call, Reply("It is sunny.")).passed and score(call, Reply("It is sunny.")).right_tool is False
    assert score(call, reference_reply(call)).right_tool
    no_tool = next(t for t in heldout if t["check"] == "no_tool")
    assert not score(no_tool, Reply(None, tool_calls=[("weather", "{}")])).passed
    js = next(t for t in heldout if t["check"] == "json")
    assert not score(js, Reply('{"unexpected": 1}')).passed and not score(js, Reply("{oops")).passed
    assert not score(js, Reply(None, error="timeout")).think_closed


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_layout_and_special_tokens(tok, corpus):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for t in SPECIAL_TOKENS:
        assert tok.encode(f"a{t}b")[1:2] == [tok.token_to_id(t)] and len(tok.encode(t)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert all(tok.decode([tok.token_to_id(t)], skip_special_tokens=True) == t for t in TAG_TOKENS)
    assert 266 < tok.vocab_size <= 1200


def test_tokenizer_splits_digits(tok):
    for text in ("1234567890", "x=90210.", " 4096 tokens", "The answer is -1375."):
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert len(digit_pieces) == sum(ch.isdigit() for ch in text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80))
def test_tokenizer_round_trips_any_text(tok, bare_tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert bare_tok.decode(bare_tok.encode(text)) == text


def _pieces(tokenizer: TrinityTokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer.encode(text)]


@pytest.mark.parametrize("word", ["ferry", "Barcelona", "harbour", "dorvak"])
def test_bare_split_keeps_a_word_the_same_tokens_in_text_names_and_json(bare_tok, tok, word):
    """A word the user writes must be the same tokens in a tool's name and in a JSON value, or copying it is
    a mapping the model has to learn per word; the GPT-2 split ("words") glues the space to the word."""
    span = _pieces(bare_tok, word)
    for context in (f"Find a {word} today.", f'"name": "{word}_schedule"', f'{{"port": "{word}"}}',
                    f"The tool {word}_lookup does"):
        pieces = _pieces(bare_tok, context)
        assert any(pieces[i:i + len(span)] == span for i in range(len(pieces))), (context, pieces, span)
    glued = _pieces(tok, f"a {word}")[1:]
    assert "".join(glued).startswith(" ") and glued != _pieces(tok, word)  # what the default split does
    assert bare_tok.decode(bare_tok.encode(f"Find a {word}, {{\"x\": \"{word}\"}}")) == \
        f"Find a {word}, {{\"x\": \"{word}\"}}"


def test_tokenizer_round_trips_the_corpus_and_compresses_it(train, tok):
    texts = [tok.apply_chat_template(r["messages"], tools=r.get("tools"), add_generation_prompt=False)
             for r in train[:200]]
    total_chars = total_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        total_chars, total_tokens = total_chars + len(text), total_tokens + len(ids)
    assert total_chars / total_tokens > 2.5  # learned merges, not bytes


def test_tokenizer_loads_in_transformers_with_the_template(tok, tok_dir, tmp_path):
    from transformers import AutoTokenizer

    shutil.copytree(tok_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == BUILTIN_CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").unlink()  # transformers must find the template in tokenizer_config.json
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "What is 345 + 78?"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tok.apply_chat_template(messages) and text.endswith("<think>\n")
    sample = "Convert 42 km to miles. <tool_call>\n{\"name\": \"x\"}\n</tool_call> é 😀"
    assert hf.encode(sample, add_special_tokens=False) == tok.encode(sample)
    assert hf.eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_corpus_and_tokenizer(tmp_path):
    run = [sys.executable, "-m", "trinity.synthetic"]
    out = subprocess.run([*run, "--out", str(tmp_path / "c"), "--train", "40", "--heldout", "5", "--seed", "1"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["train"] == 40
    assert len(read_jsonl(str(tmp_path / "c" / "heldout.jsonl"))) == 5
    out = subprocess.run([*run, "tokenizer", "--corpus", str(tmp_path / "c"), "--vocab", "400", "--out",
                          str(tmp_path / "t")], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["vocab_size"] <= 400
    assert TrinityTokenizer.from_pretrained(tmp_path / "t").vocab_size <= 400
    bad = subprocess.run([*run, "--out", str(tmp_path / "d"), "--mix", "bogus=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "FAMILY=WEIGHT" in bad.stderr
    bad = subprocess.run([*run, "tokenizer", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "e")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no training corpus" in bad.stderr


def test_jsonl_reader_skips_blank_lines_and_names_a_bad_one(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"tasks\.jsonl:4: not valid JSON"):
        read_jsonl(str(path))
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(str(path)) == [{"a": 1}, {"a": 2}]


def test_arithmetic_json_tasks_are_for_evaluation_and_rl_only():
    """Arithmetic answered under a JSON schema: the reference reply is valid and exact, the task carries the
    response_format the evaluator sends, and the family can be drawn for held-out tasks but not for training."""
    mix = parse_mix("arithmetic_json=1,rest=0", HELDOUT_MIX)
    tasks = [heldout_task(5, i, mix, set()) for i in range(30)]
    assert {t["family"] for t in tasks} == {"arithmetic_json"}
    for task in tasks:
        assert task["response_format"]["json_schema"]["schema"] == task["expected"]["schema"]
        (key,) = task["expected"]["value"]
        reply = reference_reply(task)
        assert "result: " in reply.reasoning and json.loads(reply.content) == task["expected"]["value"]
        result = score(task, reply)
        assert result.passed and result.exact
        # the failure it measures: a right number that runs on is valid JSON only once closed, and then not exact
        value = task["expected"]["value"][key]
        assert not score(task, Reply(f'{{"{key}": {value}000', reply.reasoning, [], True)).passed
        assert not score(task, Reply(f'{{"{key}": {value}0}}', reply.reasoning, [], True)).exact
    assert HELDOUT_MIX["arithmetic_json"] == 0  # the evaluation's default tasks are unchanged
    with pytest.raises(ValueError, match="arithmetic_json"):
        parse_mix("arithmetic_json=1", TRAIN_MIX)


def test_arithmetic_json_asked_names_its_key_in_the_prompt():
    """The supervised twin of arithmetic_json: the prompt asks for the object by its key (so the same bare question
    never has two answers in the corpus), and the reference reply is the closed object with the exact number."""
    examples = [example_at(3, "train", i, {"arithmetic_json_asked": 1.0}) for i in range(40)]
    for example in examples:
        (checkpoint,) = example.checkpoints
        (key,) = checkpoint.expected["value"]
        prompt = " ".join(m["content"] for m in example.messages[:checkpoint.index])
        assert key in prompt and "JSON" in prompt
        assert json.loads(example.messages[-1]["content"]) == checkpoint.expected["value"]
    assert {e.messages[0]["role"] for e in examples} == {"system", "user"}  # said in either place
    assert TRAIN_MIX["arithmetic_json_asked"] > 0 and "arithmetic_json" not in TRAIN_MIX


def test_tool_listing_names_the_offered_tools_in_their_order():
    """ "Which tools do you have?": the reference reply lists every offered tool, name and description, in the
    list's order, and scores every name; a name out of place or one that was not offered does not count. Both
    families are off in the default mixes (the shipped corpus and evaluation are unchanged) and can be mixed in."""
    mix = parse_mix("unseen_tool_list=1,rest=0", HELDOUT_MIX)
    tasks = [heldout_task(5, i, mix, set()) for i in range(20)]
    assert {t["family"] for t in tasks} == {"unseen_tool_list"}
    for task in tasks:
        names = task["expected"]["names"]
        assert names == [t["function"]["name"] for t in task["tools"]]
        assert all(n in HELDOUT_TOOL_NAMES or n in TOOL_SCHEMAS for n in names)  # sometimes one corpus tool
        reply = reference_reply(task)
        assert score(task, reply).passed and score(task, reply).listed == len(names)
        lines = reply.content.splitlines()
        swapped = "\n".join([lines[0], lines[2], lines[1], *lines[3:]])
        assert score(task, Reply(swapped, reply.reasoning, [], True)).listed == len(names) - 2
        foreign = reply.content.replace(f"- {names[0]}:", "- get_time:")
        result = score(task, Reply(foreign, reply.reasoning, [], True))
        assert result.listed == len(names) - 1 and not result.passed
    assert TRAIN_MIX["tool_list"] == 0 and HELDOUT_MIX["unseen_tool_list"] == 0
    examples = [example_at(2, "train", i, {"tool_list": 1.0}) for i in range(20)]
    assert {e.family for e in examples} == {"tool_list"}
    assert all(not set(e.checkpoints[0].expected["names"]) & HELDOUT_TOOL_NAMES for e in examples)
