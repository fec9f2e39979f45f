"""Expert-bias balancing rules on a small MoE trained on skewed data: `none` vs `sign` vs `smebu`.

    .venv/bin/python benchmarks/train_balance.py [--steps 300] [--out out/bench/train_balance]

A small MoE (hidden 128, 4 layers of which 3 MoE, 32 experts top-4, no shared expert) is trained with the real
trainer (Muon + AdamW, the default balancing hyper-parameters) on text whose words follow a Zipf law
(byte-level tokens), so that routing skews. Same seed, same data, same steps for each rule. For each rule it
reports MaxVio (mean over MoE layers) averaged over the last 20% of steps, and how much it moves from step to step
there: the standard deviation of the step-to-step differences MaxVio[t] - MaxVio[t-1] (`step_diff_std`, the
steadiness measure) and, for reference, the plain standard deviation over the window (`std_last`, which also
picks up a rule that is still converging). `--gamma/--kappa/--beta/--lam` override the balancing
hyper-parameters (default: the trainer's defaults) to try other settings without touching the source.

Writes `<out>/train_balance.json` (with the curves) and `<out>/train_balance.png` beside it; prints a table and
then one JSON object (the summary) as its last line. bf16 autocast is off by default: on CPU it is ~4x slower and
changes nothing here (the balancing acts on token counts).
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

MODEL = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=32, num_hidden_layers=4,
             num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=32,
             num_experts_per_tok=4, num_shared_experts=0, sliding_window=32)


def zipf_corpus(path: str, docs: int, words: int, exponent: float, seed: int) -> None:
    """Documents of pseudo-words (600 random lowercase strings of 2-7 letters) drawn from a Zipf law: rank r has
    weight r^-exponent. Skewed, but with structure to learn (spelling), so token representations stay distinct.
    (Zipf-distributed single characters teach only the unigram law: representations collapse and every token
    routes to the same experts, which no bias can change.)"""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = sorted({"".join(rng.choice(letters, size=int(rng.integers(2, 8)))) for _ in range(600)})
    rng.shuffle(vocab)
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** exponent
    weights /= weights.sum()
    os.makedirs(path, exist_ok=True)
    for d in range(docs):
        with open(os.path.join(path, f"doc{d:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(" ".join(rng.choice(vocab, size=words, p=weights)))


def train(rule: str, corpus: str, args, work: str) -> dict:
    cfg = TrainConfig(preset="tiny", model=dict(MODEL), data=[corpus], seq_len=args.seq_len,
                      batch_size=args.batch_size, steps=args.steps, warmup_steps=10, balance=rule, seed=args.seed,
                      **{f"balance_{k}": getattr(args, k) for k in ("gamma", "kappa", "beta", "lambda")
                         if getattr(args, k) is not None},
                      out_dir=os.path.join(work, rule), progress=False, autocast=args.autocast, device=args.device,
                      data_order="rsdb")
    trainer = Trainer(cfg)
    maxvio, per_layer, loss = [], [], []
    start = time.perf_counter()
    for step in range(args.steps):
        record = trainer.train_step()
        maxvio.append(record["maxvio"])
        per_layer.append(record["maxvio_per_layer"])
        loss.append(record["loss"])
        if (step + 1) % 25 == 0:
            print(f"  {rule:6s} step {step + 1:4d}  loss {record['loss']:.3f}  maxvio {record['maxvio']:.3f}  "
                  f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    biases = [b.expert_bias.detach().float() for b in trainer.balancer.blocks]
    return {"maxvio": maxvio, "maxvio_per_layer": per_layer, "loss": loss,
            "bias_range": max((b.max() - b.min()).item() for b in biases),
            "seconds": time.perf_counter() - start}


def summarise(run: dict, tail: int) -> dict:
    window = np.array(run["maxvio"][-tail:])
    return {"final_maxvio": float(window.mean()), "std_last": float(window.std()),
            "step_diff_std": float(np.diff(window).std()), "first_maxvio": float(np.mean(run["maxvio"][:5])),
            "final_loss": float(np.mean(run["loss"][-tail:])), "bias_range": run["bias_range"],
            "seconds": round(run["seconds"], 1)}


def plot(runs: dict, path: str, tail: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {"none": "tab:red", "sign": "tab:blue", "smebu": "tab:green"}
    for rule, run in runs.items():
        ax.plot(np.arange(1, len(run["maxvio"]) + 1), run["maxvio"], label=rule, color=colours.get(rule), lw=1.2)
    steps = len(next(iter(runs.values()))["maxvio"])
    ax.axvspan(steps - tail + 0.5, steps + 0.5, color="grey", alpha=0.15, label="last 20%")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio (mean over MoE layers)")
    ax.set_title("Expert balancing on Zipf-skewed data: 32 experts, top-4")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=64)
    # 64 x 64 = 4096 tokens per step: MaxVio is measured on each step's own batch, and at 512 tokens per step
    # (batch 8) the counts' sampling noise (~60 tokens per expert) swamped the difference between the rules
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rules", default="none,sign,smebu")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the word distribution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (the trainer's default; slow on CPU)")
    ap.add_argument("--gamma", type=float, default=None, help="sign step (trainer default 1e-3)")
    ap.add_argument("--kappa", type=float, default=None, help="SMEBU soft-clamp sharpness (default 2)")
    ap.add_argument("--beta", type=float, default=None, help="SMEBU momentum (default 0.9)")
    ap.add_argument("--lam", dest="lambda", type=float, default=None, help="SMEBU rate (default 2e-3)")
    ap.add_argument("--out", default="out/bench/train_balance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Run-to-run reproducible: with 2+ threads the MoE's index backward (index_put_ with accumulate) otherwise
    # sums in a varying order on CPU, and the curves differ from run to run.
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    rules = [r for r in args.rules.split(",") if r]
    tail = max(2, math.ceil(0.2 * args.steps))

    runs = {}
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus")
        zipf_corpus(corpus, docs=64, words=700, exponent=args.zipf, seed=args.seed)
        for rule in rules:
            runs[rule] = train(rule, corpus, args, work)

    summary = {rule: summarise(run, tail) for rule, run in runs.items()}
    print(f"\n{'rule':8s} {'MaxVio first':>12s} {'MaxVio last20%':>14s} {'std last20%':>12s} {'diff std':>9s} "
          f"{'loss':>7s} {'bias range':>10s}")
    for rule, s in summary.items():
        print(f"{rule:8s} {s['first_maxvio']:12.3f} {s['final_maxvio']:14.3f} {s['std_last']:12.4f} "
              f"{s['step_diff_std']:9.4f} {s['final_loss']:7.3f} {s['bias_range']:10.4f}")

    result = {"benchmark": "train_balance", "steps": args.steps, "tokens_per_step": args.seq_len * args.batch_size,
              "model": MODEL, "zipf": args.zipf, "autocast": args.autocast, "device": args.device,
              "balance": {k: getattr(args, k) for k in ("gamma", "kappa", "beta", "lambda")
                          if getattr(args, k) is not None} or "defaults",
              "window_steps": tail, "rules": summary}
    if "none" in summary:
        for rule in ("sign", "smebu"):
            if rule in summary:
                result[f"{rule}_vs_none_maxvio"] = summary[rule]["final_maxvio"] / summary["none"]["final_maxvio"]
    if "sign" in summary and "smebu" in summary:
        for key in ("std_last", "step_diff_std"):
            if summary["sign"][key] > 0:
                result[f"smebu_vs_sign_{key}"] = summary["smebu"][key] / summary["sign"][key]
    png = os.path.join(args.out, "train_balance.png")
    result["png"] = png
    plot(runs, png, tail)
    with open(os.path.join(args.out, "train_balance.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "curves": {r: {"maxvio": run["maxvio"], "maxvio_per_layer": run["maxvio_per_layer"],
                                             "loss": run["loss"]} for r, run in runs.items()}}, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
