"""LangChain's ChatOpenAI against `trinity serve` with the built-in model (greedy): a tool loop with `bind_tools`,
and `with_structured_output` in its three methods. The model reasons in `<think>` first; the server applies the
grammar (JSON schema, JSON object, the forced tool call) only to the answer after it.

What the toy model can answer decides the tasks: it does column arithmetic and answers a JSON schema with the
result, it calls its five tools with arguments taken from the user's words, and it writes its trained JSON
replies. It does not carry an arithmetic result into a tool call's arguments (it copies a number from the
question: 1 to 3 of 11 right) nor write arithmetic in JSON mode (it picks the keys of its trained JSON replies:
0 to 1 of 10), so those two methods are checked on the tool calls and JSON replies it was trained for.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("langchain_openai")

from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from trinity.loading import BUILTIN_MODEL  # noqa: E402
from trinity.synthetic.arithmetic import draw_problem, question  # noqa: E402
from trinity.synthetic.json_replies import make_json_reply  # noqa: E402
from trinity.synthetic.tool_use import _REQUESTS as TOOL_REQUESTS  # noqa: E402
from trinity.synthetic.tools import TOOL_SCHEMAS, run_tool  # noqa: E402

from server_helpers import ServerProcess  # noqa: E402

pytestmark = pytest.mark.server


class Answer(BaseModel):
    answer: int


class Result(BaseModel):
    value: int


@pytest.fixture(scope="module")
def llm():
    with ServerProcess("--model", BUILTIN_MODEL, "--enable-auto-tool-choice", name="langchain") as server:
        yield ChatOpenAI(base_url=server.base_url + "/v1", api_key="none", model=BUILTIN_MODEL, temperature=0,
                         max_tokens=400, max_retries=0)


def arithmetic(seed: int, n: int = 10) -> list[tuple[str, int]]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, op, b = draw_problem(rng, allow_negative=False)
        if op != "x":
            out.append((question(rng, a, op, b), a + b if op == "+" else a - b))
    return out


def test_bind_tools_loop(llm):
    tools = [TOOL_SCHEMAS["weather"], TOOL_SCHEMAS["get_time"]]
    model = llm.bind_tools(tools)
    messages = [HumanMessage("What's the weather in Paris?")]
    ai = model.invoke(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("weather", {"city": "Paris", "unit": "celsius"})]
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    result = run_tool("weather", ai.tool_calls[0]["args"], day=3)
    messages += [ai, ToolMessage(json.dumps(result), tool_call_id=ai.tool_calls[0]["id"])]
    final = model.invoke(messages)
    assert not final.tool_calls
    assert str(result["temperature"]) in final.content and result["condition"] in final.content


def test_structured_output_json_schema(llm):
    assert llm.with_structured_output(Answer, method="json_schema").invoke("What is 12 + 30?") == Answer(answer=42)
    runnable = llm.with_structured_output(Result, method="json_schema")
    right = sum(runnable.invoke(q) == Result(value=v) for q, v in arithmetic(2026))
    assert right >= 9, f"{right}/10"


def test_structured_output_function_calling(llm):
    right = 0
    for name in ("calculator", "convert_units"):  # the tool schemas it was trained on, as dicts
        runnable, rng = llm.with_structured_output(TOOL_SCHEMAS[name], method="function_calling"), random.Random(3)
        for _ in range(5):
            request = TOOL_REQUESTS[name](rng)
            right += runnable.invoke(request.text) == request.arguments
    assert right >= 9, f"{right}/10"
    # an arithmetic answer in a forced call parses into the model class (its value is not always right)
    assert isinstance(llm.with_structured_output(Result, method="function_calling").invoke("What is 12 + 30?"),
                      Result)


def test_structured_output_json_mode(llm):
    rng, right = random.Random(5), 0
    for _ in range(10):
        example = make_json_reply(rng)
        (checkpoint,) = example.checkpoints
        prompt = [SystemMessage(m["content"]) if m["role"] == "system" else HumanMessage(m["content"])
                  for m in example.messages[:checkpoint.index]]
        got = llm.with_structured_output(checkpoint.expected["schema"], method="json_mode").invoke(prompt)
        right += got == checkpoint.expected["value"]
    assert right >= 8, f"{right}/10"
