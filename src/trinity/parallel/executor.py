"""Running the engine over a tensor-parallel group: rank 0 schedules, every rank runs its part of the model.

Rank 0 is the engine's process: the scheduler, the KV manager and the sampler run there once, beside rank 0's
`ModelRunner`. Before each forward, `TensorParallelRunner.execute` broadcasts the step (`engine.step.StepInput`,
plain data, over the gloo group) and, with look-ahead decoding, the step's tokens sampled on the device (over the
device group); every worker runs the same step on its own runner (`worker_loop`), so the collectives inside the
model (and inside captured CUDA graphs) meet. The KV plan is agreed once (the smallest pools any rank can hold),
so that the blocks rank 0's KV manager hands out exist on every rank.

Workers are local processes started here (`start`), one per GPU (CPU processes with gloo elsewhere), or the other
ranks of a torchrun launch (`join_torchrun`), which run `worker_loop` in place of the server.
A worker that exits is noticed by rank 0's monitor thread, which reports the rank and its exit code
(`Executor.on_failure`; the server marks itself failed and exits non-zero). A worker whose parent dies exits too.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing.connection
import os
import threading
import time
import traceback
from dataclasses import dataclass, replace

import torch

from .comm import TPGroup
from .launch import free_port, init_group, rank_device, torchrun_rank
from .sharding import ShardPlan, shard_model

log = logging.getLogger("trinity.parallel")


@dataclass
class ModelSource:
    """What every rank loads its part of: a model name (checkpoint folder, preset, the built-in model) or a
    whole model in memory (sent to the workers on the CPU; each rank keeps its slices)."""

    spec: str | None = None
    model: object | None = None  # a TrinityForCausalLM
    dtype: str = "auto"
    seed: int = 0
    quantization: str | None = None  # "fp8": each rank quantizes the part it reads


def load_shard(source: ModelSource, rank: int, size: int, expert_parallel: bool, group: TPGroup,
               device: torch.device):
    """-> (this rank's model, the tokenizer or None)."""
    if source.model is not None:
        model = copy.deepcopy(source.model)  # the caller's model stays whole
        shard_model(model, ShardPlan(model.config, rank, size, expert_parallel, group))
        return model.to(device), None
    from ..loading import load_model

    loaded = load_model(source.spec, dtype=source.dtype, device=str(device), seed=source.seed,
                        shard=lambda cfg: ShardPlan(cfg, rank, size, expert_parallel, group),
                        quantization=source.quantization)
    return loaded.model, loaded


class TensorParallelRunner:
    """Rank 0's `ModelRunner`, sending each step to the workers before running it."""

    def __init__(self, runner, group: TPGroup):
        self.local, self.group = runner, group

    def __getattr__(self, name):
        return getattr(self.local, name)

    def execute(self, step, input_tokens: torch.Tensor | None = None) -> torch.Tensor:
        tokens = None if input_tokens is None else (input_tokens.shape[0], input_tokens.dtype)
        self.group.broadcast_object(("step", step, tokens))
        if input_tokens is not None:
            input_tokens = self.group.broadcast_(input_tokens.contiguous())
        return self.local.execute(step, input_tokens)


def worker_loop(runner, group: TPGroup) -> None:
    """Run rank 0's steps until it says stop; apply the weight updates it sends between them."""
    while True:
        kind, step, tokens = group.broadcast_object(None)
        if kind == "stop":
            return
        if kind == "weights":
            receive_weights(runner.model, group, step, runner.device)
            continue
        input_tokens = None
        if tokens is not None:
            input_tokens = group.broadcast_(torch.empty(tokens[0], dtype=tokens[1], device=runner.device))
        runner.execute(step, input_tokens)


def send_weights(group: TPGroup, pairs: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
    """Rank 0: every whole tensor of an update to the workers, one at a time over the device group (names, shapes
    and dtypes first, over the gloo group)."""
    group.broadcast_object(("weights", [(name, tuple(t.shape), t.dtype) for name, t in pairs], None))
    for _, tensor in pairs:
        group.broadcast_(_as_sent(tensor.detach().to(device).contiguous()))


def receive_weights(model, group: TPGroup, meta: list, device: torch.device) -> None:
    """A worker: receive rank 0's update one tensor at a time and copy this rank's slices
    (`weight_update.copy_weights`, which looks the model's tensors up once for the whole update)."""
    from ..engine.weight_update import copy_weights

    def received():
        for name, shape, dtype in meta:
            buffer = _as_sent(torch.empty(shape, dtype=dtype, device=device))
            group.broadcast_(buffer)
            yield name, buffer.view(dtype)

    copy_weights(model, received())


def _as_sent(t: torch.Tensor) -> torch.Tensor:
    """One-byte floats (FP8 weights) travel as bytes: gloo has no FP8 types."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t


def agree_plan(plan, group: TPGroup):
    """The KV pools every rank can hold: each pool's smallest block count over the ranks."""
    if group.size == 1:
        return plan
    import torch.distributed as dist

    counts = torch.tensor([plan.num_full_blocks, plan.num_sliding_blocks], dtype=torch.long)
    dist.all_reduce(counts, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return replace(plan, num_full_blocks=int(counts[0]), num_sliding_blocks=int(counts[1]))


def run_worker(source: ModelSource, engine_config, group: TPGroup, device: torch.device) -> None:
    """A worker rank: load its part, build its runner as rank 0's engine does, serve steps until stopped."""
    from ..engine.engine import prepare_model
    from ..engine.runner import build_runner

    model, _ = load_shard(source, group.rank, group.size, engine_config.enable_expert_parallel, group, device)
    model = prepare_model(model)
    max_model_len = engine_config.max_model_len or model.config.max_position_embeddings
    runner = build_runner(model, engine_config, max_model_len, agree=lambda plan: agree_plan(plan, group))
    worker_loop(runner, group)


def _worker_process(rank: int, world: int, init_method: str, device_type: str, source: ModelSource,
                    engine_config, parent_pid: int) -> None:
    """A local worker process's main."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    device = rank_device(rank, torch.device(device_type))
    try:
        group = init_group(rank, world, device, init_method)
        run_worker(source, engine_config, group, device)
    except BaseException:  # noqa: BLE001 - the monitor on rank 0 reports the exit code; the cause goes to stderr
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # rank 0 is gone: nobody will send a step again


class Executor:
    """Rank 0's side of a tensor-parallel group: the group, the local worker processes and their monitor."""

    def __init__(self, group: TPGroup, processes: list, device: torch.device, on_failure=None):
        self.group, self.processes, self.device = group, processes, device
        self.on_failure = on_failure  # called once with the reason when a worker exits while serving
        self.failure: str | None = None
        self._stopping = False
        if processes:
            threading.Thread(target=self._monitor, name="trinity-tp-monitor", daemon=True).start()

    def wrap(self, runner) -> TensorParallelRunner:
        return TensorParallelRunner(runner, self.group)

    def agree_plan(self, plan):
        return agree_plan(plan, self.group)

    def send_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        send_weights(self.group, pairs, self.device)

    def _monitor(self) -> None:
        by_sentinel = {p.sentinel: (rank, p) for rank, p in enumerate(self.processes, start=1)}
        while by_sentinel and not self._stopping:
            ready = multiprocessing.connection.wait(list(by_sentinel), timeout=0.5)
            if self._stopping or not ready:
                continue
            rank, p = by_sentinel.pop(ready[0])
            p.join(timeout=1)
            self.failure = f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
            log.error(self.failure)
            if self.on_failure is not None:
                self.on_failure(self.failure)
            return

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker (a stop message, then a kill for any still running) and leave the group."""
        import torch.distributed as dist

        if self._stopping:
            return
        self._stopping = True
        if self.failure is None:
            try:
                self.group.broadcast_object(("stop", None, None))
            except Exception:  # noqa: BLE001 - a worker already gone: the kills below still run
                log.warning("could not send stop to the workers", exc_info=True)
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()


def start(source: ModelSource, engine_config, device: torch.device, on_failure=None):
    """Rank 0 of a new tensor-parallel group on this machine: start tp - 1 worker processes, join the group, load
    rank 0's part. -> (rank 0's model, the loaded model's `LoadedModel` or None, the Executor)."""
    world = engine_config.tensor_parallel_size
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size = {world} needs {world} GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    _check_sizes(source, engine_config)
    if source.model is not None:
        source = replace(source, model=copy.deepcopy(source.model).to("cpu"))  # sent to the workers from memory
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = torch.multiprocessing.get_context("spawn")
    processes = []
    try:
        for rank in range(1, world):
            p = ctx.Process(target=_worker_process, name=f"trinity-tp-rank{rank}", daemon=True,
                            args=(rank, world, init_method, device.type, source, engine_config, os.getpid()))
            p.start()
            processes.append(p)
        rank0 = rank_device(0, device)
        group = init_group(0, world, rank0, init_method)
        executor = Executor(group, processes, rank0, on_failure)
        model, loaded = load_shard(source, 0, world, engine_config.enable_expert_parallel, group, rank0)
    except BaseException:
        for p in processes:
            p.kill()
        raise
    return model, loaded, executor


def join_torchrun(source: ModelSource, engine_config, device: torch.device):
    """Under torchrun: join the group torchrun set up. Ranks > 0 run the worker loop and return None when rank 0
    stops them; rank 0 gets (its model, LoadedModel or None, Executor) as from `start`."""
    rank, world = torchrun_rank()
    if world != engine_config.tensor_parallel_size:
        raise ValueError(f"torchrun started {world} processes but tensor_parallel_size = "
                         f"{engine_config.tensor_parallel_size}: they must be equal")
    _check_sizes(source, engine_config)
    local = rank_device(rank, device)
    group = init_group(rank, world, local)
    if rank > 0:
        run_worker(source, engine_config, group, local)
        import torch.distributed as dist
        dist.destroy_process_group()
        return None
    model, loaded = load_shard(source, 0, world, engine_config.enable_expert_parallel, group, local)
    return model, loaded, Executor(group, [], local)


def start_rank0(model, dtype: str, device: str, engine_config, on_failure=None, quantization: str | None = None):
    """Rank 0 of a tensor-parallel engine, from what `LLM` or `trinity serve` was given (a model name, or a model
    in memory): joins torchrun's group when torchrun started this process, else starts local workers.
    -> (rank 0's model, LoadedModel or None, Executor); under torchrun, ranks > 0 serve steps here and exit."""
    from ..loading import resolve_device
    from ..model.model import TrinityForCausalLM

    source = ModelSource(model=model) if isinstance(model, TrinityForCausalLM) \
        else ModelSource(spec=model, dtype=dtype, seed=engine_config.seed or 0, quantization=quantization)
    dev = resolve_device(device)
    if torchrun_rank() is None:
        return start(source, engine_config, dev, on_failure)
    joined = join_torchrun(source, engine_config, dev)
    if joined is None:  # a worker rank, stopped by rank 0
        raise SystemExit(0)
    joined[2].on_failure = on_failure
    return joined


def _check_sizes(source: ModelSource, engine_config) -> None:
    """Refuse sizes that cannot split the model before any process starts."""
    from ..loading import model_config
    from .sharding import check_sizes

    config = source.model.config if source.model is not None else model_config(source.spec)
    check_sizes(config, engine_config.tensor_parallel_size, engine_config.enable_expert_parallel)
