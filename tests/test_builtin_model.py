"""The built-in model (`trinity-tiny`, package data): what `make serve` serves with no model argument.

It loads by default under its name, its checkpoint loads in HF transformers with the same logits, and through the
real server and `openai` client it reasons (`reasoning_content`), calls a tool (`tool_calls`) and answers. The
prompts are fixed and decoding is greedy, so these are exact checks of the shipped weights, template and parsers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from trinity.loading import BUILTIN_MODEL, builtin_model_path, load_model
from trinity.synthetic.tools import TOOL_SCHEMAS

from server_helpers import ServerProcess

PATH = builtin_model_path()


def test_builtin_model_is_the_default_and_small():
    loaded = load_model(device="cpu")
    assert loaded.name == BUILTIN_MODEL
    weights = [f for f in os.listdir(PATH) if f.endswith(".safetensors")]
    assert weights and sum(os.path.getsize(os.path.join(PATH, f)) for f in weights) <= 25 * 2**20
    cfg = loaded.model.config
    # every Trinity feature on: 3:1 sliding/full, dense then MoE with a shared expert, sigmoid routing, muP
    kinds = [cfg.is_sliding_layer(i) for i in range(cfg.num_hidden_layers)]
    assert kinds.count(True) == 3 * kinds.count(False)
    assert 0 < cfg.num_dense_layers < cfg.num_hidden_layers and cfg.num_shared_experts >= 1
    assert cfg.score_func == "sigmoid" and cfg.mup_enabled
    assert os.path.exists(os.path.join(PATH, "README.md"))  # the model card


def test_builtin_model_matches_hf_transformers():
    transformers = pytest.importorskip("transformers")
    loaded = load_model(device="cpu", dtype="float32")
    hf = transformers.AfmoeForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is 27 + 58?"}])
    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    with torch.inference_mode():
        ours, theirs = loaded.model(ids).float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", BUILTIN_MODEL, "--reasoning-parser", "trinity", "--tool-call-parser", "hermes",
                       "--enable-auto-tool-choice", name="builtin") as s:
        yield s


@pytest.mark.server
def test_served_under_its_name(server):
    assert [m.id for m in server.client.models.list().data] == [BUILTIN_MODEL]


@pytest.mark.server
def test_reasons_then_answers_arithmetic(server):
    r = server.client.chat.completions.create(model=BUILTIN_MODEL, temperature=0, max_tokens=300,
                                              messages=[{"role": "user", "content": "What is 27 + 58?"}])
    msg = r.choices[0].message
    reasoning = getattr(msg, "reasoning_content", None)
    assert reasoning and "27 + 58" in reasoning and "</think>" not in reasoning
    assert msg.content.strip() == "The answer is 85."
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.server
def test_calls_the_right_tool_then_answers_from_its_result(server):
    tools = [TOOL_SCHEMAS["weather"], TOOL_SCHEMAS["get_time"], TOOL_SCHEMAS["search"]]
    messages = [{"role": "user", "content": "What's the weather in Paris in celsius?"}]
    r = server.client.chat.completions.create(model=BUILTIN_MODEL, temperature=0, max_tokens=300,
                                              messages=messages, tools=tools)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # the tool's result goes back; the model answers from it
    result = {"city": "Paris", "temperature": 17, "unit": "celsius", "condition": "sunny"}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    r = server.client.chat.completions.create(model=BUILTIN_MODEL, temperature=0, max_tokens=300,
                                              messages=messages, tools=tools)
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "17" in answer
