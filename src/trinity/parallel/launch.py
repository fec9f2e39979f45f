"""Starting the ranks of a tensor-parallel group: the process group of each rank, and local worker processes.

Ranks meet over torch.distributed's TCP rendezvous on 127.0.0.1 (one machine) or, under torchrun, at the address
torchrun gives (`MASTER_ADDR` / `MASTER_PORT`, multi-node). Each rank gets the device group (NCCL on GPUs, gloo on
the CPU) and a gloo group for the step messages.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from .comm import TPGroup, backend_for

# How long a collective may wait before gloo (and NCCL's watchdog) gives up on a silent peer.
DEFAULT_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, device: torch.device, init_method: str | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join the process group as `rank` of `world` (`init_method` like tcp://127.0.0.1:PORT; None: the environment
    torchrun sets) and return the tensor-parallel group over all of it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                            timeout=timeout, **kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return TPGroup(rank, world, None, cpu_group)


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun (or another launcher that sets them)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def rank_device(rank: int, device: torch.device) -> torch.device:
    """The device of a rank on its node: cuda:LOCAL_RANK (torchrun) or cuda:rank; the CPU for every rank on the
    CPU."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count())
    return torch.device("cuda", local)
