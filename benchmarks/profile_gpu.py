"""Where a decode step's time goes on the GPU: host vs graph replay, and the kernels by total time.

    PYTHONPATH=src python3 benchmarks/profile_gpu.py [--models nano,mini] [--out DIR]

For each model (random bf16 weights): the median engine step at batch 1 (1K context) split into the CUDA-graph
replay alone (device events) and everything else (scheduling, metadata, sampling: host work); then the torch
profiler's per-kernel CUDA time for eager decode steps at batch 1 and 64 and for one 2K-token prefill, per step.
Prints tables, then one JSON object last.
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


def add(engine: LLMEngine, n: int, context: int, max_tokens: int, vocab: int, tag: str) -> None:
    g = torch.Generator().manual_seed(n + context)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"{tag}{i}", prompt_token_ids=torch.randint(0, vocab, (context,), generator=g).tolist(),
                           params=params)


def until_decoding(engine: LLMEngine) -> None:
    """Step until no prompt is left to compute (every running sequence decodes)."""
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    torch.cuda.synchronize()


def timed_steps(engine: LLMEngine, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def replay_time(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def kernel_table(fn, steps: int, top: int = 25) -> dict:
    """Run fn() `steps` times under the profiler; per-step CUDA time by kernel name (top entries)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key, t / steps, ev.count / steps))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"gpu_us_per_step": round(total, 1), "kernels_per_step": round(sum(r[2] for r in rows), 1),
            "top": [{"name": k[:90], "us": round(t, 1), "count": round(c, 1), "share": round(t / total, 3)}
                    for k, t, c in rows[:top]]}


def profile_model(name: str, args) -> dict:
    cfg = preset(name)
    model = TrinityForCausalLM.random(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    out = {"model": name}
    # plain steps (no look-ahead): each timed step then holds exactly one replay, so step - replay = host work
    engine = LLMEngine(model, None, EngineConfig(max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=4096,
                                                 seed=0, async_scheduling=False))
    add(engine, 1, 1024, 400, cfg.vocab_size, "g")
    until_decoding(engine)
    steps = timed_steps(engine, 60)
    replay = replay_time(engine.runner.graphs.graphs[1])
    step = statistics.median(steps)
    out["batch1_graph"] = {"step_ms": round(step * 1e3, 3), "replay_ms": round(replay * 1e3, 3),
                           "host_ms": round((step - replay) * 1e3, 3), "tok_s": round(1 / step, 1)}
    # host breakdown: cProfile of 30 steps, top functions by own time
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    timed_steps(engine, 30)
    pr.disable()
    st = pstats.Stats(pr)
    funcs = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]
    out["host_top"] = [{"fn": f"{os.path.basename(k[0])}:{k[1]}:{k[2]}", "ms_per_step": round(v[2] / 30 * 1e3, 3)}
                       for k, v in funcs]
    while engine.has_unfinished():
        for r in list(engine.requests):
            engine.abort(r)
    del engine
    torch.cuda.empty_cache()

    eager = LLMEngine(model, None, EngineConfig(max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=4096,
                                                seed=0, enforce_eager=True, async_scheduling=False))
    add(eager, 1, 1024, 400, cfg.vocab_size, "e")
    until_decoding(eager)
    timed_steps(eager, 3)
    out["decode_b1_kernels"] = kernel_table(eager.step, 10)
    for r in list(eager.requests):
        eager.abort(r)
    add(eager, 64, 256, 400, cfg.vocab_size, "f")
    until_decoding(eager)
    timed_steps(eager, 3)
    s64 = statistics.median(timed_steps(eager, 10))
    out["decode_b64_eager_step_ms"] = round(s64 * 1e3, 2)
    out["decode_b64_kernels"] = kernel_table(eager.step, 5)
    for r in list(eager.requests):
        eager.abort(r)

    def prefill():
        add(eager, 1, 2048, 1, cfg.vocab_size, f"p{time.perf_counter_ns()}")
        while eager.has_unfinished():
            eager.step()
    prefill()
    torch.cuda.synchronize()
    start = time.perf_counter()
    prefill()
    torch.cuda.synchronize()
    out["prefill_2k_ms"] = round((time.perf_counter() - start) * 1e3, 2)
    out["prefill_2k_kernels"] = kernel_table(prefill, 2)
    del eager, model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nano,mini")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.models.split(","):
        try:
            r = profile_model(name, args)
        except Exception as e:
            import traceback
            traceback.print_exc()
            r = {"model": name, "error": f"{type(e).__name__}: {e}"[:800]}
        results.append(r)
        with open(os.path.join(args.out, f"profile_{name}.json"), "w") as f:
            json.dump(r, f, indent=1)
        if "error" in r:
            continue
        print(f"== {name}: batch 1 step {r['batch1_graph']}")
        for h in r["host_top"][:10]:
            print(f"   host {h['ms_per_step']:7.3f} ms  {h['fn']}")
        for key in ("decode_b1_kernels", "decode_b64_kernels", "prefill_2k_kernels"):
            t = r[key]
            print(f"-- {key}: {t['gpu_us_per_step']} us GPU/step, {t['kernels_per_step']} kernels/step")
            for row in t["top"][:14]:
                print(f"   {row['us']:9.1f} us x{row['count']:6.1f} {row['share']:6.1%}  {row['name']}")
        print(f"   b64 eager step {r['decode_b64_eager_step_ms']} ms, prefill 2K {r['prefill_2k_ms']} ms")
    print(json.dumps({"benchmark": "profile_gpu", "device": torch.cuda.get_device_name(), "results": [
        {k: v for k, v in r.items() if k in ("model", "batch1_graph", "decode_b64_eager_step_ms", "prefill_2k_ms",
                                              "error")} for r in results]}))


if __name__ == "__main__":
    main()
