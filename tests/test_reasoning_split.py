import pytest

from trinity.reasoning import ThinkSplitter


def run(deltas, prefill=True):
    s = ThinkSplitter(starts_in_reasoning=prefill)
    r, c = [], []
    for d in deltas:
        a, b = s.feed(d)
        r.append(a)
        c.append(b)
    a, b = s.flush()
    return "".join(r) + a, "".join(c) + b


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 100])
def test_prefilled_reasoning_split_at_any_chunking(chunk):
    text = "12 + 30 = 42, so the answer is 42.\n</think>\nThe answer is 42."
    deltas = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    assert run(deltas) == ("12 + 30 = 42, so the answer is 42.\n", "The answer is 42.")


def test_explicit_think_block_without_prefill():
    assert run(["Sure. <th", "ink>\nhmm</th", "ink>\nDone"], prefill=False) == ("hmm", "Sure. Done")


def test_unclosed_reasoning_stays_reasoning():
    assert run(["still thinking </thi"]) == ("still thinking </thi", "")


def test_no_reasoning_at_all():
    assert run(["plain answer, 3 < 4"], prefill=False) == ("", "plain answer, 3 < 4")
