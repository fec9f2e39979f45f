"""RSDB vs sequential packing on a corpus with a few very long documents: BatchHet and step-loss variance.

    .venv/bin/python benchmarks/train_rsdb.py [--steps 120] [--out out/bench/train_rsdb]

Corpus: 3 long documents of ~20k tokens (CSV-like tables: a style of their own) placed among 200 short prose
documents (~100-400 tokens each), in file order. The tiny preset is trained twice with the real trainer, same
seed and steps, once per data order; each step is 8 micro batches of 1 sequence. Reported per order, over the
steps after warmup:

- BatchHet: max - mean micro-batch loss within a step (the trainer's `batchhet`), averaged over steps;
- step-to-step loss variation: the standard deviation of loss[t] - loss[t-1];
- the final loss (mean of the last 20% of steps).

Writes `<out>/train_rsdb.json` (with the per-step curves), prints a table, then one JSON object as the last line,
with ratios sequential / rsdb (> 1 means RSDB is lower).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

from trinity.train.trainer import TrainConfig, Trainer

WORDS = ("the of and to in is was he for it with as his on be at by had are but from or have an they which one you "
         "were all we her she there would their will when who him been has more if no out so said what up its about "
         "into than them can only other time new some could these two may first then do any like my now over such "
         "our man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men "
         "work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three").split()


def long_document(k: int, chars: int, rng: np.random.Generator) -> str:
    rows, i = [], 0
    while sum(map(len, rows)) < chars:
        rows.append(f"{k}-{i:05d},{(i * 7919 + 13 * k) % 1000:03d},{rng.choice(WORDS)},{i % 7 * 1.5:.1f}\n")
        i += 1
    return "".join(rows)[:chars]


def short_document(rng: np.random.Generator) -> str:
    sentences = []
    for _ in range(int(rng.integers(2, 8))):
        words = rng.choice(WORDS, size=int(rng.integers(5, 14)))
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def write_corpus(path: str, n_short: int, n_long: int, long_chars: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    docs = [short_document(rng) for _ in range(n_short)]
    at = [round((j + 1) * n_short / (n_long + 1)) for j in range(n_long)]  # spread through the file order
    for j, position in enumerate(reversed(at)):
        docs.insert(position, long_document(n_long - 1 - j, long_chars, rng))
    for i, text in enumerate(docs):
        with open(os.path.join(path, f"doc{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    lengths = [len(d) for d in docs]
    return {"documents": len(docs), "long_documents": n_long, "long_tokens": long_chars,
            "short_tokens_mean": float(np.mean([n for n in lengths if n < long_chars])), "total_tokens": sum(lengths)}


def train(order: str, corpus: str, args, work: str) -> dict:
    # sequential: one reader per micro batch, as data workers on separate shards (RSDB ignores data_streams)
    cfg = TrainConfig(preset="tiny", data=[corpus], data_order=order, seq_len=args.seq_len,
                      data_streams=args.micro_batches,
                      batch_size=args.micro_batches * args.micro_batch_size, micro_batch_size=args.micro_batch_size,
                      steps=args.steps, warmup_steps=args.warmup, seed=args.seed, out_dir=os.path.join(work, order),
                      progress=False, autocast=args.autocast, device=args.device)
    trainer = Trainer(cfg)
    loss, het = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        record = trainer.train_step()
        loss.append(record["loss"])
        het.append(record["batchhet"])
        if (step + 1) % 20 == 0:
            print(f"  {order:10s} step {step + 1:4d}  loss {record['loss']:.3f}  batchhet {record['batchhet']:.3f}  "
                  f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    return {"loss": loss, "batchhet": het, "seconds": time.perf_counter() - start}


def summarise(run: dict, skip: int, tail: int) -> dict:
    loss, het = np.array(run["loss"][skip:]), np.array(run["batchhet"][skip:])
    return {"batchhet_mean": float(het.mean()), "batchhet_median": float(np.median(het)),
            "loss_step_diff_std": float(np.diff(loss).std()), "loss_std": float(loss.std()),
            "final_loss": float(np.mean(run["loss"][-tail:])), "seconds": round(run["seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batches", type=int, default=8, help="micro batches per step")
    ap.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro batch")
    ap.add_argument("--long-tokens", type=int, default=20000)
    ap.add_argument("--short-docs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (the trainer's default; slow on CPU)")
    ap.add_argument("--out", default="out/bench/train_rsdb")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    runs = {}
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus")
        info = write_corpus(corpus, args.short_docs, 3, args.long_tokens, args.seed)
        for order in ("sequential", "rsdb"):
            runs[order] = train(order, corpus, args, work)

    tail = max(2, math.ceil(0.2 * args.steps))
    summary = {order: summarise(run, args.warmup, tail) for order, run in runs.items()}
    print(f"\n{'order':11s} {'BatchHet mean':>13s} {'median':>8s} {'loss diff std':>13s} {'final loss':>10s}")
    for order, s in summary.items():
        print(f"{order:11s} {s['batchhet_mean']:13.4f} {s['batchhet_median']:8.4f} {s['loss_step_diff_std']:13.4f} "
              f"{s['final_loss']:10.4f}")
    seq, rsdb = summary["sequential"], summary["rsdb"]
    result = {"benchmark": "train_rsdb", "steps": args.steps, "seq_len": args.seq_len,
              "micro_batches": args.micro_batches, "micro_batch_size": args.micro_batch_size,
              "autocast": args.autocast, "device": args.device, "corpus": info, "orders": summary,
              "batchhet_ratio_seq_over_rsdb": seq["batchhet_mean"] / max(rsdb["batchhet_mean"], 1e-12),
              "loss_diff_std_ratio_seq_over_rsdb": seq["loss_step_diff_std"] / max(rsdb["loss_step_diff_std"], 1e-12)}
    with open(os.path.join(args.out, "train_rsdb.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "curves": runs}, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
