"""CPU decode throughput of the same model in bf16 and in W4A16 (4-bit weights, group-wise scales), one process.

    .venv/bin/python benchmarks/w4a16_cpu.py [--rounds 3] [--new-tokens 32] [--threads 2] [--skip-builtin]
                                             [--group 128] [--asymmetric] [--clock wall|process] [--crossover]

The same two models as `benchmarks/fp8_cpu.py`, each built once in bf16 and once quantized from the same bf16
weights by round-to-nearest (`quant.int4.quantize`, groups of `--group` columns, symmetric unless
`--asymmetric`): every bias-free projection becomes an `Int4Linear` and every MoE block's routed experts an
`Int4Experts`; the routers and the LM head stay bf16 (as fp8_cpu.py's online FP8 leaves them). There is no online
int4 path in the engine (4-bit models come from checkpoints), so `quantize_int4` below does it.

- the built-in model (`trinity-tiny`, with its tokenizer): small enough that per-op overhead sets its speed;
- a random Trinity-shaped model (hidden 1024, 8 layers, 16 experts top-4 of width 512, a 2048-wide dense layer),
  whose decode step reads tens of MB of weights: where 4-bit weights (a quarter of bf16's bytes) should pay.

Decode tok/s at batch 1 and 8, greedy, 16-token prompts, only the steps after the prefill timed; bf16 and W4A16
rounds alternate, best round counts. Prints a table, then one JSON object as the last line.

`--crossover`: instead, one projection (1024 -> 4096, group 128) at 1-64 rows of x, fp32 and bf16: the C kernel
(`linear_int4_native`) against dequantize-and-GEMM (`linear_int4_dequantized`), the measure behind
`kernels.int4.NATIVE_MAX_ROWS`.

`--clock process --threads 1`: time by this process's CPU time, for a machine that other jobs share.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fp8_cpu as common  # noqa: E402  (the models, the engine driver and the byte counts are fp8_cpu.py's)

from trinity import TrinityForCausalLM  # noqa: E402
from trinity.loading import load_model  # noqa: E402
from trinity.model.moe import RoutedExperts  # noqa: E402
from trinity.quant import int4  # noqa: E402
from trinity.quant.int4_modules import Int4Experts, Int4Linear  # noqa: E402
from trinity.quant.int4_scheme import Int4Scheme  # noqa: E402


def _fill(module: nn.Module, base: str, w: int4.Int4Weight) -> None:
    for suffix, value in (("", w.codes), ("_scale", w.scale), ("_zero_point", w.zero_point)):
        if value is not None:
            getattr(module, base + suffix).data = value.reshape(getattr(module, base + suffix).shape)


def _stack(weights: list[int4.Int4Weight]) -> int4.Int4Weight:
    zero = None if weights[0].zero_point is None else torch.stack([w.zero_point for w in weights])
    return weights[0]._replace(codes=torch.stack([w.codes for w in weights]),
                               scale=torch.stack([w.scale for w in weights]), zero_point=zero)


@torch.no_grad()
def quantize_int4(model: nn.Module, group: int | None, symmetric: bool) -> nn.Module:
    """Round-to-nearest W4A16 in place: bias-free projections (not routers, not the LM head) -> `Int4Linear`,
    routed experts -> `Int4Experts` (gate and up quantized as separate matrices, as checkpoints hold them)."""
    scheme = Int4Scheme("pack-quantized", group, symmetric)
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear) and module.bias is None and "router" not in name and "lm_head" not in name:
            q = Int4Linear(module.out_features, module.in_features, scheme)
            _fill(q, "weight", int4.quantize(module.weight, group, symmetric))
            setattr(parent, attr, q)
        elif isinstance(module, RoutedExperts):
            e, two_i, h = module.gate_up_proj.shape
            inter = two_i // 2
            q = Int4Experts(e, h, inter, scheme)
            gate_up = []
            for x in range(e):
                gate = int4.quantize(module.gate_up_proj[x, :inter], group, symmetric)
                up = int4.quantize(module.gate_up_proj[x, inter:], group, symmetric)
                gate_up.append(gate._replace(codes=torch.cat([gate.codes, up.codes]),
                                             scale=torch.cat([gate.scale, up.scale]),
                                             zero_point=None if symmetric else torch.cat([gate.zero_point,
                                                                                          up.zero_point])))
            _fill(q, "gate_up_proj", _stack(gate_up))
            _fill(q, "down_proj", _stack([int4.quantize(module.down_proj[x], group, symmetric) for x in range(e)]))
            setattr(parent, attr, q)
    return model


def crossover(group: int | None, symmetric: bool) -> list[dict]:
    from trinity.kernels import int4 as k4

    w = int4.quantize(torch.randn(4096, 1024) / 32, group, symmetric)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 4, 8, 12, 16, 24, 32, 48, 64):
            x = torch.randn(m, 1024).to(dtype)
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": m}
            for key, fn in (("native_ms", k4.linear_int4_native), ("gemm_ms", k4.linear_int4_dequantized)):
                fn(x, w)
                best = float("inf")
                for _ in range(5):
                    start = common.clock()
                    fn(x, w)
                    best = min(best, common.clock() - start)
                row[key] = round(best * 1e3, 3)
            rows.append(row)
            print(f"{row['dtype']:<9}{m:>4} rows  C kernel {row['native_ms']:>7} ms  dequantize + GEMM "
                  f"{row['gemm_ms']:>7} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--group", type=int, default=128, help="columns per scale; 0: one group per row (channel)")
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--clock", choices=sorted(common.CLOCK), default="wall")
    ap.add_argument("--crossover", action="store_true")
    args = ap.parse_args()
    common.clock = common.CLOCK[args.clock]  # decode_rate reads fp8_cpu's module-level clock
    torch.set_num_threads(args.threads)
    group, symmetric = args.group or None, not args.asymmetric
    if args.crossover:
        with torch.inference_mode():
            table = crossover(group, symmetric)
        print(json.dumps({"benchmark": "w4a16_cpu_crossover", "threads": args.threads, "clock": args.clock,
                          "shape": [4096, 1024], "group": group, "symmetric": symmetric, "rows": table}))
        return

    def builtin():
        bf16 = load_model("trinity-tiny", dtype="bfloat16")
        q = load_model("trinity-tiny", dtype="bfloat16")
        quantize_int4(q.model, group, symmetric)
        return {"bf16": bf16.model.eval(), "w4a16": q.model.eval()}, bf16.tokenizer, bf16.model.config

    def big():
        cfg = common.big_config()
        bf16 = TrinityForCausalLM.random(cfg, seed=0, dtype=torch.bfloat16).eval()
        q = quantize_int4(TrinityForCausalLM.random(cfg, seed=0, dtype=torch.bfloat16).eval(), group, symmetric)
        return {"bf16": bf16, "w4a16": q}, None, cfg

    rows = []
    for name, make in (("trinity-tiny", builtin), ("big", big)):
        if name == "trinity-tiny" and args.skip_builtin:
            continue
        models, tokenizer, cfg = make()
        row = common.compare(name, models, tokenizer, cfg.vocab_size, args)
        for variant, m in models.items():
            row[f"{variant}_decode_read_mb"] = round(common.decode_bytes_per_token(m, cfg) / 1e6, 1)
        rows.append(row)
        del models

    common.print_table(rows, "w4a16", "w4/bf16")
    print(json.dumps({"benchmark": "w4a16_cpu", "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
                      "new_tokens": args.new_tokens, "prompt_tokens": common.PROMPT_TOKENS, "group": group,
                      "symmetric": symmetric, "torch": torch.__version__, "models": rows}))


if __name__ == "__main__":
    main()
