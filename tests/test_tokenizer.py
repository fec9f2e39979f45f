"""Tests for trinity.tokenizer and trinity.chat_template (no network, no checkpoint files)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import jinja2.exceptions
import pytest
from tokenizers import decoders, pre_tokenizers

from trinity.chat_template import ChatTemplateError
from trinity.tokenizer import (
    BUILTIN_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TrinityTokenizer,
    build_byte_level_tokenizer,
    train_bpe_tokenizer,
)

# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

_WORDS = "the model reads every token and writes an answer with care about numbers and code".split()
_UNICODE = ["café", "naïve", "東京", "日本語のテキスト", "Привет", "😀", "🚀✨", "α+β=γ", "ß", "👩‍💻"]


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(1234)
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        record = json.dumps({"id": i, "name": rng.choice(_WORDS), "score": round(rng.random() * 100, 2)})
        lines.append(f"{words} {rng.randint(0, 99999)} {rng.choice(_UNICODE)}\n{record}")
    return lines


@pytest.fixture(scope="module")
def tok() -> TrinityTokenizer:
    return train_bpe_tokenizer(_corpus(), vocab_size=800)


@pytest.fixture(scope="module")
def byte_tok() -> TrinityTokenizer:
    return build_byte_level_tokenizer()


TRICKY = [
    "",
    "hello world",
    "  two leading spaces",
    " leading space and trailing ",
    "line one\nline two\r\n\ttabbed\n\n",
    "emoji 😀 and family 👨‍👩‍👧‍👦 and flag 🇫🇷",
    "中文字符 and 日本語 and 한국어",
    "combining: e\u0301 and zero-width\u200bjoiner",
    '{"key": [1, 2.5, null], "nested": {"ok": true}}',
    "specials inline <|im_start|>user\n<think>x</think><|im_end|>",
    "\x00\x01 control bytes \x7f",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral plane",
]

# ----------------------------------------------------------------------------------------------
# Vocabulary layout and encode/decode
# ----------------------------------------------------------------------------------------------


def test_special_tokens_have_fixed_single_ids(tok: TrinityTokenizer, byte_tok: TrinityTokenizer) -> None:
    for t in (tok, byte_tok):
        for i, special in enumerate(SPECIAL_TOKENS):
            assert t.token_to_id(special) == i
            assert t.encode(special) == [i]
            assert t.encode(f"a{special}b")[1:-1] == [i]  # recognised inside text, not split


def test_vocab_sizes(tok: TrinityTokenizer, byte_tok: TrinityTokenizer) -> None:
    assert byte_tok.vocab_size == 266
    assert tok.vocab_size == 800


def test_byte_alphabet_matches_tokenizers_bytelevel(byte_tok: TrinityTokenizer) -> None:
    ours = {byte_tok.id_to_token(i) for i in range(10, 266)}
    assert ours == set(pre_tokenizers.ByteLevel.alphabet())
    # ids 10.. are in byte order: byte 0x41 ("A") is id 10 + 0x41
    assert byte_tok.encode("A") == [10 + 0x41]


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_trained(tok: TrinityTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_byte_level(byte_tok: TrinityTokenizer, text: str) -> None:
    ids = byte_tok.encode(text)
    assert byte_tok.decode(ids) == text


def test_trained_tokenizer_compresses(tok: TrinityTokenizer, byte_tok: TrinityTokenizer) -> None:
    text = "the model reads every token"
    assert len(tok.encode(text)) < len(byte_tok.encode(text)) // 2


def test_skip_special_tokens_keeps_think_and_tool_tags(tok: TrinityTokenizer) -> None:
    text = '<|im_start|>assistant\n<think>\nhm\n</think>\n<tool_call>\n{"a": 1}\n</tool_call><|im_end|><|endoftext|><|pad|>'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == 'assistant\n<think>\nhm\n</think>\n<tool_call>\n{"a": 1}\n</tool_call>'
    assert tok.decode(tok.encode("<tool_response>r</tool_response>"), skip_special_tokens=True) == (
        "<tool_response>r</tool_response>"
    )


def test_eos_and_pad_ids(tok: TrinityTokenizer) -> None:
    assert tok.eos_token_id == 2  # <|im_end|>
    assert tok.eos_token_ids == {0, 2}  # plus <|endoftext|>
    assert tok.pad_token_id == 3
    assert tok.bos_token_id is None
    assert tok.special_token_ids == frozenset({0, 1, 2, 3})


def test_add_special_tokens_prepends_bos(tok: TrinityTokenizer) -> None:
    with_bos = TrinityTokenizer(tok.backend, bos_token="<|endoftext|>")
    assert with_bos.encode("hi", add_special_tokens=True) == [0, *tok.encode("hi")]
    assert with_bos.encode("hi") == tok.encode("hi")


def test_unknown_eos_is_rejected(tok: TrinityTokenizer) -> None:
    with pytest.raises(ValueError, match="eos_token"):
        TrinityTokenizer(tok.backend, eos_token="<nope>")


def test_byte_level_tokenizer_is_deterministic() -> None:
    a, b = build_byte_level_tokenizer(), build_byte_level_tokenizer()
    assert a.backend.to_str() == b.backend.to_str()
    assert a.encode("déjà vu 😀") == b.encode("déjà vu 😀")


def test_training_is_deterministic(tok: TrinityTokenizer) -> None:
    again = train_bpe_tokenizer(_corpus(), vocab_size=800)
    assert again.backend.to_str() == tok.backend.to_str()


def test_training_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="at least 266"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


def test_save_and_load_roundtrip(tok: TrinityTokenizer, tmp_path: Path) -> None:
    custom = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    original = TrinityTokenizer(tok.backend, chat_template=custom, extra_config={"model_max_length": 4096})
    original.save_pretrained(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|pad|>", None)
    assert config["model_max_length"] == 4096

    loaded = TrinityTokenizer.from_pretrained(tmp_path / "out")
    text = "round trip 東京 😀 <think>x</think>"
    assert loaded.encode(text) == original.encode(text)
    assert loaded.chat_template == custom
    assert loaded.eos_token_ids == original.eos_token_ids
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (2, 3, None)
    assert loaded.model_max_length == 4096
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"


def test_from_pretrained_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        TrinityTokenizer.from_pretrained(tmp_path)


def _write_checkpoint_dir(tok: TrinityTokenizer, path: Path, config: dict) -> Path:
    path.mkdir()
    tok.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_config_chat_template_string(tok: TrinityTokenizer, tmp_path: Path) -> None:
    d = _write_checkpoint_dir(tok, tmp_path / "c", {"chat_template": "STR{{ messages | length }}"})
    assert TrinityTokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "x"}]) == "STR1"


def test_config_chat_template_list_takes_default(tok: TrinityTokenizer, tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    d = _write_checkpoint_dir(tok, tmp_path / "c", {"chat_template": templates})
    assert TrinityTokenizer.from_pretrained(d).chat_template == "DEFAULT"


def test_chat_template_jinja_wins_over_config(tok: TrinityTokenizer, tmp_path: Path) -> None:
    d = _write_checkpoint_dir(tok, tmp_path / "c", {"chat_template": "FROM_CONFIG"})
    (d / "chat_template.jinja").write_text("FROM_FILE")
    assert TrinityTokenizer.from_pretrained(d).chat_template == "FROM_FILE"


def test_missing_template_falls_back_to_builtin(tok: TrinityTokenizer, tmp_path: Path) -> None:
    d = _write_checkpoint_dir(tok, tmp_path / "c", {})
    assert TrinityTokenizer.from_pretrained(d).chat_template == BUILTIN_CHAT_TEMPLATE


def test_config_tokens_as_dicts_and_generation_config_eos(tok: TrinityTokenizer, tmp_path: Path) -> None:
    config = {
        "bos_token": {"content": "<|endoftext|>", "special": True},
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
        "pad_token": "<|pad|>",
    }
    d = _write_checkpoint_dir(tok, tmp_path / "c", config)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    loaded = TrinityTokenizer.from_pretrained(d)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 2, 3)
    assert loaded.eos_token_ids == {0, 2, 7}


def test_generation_config_single_int_eos(tok: TrinityTokenizer, tmp_path: Path) -> None:
    d = _write_checkpoint_dir(tok, tmp_path / "c", {})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert TrinityTokenizer.from_pretrained(d).eos_token_ids == {0, 2, 5}


# ----------------------------------------------------------------------------------------------
# Built-in chat template: exact renderings
# ----------------------------------------------------------------------------------------------

SYS_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {"name": "now", "description": "Current time in Zürich", "parameters": {"type": "object", "properties": {}}}


def test_render_system_user_with_thinking_prefill(tok: TrinityTokenizer) -> None:
    assert tok.apply_chat_template(SYS_USER) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_render_without_thinking(tok: TrinityTokenizer) -> None:
    assert tok.apply_chat_template(SYS_USER, enable_thinking=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_without_generation_prompt(tok: TrinityTokenizer) -> None:
    assert tok.apply_chat_template(SYS_USER[1:], add_generation_prompt=False) == "<|im_start|>user\nHi there<|im_end|>\n"


def test_developer_role_renders_as_system(tok: TrinityTokenizer) -> None:
    msgs = [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "q"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nRules.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
    )


def test_render_with_tools(tok: TrinityTokenizer) -> None:
    text = tok.apply_chat_template(SYS_USER, tools=[WEATHER_TOOL, TIME_TOOL])
    assert isinstance(text, str)
    system_turn, rest = text.split("<|im_end|>\n", 1)
    # one system turn: the system message first, then the tools section
    assert system_turn.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1
    weather_line = json.dumps(WEATHER_TOOL, ensure_ascii=False)
    time_line = json.dumps({"type": "function", "function": TIME_TOOL}, ensure_ascii=False)  # bare schema wrapped
    assert f"<tools>\n{weather_line}\n{time_line}\n</tools>" in system_turn
    assert "Zürich" in system_turn  # not \u-escaped
    assert '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>' in system_turn
    assert rest == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_tools_without_system_message(tok: TrinityTokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert text.endswith("<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_empty_tools_list_means_no_tools(tok: TrinityTokenizer) -> None:
    assert tok.apply_chat_template(SYS_USER, tools=[]) == tok.apply_chat_template(SYS_USER)


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_assistant_reasoning_renders_think_on_every_turn(tok: TrinityTokenizer, key: str) -> None:
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", key: "Add them.", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", key: "\nAdd again.\n", "content": "6"},
    ]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd again.\n</think>\n6<|im_end|>\n"
    )


def _call(arguments: object, name: str = "get_weather") -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_tool_call_arguments_string_and_dict_render_identically(tok: TrinityTokenizer) -> None:
    def convo(arguments: object) -> list[dict]:
        return [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [_call(arguments), _call({}, "now")]},
        ]

    as_string = tok.apply_chat_template(convo('{"city": "Paris"}'), add_generation_prompt=False)
    as_dict = tok.apply_chat_template(convo({"city": "Paris"}), add_generation_prompt=False)
    assert as_string == as_dict == (
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_tool_call_without_content(tok: TrinityTokenizer) -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [_call("")]}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_consecutive_tool_messages_grouped_into_one_user_turn(tok: TrinityTokenizer) -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [_call({"city": "Oslo"}), _call({}, "now")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "Cold, noon."},
        {"role": "tool", "content": "late"},
    ]
    text = tok.apply_chat_template(msgs, enable_thinking=False)
    assert text.endswith(
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n-3C\n</tool_response>\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nCold, noon.<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nlate\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text.count("<|im_start|>user") == 3


def test_content_text_parts_are_joined(tok: TrinityTokenizer) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    assert tok.apply_chat_template(msgs, enable_thinking=False) == (
        "<|im_start|>user\nfirst\nsecond<|im_end|>\n<|im_start|>assistant\n"
    )


def test_messages_are_not_mutated(tok: TrinityTokenizer) -> None:
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "reasoning": "r", "content": None, "tool_calls": [_call('{"x": 1}')]},
    ]
    before = copy.deepcopy(msgs)
    tok.apply_chat_template(msgs)
    assert msgs == before


def test_tokenize_returns_ids(tok: TrinityTokenizer) -> None:
    ids = tok.apply_chat_template(SYS_USER, tokenize=True)
    assert ids == tok.encode(tok.apply_chat_template(SYS_USER))
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-2:] == [tok.token_to_id("<think>"), tok.encode("\n")[0]]


def test_template_kwargs_and_helpers_reach_template(tok: TrinityTokenizer) -> None:
    custom = TrinityTokenizer(
        tok.backend,
        chat_template="{{ greeting }}|{{ eos_token }}|{{ {'k': 'é'} | tojson }}|{{ [1] | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}",
    )
    assert custom.apply_chat_template([{"role": "user", "content": "x"}], greeting="hey") == (
        'hey|<|im_end|>|{"k": "é"}|[\n  1\n]|4'
    )


# ----------------------------------------------------------------------------------------------
# Chat template errors and sandbox
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ("hello", "must be a list"),
        ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
        (["not a dict"], r"messages\[0\] must be an object"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
        ([{"role": "user", "content": None}], "no content"),
        ([{"role": "user", "content": 42}], "must be a string or a list"),
        ([{"role": "assistant", "content": None, "tool_calls": [_call('{"city": ')]}], "not valid JSON"),
        ([{"role": "assistant", "content": None, "tool_calls": [_call("[1, 2]")]}], "must be a JSON object"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}], "string 'name'"),
    ],
)
def test_invalid_messages_raise(tok: TrinityTokenizer, messages: object, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_chat_template_error_is_value_error() -> None:
    assert issubclass(ChatTemplateError, ValueError)


def test_template_syntax_error(tok: TrinityTokenizer) -> None:
    broken = TrinityTokenizer(tok.backend, chat_template="{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match="syntax error"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_raise_exception(tok: TrinityTokenizer) -> None:
    strict = TrinityTokenizer(tok.backend, chat_template="{{ raise_exception('only users allowed') }}")
    with pytest.raises(ChatTemplateError, match="only users allowed"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{{ messages.append(1) }}",  # the immutable sandbox forbids mutating the inputs
    ],
)
def test_sandbox_blocks_escapes(tok: TrinityTokenizer, source: str) -> None:
    evil = TrinityTokenizer(tok.backend, chat_template=source)
    with pytest.raises((ChatTemplateError, jinja2.exceptions.SecurityError)):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


# ----------------------------------------------------------------------------------------------
# Incremental detokenizer
# ----------------------------------------------------------------------------------------------

STREAM_TEXT = "Hi 😀! 東京は晴れ。👩‍💻 writes ∑ code.\n<think>hmm</think> done 🇫🇷"


def _stream(t: TrinityTokenizer, ids: list[int], **kw: object) -> list[str]:
    detok = t.detokenizer(**kw)  # type: ignore[arg-type]
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("which", ["tok", "byte_tok"])
def test_detokenizer_random_prefixes_never_emit_broken_text(which: str, request: pytest.FixtureRequest) -> None:
    t: TrinityTokenizer = request.getfixturevalue(which)
    rng = random.Random(7)
    all_ids = t.encode(STREAM_TEXT * 3)
    for _ in range(40):
        start = rng.randrange(len(all_ids))
        ids = all_ids[start : start + rng.randint(1, 60)]
        deltas = _stream(t, ids)
        expected = t.decode(ids)
        assert "".join(deltas) == expected
        # U+FFFD may only come from a character cut at the slice's edges: leading orphan
        # continuation bytes (emitted at once) or an unfinished character (emitted by flush).
        assert "\ufffd" not in "".join(deltas[:-1]).lstrip("\ufffd")
        assert set(deltas[-1]) <= {"\ufffd"}


def test_detokenizer_full_stream_exact(tok: TrinityTokenizer) -> None:
    ids = tok.encode(STREAM_TEXT)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == STREAM_TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_holds_back_split_emoji(byte_tok: TrinityTokenizer) -> None:
    ids = byte_tok.encode("a😀b")
    assert len(ids) == 6  # a, four bytes of the emoji, b
    detok = byte_tok.detokenizer()
    assert [detok.add(i) for i in ids] == ["a", "", "", "", "😀", "b"]
    assert detok.flush() == ""
    assert detok.text == "a😀b"


def test_detokenizer_flush_emits_replacement_for_cut_sequence(byte_tok: TrinityTokenizer) -> None:
    ids = byte_tok.encode("x😀")[:-1]  # drop the emoji's last byte
    detok = byte_tok.detokenizer()
    assert detok.add_many(ids) == "x"
    assert detok.flush() == "\ufffd"
    assert detok.text == byte_tok.decode(ids) == "x\ufffd"


def test_detokenizer_matches_decode_on_random_bytes(byte_tok: TrinityTokenizer) -> None:
    # Random byte ids include invalid UTF-8; the stream must replace exactly as decode() does.
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(10, 266) for _ in range(rng.randint(1, 12))]
        assert "".join(_stream(byte_tok, ids)) == byte_tok.decode(ids)


def test_detokenizer_skip_special_tokens(tok: TrinityTokenizer) -> None:
    ids = tok.encode("<|im_start|>ok<think>r</think><|im_end|>")
    assert "".join(_stream(tok, ids, skip_special_tokens=True)) == "ok<think>r</think>"
    assert "".join(_stream(tok, ids)) == "<|im_start|>ok<think>r</think><|im_end|>"


def test_detokenizer_window_fallback_for_other_decoders(tok: TrinityTokenizer) -> None:
    # A decoder that is not a bare ByteLevel takes the re-decode path; results must agree.
    backend = type(tok.backend).from_str(tok.backend.to_str())
    backend.decoder = decoders.Sequence([decoders.ByteLevel()])
    other = TrinityTokenizer(backend)
    ids = other.encode(STREAM_TEXT)
    deltas = _stream(other, ids, prompt_ids=other.encode("prompt "))
    assert "".join(deltas) == STREAM_TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # multi-byte characters were held back until complete


# ----------------------------------------------------------------------------------------------
# Interop: a saved tokenizer loads in HF transformers and the template renders the same there
# ----------------------------------------------------------------------------------------------


def test_hf_transformers_interop(tok: TrinityTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "interop 東京 😀 <think>x</think><|im_end|>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    msgs = [
        *SYS_USER,
        {"role": "assistant", "reasoning_content": "r", "content": "ok", "tool_calls": [_call({"city": "Rome"})]},
        {"role": "tool", "content": "sunny"},
    ]
    ours = tok.apply_chat_template(msgs, tools=[WEATHER_TOOL])
    theirs = hf.apply_chat_template(msgs, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert theirs == ours
