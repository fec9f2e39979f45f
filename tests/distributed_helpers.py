"""Running a function on several ranks of a real torch.distributed group (gloo, CPU processes), bounded in time.

`run_ranks(fn, world, *args)` starts `world` spawned processes that join one process group over TCP on 127.0.0.1,
calls `fn(group, *args)` on each (`group`: a `parallel.comm.TPGroup`) and returns their results in rank order. A
rank that raises, dies or outlives the timeout fails the call; every process it started is stopped before it
returns, also on failure. `fn` must be importable by name (a module-level function of a test helper module).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback


def _rank_main(fn, rank: int, world: int, port: int, results, args) -> None:
    import torch
    import torch.distributed as dist

    from trinity.parallel.launch import init_group

    try:
        torch.set_num_threads(1)
        group = init_group(rank, world, torch.device("cpu"), f"tcp://127.0.0.1:{port}", timeout_s=120)
        results.put((rank, True, fn(group, *args)))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 240.0) -> list:
    from trinity.parallel.launch import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, results, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(got))} did not finish in {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [got[r] for r in range(world)]
