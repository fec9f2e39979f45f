"""A multi-megabyte prompt must not stall the server (issue 26, item 7): one that cannot fit the context is refused
from its length alone, before tokenizing (`TrinityTokenizer.fewest_tokens`, a lower bound on its token count), and
prompts are tokenized off the event loop."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from server_helpers import assert_error, running_server
from trinity.loading import load_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("trinity-tiny").tokenizer


def test_fewest_tokens_never_exceeds_the_real_count(tokenizer):
    rng = random.Random(0)
    alphabet = "abc xyz 0123456789\n\t.,!?éßж中文😀<|im_start|><|im_end|><think></think>"
    texts = ["", "a", "<|im_start|>", "😀" * 50, "1234567890" * 30]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(300)]
    for text in texts:
        assert tokenizer.fewest_tokens(text) <= len(tokenizer.encode(text)), repr(text)
    # and it is a real bound, not 0: 3.9 MB of words is far more than any context here
    assert tokenizer.fewest_tokens("word " * 800_000) > 100_000


@pytest.mark.server
def test_a_huge_prompt_is_refused_without_stalling_other_requests():
    with running_server("--max-request-bytes", "8000000", name="huge") as server:
        _refuse_huge_prompt_beside_short_ones(server)


def _refuse_huge_prompt_beside_short_ones(server) -> None:
    http = server.http
    short = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}

    def timed() -> float:
        t = time.perf_counter()
        assert http.post("/v1/completions", json=short, timeout=60).status_code == 200
        return time.perf_counter() - t

    timed()
    alone = min(timed() for _ in range(3))
    huge = {"prompt": "word " * 780_000, "max_tokens": 1}  # 3.9 MB: took 3-4 s to tokenize on the event loop
    result = {}

    def send() -> None:
        t = time.perf_counter()
        with httpx.Client(base_url=server.base_url, headers=server.headers) as other:
            result["response"] = other.post("/v1/completions", json=huge, timeout=120)
        result["s"] = time.perf_counter() - t

    thread = threading.Thread(target=send)
    thread.start()
    worst = max(timed() for _ in range(3))
    thread.join(120)
    assert_error(result["response"], 400, "invalid_request_error", param="prompt", code="context_length_exceeded")
    assert result["s"] < 3.0, f"the huge prompt took {result['s']:.2f} s to refuse"
    assert worst < 2 * alone + 1.0, f"a short request took {worst:.2f} s beside it (alone {alone:.2f} s)"
