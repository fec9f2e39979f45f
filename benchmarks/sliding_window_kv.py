"""The sliding-window KV design's figures, for whichever design is on PYTHONPATH (issue 19 item 3): the ring
(`KVCacheManager.new_step` / `commit_step`, ring entries) or vLLM's shape (tables by block index, blocks behind the
window freed). Run it once per design, alternating, with each design's source first on the path:

    PYTHONPATH=/tmp/wt_ring/src   .venv/bin/python benchmarks/sliding_window_kv.py
    PYTHONPATH=/tmp/wt_window/src .venv/bin/python benchmarks/sliding_window_kv.py

1. Memory per sequence: sliding-pool blocks one sequence holds (the pool's used blocks, the sequence alone in a
   large pool), driving the KV manager as the scheduler does: a 3-window prompt in chunks of max_num_batched_tokens
   (2048, and 8192 for window 2048), then 2 windows of decode steps; during a step (after its allocation) and
   between steps (after its blocks are registered), with and without prefix caching. The built-in model's shape
   (window 128) and Mini's (window 2048), block 16.
2. Host time of a decode step's KV calls, 64 sequences at window 2048, block 16, contexts of ~3000 tokens: the
   allocations alone (with new_step / commit_step where the design has them), and everything the scheduler calls
   (take_changes, needs_registering / register with caching).
3. The runner's per-step host work for a decode batch of 32 at ~3000 tokens: `ModelRunner._pool_step` of each pool
   (eager path, CPU tensors) and `DecodeTable.fill` (the CUDA-graph path's table, max_model_len 8192), with the
   runner's block tables as per-sequence lists, or persistent (`engine/block_tables.py`) where the checkout has them.
Prints a table, then one JSON object last. Plain Python and CPU torch; no model weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from trinity.engine.kv_cache import KVCacheManager, extend_block_keys

RING = hasattr(KVCacheManager, "new_step")
try:  # the runner's persistent block tables (a row per sequence, on the host and the device)
    import trinity.engine.block_tables  # noqa: F401
    PERSISTENT_TABLES = True
except ImportError:
    PERSISTENT_TABLES = False


def take_changes(kv):
    """The scheduler's end of a step's allocations: blocks kept only for the cache (where the design defers them),
    then the changes for the runner."""
    if hasattr(kv, "fill_for_cache"):
        kv.fill_for_cache()
    return kv.take_changes()
DESIGN = "ring" if RING else "vllm-shape"


def step_alloc(kv: KVCacheManager, seq: str, num_tokens: int) -> bool:
    if RING:
        kv.new_step()
        ok = kv.allocate(seq, num_tokens)
        kv.commit_step()
        return ok
    return kv.allocate(seq, num_tokens)


# ------------------------------------------------------------------------------------------- memory
def memory(window: int, block_size: int, chunk: int, caching: bool) -> dict:
    kv = KVCacheManager(block_size, 100_000, 100_000, window, prefix_caching=caching)
    prompt = 3 * window
    total = prompt + 2 * window
    tokens = list(range(1000, 1000 + total))
    keys: list[bytes] = []
    during, between, decode_during, decode_between = [], [], [], []
    computed = 0
    while computed < total:
        n = min(chunk, prompt - computed) if computed < prompt else 1
        assert step_alloc(kv, "s", computed + n)
        take_changes(kv)
        (during if n > 1 else decode_during).append(kv.sliding.num_used)
        computed += n
        if caching:
            done = computed // block_size
            extend_block_keys(keys, lambda lo, hi: tokens[lo:hi], block_size, done)
            kv.register("s", keys, done)
        (between if n > 1 else decode_between).append(kv.sliding.num_used)
    return {"window": window, "block": block_size, "chunk": chunk, "prefix_caching": caching,
            "prefill_peak_during_step": max(during), "prefill_after_steps": between,
            "decode_min": min(decode_during), "decode_mean": round(statistics.mean(decode_during), 2),
            "decode_max": max(decode_during), "decode_between_steps_mean": round(statistics.mean(decode_between), 2),
            "tokens_in_window_blocks": -(-window // block_size)}


# ------------------------------------------------------------------------------------------- host time
def decode_host_time(num_seqs: int, window: int, block_size: int, context: int, steps: int, caching: bool) -> dict:
    kv = KVCacheManager(block_size, 100_000, 100_000, window, prefix_caching=caching)
    computed = {}
    tokens = {}
    keys: dict[str, list[bytes]] = {}
    for i in range(num_seqs):  # contexts of context .. context + num_seqs - 1: block boundaries fall on every step
        seq, n = f"s{i}", context + i
        tokens[seq] = list(range(i, i + n + steps + 1))
        keys[seq] = []
        assert step_alloc(kv, seq, n)
        computed[seq] = n
        if caching:
            done = n // block_size
            extend_block_keys(keys[seq], lambda lo, hi, t=tokens[seq]: t[lo:hi], block_size, done)
            kv.register(seq, keys[seq], done)
    take_changes(kv)
    seqs = list(computed)
    alloc_s, all_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if RING:
            kv.new_step()
        for seq in seqs:
            assert kv.allocate(seq, computed[seq] + 1)
        if RING:
            kv.commit_step()
        t1 = time.perf_counter()
        take_changes(kv)
        for seq in seqs:  # the scheduler's cache_computed, once the step is launched
            computed[seq] += 1
            if caching:
                done = computed[seq] // block_size
                if kv.needs_registering(seq, done):
                    t = tokens[seq]
                    kv.register(seq, extend_block_keys(keys[seq], lambda lo, hi, t=t: t[lo:hi], block_size, done),
                                done)
        t2 = time.perf_counter()
        alloc_s.append(t1 - t0)
        all_s.append(t2 - t0)
    return {"seqs": num_seqs, "window": window, "block": block_size, "context": context, "steps": steps,
            "prefix_caching": caching, "allocate_us_per_step": round(statistics.median(alloc_s) * 1e6, 1),
            "allocate_us_mean": round(statistics.mean(alloc_s) * 1e6, 1),
            "kv_calls_us_per_step": round(statistics.median(all_s) * 1e6, 1),
            "kv_calls_us_mean": round(statistics.mean(all_s) * 1e6, 1)}


def runner_host_time(batch: int, window: int, block_size: int, context: int, reps: int) -> dict:
    import torch

    from trinity.engine import cuda_graphs
    from trinity.engine.runner import ModelRunner
    from trinity.engine.step import StepInput, StepSeq

    torch.set_num_threads(1)
    max_model_len = 8192
    kv = KVCacheManager(block_size, 100_000, 100_000, window)
    runner = ModelRunner.__new__(ModelRunner)  # the host side only: no model, no cache tensors
    runner.layout, runner.device = kv.layout, torch.device("cpu")
    seqs = [f"s{i}" for i in range(batch)]
    for i, seq in enumerate(seqs):
        assert step_alloc(kv, seq, context + i)
    for i, seq in enumerate(seqs):  # the decode step's allocation
        assert step_alloc(kv, seq, context + i + 1)
    changes, _ = take_changes(kv)
    if PERSISTENT_TABLES:
        from trinity.engine.block_tables import WorkerBlockTables
        runner.tables = WorkerBlockTables(batch, kv.layout.num_blocks(max_model_len), runner.device, {})
        runner.tables.apply(StepInput(tables=changes))
    else:  # the runner's per-sequence lists before the persistent tables
        from trinity.engine.step import SeqTables
        runner.tables = {}
        for seq, change in changes.items():
            runner.tables.setdefault(seq, SeqTables()).apply(change)
    step = StepInput(seqs=[StepSeq(seq, context + i, 1, [7]) for i, seq in enumerate(seqs)],
                     logits_rows=list(range(batch)))
    starts = list(range(batch))
    out = {"batch": batch, "window": window, "block": block_size, "context": context}
    for pool in ("full", "sliding"):
        runner._pool_step(pool, step, starts)  # warm
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            runner._pool_step(pool, step, starts)
            times.append(time.perf_counter() - t0)
        out[f"pool_step_{pool}_us"] = round(statistics.median(times) * 1e6, 1)
    # the CUDA-graph decode table's host fill (its __init__ needs a model: the fields it reads are set here)
    table = cuda_graphs.DecodeTable.__new__(cuda_graphs.DecodeTable)
    table.runner, table.block_size, table.max_batch = runner, block_size, batch
    layout, offset, pools = kv.layout, 3, []
    for name in ("full", "sliding"):
        sliding = name == "sliding"
        width = layout.window if sliding else max_model_len
        if PERSISTENT_TABLES:  # a pool's columns: slot, lo, length, table row
            pools.append(cuda_graphs._Pool(name, offset, width, sliding, 0))
            offset += cuda_graphs._POOL_COLUMNS
            continue
        if RING:
            ring = layout.ring_blocks if sliding else None
            pool = cuda_graphs._Pool(name, offset, ring or layout.num_blocks(max_model_len), width, ring, 0)
        else:
            columns = layout.window_blocks if sliding else layout.num_blocks(max_model_len)
            pool = cuda_graphs._Pool(name, offset, columns, width, sliding, 0)
        pools.append(pool)
        offset += pool.columns
    table.pools, table.columns = pools, offset
    host = torch.zeros(batch, offset, dtype=torch.int32).numpy()
    table.fill(host, step, batch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        table.fill(host, step, batch)
        times.append(time.perf_counter() - t0)
    out["decode_table_fill_us"] = round(statistics.median(times) * 1e6, 1)
    out["decode_table_columns"] = offset
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    mem = [memory(w, 16, chunk, c) for w, chunk in ((128, 2048), (2048, 2048), (2048, 8192)) for c in (False, True)]
    for m in mem:
        print(f"{DESIGN:10} memory W={m['window']:5} chunk={m['chunk']:5} caching={m['prefix_caching']!s:5}: "
              f"prefill peak {m['prefill_peak_during_step']} blocks during a step, after steps "
              f"{m['prefill_after_steps']}; decode {m['decode_min']}..{m['decode_max']} (mean {m['decode_mean']}; "
              f"between steps "
              f"{m['decode_between_steps_mean']})")
    host = [decode_host_time(64, 2048, 16, 3000, args.steps, c) for c in (False, True)]
    for h in host:
        print(f"{DESIGN:10} decode KV host time, 64 seqs, caching={h['prefix_caching']!s:5}: allocate "
              f"{h['allocate_us_per_step']} us/step (mean {h['allocate_us_mean']}), all KV calls "
              f"{h['kv_calls_us_per_step']} us/step (mean {h['kv_calls_us_mean']})")
    run = runner_host_time(32, 2048, 16, 3000, args.reps)
    print(f"{DESIGN:10} runner host time, batch 32: _pool_step full {run['pool_step_full_us']} us, sliding "
          f"{run['pool_step_sliding_us']} us; DecodeTable.fill {run['decode_table_fill_us']} us "
          f"(columns {run['decode_table_columns']})")
    print(json.dumps({"benchmark": "sliding_window_kv", "design": DESIGN, "memory": mem, "decode_kv_host": host,
                      "runner_host": run}))


if __name__ == "__main__":
    main()
