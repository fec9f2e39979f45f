"""lm-eval (EleutherAI's harness, pinned in the `frameworks` extra) scores the served built-in model through
/v1/completions with its `local-completions` model: loglikelihoods from `echo` + `logprobs` (multiple choice) and
greedy generations (generate_until), on the two small local tasks in tests/data/lm_eval_tasks.

lm-eval runs in a subprocess, offline (no hub, no network): its global seeding and logging stay out of this
process, and it reads the tasks' local JSON files with the paths the YAML files give, relative to the repository
root. One subprocess runs both request shapes: token-id prompts batched 8 to a request, and text prompts one by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trinity.loading import BUILTIN_MODEL

from server_helpers import ROOT, ServerProcess

pytest.importorskip("lm_eval", reason="lm-eval is in the `frameworks` extra")

TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"

# simple_evaluate twice: argv = base_url, output file. Prints nothing we read; writes the metrics and, per sample,
# the request arguments and the responses lm-eval got.
DRIVER = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

base_url, out = sys.argv[1], sys.argv[2]
tasks = TaskManager(include_path="tests/data/lm_eval_tasks")
runs = {}
for name, tokenized, batch, names in (("tokens", True, 8, ["trinity_capitals", "trinity_arithmetic"]),
                                      ("text", False, 1, ["trinity_capitals"])):
    args = (f"base_url={base_url},model=trinity-tiny,tokenizer=src/trinity/assets/trinity-tiny,"
            f"tokenizer_backend=huggingface,tokenized_requests={tokenized}")
    r = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=names, task_manager=tasks,
                                batch_size=batch, log_samples=True)
    runs[name] = {"results": r["results"],
                  "samples": {t: [{"arguments": [list(a) for a in s["arguments"]], "resps": s["resps"],
                                   "filtered_resps": s["filtered_resps"], "target": s["target"]} for s in samples]
                              for t, samples in r["samples"].items()}}
with open(out, "w") as f:
    json.dump(runs, f, default=str)
"""


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", BUILTIN_MODEL, "--dtype", "float32", "--device", "cpu", name="lm-eval") as s:
        yield s


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    out = tmp / "runs.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp / "datasets"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-c", DRIVER, f"{server.base_url}/v1/completions", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.server
def test_the_metrics_are_real(runs):
    results = runs["tokens"]["results"]
    # 4 choices: chance is 0.25; the model knows these capitals
    assert results["trinity_capitals"]["acc,none"] >= 0.875
    # the column-arithmetic answers, parsed from "The answer is N."
    assert results["trinity_arithmetic"]["exact_match,answer"] >= 0.875
    # text prompts (re-tokenized by the server) score the same
    assert runs["text"]["results"]["trinity_capitals"]["acc,none"] == results["trinity_capitals"]["acc,none"]


def _loglikelihoods(run: dict) -> dict[tuple[str, str], tuple[float, bool]]:
    """(context, continuation) -> (loglikelihood, is_greedy) as lm-eval parsed them from the server's responses."""
    out = {}
    for sample in run["samples"]["trinity_capitals"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            value, greedy = resp[0]
            out[(context, continuation)] = (float(value), str(greedy) == "True")
    return out


@pytest.mark.server
def test_lm_eval_loglikelihoods_are_the_servers(server, runs):
    got = _loglikelihoods(runs["tokens"])
    assert len(got) == 8 * 4
    pairs = list(got)
    # the server's own scores of the same texts: the prompt only (max_tokens=0), the continuation's tokens are
    # those whose text starts at or after the context's end
    r = server.http.post("/v1/completions", json={"model": BUILTIN_MODEL, "prompt": [c + x for c, x in pairs],
                                                  "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        context, continuation = pairs[choice["index"]]
        lp = choice["logprobs"]
        scores = [v for v, at in zip(lp["token_logprobs"], lp["text_offset"]) if at >= len(context)]
        assert scores and got[(context, continuation)][0] == pytest.approx(sum(scores), abs=1e-4)
    # text prompts one at a time: the same numbers as token ids in batches
    text = _loglikelihoods(runs["text"])
    assert text.keys() == got.keys()
    assert all(text[k][0] == pytest.approx(got[k][0], abs=1e-4) and text[k][1] == got[k][1] for k in got)


@pytest.mark.server
def test_the_right_answers_are_greedy_and_the_generations_parse(runs):
    for sample in runs["tokens"]["samples"]["trinity_capitals"]:
        ll = [float(r[0][0]) for r in sample["resps"]]
        right = int(sample["target"])
        assert max(range(len(ll)), key=ll.__getitem__) == right
        assert str(sample["resps"][right][0][1]) == "True"  # lm-eval's is_greedy, from the top_logprobs
    for sample in runs["tokens"]["samples"]["trinity_arithmetic"]:
        generated = sample["resps"][0][0]
        assert "</think>" in generated and f"The answer is {sample['target']}." in generated
        assert sample["filtered_resps"][0] == sample["target"]
