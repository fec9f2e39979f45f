"""Batch-1 CPU decode: trinity's simple decode loop vs HF transformers `generate`, same weights, same process.

    .venv/bin/python benchmarks/cpu_generate.py [--new-tokens 128] [--threads 2]

A random ~120M-parameter Trinity-shaped model (hidden 512, 8 layers, 32 experts top-4), fp32, greedy.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from trinity import TrinityForCausalLM, preset
from trinity.generate import GenerationParams, generate


def bench_config():
    return preset("tiny", vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                  num_hidden_layers=8, num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=128, num_experts=32, num_experts_per_tok=4, sliding_window=64,
                  max_position_embeddings=4096)


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = bench_config()
    ours = TrinityForCausalLM.random(cfg, seed=0)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = transformers.AfmoeForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    def run_ours():
        return generate(ours, [prompt.tolist()], GenerationParams(max_tokens=n, temperature=0))[0]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    run_ours(), run_hf()  # warm-up
    t_ours, tok_ours = timed(run_ours, args.repeats)
    t_hf, tok_hf = timed(run_hf, args.repeats)
    result = {
        "benchmark": "cpu_generate",
        "params_millions": round(cfg.num_parameters() / 1e6, 1),
        "batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": n, "threads": args.threads,
        "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
        "trinity_tok_s": round(n / t_ours, 2),
        "hf_tok_s": round(n / t_hf, 2),
        "speedup": round(t_hf / t_ours, 2),
        "same_tokens": tok_ours == tok_hf,
    }
    print(f"trinity {result['trinity_tok_s']:>8} tok/s")
    print(f"hf      {result['hf_tok_s']:>8} tok/s")
    print(f"ratio   {result['speedup']:>8}x   (identical greedy tokens: {result['same_tokens']})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
