"""RSDB vs sequential packing on a corpus with a few very long documents: BatchHet and step-loss variance.

    .venv/bin/python benchmarks/train_rsdb.py [--steps 240] [--out out/bench/train_rsdb]

Corpus: 3 long documents of ~20k tokens (CSV-like tables: a style of their own) placed among 200 short prose
documents (~100-400 tokens each), in file order. The tiny preset is trained twice with the real trainer, same
seed and steps, once per data order; each step is 8 micro batches of 4 sequences. Sequential packing runs one reader
per micro batch (`data_streams` = 8, readers starting at evenly spaced documents, like data-parallel workers on
separate shards); with a single reader every micro batch of a step would come from the same long document.
Reported per order, over the steps after warmup:

- BatchHet: max - mean micro-batch loss within a step (the trainer's `batchhet`), averaged over steps;
- step-to-step loss variation: the standard deviation of loss[t] - loss[t-1];
- the final training loss (mean of the last 20% of steps), and the trained model's loss on held-out data: 16
  sequences of a fourth long (table) document and 16 of fresh short (prose) documents.

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

from trinity.train.data import SequentialLoader, load_documents
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
    # spread through the file order at random places (evenly spaced ones would sit exactly where the sequential
    # readers start, pinning three of the eight micro batches to the long documents for the whole run)
    at = sorted(int(x) for x in rng.choice(np.arange(1, n_short), size=n_long, replace=False))
    for j, position in enumerate(reversed(at)):
        docs.insert(position, long_document(n_long - 1 - j, long_chars, rng))
    for i, text in enumerate(docs):
        with open(os.path.join(path, f"doc{i:04d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    lengths = [len(d) for d in docs]
    return {"documents": len(docs), "long_documents": n_long, "long_tokens": long_chars,
            "short_tokens_mean": float(np.mean([n for n in lengths if n < long_chars])), "total_tokens": sum(lengths)}


def write_heldout(path: str, seed: int, long_chars: int) -> None:
    rng = np.random.default_rng(seed + 1000)
    os.makedirs(os.path.join(path, "long"), exist_ok=True)
    os.makedirs(os.path.join(path, "short"), exist_ok=True)
    with open(os.path.join(path, "long", "doc.txt"), "w", encoding="utf-8") as f:
        f.write(long_document(3, long_chars, rng))
    for i in range(40):
        with open(os.path.join(path, "short", f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(short_document(rng))


@torch.no_grad()
def heldout_loss(trainer: Trainer, path: str, seq_len: int) -> dict:
    model = trainer.model.eval()
    out = {}
    for kind in ("long", "short"):
        docs = load_documents(os.path.join(path, kind), trainer.tokenizer, trainer.tokenizer.eos_token_id)
        ids, labels = SequentialLoader(docs, seq_len).next_batch(16)
        logits = model(ids.to(trainer.device)).float()
        out[kind] = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      labels.to(trainer.device).reshape(-1)).item()
    out["mean"] = (out["long"] + out["short"]) / 2
    model.train()
    return out


def train(order: str, corpus: str, heldout: str, args, work: str) -> dict:
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
    return {"loss": loss, "batchhet": het, "seconds": time.perf_counter() - start,
            "heldout": heldout_loss(trainer, heldout, args.seq_len)}


def summarise(run: dict, skip: int, tail: int) -> dict:
    loss, het = np.array(run["loss"][skip:]), np.array(run["batchhet"][skip:])
    return {"batchhet_mean": float(het.mean()), "batchhet_median": float(np.median(het)),
            "loss_step_diff_std": float(np.diff(loss).std()), "loss_std": float(loss.std()),
            "final_loss": float(np.mean(run["loss"][-tail:])), "heldout_loss": run["heldout"],
            "seconds": round(run["seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batches", type=int, default=8, help="micro batches per step")
    # 4 sequences per micro batch: a micro batch then mixes documents under RSDB but holds consecutive stretches of
    # one document under sequential packing, which is the heterogeneity RSDB removes; with one sequence per micro
    # batch both orders put exactly one document in each micro batch (measured: BatchHet only 1.05x lower)
    ap.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro batch")
    ap.add_argument("--long-tokens", type=int, default=20000)
    ap.add_argument("--short-docs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (the trainer's default; slow on CPU)")
    ap.add_argument("--out", default="out/bench/train_rsdb")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Run-to-run reproducible: with 2+ threads the MoE's index backward (index_put_ with accumulate) otherwise
    # sums in a varying order on CPU, and the curves differ from run to run.
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    runs = {}
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus")
        info = write_corpus(corpus, args.short_docs, 3, args.long_tokens, args.seed)
        heldout = os.path.join(work, "heldout")
        write_heldout(heldout, args.seed, args.long_tokens)
        for order in ("sequential", "rsdb"):
            runs[order] = train(order, corpus, heldout, args, work)

    tail = max(2, math.ceil(0.2 * args.steps))
    summary = {order: summarise(run, args.warmup, tail) for order, run in runs.items()}
    print(f"\n{'order':11s} {'BatchHet mean':>13s} {'median':>8s} {'loss diff std':>13s} {'final loss':>10s} "
          f"{'held-out long':>13s} {'short':>6s}")
    for order, s in summary.items():
        print(f"{order:11s} {s['batchhet_mean']:13.4f} {s['batchhet_median']:8.4f} {s['loss_step_diff_std']:13.4f} "
              f"{s['final_loss']:10.4f} {s['heldout_loss']['long']:13.4f} {s['heldout_loss']['short']:6.4f}")
    seq, rsdb = summary["sequential"], summary["rsdb"]
    result = {"benchmark": "train_rsdb", "steps": args.steps, "seq_len": args.seq_len,
              "micro_batches": args.micro_batches, "micro_batch_size": args.micro_batch_size,
              "sequential_data_streams": args.micro_batches,
              "autocast": args.autocast, "device": args.device, "corpus": info, "orders": summary,
              "batchhet_ratio_seq_over_rsdb": seq["batchhet_mean"] / max(rsdb["batchhet_mean"], 1e-12),
              "loss_diff_std_ratio_seq_over_rsdb": seq["loss_step_diff_std"] / max(rsdb["loss_step_diff_std"], 1e-12)}
    with open(os.path.join(args.out, "train_rsdb.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "curves": {k: {"loss": r["loss"], "batchhet": r["batchhet"]} for k, r in runs.items()}}, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
