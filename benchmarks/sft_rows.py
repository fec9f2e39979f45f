"""How the data orders fill training rows with conversations: the share of a tool conversation's loss tokens
trained in a row that lacks the conversation's start (its tool list: a piece read from mid-document), and the
share of padding, for `rsdb` and `packed` at two row lengths. No training: the loaders only.

    .venv/bin/python benchmarks/sft_rows.py --corpus out/tiny/data/train.jsonl --tokenizer out/tiny/tokenizer
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from trinity.tokenizer import TrinityTokenizer  # noqa: E402
from trinity.train.data import chat_document, make_loader  # noqa: E402


def measure(order: str, docs, has_tools: list[bool], seq_len: int, rows: int, pad_id: int) -> dict:
    loader = make_loader(order, docs, seq_len, seed=0, pad_id=pad_id)
    read = loader._read
    counts = {"whole": 0, "cut": 0}

    def counting(doc_index: int, start: int, want: int):
        ids, mask = read(doc_index, start, want)
        if has_tools[doc_index]:
            counts["cut" if start > 0 else "whole"] += int(mask.sum())
        return ids, mask

    loader._read = counting
    padding = sum(int((loader.next_sequence()[0] == pad_id).sum()) for _ in range(rows))
    return {"tool_loss_tokens_without_their_start": round(counts["cut"] / max(1, sum(counts.values())), 4),
            "padding": round(padding / (rows * (seq_len + 1)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="train.jsonl from `python -m trinity.synthetic`")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--documents", type=int, default=6000, help="the corpus' first N conversations")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[512, 1024])
    args = ap.parse_args()

    tok = TrinityTokenizer.from_pretrained(args.tokenizer)
    docs, has_tools = [], []
    with open(args.corpus, encoding="utf-8") as f:
        for line in itertools.islice(f, args.documents):
            record = json.loads(line)
            docs.append(chat_document(record["messages"], tok, tok.eos_token_id, record.get("tools")))
            has_tools.append(bool(record.get("tools")))
    lengths = np.array([len(d.ids) for d in docs])
    out: dict = {"documents": len(docs), "with_tools": int(sum(has_tools)), "longest": int(lengths.max()),
                 "median": int(np.median(lengths))}
    pad_id = -1  # no token has it: padding counted exactly (the loader writes it, the model never sees it here)
    for seq_len in args.seq_len:
        for order in ("rsdb", "packed"):
            out[f"{order}_{seq_len}"] = result = measure(order, docs, has_tools, seq_len, args.rows, pad_id)
            print(f"{order:6s} seq_len {seq_len:5d}: {result['tool_loss_tokens_without_their_start']:6.1%} of the tool "
                  f"conversations' loss tokens in a row without the conversation's start; padding "
                  f"{result['padding']:.1%}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
