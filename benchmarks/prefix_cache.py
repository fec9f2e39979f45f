"""Time to first token with and without automatic prefix caching, on the CPU, for the built-in model.

    .venv/bin/python benchmarks/prefix_cache.py [--system 1500] [--question 32] [--requests 8] [--turns 6]
                                                [--threads 2]
    PYTHONPATH=src python3 benchmarks/prefix_cache.py --preset mini --device cuda   # a random bf16 Mini on a GPU

Two engines over the same weights (fp32, what `make serve` runs on a CPU), one with prefix caching and one without,
given the same requests one after another, alternating:
- shared prefix: `--requests` prompts made of one `--system`-token system prompt and a different `--question`-token
  question each. The cached engine saw the system prompt once before (a warm-up request), as a server has;
- multi-turn chat: `--turns` turns of one conversation; each prompt is the last one, its answer and a new
  `--question`-token message;
- no reuse: `--requests` fresh `--system`-token prompts, nothing to hit: what caching costs on a miss (the keys,
  the blocks kept for the cache).
Each request is timed from `add_request` to the step that returns its first token; it generates `--answer` greedy
tokens, which must be the same on both engines. Prints a table, then one JSON object last.
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

from trinity import TrinityForCausalLM, preset  # noqa: E402
from trinity.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from trinity.loading import builtin_model_path  # noqa: E402


def timed_request(engine: LLMEngine, ids: list[int], request_id: str, answer: int) -> tuple[float, list[int], int]:
    """(seconds to the first token, the greedy tokens, prompt tokens taken from the cache)."""
    engine.add_request(request_id, prompt_token_ids=ids,
                       params=SamplingParams(max_tokens=answer, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    first = None
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            if out.finished:
                return first, out.outputs[0].token_ids, out.num_cached_tokens


def compare(engines: dict[str, LLMEngine], prompts: list[list[int]], tag: str, answer: int,
            next_prompt=None) -> dict:
    """Run each prompt on both engines, alternating; `next_prompt(prompt, answer)` makes a conversation's next one."""
    times = {name: [] for name in engines}
    cached, same = [], 0
    for i in range(len(prompts)):
        outs = {}
        for name, engine in engines.items():
            t, tokens, hit = timed_request(engine, prompts[i], f"{tag}-{i}-{name}", answer)
            times[name].append(t)
            outs[name] = tokens
            if name == "cached":
                cached.append(hit)
        same += outs["cached"] == outs["uncached"]
        if next_prompt is not None and i + 1 < len(prompts):
            prompts[i + 1] = next_prompt(prompts[i], outs["uncached"])
    row = {"requests": len(prompts), "prompt_tokens": [len(p) for p in prompts], "cached_tokens": cached,
           "cached_ttft_ms": round(statistics.median(times["cached"]) * 1e3, 1),
           "uncached_ttft_ms": round(statistics.median(times["uncached"]) * 1e3, 1),
           "same_answers": f"{same}/{len(prompts)}"}
    row["speedup"] = round(row["uncached_ttft_ms"] / row["cached_ttft_ms"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", type=int, default=1500)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default=None, help="a random-weight model of this preset instead of the built-in one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-gb", type=float, default=2.0, help="KV cache budget of each of the two engines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.preset:  # bf16 on a GPU, fp32 on the CPU
        dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
        model = TrinityForCausalLM.random(preset(args.preset), dtype=dtype, device=args.device, seed=0).eval()
    else:
        model = TrinityForCausalLM.from_pretrained(builtin_model_path()).to(args.device).float().eval()
    max_len = min(model.config.max_position_embeddings, 8192)
    longest = max(args.system + args.question, 512 + (args.turns - 1) * (args.answer + args.question))
    if longest + args.answer > max_len:
        raise SystemExit(f"these sizes reach {longest + args.answer} tokens; the model holds {max_len}")
    config = dict(max_model_len=max_len, max_num_seqs=4, max_num_batched_tokens=max_len,
                  kv_cache_memory=int(args.kv_gb * 2**30))
    engines = {"cached": LLMEngine(model, None, EngineConfig(**config)),
               "uncached": LLMEngine(model, None, EngineConfig(**config, enable_prefix_caching=False))}
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(10, vocab, (n,), generator=gen).tolist()  # noqa: E731
    for name, engine in engines.items():  # warm both up (kernels, allocator) on a prompt never used again
        timed_request(engine, draw(256), f"warm-{name}", 2)

    system = draw(args.system)
    timed_request(engines["cached"], system + draw(args.question), "system-seen", 1)  # the server saw it before
    shared = compare(engines, [system + draw(args.question) for _ in range(args.requests)], "shared",
                     args.answer)
    print(f"shared {args.system}-token system prompt, {args.requests} questions: cached {shared['cached_ttft_ms']} ms, "
          f"uncached {shared['uncached_ttft_ms']} ms ({shared['speedup']}x), same answers {shared['same_answers']}")

    chat = compare(engines, [draw(512)] + [[] for _ in range(args.turns - 1)], "chat", args.answer,
                   next_prompt=lambda prompt, answer: prompt + answer + draw(args.question))
    print(f"{args.turns}-turn chat: cached {chat['cached_ttft_ms']} ms, uncached {chat['uncached_ttft_ms']} ms "
          f"({chat['speedup']}x), same answers {chat['same_answers']}")
    fresh = compare(engines, [draw(args.system) for _ in range(args.requests)], "fresh", args.answer)
    print(f"no reuse, {args.requests} fresh {args.system}-token prompts: cached {fresh['cached_ttft_ms']} ms, "
          f"uncached {fresh['uncached_ttft_ms']} ms ({fresh['speedup']}x), same answers {fresh['same_answers']}")
    print(json.dumps({"benchmark": "prefix_cache", "model": args.preset or "trinity-tiny (built-in)",
                      "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                      "threads": args.threads, "torch": torch.__version__, "shared_prefix": shared,
                      "multi_turn": chat, "no_reuse": fresh}))


if __name__ == "__main__":
    main()
