"""Offline batch throughput on the CPU: trinity `LLM.generate` vs HF transformers batched `generate`.

    .venv/bin/python benchmarks/cpu_throughput.py [--requests 32] [--prompt-tokens 64] [--new-tokens 128] [--repeats 2]

The same random ~120M-parameter Trinity-shaped model (hidden 512, 8 layers, 32 experts top-4), greedy, in one
process, fp32 by default (`--dtype bfloat16` for both sides in bf16). HF gets the whole batch at once
(equal-length prompts, so no padding is wasted). Each side runs `--repeats` times, alternating, and its best run
counts: these shared cores vary by +-10% from run to run.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cpu_generate import bench_config  # noqa: E402

from trinity import LLM, SamplingParams, TrinityForCausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = bench_config()
    dtype = getattr(torch, args.dtype)
    model = TrinityForCausalLM.random(cfg, seed=0, dtype=dtype)
    prompts = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    total = args.requests * n

    llm = LLM(model, max_model_len=args.prompt_tokens + n, max_num_seqs=args.requests,
              max_num_batched_tokens=max(2048, args.requests * args.prompt_tokens), block_size=16)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2, :8].tolist(), sampling_params=SamplingParams(max_tokens=4))  # warm-up
    hf = None
    if not args.skip_hf:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = transformers.AfmoeForCausalLM.from_pretrained(d, dtype=dtype).eval()
        with torch.inference_mode():
            hf.generate(prompts[:2, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up

    def ours():
        return llm.generate(prompt_token_ids=prompts.tolist(), sampling_params=params)

    def theirs():
        with torch.inference_mode():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    t_ours = t_hf = float("inf")
    for _ in range(args.repeats):  # alternating, so both sides see the same machine
        start = time.perf_counter()
        outs = ours()
        t_ours = min(t_ours, time.perf_counter() - start)
        if hf is not None:
            start = time.perf_counter()
            ref = theirs()
            t_hf = min(t_hf, time.perf_counter() - start)
    assert all(len(o.outputs[0].token_ids) == n for o in outs)

    result = {"benchmark": "cpu_throughput", "params_millions": round(cfg.num_parameters() / 1e6, 1),
              "requests": args.requests, "prompt_tokens": args.prompt_tokens, "new_tokens": n,
              "threads": args.threads, "dtype": args.dtype, "torch": torch.__version__, "repeats": args.repeats,
              "trinity_tok_s": round(total / t_ours, 1)}
    print(f"trinity LLM.generate  {result['trinity_tok_s']:>8} tok/s  (best {t_ours:.1f} s)")
    if hf is not None:
        same = sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref[:, args.prompt_tokens:].tolist()))
        result.update({"transformers": transformers.__version__, "hf_tok_s": round(total / t_hf, 1),
                       "speedup": round(t_hf / t_ours, 2), "identical_greedy_outputs": f"{same}/{args.requests}"})
        print(f"HF generate (batched) {result['hf_tok_s']:>8} tok/s  (best {t_hf:.1f} s)")
        print(f"ratio {result['speedup']}x; identical greedy outputs {same}/{args.requests}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
