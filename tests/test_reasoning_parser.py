import random

import pytest

from trinity.serve.reasoning import ReasoningParser, get_reasoning_parser


def stream(cls, deltas, starts_in_reasoning):
    p = cls(starts_in_reasoning)
    r, c = [], []
    for d in deltas:
        a, b = p.feed(d)
        r.append(a)
        c.append(b)
    a, b = p.flush()
    return "".join(r) + a, "".join(c) + b


def splits(text, seed=0):
    """Every 2-piece split, 1 char at a time, and random multi-piece splits."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 8))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


# (parser, starts_in_reasoning, text, expected extract)
CASES = [
    # prefilled reasoning, then content
    ("trinity", True, "12 + 30 = 42.\n</think>\nThe answer is 42.", ("12 + 30 = 42.\n", "The answer is 42.")),
    ("trinity", True, "r\n</think>\n\nContent\n", ("r\n", "\nContent\n")),
    # reasoning only (never closed): everything is reasoning, even a partial close tag
    ("trinity", True, "still thinking </thi", ("still thinking </thi", "")),
    ("trinity", True, "only reasoning, no end", ("only reasoning, no end", "")),
    # blank reasoning -> None
    ("trinity", True, "  \n</think>\nAnswer", (None, "Answer")),
    ("trinity", True, "</think>Answer", (None, "Answer")),
    ("trinity", True, "", (None, "")),
    ("trinity", True, " \n ", (None, "")),
    # a redundant opening tag after the prefill is swallowed (with the blank before it)
    ("trinity", True, "<think>\nredundant\n</think>\nAns", ("redundant\n", "Ans")),
    ("trinity", True, "\n <think>x</think>y", ("x", "y")),
    ("trinity", True, "<thin", ("<thin", "")),
    ("trinity", True, "a<think>b</think>c", ("a<think>b", "c")),
    # no prefill: no reasoning
    ("trinity", False, "plain answer, 3 < 4 and <b>bold</b>", (None, "plain answer, 3 < 4 and <b>bold</b>")),
    ("trinity", False, "stray </think> stays content", (None, "stray </think> stays content")),
    ("trinity", False, "", (None, "")),
    # explicit <think> without prefill
    ("trinity", False, "<think>\nhmm\n</think>\nDone", ("hmm\n", "Done")),
    ("trinity", False, "<think></think>answer", (None, "answer")),
    ("trinity", False, "<think>\nunclosed <", ("unclosed <", "")),
    # content before <think>
    ("trinity", False, "Sure. <think>\nhmm</think>\nDone", ("hmm", "Sure. Done")),
    ("trinity", False, "a <thin <think>\nb</thinkx</think>\nc", ("b</thinkx", "a <thin c")),
    # only one reasoning block: later tags are content
    ("trinity", True, "r</think>\nc <think>\nx</think>\ny", ("r", "c <think>\nx</think>\ny")),
    ("trinity", True, "Überlegung: 東京 🚀\n</think>\nAntwort ✓", ("Überlegung: 東京 🚀\n", "Antwort ✓")),
    # deepseek_r1: always starts inside the reasoning; a leading <think> is swallowed
    ("deepseek_r1", False, "<think>\nr\n</think>\nc", ("r\n", "c")),
    ("deepseek_r1", False, "r</think>c", ("r", "c")),
    ("deepseek_r1", True, "\n\n<think>\nr</think>\n\nc", ("r", "\nc")),
    ("deepseek_r1", False, "no close", ("no close", "")),
    # none: everything is content
    ("none", True, "<think>\nr</think>\nc", (None, "<think>\nr</think>\nc")),
    ("none", False, "x", (None, "x")),
]


@pytest.mark.parametrize("name,sir,text,expected", CASES)
def test_extract(name, sir, text, expected):
    assert get_reasoning_parser(name).extract(text, sir) == expected


@pytest.mark.parametrize("name,sir,text,expected", CASES)
def test_stream_equals_extract_for_every_split(name, sir, text, expected):
    cls = get_reasoning_parser(name)
    r, c = cls.extract(text, sir)
    want = (r or "", c)
    for k, deltas in enumerate(splits(text)):
        assert "".join(deltas) == text
        assert stream(cls, deltas, sir) == want, deltas


def test_random_texts_stream_equals_extract():
    rng = random.Random(1234)
    alphabet = ["<think>", "</think>", "<", "</", "<thi", "</thi", "nk>", "\n", " ", "a", "é", ">"]
    for name in ("trinity", "deepseek_r1", "none"):
        cls = get_reasoning_parser(name)
        for _ in range(150):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            for sir in (True, False):
                r, c = cls.extract(text, sir)
                assert r is None or r.strip()
                for deltas in splits(text, seed=rng.random()):
                    assert stream(cls, deltas, sir) == (r or "", c), (name, sir, deltas)


def test_partial_tag_is_held_back_then_released():
    p = ReasoningParser(starts_in_reasoning=True)
    assert p.feed("step one </th") == ("step one ", "")
    assert p.feed("ink>\nanswer") == ("", "answer")
    p = ReasoningParser(starts_in_reasoning=False)
    assert p.feed("hello <thi") == ("", "hello ")
    assert p.feed("s is not a tag") == ("", "<this is not a tag")
    assert p.flush() == ("", "")


def test_blank_reasoning_is_held_until_text_arrives():
    p = ReasoningParser(starts_in_reasoning=True)
    assert p.feed("\n") == ("", "")
    assert p.feed("x") == ("\nx", "")
    p = ReasoningParser(starts_in_reasoning=True)
    assert p.feed("  ") == ("", "")
    assert p.feed("</think>\nok") == ("", "ok")


def test_get_reasoning_parser():
    assert get_reasoning_parser("trinity") is ReasoningParser
    with pytest.raises(ValueError, match="deepseek_r1.*none.*trinity"):
        get_reasoning_parser("qwen9")
