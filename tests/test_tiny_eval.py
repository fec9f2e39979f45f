"""benchmarks/tiny_eval.py against the real server: a random-weight model with the synthetic corpus' tokenizer is
served for real, the evaluator sends held-out tasks with the `openai` client and scores them (all wrong, but
measured), and the prompts the server builds for those tasks are token for token the ones the trainer uses."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from trinity import preset
from trinity.model.init import write_random_checkpoint
from trinity.jsonl import read_jsonl
from trinity.synthetic.conversations import HELDOUT_MIX, parse_mix
from trinity.synthetic.corpus import heldout_task, write_corpus
from trinity.synthetic.scoring import Reply, reference_reply, score
from trinity.synthetic.tokenizer_train import train_from_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tiny_eval  # noqa: E402

# every test starts `trinity serve` through the evaluator (the last one, a model that will not load)
pytestmark = pytest.mark.server
TASKS = 12
FLAGS = ["--server-arg=--max-model-len=2048", "--server-arg=--num-kv-blocks=256"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-eval")
    write_corpus(str(root / "data"), 200, TASKS, seed=5)
    tok = train_from_corpus(str(root / "data"), str(root / "model"), vocab_size=800)
    config = preset("tiny", vocab_size=800, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    write_random_checkpoint(config, root / "model", dtype=torch.float32, seed=0)
    return root / "model", root / "data" / "heldout.jsonl"


def test_evaluator_end_to_end(setup, tmp_path):
    model, heldout = setup
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = tiny_eval.main(["--model", str(model), "--heldout", str(heldout), "--max-tokens", "12",
                               "--concurrency", "3", "--out", str(tmp_path / "replies.jsonl"), *FLAGS])
    assert code == 0
    lines = out.getvalue().strip().splitlines()
    assert "tool_call_accuracy" in lines[0] or "metric" in lines[0]  # the table comes first
    result = json.loads(lines[-1])
    assert result["tasks"] == TASKS and result["errors"] == 0 and result["model"] == "model"
    metrics = result["metrics"]
    tasks = read_jsonl(str(heldout))
    checks = [t["check"] for t in tasks]
    assert metrics["think_closed"]["n"] == TASKS
    # each tool-call split on its own: the tools seen in training, unseen tools, forced calls (tool_choice)
    unseen = [t for t in tasks if t["family"].startswith("unseen_tool") and t["check"] in ("tool_call", "tool_calls")]
    forced = [t for t in tasks if "tool_choice" in t]
    assert unseen and forced  # this corpus' first tasks have both, so the new split is measured end to end
    assert metrics["unseen_tool_accuracy"]["n"] == len(unseen)
    assert metrics["forced_call_accuracy"]["n"] == len(forced)
    assert metrics["tool_call_accuracy"]["n"] == checks.count("tool_call") - len(forced) - \
        sum(t["check"] == "tool_call" for t in unseen)
    assert metrics["unseen_right_tool"]["n"] == sum(t["check"] == "tool_call" for t in unseen)
    assert metrics["arithmetic_exact"]["n"] == checks.count("arithmetic")
    assert metrics["json_valid"]["n"] == checks.count("json")
    for m in metrics.values():
        assert m["value"] is None or 0.0 <= m["value"] <= 1.0
    # random weights: nothing is right, so the targets are not met and the run says so
    assert result["all_targets_met"] is False
    replies = read_jsonl(str(tmp_path / "replies.jsonl"))
    assert len(replies) == TASKS and all(r["error"] is None for r in replies)
    assert sum(r["family"] == f for r in replies for f in result["by_family"]) == TASKS
    # benchmarks/tool_choice_probe.py reads these replies: each unseen single call scored after both reasonings
    probe = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tool_choice_probe.py"), "--model", str(model),
                            "--heldout", str(heldout), "--replies", str(tmp_path / "replies.jsonl")],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["tasks"] == metrics["unseen_right_tool"]["n"] > 0
    ways = {f"{which}_reasoning_{way}" for which in ("own", "gold") for way in ("greedy", "sum", "mean")}
    assert ways <= set(found) and all(0.0 <= found[k] <= 100.0 for k in ways) and 0 < found["chance"] < 100


def test_tools_listed_counts_the_names_at_their_place():
    """tools_listed: of the tools the listing tasks offer, those the replies name at their place."""
    tasks = [heldout_task(9, i, parse_mix("unseen_tool_list=1,arithmetic=1,rest=0", HELDOUT_MIX), set())
             for i in range(12)]
    listing = [t for t in tasks if "names" in t["expected"]]
    assert listing and len(listing) < len(tasks)
    offered = sum(len(t["expected"]["names"]) for t in listing)
    first = listing[0]["expected"]["names"]
    replies = [reference_reply(t) for t in tasks]
    replies[tasks.index(listing[0])] = Reply(f"- {first[0]}: something", "The user asks.", [], True)
    metric = tiny_eval.summarise(tasks, [score(t, r) for t, r in zip(tasks, replies)])["metrics"]["tools_listed"]
    assert metric["n"] == offered
    assert metric["value"] == pytest.approx((offered - len(first) + 1) / offered)


def test_server_prompts_are_the_training_prompts(setup):
    """The server renders each task (tools included) to exactly the tokens the trainer puts before the turn."""
    from trinity.tokenizer import TrinityTokenizer

    model, heldout = setup
    tok = TrinityTokenizer.from_pretrained(model)
    server = tiny_eval.Server(str(model), ["--max-model-len=2048", "--num-kv-blocks=256"], startup_timeout=120)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        for task in read_jsonl(str(heldout)):
            ids = tok.apply_chat_template(task["prompt"], tools=task.get("tools"), tokenize=True)
            if task.get("tools"):  # /tokenize takes no tools: compare the count the completion reports
                response = client.chat.completions.create(model="model", messages=task["prompt"],
                                                          tools=task["tools"], max_tokens=1, temperature=0)
                assert response.usage.prompt_tokens == len(ids), task["id"]
            else:
                body = json.dumps({"messages": task["prompt"]}).encode()
                request = urllib.request.Request(f"http://127.0.0.1:{server.port}/tokenize", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as r:
                    assert json.load(r)["tokens"] == ids, task["id"]
    finally:
        server.stop()


def test_evaluator_reports_a_server_that_will_not_start(setup, tmp_path):
    _, heldout = setup
    with pytest.raises(RuntimeError, match="failed to load.*neither a local checkpoint"):
        tiny_eval.main(["--model", str(tmp_path / "no-such-model"), "--heldout", str(heldout)])
