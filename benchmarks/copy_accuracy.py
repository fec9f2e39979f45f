"""How well trained models copy: accuracy on the copy rows of `trinity.train.copy_task`, side by side.

A model that can call an unseen tool must copy its name from the tool list, hundreds of tokens back. This scores
saved models (HF-layout folders) on rows of random tokens with a span written twice at a varying distance, the
repeat's predictable tokens only (`copy_probe.py` trains a shape on those rows; this measures what a training run
kept). Each row shape is `SEQ_LEN:SPAN`: rows of SEQ_LEN tokens, spans of SPAN/2..SPAN. Every model sees the same
rows (about 8,192 tokens per shape, a fixed seed), drawn from the tokenizer's ordinary tokens.

    python benchmarks/copy_accuracy.py --tokenizer out/tiny/tokenizer --rows 63:32 1023:256 -- MODEL [MODEL ...]

prints one JSON object: accuracy per model and row shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trinity.model.model import TrinityForCausalLM  # noqa: E402
from trinity.train.copy_task import copy_accuracy, copy_batch, ordinary_token_ids  # noqa: E402
from trinity.train.trainer import build_tokenizer  # noqa: E402

TOKENS_PER_SHAPE = 8192


def shape_accuracy(model: TrinityForCausalLM, pool: torch.Tensor, seq_len: int, span: int, seed: int) -> float:
    ids, labels = copy_batch(max(1, TOKENS_PER_SHAPE // seq_len), seq_len, span, pool,
                             torch.Generator().manual_seed(seed))
    return copy_accuracy(model, ids, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (draws the rows' tokens)")
    parser.add_argument("--rows", nargs="+", default=["63:32", "1023:256"], help="row shapes SEQ_LEN:SPAN")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    pool = ordinary_token_ids(build_tokenizer(args.tokenizer))
    shapes = [tuple(int(x) for x in shape.split(":")) for shape in args.rows]
    results = {}
    for path in args.models:
        model = TrinityForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[path] = {f"{seq}:{span}": round(shape_accuracy(model, pool, seq, span, args.seed), 3)
                         for seq, span in shapes}
    print(json.dumps({"tokens_per_shape": TOKENS_PER_SHAPE, "seed": args.seed, "accuracy": results}))


if __name__ == "__main__":
    main()
