"""The OpenAI Agents SDK (openai-agents, pinned in pyproject's `frameworks` extra) against `trinity serve` with the
built-in model: an agent with a function tool runs its loop (the model calls the tool, the SDK runs it, the model
answers from its result) over Chat Completions and over the Responses API, whole and streamed."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import openai
import pytest

agents = pytest.importorskip("agents")

from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,  # noqa: E402
                    function_tool, set_tracing_disabled)

from trinity.loading import BUILTIN_MODEL  # noqa: E402

from server_helpers import ServerProcess  # noqa: E402

pytestmark = pytest.mark.server

QUESTION = "What's the weather in Paris in celsius?"


@pytest.fixture(scope="module")
def server():
    set_tracing_disabled(True)  # no traces sent to OpenAI from a test
    with ServerProcess("--model", BUILTIN_MODEL, "--enable-auto-tool-choice", api_key="agents-key",
                       name="agents") as s:
        yield s


def weather_agent(server: ServerProcess, model_class, **client_options) -> tuple[Agent, list]:
    calls = []

    @function_tool
    def weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> dict:
        """Current weather in a city."""
        calls.append((city, unit))
        return {"city": city, "temperature": 17, "unit": unit, "condition": "sunny"}

    model = model_class(model=BUILTIN_MODEL, openai_client=server.async_client(**client_options))
    agent = Agent(name="assistant", tools=[weather], model=model,
                  model_settings=ModelSettings(temperature=0, max_tokens=300))
    return agent, calls


@pytest.mark.parametrize("model_class", [OpenAIChatCompletionsModel, OpenAIResponsesModel],
                         ids=["chat-completions", "responses"])
def test_agent_calls_its_tool_then_answers(server, model_class):
    agent, calls = weather_agent(server, model_class)
    result = asyncio.run(Runner.run(agent, QUESTION, max_turns=4))
    assert calls == [("Paris", "celsius")]  # the model called the tool, with the question's arguments
    assert "17" in result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds.count("tool_call_item") == 1 and kinds.count("tool_call_output_item") == 1
    assert kinds[-1] == "message_output_item"


def test_agent_streamed_over_responses(server):
    agent, calls = weather_agent(server, OpenAIResponsesModel)

    async def run():
        result = Runner.run_streamed(agent, QUESTION, max_turns=4)
        deltas = [e.data.delta async for e in result.stream_events()
                  if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"]
        return result, "".join(deltas)

    result, streamed_text = asyncio.run(run())
    assert calls == [("Paris", "celsius")]
    assert "17" in result.final_output and streamed_text == result.final_output


def test_agent_chains_server_stored_responses(server):
    """auto_previous_response_id: the SDK sends only the new items and the id of the last response; the server
    prepends what it stored (the question, the reasoning, the call) before the tool's result."""
    sent = []

    async def record(request):
        sent.append(json.loads(request.content))

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]})
    agent, calls = weather_agent(server, OpenAIResponsesModel, http_client=http)
    result = asyncio.run(Runner.run(agent, QUESTION, max_turns=4, auto_previous_response_id=True))
    assert calls == [("Paris", "celsius")] and "17" in result.final_output
    first, second = result.raw_responses
    assert "previous_response_id" not in sent[0]
    assert sent[1]["previous_response_id"] == first.response_id
    assert [item["type"] for item in sent[1]["input"]] == ["function_call_output"]
