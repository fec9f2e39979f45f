"""A prefill that keeps only its logit rows in the last layer against one that computes every row, on the CPU,
through the engine's paged attention.

    .venv/bin/python benchmarks/cpu_prefill_rows.py [--tokens 1024] [--repeats 7] [--threads 2]

`TrinityModel.forward(rows=...)` drops the rows no logit reads in the last layer: the engine's paged attention
computes only those rows' queries there (every row's K/V is still written), and the o_proj, MLP and norms after it
run on those rows alone. One prompt is scheduled in an `LLMEngine` and its first step's attention metadata built as
the runner builds it; both ways then run on the same weights in the same process, alternating, median of
`--repeats`: every row (`model.model(...)`, then the head on the last row, as before) and kept rows
(`model(..., logits_indices=last)`). Both write the same K/V, so repeating the step is harmless. Models: the
built-in `trinity-tiny` (its trained weights, 8 layers) and `cpu_generate.py`'s 134M shape (random weights, 8
layers). Prints one line per model, then one JSON object last.
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
from trinity.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from trinity.engine.paged_attention import PagedAttention  # noqa: E402
from trinity.loading import builtin_model_path  # noqa: E402


def first_step(model: TrinityForCausalLM, ids: list[int]):
    """An engine with the prompt scheduled: (the engine, its first batch), the whole prompt in one chunk."""
    n = len(ids)
    engine = LLMEngine(model, None, EngineConfig(max_model_len=n + 16, max_num_seqs=1, max_num_batched_tokens=n,
                                                 num_kv_blocks=n // 16 + 4))
    engine.add_request("p", prompt_token_ids=ids, params=SamplingParams(max_tokens=1, temperature=0))
    step = engine.scheduler.schedule().step
    engine.runner.apply_changes(step)
    return engine, step


def prefill_seconds(engine: LLMEngine, step, ids: torch.Tensor, kept: bool) -> tuple[float, torch.Tensor]:
    runner, model, n = engine.runner, engine.runner.model, ids.numel()
    positions, last = torch.arange(n), torch.tensor([n - 1])
    start = time.perf_counter()
    attn = PagedAttention(runner.cache, {pool: runner._pool_step(pool, step, [0]) for pool in runner.cache.k})
    if kept:
        logits = model(ids, positions, attn, logits_indices=last)
    else:
        logits = model.lm_head(model.model(ids, positions, attn)[last])
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
        engine, batch = first_step(model, ids.tolist())
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            outputs = {kept: prefill_seconds(engine, batch, ids, kept)[1] for kept in (False, True)}  # warm-up
            for _ in range(args.repeats):
                for kept in (False, True):
                    times[kept].append(prefill_seconds(engine, batch, ids, kept)[0])
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
