"""Can a model shape learn to copy from far back in its context? Side by side, from scratch, on synthetic rows.

Calling an unseen tool needs a copy: its name and keys exist only in the tool list, hundreds of tokens before the
reply. This probe isolates that copy from the corpus, on the rows of `trinity.train.copy_task`: random tokens with
a span written twice; the loss and the accuracy count the repeat (from its second token: the first one needs to
know where the span began). Two kinds of rows:

- `var`: the span's length, so the distance of the copy, changes per row. Only a content match (an induction
  head: find the earlier occurrence of the current token, write the token after it) predicts the repeat.
- `fixed`: every span has the same length, so "the token N back" predicts the repeat: a position shortcut that
  RoPE layers can learn and NoPE layers cannot. It is a control, not the copy that tools need.

Each variant is `KIND:N:WINDOW[:GAIN]`: rows of 2N tokens with spans of N/2..N (`var`) or N (`fixed`) tokens,
the model's sliding window, and an optional starting value of the q/k RMSNorm gains (1 by default). The model is
`configs/tiny_model.toml`'s shape, initialised as the trainer does, trained with the trainer's optimizer (Muon +
AdamW, that file's learning rates, linear warm-up then constant) on about 3,200 tokens per step.

    python benchmarks/copy_probe.py --steps 400 var:200:1024 fixed:200:1024 fixed:200:128

prints one JSON line per evaluation and, last, one JSON object with every variant's curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from trinity.config import preset  # noqa: E402
from trinity.model.model import TrinityForCausalLM  # noqa: E402
from trinity.train.copy_task import IGNORE, copy_accuracy, copy_batch  # noqa: E402
from trinity.train.optim import CombinedOptimizer  # noqa: E402
from trinity.train.trainer import init_like_report_, load_train_config  # noqa: E402

TOKENS_PER_STEP = 3200
FIRST_ID = 16  # drawn ids: above the control and tag tokens, up to the model's vocab size


def build(window: int, gain: float, config_path: str) -> tuple[TrinityForCausalLM, object]:
    cfg = load_train_config(config_path, {})
    config = preset(cfg.preset, **{**cfg.model, "sliding_window": window})
    model = TrinityForCausalLM.empty(config, torch.float32, "cpu")
    init_like_report_(model, cfg.seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(gain)
            layer.self_attn.k_norm.weight.fill_(gain)
    return model.train(), cfg


def accuracy(model: TrinityForCausalLM, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    value = copy_accuracy(model, ids, labels)
    model.train()
    return value


def run_variant(spec: str, steps: int, eval_every: int, warmup: int, config_path: str) -> dict:
    kind, n, window, *rest = spec.split(":")
    if kind not in ("var", "fixed"):
        raise SystemExit(f"variant {spec!r}: the kind is var or fixed")
    n, window, gain = int(n), int(window), float(rest[0]) if rest else 1.0
    fixed = kind == "fixed"
    model, cfg = build(window, gain, config_path)
    optimizer = CombinedOptimizer(model, lr=cfg.lr, muon_lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    pool = torch.arange(FIRST_ID, model.config.vocab_size)
    data, held = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    # one segment of 2n tokens per row
    eval_ids, eval_labels = copy_batch(16, 2 * n - 1, n, pool, held, fixed)
    batch = max(1, TOKENS_PER_STEP // (2 * n))
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.set_lr_scale(min(1.0, step / warmup))
        ids, labels = copy_batch(batch, 2 * n - 1, n, pool, data, fixed)
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        if step % eval_every == 0 or step == steps:
            point = {"variant": spec, "step": step, "loss": round(loss.item(), 3),
                     "copy_accuracy": round(accuracy(model, eval_ids, eval_labels), 3),
                     "seconds": round(time.perf_counter() - start, 1)}
            curve.append(point)
            print(json.dumps(point), flush=True)
    return {"variant": spec, "final_copy_accuracy": curve[-1]["copy_accuracy"], "final_loss": curve[-1]["loss"],
            "curve": [(p["step"], p["copy_accuracy"]) for p in curve]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="KIND:N:WINDOW[:GAIN], e.g. var:200:1024")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_model.toml"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_variant(v, args.steps, args.eval_every, args.warmup, args.config) for v in args.variants]
    print(json.dumps({"benchmark": "copy_probe", "steps": args.steps, "tokens_per_step": TOKENS_PER_STEP,
                      "variants": results}))


if __name__ == "__main__":
    main()
