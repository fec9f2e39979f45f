"""Tensor parallelism on the CPU: the engine's step time at TP=1 and TP=2, and what one all-reduce costs.

    .venv/bin/python benchmarks/tp_cpu.py [--model trinity-tiny] [--requests 4] [--new-tokens 64] [--rounds 2]

1. The same greedy batch (`--requests` prompts of ~`--prompt-tokens` tokens, `--new-tokens` each) through `LLM` with
   tensor_parallel_size 1 and 2 (gloo, one worker process, one intra-op thread per rank), alternating, best of
   `--rounds`: wall time, decode time per step (the steps after the last prompt finished prefilling), tokens/s.
2. One all-reduce of decode-sized hidden states ([batch, hidden] fp32, batch 1 / 4 / 32, the model's hidden size)
   between two gloo ranks: the median over 200 calls. A decode step of a Trinity layer makes 2 (attention's o_proj,
   then the MLP or MoE block), plus 1 for the embedding and a gather of the logits: the communication a step pays
   is then the step's all-reduces times that figure, printed beside the measured step time.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def run_engine(model: str, tp: int, prompts: list[list[int]], new_tokens: int) -> dict:
    from trinity import LLM, SamplingParams

    llm = LLM(model, dtype="float32", tensor_parallel_size=tp, max_num_seqs=len(prompts), async_scheduling=False)
    try:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=4))  # warm-up
        engine = llm.engine
        for p in prompts:  # all admitted at once: the first step prefills them all
            engine.add_request(f"r{len(engine.requests)}-{time.monotonic_ns()}", prompt_token_ids=p, params=params)
        step_times, t0 = [], time.perf_counter()
        while engine.has_unfinished():
            s = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        decode = step_times[1:]  # after the prefill step
        return {"tp": tp, "wall_s": round(wall, 3), "steps": len(step_times),
                "prefill_step_ms": round(step_times[0] * 1e3, 2),
                "decode_step_ms": round(statistics.median(decode) * 1e3, 2),
                "tokens_per_s": round(len(prompts) * new_tokens / wall, 1)}
    finally:
        llm.shutdown()


def _all_reduce_rank(rank: int, world: int, init: str, hidden: int, batches: list[int], reps: int, out) -> None:
    import torch.distributed as dist

    from trinity.parallel.launch import init_group

    torch.set_num_threads(1)
    group = init_group(rank, world, torch.device("cpu"), init, timeout_s=120)
    result = {}
    for b in batches:
        x = torch.randn(b, hidden)
        for _ in range(10):
            group.all_reduce_(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            group.all_reduce_(x)
            times.append(time.perf_counter() - t0)
        result[b] = statistics.median(times)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def all_reduce_us(hidden: int, batches: list[int], reps: int = 200) -> dict[int, float]:
    from trinity.parallel.launch import free_port

    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_all_reduce_rank, args=(r, 2, init, hidden, batches, reps, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        result = out.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {b: round(t * 1e6, 1) for b, t in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="trinity-tiny")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers inherit it: one thread per rank
    torch.set_num_threads(1)
    from trinity.loading import model_config

    cfg = model_config(args.model)
    prompts = [[(7 * i + 3 * j) % 200 + 10 for j in range(args.prompt_tokens + i)] for i in range(args.requests)]
    best: dict[int, dict] = {}
    for _ in range(args.rounds):
        for tp in (1, 2):
            r = run_engine(args.model, tp, prompts, args.new_tokens)
            if tp not in best or r["wall_s"] < best[tp]["wall_s"]:
                best[tp] = r
    batches = sorted({1, 4, 32, args.requests})
    ar = all_reduce_us(cfg.hidden_size, batches)
    per_step = 2 * cfg.num_hidden_layers + 2  # o_proj and MLP per layer, the embedding, the logits' gather
    comm_ms = per_step * ar[args.requests] / 1e3
    print(f"model {args.model}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers; {args.requests} requests x "
          f"{args.new_tokens} tokens, best of {args.rounds}")
    for tp in (1, 2):
        r = best[tp]
        print(f"TP={tp}: wall {r['wall_s']} s, {r['tokens_per_s']} tok/s, prefill step {r['prefill_step_ms']} ms, "
              f"decode step {r['decode_step_ms']} ms (median)")
    print("one all-reduce, 2 gloo ranks: " + ", ".join(f"[{b}, {cfg.hidden_size}] {us} us" for b, us in ar.items()))
    print(f"a decode step's {per_step} collectives at batch {args.requests}: ~{comm_ms:.2f} ms of the TP=2 step's "
          f"{best[2]['decode_step_ms']} ms")
    print(json.dumps({"benchmark": "tp_cpu", "model": args.model, "hidden_size": cfg.hidden_size,
                      "layers": cfg.num_hidden_layers, "requests": args.requests, "new_tokens": args.new_tokens,
                      "engine": [best[1], best[2]], "all_reduce_us": ar, "collectives_per_decode_step": per_step,
                      "decode_step_comm_ms": round(comm_ms, 2)}))


if __name__ == "__main__":
    main()
