"""A prefill that keeps only its logit rows in the last layer against one that computes every row, on the CPU.

    .venv/bin/python benchmarks/cpu_prefill_rows.py [--tokens 1024] [--repeats 7] [--threads 2]

`TrinityModel.forward(rows=...)` drops the rows no logit reads once the last layer's attention has run (their K/V
are written by then). Both ways run in the same process on the same random weights, through the inference path
(`fuse_projections`): every row (`model.model(...)` then the head on the last row, as before) and kept rows
(`model(..., logits_indices=last)`), alternating, median of `--repeats`. Models: the built-in `trinity-tiny` (its
trained weights, 8 layers) and `cpu_generate.py`'s 134M shape (random weights, 8 layers). Prints one line per
model, then one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from cpu_generate import bench_config  # noqa: E402

from trinity import TrinityForCausalLM  # noqa: E402
from trinity.loading import builtin_model_path  # noqa: E402
from trinity.model import ContiguousKVCache  # noqa: E402


def prefill_seconds(model: TrinityForCausalLM, ids: torch.Tensor, kept: bool) -> tuple[float, torch.Tensor]:
    cfg, n = model.config, ids.numel()
    cache = ContiguousKVCache(cfg.num_hidden_layers, 1, n, cfg.num_key_value_heads, cfg.head_dim, model.dtype, "cpu")
    step, positions, last = cache.step([n]), cache.positions([n], "cpu"), torch.tensor([n - 1])
    start = time.perf_counter()
    if kept:
        logits = model(ids, positions, step, logits_indices=last)
    else:
        logits = model.lm_head(model.model(ids, positions, step)[last])
    return time.perf_counter() - start, logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    models = {"built-in trinity-tiny": lambda: TrinityForCausalLM.from_pretrained(builtin_model_path()),
              "cpu_generate 134M shape": lambda: TrinityForCausalLM.random(bench_config(), seed=0)}
    for name, build in models.items():
        model = build().float().eval().fuse_projections()
        cfg = model.config
        ids = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            outputs = {kept: prefill_seconds(model, ids, kept)[1] for kept in (False, True)}  # warm-up
            for _ in range(args.repeats):
                for kept in (False, True):
                    times[kept].append(prefill_seconds(model, ids, kept)[0])
        every, kept = statistics.median(times[False]), statistics.median(times[True])
        diff = (outputs[True] - outputs[False]).abs().max().item()
        results.append({"model": name, "layers": cfg.num_hidden_layers, "tokens": args.tokens,
                        "every_row_ms": round(every * 1e3, 1), "kept_rows_ms": round(kept * 1e3, 1),
                        "saved": round(1 - kept / every, 3), "max_logit_diff": diff})
        print(f"{name}: {args.tokens}-token prefill, every row {every * 1e3:.1f} ms, kept rows {kept * 1e3:.1f} ms "
              f"({1 - kept / every:.1%} saved; logits differ by at most {diff:.2e})")
    print(json.dumps({"benchmark": "cpu_prefill_rows", "torch": torch.__version__, "threads": args.threads,
                      "results": results}))


if __name__ == "__main__":
    main()
