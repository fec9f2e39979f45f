"""The host cost per token of one long stream, at its start and at its end (issue 19: outputs as deltas).

A reasoning trace runs 8K-40K tokens. If every step copied the whole output (token ids, logprobs, text) and the
consumer re-diffed it, a token at the end of the stream would cost far more than one at its start. This runs one
16K-token request through `LLMEngine.step()` on the built-in model (its tokenizer, logprobs on, stop strings on)
and times, per generated token, the host work of a step outside the model: the step's wall time minus the
forward (`runner.execute`) and the sampling read (`PendingSample.result`). It prints the first 1K tokens'
and the last 1K tokens' medians and their ratio (flat is 1.0). The script uses only APIs older than the change,
so the same file measures an older checkout too (`git worktree add /tmp/old <commit>` and run it there).

    .venv/bin/python benchmarks/stream_cost.py [--tokens 16384]

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from trinity.engine import EngineConfig, LLMEngine, SamplingParams
from trinity.engine import sampler as sampler_module
from trinity.loading import builtin_model_path
from trinity.model import TrinityForCausalLM
from trinity.tokenizer import TrinityTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024, help="tokens at each end compared")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = builtin_model_path()
    model = TrinityForCausalLM.from_pretrained(path)
    tokenizer = TrinityTokenizer.from_pretrained(path)
    max_len = args.tokens + 64
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=max_len, max_num_seqs=1, async_scheduling=False,
                                                      kv_cache_memory=1 << 30))
    # logprobs and a stop string that never appears: the per-token work a chat stream with them does
    params = SamplingParams(max_tokens=args.tokens, temperature=1.0, ignore_eos=True, logprobs=2,
                            stop=["\u2603never\u2603"])
    engine.add_request("long", prompt="What is 352 + 479?", params=params)

    model_time = 0.0
    execute = engine.runner.execute

    def timed_execute(*a, **kw):
        nonlocal model_time
        t = time.perf_counter()
        out = execute(*a, **kw)
        model_time += time.perf_counter() - t
        return out

    engine.runner.execute = timed_execute
    result = sampler_module.PendingSample.result

    def timed_result(self):
        nonlocal model_time
        t = time.perf_counter()
        out = result(self)
        model_time += time.perf_counter() - t
        return out

    sampler_module.PendingSample.result = timed_result
    host_us: list[float] = []  # per generated token
    generated = 0
    wall = time.perf_counter()
    while engine.has_unfinished():
        model_time = 0.0
        t = time.perf_counter()
        outs = engine.step()
        step = time.perf_counter() - t
        n = len(outs[0].outputs[0].token_ids) if outs else generated
        if n > generated:
            host_us += [(step - model_time) / (n - generated) * 1e6] * (n - generated)
            generated = n
    wall = time.perf_counter() - wall
    w = min(args.window, len(host_us) // 2)
    first, last = statistics.median(host_us[1:w + 1]), statistics.median(host_us[-w:])
    report = {"tokens": generated, "window": w, "host_us_per_token_first": round(first, 1),
              "host_us_per_token_last": round(last, 1), "last_over_first": round(last / first, 2),
              "text_chars": len(outs[-1].outputs[0].text) if outs else None, "wall_s": round(wall, 1)}
    print(f"host time per token outside the model: first {w} tokens {first:.1f} us, last {w} {last:.1f} us",
          file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
