"""Time to first token on the CPU for the built-in model: trinity's engine against HF transformers, same weights.

    .venv/bin/python benchmarks/cpu_ttft.py [--prompts 256,1024,2000] [--trials 5] [--threads 2]

For each prompt length: `--trials` fresh random prompts (never a cached prefix), each timed from `add_request` to the
step that returns its first token through `LLMEngine` (fp32, what `make serve` runs on a CPU), and HF
`AfmoeForCausalLM.generate(max_new_tokens=1)` on the same prompt; medians, and whether the greedy first tokens agree.
Both sides are warmed up first. Prints a table, then one JSON object last.
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

from trinity import TrinityForCausalLM  # noqa: E402
from trinity.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from trinity.loading import builtin_model_path  # noqa: E402


def ours_first_token(engine: LLMEngine, ids: list[int], request_id: str) -> tuple[float, int]:
    engine.add_request(request_id, prompt_token_ids=ids, params=SamplingParams(max_tokens=1, temperature=0))
    start = time.perf_counter()
    token = None
    while token is None:
        for out in engine.step():
            if out.request_id == request_id and out.outputs[0].token_ids:
                token = out.outputs[0].token_ids[0]
    return time.perf_counter() - start, token


def hf_first_token(hf, ids: list[int]) -> tuple[float, int]:
    prompt = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False,
                          pad_token_id=0)
    return time.perf_counter() - start, int(out[0, -1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="256,1024,2000")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    path = builtin_model_path()
    ours = TrinityForCausalLM.from_pretrained(path).float().eval()
    hf = transformers.AfmoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [int(p) for p in args.prompts.split(",")]
    longest = max(prompts)
    if longest > ours.config.max_position_embeddings - 1:
        raise SystemExit(f"prompts must leave room for one token: at most {ours.config.max_position_embeddings - 1}")
    engine = LLMEngine(ours, None, EngineConfig(max_model_len=longest + 1, max_num_seqs=1,
                                                max_num_batched_tokens=longest + 1))
    vocab = ours.config.vocab_size
    draw = lambda n, seed: torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # noqa: E731
    ours_first_token(engine, draw(64, 0), "warm"), hf_first_token(hf, draw(64, 0))
    results = []
    for n in prompts:
        ours_t, hf_t, agree = [], [], 0
        for trial in range(args.trials):
            ids = draw(n, 1000 * n + trial)
            t_ours, tok_ours = ours_first_token(engine, ids, f"{n}-{trial}")
            t_hf, tok_hf = hf_first_token(hf, ids)
            ours_t.append(t_ours)
            hf_t.append(t_hf)
            agree += tok_ours == tok_hf
        row = {"prompt_tokens": n, "trinity_ms": round(statistics.median(ours_t) * 1e3, 1),
               "hf_ms": round(statistics.median(hf_t) * 1e3, 1), "same_first_token": f"{agree}/{args.trials}"}
        row["speedup"] = round(row["hf_ms"] / row["trinity_ms"], 2)
        results.append(row)
        print(f"{n:>6} tokens: trinity {row['trinity_ms']:>7} ms, HF {row['hf_ms']:>7} ms ({row['speedup']}x), "
              f"same first token {row['same_first_token']}")
    print(json.dumps({"benchmark": "cpu_ttft", "model": "trinity-tiny (built-in)", "dtype": "float32",
                      "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                      "results": results}))


if __name__ == "__main__":
    main()
