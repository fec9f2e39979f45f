"""CPU decode throughput of the same model in bf16 and in FP8 (block-scaled e4m3 weights, 128 x 128), one process.

    .venv/bin/python benchmarks/fp8_cpu.py [--rounds 3] [--new-tokens 32] [--threads 2] [--skip-builtin]
                                           [--clock wall|process] [--crossover]

Two models, each loaded once in bf16 and once quantized from the same bf16 weights (`quantize_model` with
`QuantConfig.online_fp8()`: every projection and routed expert in FP8, the router and the LM head kept in bf16):

- the built-in model (`trinity-tiny`, with its tokenizer): small enough that per-op overhead, not weight reading,
  sets its speed;
- a random Trinity-shaped model (hidden 1024, 8 layers, 16 experts top-4 of width 512, a 2048-wide dense layer),
  whose decode step reads tens of MB of weights: where FP8's half-size weights should pay.

Decode tok/s at batch 1 and batch 8: greedy, 16-token prompts, the engine stepped by hand and only the steps
after the first (the prefill) timed. bf16 and FP8 rounds alternate, best round counts (these shared cores vary by
+-10% from run to run). Weight bytes: sum of numel * element_size over the parameters. Prints a table, then one
JSON object as the last line.

`--crossover`: instead, one projection (1024 -> 4096, 128 x 128 blocks) at 1-64 rows of x, fp32 and bf16: the C
kernel (`linear_fp8_native`) against dequantize-and-GEMM (`linear_fp8_dequantized`), the measure behind
`kernels.fp8.NATIVE_MAX_ROWS`.

`--clock process --threads 1`: time by this process's CPU time instead of the wall clock, for a machine that
other jobs share (descheduled time then does not count; with 2 threads on 2 busy cores every OpenMP region can
wait a scheduler quantum for its second thread, and the wall clock measures mostly that).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trinity import LLM, SamplingParams, TrinityForCausalLM, preset
from trinity.loading import load_model
from trinity.quant.modules import quantize_model
from trinity.quant.scheme import QuantConfig

BATCHES = (1, 8)
PROMPT_TOKENS = 16


def big_config():
    return preset("tiny", vocab_size=2048, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                  num_hidden_layers=8, num_dense_layers=1, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=128, num_experts=16, num_experts_per_tok=4, sliding_window=64,
                  max_position_embeddings=4096)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_bytes_per_token(model, cfg) -> int:
    """Weight bytes one batch-1 decode step reads: everything but the embedding table and the routed experts not
    chosen (top-k of E per MoE layer)."""
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if "embed_tokens" in name:
            continue
        if ".mlp.experts." in name:
            size = size * cfg.num_experts_per_tok // cfg.num_experts
        total += size
    return total


def make_llm(model, tokenizer, max_len: int) -> LLM:
    return LLM(model, tokenizer=tokenizer, max_model_len=max_len, max_num_seqs=max(BATCHES),
               max_num_batched_tokens=max(2048, max(BATCHES) * PROMPT_TOKENS), block_size=16)


CLOCK = {"wall": time.perf_counter, "process": time.process_time}
clock = time.perf_counter


def decode_rate(llm: LLM, batch: int, new_tokens: int, vocab: int) -> float:
    """Decode tok/s of one greedy batch: the engine stepped by hand, the first step (prefill) not timed."""
    engine = llm.engine
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=g).tolist()
        engine.enqueue(engine.prepare_request(f"bench-{batch}-{i}-{time.monotonic_ns()}", None, params, ids))
    engine.step()  # the prefill, and each sequence's first token
    steps, start = 0, clock()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return batch * steps / (clock() - start)


def compare(name: str, models: dict, tokenizer, vocab: int, args) -> dict:
    """Alternating rounds over the variants; the best decode rate of each per batch size."""
    llms = {variant: make_llm(m, tokenizer, PROMPT_TOKENS + args.new_tokens + 8) for variant, m in models.items()}
    for llm in llms.values():  # warm-up: builds the C kernels, oneDNN's packed weights, the allocator's pools
        for b in BATCHES:
            decode_rate(llm, b, 4, vocab)
    best = {(v, b): 0.0 for v in llms for b in BATCHES}
    for _ in range(args.rounds):
        for b in BATCHES:
            for variant, llm in llms.items():
                best[variant, b] = max(best[variant, b], decode_rate(llm, b, args.new_tokens, vocab))
    row = {"model": name}
    for variant, m in models.items():
        row[f"{variant}_weight_mb"] = round(weight_bytes(m) / 1e6, 1)
        for b in BATCHES:
            row[f"{variant}_b{b}_tok_s"] = round(best[variant, b], 1)
    for variant in models:  # each quantized variant against bf16
        if variant != "bf16":
            for b in BATCHES:
                row[f"{variant}_over_bf16_b{b}"] = round(best[variant, b] / best["bf16", b], 2)
    return row


def print_table(rows: list[dict], variant: str, label: str) -> None:
    """The rows of `compare` (plus each variant's `*_decode_read_mb`) as a table: bf16, then `variant`, then their
    ratio per batch size under `label`."""
    print(f"{'model':<14}{'variant':<8}{'weights MB':>11}{'read/token MB':>15}"
          + "".join(f"{f'b{b} tok/s':>12}" for b in BATCHES))
    for row in rows:
        for v in ("bf16", variant):
            print(f"{row['model']:<14}{v:<8}{row[f'{v}_weight_mb']:>11}{row[f'{v}_decode_read_mb']:>15}"
                  + "".join(f"{row[f'{v}_b{b}_tok_s']:>12}" for b in BATCHES))
        print(f"{'':<14}{label:<8}{'':>26}" + "".join(f"{row[f'{variant}_over_bf16_b{b}']:>11}x" for b in BATCHES))


def crossover(threads: int) -> list[dict]:
    from trinity.kernels import fp8 as kfp8
    from trinity.quant import fp8

    q, s = fp8.quantize(torch.randn(4096, 1024) / 32, (128, 128))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 4, 8, 12, 16, 24, 32, 48, 64):
            x = torch.randn(m, 1024).to(dtype)
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": m}
            for name, fn in (("native_ms", kfp8.linear_fp8_native), ("gemm_ms", kfp8.linear_fp8_dequantized)):
                fn(x, q, s, (128, 128))
                best = float("inf")
                for _ in range(5):
                    start = clock()
                    fn(x, q, s, (128, 128))
                    best = min(best, clock() - start)
                row[name] = round(best * 1e3, 3)
            rows.append(row)
            print(f"{row['dtype']:<9}{m:>4} rows  C kernel {row['native_ms']:>7} ms  dequantize + GEMM "
                  f"{row['gemm_ms']:>7} ms")
    return rows


def builtin_models():
    bf16 = load_model("trinity-tiny", dtype="bfloat16")
    fp8 = load_model("trinity-tiny", dtype="bfloat16")
    quantize_model(fp8.model, QuantConfig.online_fp8())
    return {"bf16": bf16.model.eval(), "fp8": fp8.model.eval()}, bf16.tokenizer, bf16.model.config


def big_models():
    cfg = big_config()
    bf16 = TrinityForCausalLM.random(cfg, seed=0, dtype=torch.bfloat16).eval()
    fp8 = TrinityForCausalLM.random(cfg, seed=0, dtype=torch.bfloat16).eval()
    quantize_model(fp8, QuantConfig.online_fp8())
    return {"bf16": bf16, "fp8": fp8}, None, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    ap.add_argument("--crossover", action="store_true")
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    if args.crossover:
        with torch.inference_mode():
            table = crossover(args.threads)
        print(json.dumps({"benchmark": "fp8_cpu_crossover", "threads": args.threads, "clock": args.clock,
                          "shape": [4096, 1024], "rows": table}))
        return
    rows = []
    for name, make in (("trinity-tiny", builtin_models), ("big", big_models)):
        if name == "trinity-tiny" and args.skip_builtin:
            continue
        models, tokenizer, cfg = make()
        row = compare(name, models, tokenizer, cfg.vocab_size, args)
        for variant, m in models.items():
            row[f"{variant}_decode_read_mb"] = round(decode_bytes_per_token(m, cfg) / 1e6, 1)
        rows.append(row)
        del models

    print_table(rows, "fp8", "fp8/bf16")
    print(json.dumps({"benchmark": "fp8_cpu", "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
                      "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS, "torch": torch.__version__,
                      "models": rows}))


if __name__ == "__main__":
    main()
