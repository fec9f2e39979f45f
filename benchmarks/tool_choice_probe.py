"""Where the choice of an unseen tool goes wrong: in the reasoning, in the call, or in greedy decoding.

    .venv/bin/python benchmarks/tiny_eval.py --model MODEL --heldout U/heldout.jsonl --out replies.jsonl
    .venv/bin/python benchmarks/tool_choice_probe.py --model MODEL --heldout U/heldout.jsonl --replies replies.jsonl

For each unseen-tool single call of the held-out file, the prompt (tools included) is followed by a reasoning,
then the call's opening `<tool_call>\\n{"name": "`, and every offered name is scored by the model at that point:
- after the model's own reasoning (the reply tiny_eval recorded), and after the task's gold reasoning (which names
  the right tool): how much the call follows the reasoning, and how much the reasoning's choice costs;
- three ways to choose among the names: greedy token by token (what the server's grammar does at temperature 0),
  the whole name's summed log-probability, and its mean per token.
Chance is the mean of 1 / tools offered. Prints one JSON object: percent right per (reasoning, way).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trinity.jsonl import read_jsonl  # noqa: E402
from trinity.loading import load_model  # noqa: E402
from trinity.synthetic.conversations import HELDOUT_FAMILIES  # noqa: E402

CALL_OPENING = '\n</think>\n<tool_call>\n{"name": "'


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    p.add_argument("--heldout", required=True, help="held-out tasks (the unseen-tool ones are probed)")
    p.add_argument("--replies", required=True, help="tiny_eval.py --out of the same model on the same tasks")
    return p.parse_args()


class Scorer:
    def __init__(self, model_path: str | None):
        loaded = load_model(model_path, dtype=torch.float32, device="cpu")
        self.model, self.tok = loaded.model.eval(), loaded.tokenizer

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids]))[0].float().log_softmax(-1)

    def choose(self, prefix: str, names: list[str]) -> dict[str, str]:
        """The name each way picks after `prefix`."""
        head = self.tok.encode(prefix)
        tails, lps, total = {}, {}, {}
        for name in names:
            ids = self.tok.encode(prefix + name + '", ')
            if ids[:len(head)] != head:
                raise ValueError(f"the prefix does not tokenize alone as within {name!r}")
            tails[name] = ids[len(head):]
            # row len(head) - 1 + i: the next-token distribution after the prefix and the name's first i tokens
            lps[name] = self.logprobs(ids)[len(head) - 1:]
            total[name] = sum(lps[name][i, t].item() for i, t in enumerate(tails[name]))
        alive, depth = list(names), 0
        while len(alive) > 1:  # greedy: the best next token among the names still possible
            lp = lps[alive[0]][depth]  # the names alive share their first `depth` tokens, so any one's row serves
            nexts = {n: tails[n][depth] for n in alive if depth < len(tails[n])}
            best = max(nexts.values(), key=lambda t: lp[t].item())
            alive = [n for n in alive if nexts.get(n) == best]
            depth += 1
        return {"greedy": alive[0], "sum": max(total, key=total.get),
                "mean": max(names, key=lambda n: total[n] / len(tails[n]))}


def main() -> None:
    args = parse_args()
    scorer = Scorer(args.model)
    replies = {r["id"]: r for r in read_jsonl(args.replies)}
    right: dict[str, int] = {}
    n, chance = 0, 0.0
    for task in read_jsonl(args.heldout):
        if task["check"] != "tool_call" or task["family"] not in HELDOUT_FAMILIES:  # tiny_eval's unseen split
            continue
        prompt = scorer.tok.apply_chat_template(task["prompt"], tools=task["tools"])
        names = [t["function"]["name"] for t in task["tools"]]
        reasonings = {"own": replies[task["id"]]["reasoning"], "gold": task["reference"].get("reasoning_content")}
        for which, reasoning in reasonings.items():
            picks = scorer.choose(prompt + (reasoning or "").strip() + CALL_OPENING, names)
            for way, name in picks.items():
                key = f"{which}_reasoning_{way}"
                right[key] = right.get(key, 0) + (name == task["expected"]["name"])
        n += 1
        chance += 1 / len(names)
    if not n:
        raise SystemExit("no unseen-tool single calls in the held-out file")
    print(json.dumps({"model": args.model or "trinity-tiny", "tasks": n, "chance": round(100 * chance / n, 1),
                      **{k: round(100 * v / n, 1) for k, v in sorted(right.items())}}))


if __name__ == "__main__":
    main()
