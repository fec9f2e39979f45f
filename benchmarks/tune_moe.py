"""Sweep the fused MoE kernels' launch configurations on a GPU; print the best per batch bucket as a table for
`trinity.kernels.moe_triton.CONFIGS`.

    PYTHONPATH=src python3 benchmarks/tune_moe.py [--models nano,mini] [--tokens 1,8,32,64]
    .venv/bin/python benchmarks/tune_moe.py --smoke      # CPU, Triton's interpreter: checks the script runs

For each model shape (hidden, moe_intermediate; 128 experts, top-8, plus the stacked shared expert) and batch
size: random bf16 experts and router logits, then `fused_moe_layer` as a decode step runs it (routing + alignment,
gate_up + SwiGLU, down; the combine left to the next norm), for each candidate configuration that fits the GPU's
shared memory. The sweep is in two passes: the gate_up tiles with the table's down tiles, then the down tiles with
the best gate_up tiles (each pass per row-block size). Each candidate is timed as a CUDA graph of `--calls` layer
calls replayed `--replays` times (kernel time, no host launch cost), median per call; its output is checked
against the table's configuration. Prints, per model and bucket, the table's time, the best time, the expert
weights' effective bandwidth, then the table literal. Then, at prefill-sized batches (`--crossover`), the routed
experts through the Triton kernels against F.grouped_mm (the two ways `kernels.moe.FUSED_MOE_MAX_TOKENS` picks
between), with the token count from which F.grouped_mm wins. One JSON object last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--models", default="nano,mini")
parser.add_argument("--tokens", default="1,8,32,64")
parser.add_argument("--calls", type=int, default=20, help="layer calls per captured graph")
parser.add_argument("--replays", type=int, default=5)
parser.add_argument("--crossover", default="64,128,256,512,1024,2048,8192",
                    help="token counts at which to time the Triton experts against F.grouped_mm ('' to skip)")
parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, two candidates")
args = parser.parse_args()

if args.smoke:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["TRINITY_KERNELS"] = "triton"
    args.replays = 1  # the smoke run checks that every path runs; interpreted timings mean nothing, so time once

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from timing import median_seconds  # noqa: E402
from trinity.kernels import moe as kmoe  # noqa: E402
from trinity.kernels import moe_triton as mt  # noqa: E402

SHAPES = {"nano": (1024, 256), "mini": (2048, 1024)}  # hidden, moe_intermediate
EXPERTS, TOP_K = 128, 8


def candidates_up(block_m: int) -> list[mt.MoEConfig]:
    if args.smoke:
        return [mt.MoEConfig(block_m=16, up_n=16, up_k=32), mt.MoEConfig(block_m=16, up_n=32, up_k=16)]
    return [mt.MoEConfig(block_m=block_m, up_n=n, up_k=k, num_warps=w, num_stages=s)
            for n, k, w, s in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 4))]


def candidates_down(base: mt.MoEConfig) -> list[mt.MoEConfig]:
    if args.smoke:
        return [base, mt.MoEConfig(**{**base.__dict__, "down_n": 32, "down_k": 16})]
    return [mt.MoEConfig(block_m=base.block_m, up_n=base.up_n, up_k=base.up_k, down_n=n, down_k=k, num_warps=w,
                         num_stages=s)
            for n, k, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3, 4))]


def problem(hidden: int, inter: int, tokens: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(tokens)
    experts = EXPERTS + 1  # the shared expert stacked last
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(device, dtype)
    logits = torch.randn(tokens, EXPERTS, generator=g).to(device)
    bias = torch.zeros(EXPERTS, device=device)
    return x, logits, bias, gate_up, down


def run(prob, cfg: mt.MoEConfig | None) -> torch.Tensor:
    x, logits, bias, gate_up, down = prob
    return mt.fused_moe_layer(x, logits, bias, TOP_K, True, 2.826, gate_up, down, shared=1, config=cfg,
                              combine=False)


def seconds_per_call(prob, cfg: mt.MoEConfig | None) -> float:
    """Median time of one layer call: on a GPU from replays of a graph of `--calls` calls; in the smoke run from
    plain calls."""
    device = prob[0].device
    if device.type != "cuda":
        start = time.perf_counter()
        run(prob, cfg)
        return time.perf_counter() - start
    run(prob, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(args.calls):
            run(prob, cfg)
    times = []
    for _ in range(args.replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / args.calls)
    return statistics.median(times)


def fits(cfg: mt.MoEConfig, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    limit = mt._shared_memory_limit(device.index or 0)
    return mt.fit_shared_memory(cfg, 2, limit) == cfg  # only configs that need no shrinking


def expert_bytes(hidden: int, inter: int, tokens: int, ids_per_token: int = TOP_K) -> float:
    """Bytes of expert weights one call reads: the distinct experts its tokens chose (expected, uniform routing)
    plus the shared one."""
    distinct = EXPERTS * (1 - (1 - ids_per_token / EXPERTS) ** tokens)
    return (distinct + 1) * 3 * hidden * inter * 2


def tune(name: str, hidden: int, inter: int, tokens: int, device: torch.device) -> dict:
    prob = problem(hidden, inter, tokens, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    table_cfg = mt.get_config(tokens, hidden, inter, EXPERTS, TOP_K)
    want = run(prob, table_cfg)
    table_time = seconds_per_call(prob, table_cfg)
    best_cfg, best_time, tried = table_cfg, table_time, 0

    def consider(cfg: mt.MoEConfig) -> None:
        nonlocal best_cfg, best_time, tried
        if not fits(cfg, device):
            return
        got = run(prob, cfg)
        if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            print(f"[{name} T={tokens}] {cfg} disagrees with the table's config: skipped", file=sys.stderr)
            return
        t = seconds_per_call(prob, cfg)
        tried += 1
        if t < best_time:
            best_cfg, best_time = cfg, t

    block_ms = (16,) if args.smoke else sorted({16, mt._block_m_for_load(tokens, TOP_K, EXPERTS), 32 if tokens >= 32
                                                else 16})
    for block_m in block_ms:  # pass 1: gate_up tiles, the table's down tiles
        for cfg in candidates_up(block_m):
            consider(mt.MoEConfig(**{**cfg.__dict__, "down_n": table_cfg.down_n, "down_k": table_cfg.down_k}))
    for cfg in candidates_down(best_cfg):  # pass 2: down tiles under the best gate_up tiles
        consider(cfg)
    gbs = expert_bytes(hidden, inter, tokens) / best_time / 1e9
    out = {"tokens": tokens, "table_us": round(table_time * 1e6, 2), "best_us": round(best_time * 1e6, 2),
           "best": best_cfg.__dict__, "expert_gb_s": round(gbs, 1), "candidates": tried}
    print(f"[{name} T={tokens}] table {out['table_us']} us, best {out['best_us']} us ({gbs:.0f} GB/s of expert "
          f"weights) of {tried}: {best_cfg}", file=sys.stderr, flush=True)
    return out


def crossover(name: str, hidden: int, inter: int, tokens: int, device: torch.device) -> dict:
    """The routed experts of a prefill-sized batch two ways, as `kernels.moe.routed_experts` would pick between
    them by `FUSED_MOE_MAX_TOKENS`: the Triton fused kernels (`fused_moe`, the table's or the load-sized tiles) and
    `experts_grouped` (F.grouped_mm, with its grouping and combine). Eager calls (F.grouped_mm cannot be captured),
    CUDA events, median of `--replays`; the outputs must agree. TFLOP/s over the routed tokens' expert GEMMs."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, logits, bias, gate_up, down = problem(hidden, inter, tokens, device, dtype)
    weights, ids = mt.fused_route(logits, bias, TOP_K, True, 2.826)
    gate_up, down = gate_up[:EXPERTS], down[:EXPERTS]  # routed experts only
    ways = {"triton": lambda: mt.fused_moe(x, weights, ids, gate_up, down),
            "grouped_mm": lambda: kmoe.experts_grouped(x, weights, ids, gate_up, down)}
    if not kmoe.grouped_mm_available(device, dtype):
        ways.pop("grouped_mm")
    outs = {k: f() for k, f in ways.items()}
    if len(outs) == 2:
        a, b = outs["triton"].float(), outs["grouped_mm"].float()
        err = ((a - b).norm() / b.norm()).item()
        if err > 2e-2:
            raise SystemExit(f"[{name} T={tokens}] Triton and grouped_mm experts disagree: relative error {err:.3g}")
    result = {"tokens": tokens}
    flops = 2 * 3 * hidden * inter * tokens * TOP_K
    for k, f in ways.items():
        t = median_seconds(f, args.replays, device.type == "cuda")
        result[f"{k}_us"] = round(t * 1e6, 1)
        result[f"{k}_tflops"] = round(flops / t / 1e12, 1)
    print(f"[{name} T={tokens}] experts: " + ", ".join(f"{k} {result[f'{k}_us']} us ({result[f'{k}_tflops']} "
                                                     "TFLOP/s)" for k in ways), file=sys.stderr, flush=True)
    return result


def main() -> None:
    device = torch.device("cpu" if args.smoke else "cuda")
    tokens = [1, 2] if args.smoke else [int(t) for t in args.tokens.split(",")]
    results = {}
    for name in args.models.split(","):
        hidden, inter = (32, 16) if args.smoke else SHAPES[name]
        results[name] = {str(t): tune(name, hidden, inter, t, device) for t in tokens}
        fields = ("block_m", "up_n", "up_k", "down_n", "down_k", "num_warps", "num_stages")
        print(f"{name} ({hidden}, {inter}, {EXPERTS}, {TOP_K}): {{")
        for t, r in results[name].items():
            cfg = ", ".join(f"{f}={r['best'][f]}" for f in fields)
            print(f"    {mt._bucket(int(t))}: MoEConfig({cfg}),  # {r['best_us']} us vs {r['table_us']} us")
        print("}")
        cross = [16, 64] if args.smoke else [int(t) for t in args.crossover.split(",") if t]
        if cross:
            rows = [crossover(name, hidden, inter, t, device) for t in cross]
            results[f"{name}_crossover"] = rows
            wins = [r["tokens"] for r in rows if r.get("grouped_mm_us", float("inf")) < r["triton_us"]]
            print(f"{name}: F.grouped_mm beats the Triton experts from {min(wins) if wins else 'no'} tokens "
                  f"(kernels.moe.FUSED_MOE_MAX_TOKENS is {kmoe.FUSED_MOE_MAX_TOKENS})")
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, **results}))


if __name__ == "__main__":
    main()
