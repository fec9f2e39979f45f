"""Write a corpus: `train.jsonl` (conversations for `trinity train`), `heldout.jsonl` (tasks for the evaluator)
and `manifest.json` (what was asked for and what came out).

Held-out tasks come from their own seed stream, and a task whose prompt also occurs in the training set is
redrawn; only families whose whole space is small (a greeting is a greeting) may, after many redraws, keep an
overlapping prompt, and such tasks are marked `"seen_in_train": true`.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from .conversations import HELDOUT_MIX, TRAIN_MIX, example_at
from .example import Checkpoint, Example

HELDOUT_REDRAWS = 64
# chat request fields a family puts in its meta for the evaluator to send (generated_conversations.py's forced
# calls, reasoned_json.py's response_format); such families have checkpoints only where the field applies
REQUEST_FIELDS = ("tool_choice", "response_format")


def prompt_key(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """What the model sees before a checked turn; two tasks with the same key are the same task."""
    names = [t["function"]["name"] for t in tools] if tools else []
    return json.dumps([messages, names], sort_keys=True)


def train_examples(seed: int, count: int, mix: Mapping[str, float] = TRAIN_MIX) -> Iterator[Example]:
    for i in range(count):
        yield example_at(seed, "train", i, mix)


def _pick_checkpoint(rng: random.Random, example: Example) -> Checkpoint:
    # tool calls are what the issue measures, so a tool conversation is more often tested at its call
    weights = [3 if c.check in ("tool_call", "tool_calls") else 1 for c in example.checkpoints]
    return rng.choices(example.checkpoints, weights)[0]


def heldout_task(seed: int, index: int, mix: Mapping[str, float], taken: set[str]) -> dict[str, Any]:
    """Held-out task `index`, redrawn while its prompt is in `taken` (training prompts and earlier tasks)."""
    for attempt in range(HELDOUT_REDRAWS):
        example = example_at(seed, "heldout", index, mix, attempt)
        checkpoint = _pick_checkpoint(random.Random(f"trinity-heldout-pick:{seed}:{index}:{attempt}"), example)
        prompt = example.messages[:checkpoint.index]
        key = prompt_key(prompt, example.tools)
        if key not in taken or attempt == HELDOUT_REDRAWS - 1:
            break
    task: dict[str, Any] = {"id": f"heldout-{index}", "family": example.family, "check": checkpoint.check,
                            "prompt": prompt, "expected": checkpoint.expected,
                            "reference": example.messages[checkpoint.index]}
    if example.tools:
        task["tools"] = example.tools
    if example.meta:
        task["meta"] = example.meta
    for field in REQUEST_FIELDS:  # what the evaluator must send with the messages (tool_choice, response_format)
        if field in example.meta:
            task[field] = example.meta[field]
    if key in taken:
        task["seen_in_train"] = True
    taken.add(key)
    return task


def write_corpus(out: str, train: int, heldout: int, seed: int, train_mix: Mapping[str, float] = TRAIN_MIX,
                 heldout_mix: Mapping[str, float] = HELDOUT_MIX) -> dict[str, Any]:
    if train < 0 or heldout < 0:
        raise ValueError(f"counts must be >= 0 (train {train}, heldout {heldout})")
    os.makedirs(out, exist_ok=True)
    taken: set[str] = set()
    families: Counter[str] = Counter()
    with open(os.path.join(out, "train.jsonl"), "w", encoding="utf-8") as f:
        for example in train_examples(seed, train, train_mix):
            families[example.family] += 1
            for checkpoint in example.checkpoints:
                taken.add(prompt_key(example.messages[:checkpoint.index], example.tools))
            f.write(json.dumps(example.record(), ensure_ascii=False) + "\n")
    checks: Counter[str] = Counter()
    seen = 0
    with open(os.path.join(out, "heldout.jsonl"), "w", encoding="utf-8") as f:
        for i in range(heldout):
            task = heldout_task(seed, i, heldout_mix, taken)
            checks[task["check"]] += 1
            seen += bool(task.get("seen_in_train"))
            f.write(json.dumps(task, ensure_ascii=False) + "\n")
    manifest = {"seed": seed, "train": train, "heldout": heldout, "train_mix": dict(train_mix),
                "heldout_mix": dict(heldout_mix), "train_families": dict(sorted(families.items())),
                "heldout_checks": dict(sorted(checks.items())), "heldout_seen_in_train": seen}
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest
