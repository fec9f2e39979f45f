"""Property-based fuzzing of `trinity serve` with schemathesis, from the server's own /openapi.json.

Every API operation gets generated requests, both valid ones (positive) and ones that break the schema
(negative); none may get a 5xx, and every status and error body must be one /openapi.json documents
(schemathesis's status-code and response-schema conformance checks). Generation is derandomized so a run is
reproducible. Generated bodies may ask for long generations, so max_tokens is capped (only where the generated
value was already a valid one, so negative cases stay negative); the shared server's short context bounds
everything else.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from server_helpers import AUTH

pytestmark = [pytest.mark.server, pytest.mark.slow]

# (method, path, examples per generation mode); GETs without parameters have only one distinct request.
OPERATIONS = [
    ("POST", "/v1/chat/completions", 45),
    ("POST", "/v1/completions", 50),
    ("POST", "/v1/responses", 30),
    ("POST", "/v1/messages", 30),
    ("POST", "/v1/messages/count_tokens", 15),
    ("GET", "/v1/responses/{response_id}", 10),
    ("POST", "/tokenize", 40),
    ("POST", "/detokenize", 30),
    ("GET", "/v1/models", 3),
    ("GET", "/health", 3),
    ("GET", "/metrics", 3),
]
MIN_REQUESTS = 300
MAX_TOKENS_CAP = 4

SENT: dict[tuple[str, str, str], int] = {}
STATUSES: dict[int, int] = {}


@pytest.fixture(scope="module")
def schema(default_server):
    return schemathesis.openapi.from_url(default_server.base_url + "/openapi.json", headers=AUTH, timeout=30)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def cap_generation(case) -> None:
    """Keep generations short: cap valid max_tokens values, and give chat requests one (its default is the
    whole remaining context)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if _is_count(body.get(key)) and body[key] > MAX_TOKENS_CAP:
            body[key] = MAX_TOKENS_CAP
        elif key in body and body[key] is None:  # null: the rest of the context
            del body[key]
    if case.path in ("/v1/chat/completions", "/v1/completions") and \
            "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS_CAP
    if case.path == "/v1/responses" and "max_output_tokens" not in body:
        body["max_output_tokens"] = MAX_TOKENS_CAP


VOCAB = 512  # the tiny preset's model vocabulary
TOKENIZER_VOCAB = 266  # its byte-level tokenizer's


def _token(value) -> int:
    return value % TOKENIZER_VOCAB if _is_count(value) or value == 0 else 100


def repair(case) -> None:
    """Turn a schema-valid body into one the server will most likely run: most schema-valid bodies fail
    the semantic checks (unknown model, empty messages, random tools...), which the other modes cover.
    What is left varies every sampling parameter the schema allows, so the engine itself gets fuzzed."""
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body:
        body["model"] = "tiny"
    for key in ("tools", "tool_choice", "response_format", "chat_template_kwargs"):
        body.pop(key, None)
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(int(k) % VOCAB): v for k, v in body["logit_bias"].items()
                              if k.isascii() and k.isdigit()}
    if isinstance(body.get("stop"), list):
        body["stop"] = [x for x in body["stop"] if x] or None
    elif body.get("stop") == "":
        body["stop"] = None
    if isinstance(body.get("stop_token_ids"), list):
        # the generator may put any JSON in the list (it found nested lists): only ints are ids to bring in range
        body["stop_token_ids"] = [t % VOCAB for t in body["stop_token_ids"]
                                  if isinstance(t, int) and not isinstance(t, bool)]
    if body.get("top_logprobs") and not body.get("logprobs"):
        body["logprobs"] = True
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if m.get("role") != "assistant" and not m.get("content"):
                m["content"] = "x"
            m.pop("tool_calls", None)
        if not messages and case.path == "/v1/chat/completions":
            messages.append({"role": "user", "content": "x"})
    prompt = body.get("prompt")
    if prompt == "" or prompt == []:
        body["prompt"] = "x"
    elif isinstance(prompt, list):
        body["prompt"] = [([_token(t) for t in p] or [100]) if isinstance(p, list) else
                          (p or "x") if isinstance(p, str) else _token(p) for p in prompt]
    if case.path == "/tokenize":
        if "prompt" in body and body.get("messages") is not None:
            body.pop("messages")
        if body.get("prompt") is None and not body.get("messages"):
            body["prompt"] = "x"
            body.pop("messages", None)
    if case.path == "/detokenize" and isinstance(body.get("tokens"), list):
        body["tokens"] = [t % VOCAB for t in body["tokens"]]
    cap_generation(case)
    limit = body.get("max_tokens") or MAX_TOKENS_CAP
    if case.path == "/v1/chat/completions":
        limit = body.get("max_completion_tokens") or limit
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > limit:
        body["min_tokens"] = limit


REPAIRED = "repaired"  # positive cases after `repair`


def _modes(method: str) -> list:
    # a GET has no body to negate or repair
    if method == "GET":
        return [GenerationMode.POSITIVE]
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE, REPAIRED]


CASES = [(m, p, n, mode) for m, p, n in OPERATIONS for mode in _modes(m)]


def _label(mode) -> str:
    return mode if isinstance(mode, str) else mode.value


@pytest.mark.parametrize("method,path,examples,mode", CASES,
                         ids=[f"{m} {p} {_label(mode)}" for m, p, _, mode in CASES])
def test_no_server_errors(schema, default_server, method, path, examples, mode):
    operation = schema[path][method]
    key = (method, path, _label(mode))
    SENT[key] = 0
    fix = repair if mode == REPAIRED else cap_generation
    generation_mode = GenerationMode.POSITIVE if mode == REPAIRED else mode

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=generation_mode))
    def run(case):
        fix(case)
        response = case.call(base_url=default_server.base_url, headers=AUTH, timeout=60)
        SENT[key] += 1
        STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:2000], case.body)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                  response_schema_conformance], headers=AUTH)

    run()
    assert SENT[key] >= 1
    default_server.wait_idle(timeout=30)


def test_enough_requests_sent():
    if len(SENT) < len(CASES):
        pytest.skip("only part of the fuzzing ran (test selection)")
    total = sum(SENT.values())
    print(f"schemathesis: {total} requests; by operation {SENT}; by status {STATUSES}")
    assert total >= MIN_REQUESTS, (total, SENT)
    assert not any(status >= 500 for status in STATUSES), STATUSES
    assert STATUSES.get(200, 0) > 0 and STATUSES.get(400, 0) > 0, STATUSES  # both kinds were exercised
