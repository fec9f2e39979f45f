"""Does a model find a tool by its words? Teacher-forced, at every "The tool NAME" of the gold replies.

Each conversation is rendered through the chat template with its gold assistant turns. Wherever an assistant
turn says "The tool " followed by an offered tool's name, the model's greedy prediction of the name's first token
is scored (the choice; the rest of the name is a copy), and of the whole name given its own first tokens. The gold
text before it is given, so on the held-out unseen-tool split this measures the match alone: the reasoning already
says what the user wants ("The user wants to play a podcast episode. The tool "), and the model must find the
offered tool that does that. Chance is about one over the number of tools offered.

    python benchmarks/lookup_probe.py --heldout U/heldout.jsonl --limit 200 -- MODEL [MODEL ...]

Accepts held-out task files (prompt + reference + tools) and training files (messages + tools); prints one JSON
object: per model and file, first-token accuracy, whole-name accuracy, and the number of names scored.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trinity.jsonl import read_jsonl  # noqa: E402
from trinity.model.model import TrinityForCausalLM  # noqa: E402
from trinity.train.trainer import build_tokenizer  # noqa: E402


def conversation(record: dict) -> tuple[list[dict], list[dict]]:
    """(messages with gold assistant turns, tools) of a held-out task or a training record."""
    if "prompt" in record:
        return [*record["prompt"], record["reference"]], record.get("tools") or []
    return record["messages"], record.get("tools") or []


def name_spans(text: str, names: list[str], start: int) -> list[tuple[int, int]]:
    """Character spans of the offered names that follow "The tool " in text[start:]."""
    pattern = re.compile(r"The tool (" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
    return [(m.start(1), m.end(1)) for m in pattern.finditer(text, start)]


def score_record(model, tokenizer, record: dict) -> tuple[int, int, int]:
    """(first tokens right, whole names right, names scored) in one conversation."""
    messages, tools = conversation(record)
    names = [t["function"]["name"] for t in tools]
    if not names:
        return 0, 0, 0
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
    # only the assistant turns: the tool list before them holds no "The tool NAME"
    spans = name_spans(text, names, max(text.find("<|im_start|>assistant"), 0))
    if not spans:
        return 0, 0, 0
    with torch.no_grad():
        predicted = model(torch.tensor([ids]))[0].argmax(-1).tolist()
    first = whole = 0
    for begin, end in spans:
        tokens = [i for i, (a, b) in enumerate(offsets) if a < end and b > begin]
        if not tokens or tokens[0] == 0:
            continue
        hits = [predicted[i - 1] == ids[i] for i in tokens]
        first += hits[0]
        whole += all(hits)
    return first, whole, len(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", nargs="+", required=True, help="held-out task or training JSONL files")
    parser.add_argument("--limit", type=int, default=200, help="conversations per file")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    results: dict = {}
    for path in args.models:
        model = TrinityForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = build_tokenizer(path)
        results[path] = {}
        for heldout in args.heldout:
            totals = [0, 0, 0]
            for record in list(read_jsonl(heldout))[:args.limit]:
                totals = [t + s for t, s in zip(totals, score_record(model, tokenizer, record))]
            first, whole, n = totals
            results[path][heldout] = {"first_token": round(first / n, 3) if n else None,
                                      "whole_name": round(whole / n, 3) if n else None, "n": n}
    print(json.dumps({"limit": args.limit, "results": results}))


if __name__ == "__main__":
    main()
