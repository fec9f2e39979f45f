"""Data parallel for the trainer: wrap the model in one of the modes below and expose what a training step,
a checkpoint and an export need from it.

`TrainConfig.data_parallel` picks the mode; it only matters when torchrun starts more than one process
(gloo on CPU, NCCL on GPU). Every rank draws the whole global batch and trains on its share; the loss is
normalised by the global batch's loss tokens, so gradients are *summed* over ranks, never averaged.

- `fsdp`: FSDP2 `fully_shard`, per decoder layer then the root. Parameters, gradients and optimizer states are
  DTensors sharded on dim 0; each layer's weights are all-gathered for its forward and backward, gradients are
  reduce-scattered as a plain sum (gloo has no pre-multiplied sum). AdamW and gradient clipping work on the
  DTensors as they are; Muon orthogonalises stacked experts on the rank that holds them and gathers 2-D
  matrices (`optim.muon_update`). Parameters that gradients do not train (the router's `expert_bias`) stay
  whole on every rank: the balancer moves them from token counts summed over ranks, identically everywhere.
- `ddp`: `DistributedDataParallel` with a summing all-reduce hook; non-final micro batches run under `no_sync`,
  so one all-reduce per step.
- `manual`: the model is left as it is and, after the last micro batch, one flat all-reduce sums the
  gradients. The first implementation, kept as a reference the others are tested against.
- `auto`: `fsdp` where the torch build has `fully_shard` (torch >= 2.6), else `ddp`.

Checkpoints and exports hold full, unsharded tensors in every mode (the same files a one-process run writes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: one process only
    DTensor = None  # type: ignore[assignment,misc]

MODES = ("auto", "fsdp", "ddp", "manual")


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_mode(requested: str, world: int) -> str:
    """The mode a run uses: "none" for one process, `auto` resolved, `fsdp` refused where torch lacks it."""
    if requested not in MODES:
        raise ValueError(f"data_parallel {requested!r}: allowed {', '.join(MODES)}")
    if world == 1:
        return "none"
    if requested == "auto":
        return "fsdp" if fsdp_available() else "ddp"
    if requested == "fsdp" and not fsdp_available():
        raise ValueError(f"data_parallel 'fsdp' needs torch.distributed.fsdp.fully_shard (torch >= 2.6); "
                         f"this torch is {torch.__version__}")
    return requested


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm, coefficient max_norm / (norm + 1e-6) capped at 1) whose norm is
    the same fp32 number however the gradients are sharded. Torch's reduces per-shard fp32 norms, so under fsdp
    the norm can differ from one process's in the last bit, and Muon's bf16 Newton-Schulz turns that into
    visibly different updates. Here each rank sums the squares of its gradient elements in fp64 (an fp32 value
    squares exactly in fp64), the sums are added over ranks, and only the square root is rounded to fp32.
    Gradients are either all sharded DTensors (fsdp: frozen parameters are the only ones left whole) or all whole
    and the same on every rank (the other modes, after their reduction)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sharded = [_is_dtensor(g) for g in grads]
    if any(sharded) and not all(sharded):
        raise ValueError("clip_grad_norm_: some gradients are sharded DTensors and some are not")
    local = [g.to_local() if _is_dtensor(g) else g for g in grads]
    squares = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in local]).sum()
    if all(sharded):
        dist.all_reduce(squares, group=grads[0].device_mesh.get_group())
    norm = squares.sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for t in local:  # a DTensor's local tensor is a view of its shard: scaling it scales the gradient
        t.mul_(coef.to(t.device))
    return norm


def _sum_all_reduce(_state, bucket):  # no annotations: DDP compares them to real classes, and this file's
    # `from __future__ import annotations` would turn them into strings. (state: None, bucket: dist.GradBucket,
    # returns a Future of the reduced bucket.) DDP's own hook divides by the world size; our losses are already
    # normalised by the global batch, so the gradients are summed.
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DataParallel:
    """The model under one resolved mode ("none", "fsdp", "ddp" or "manual"). `module` is what the forward
    goes through; `model` stays the model itself (sharded in place under fsdp)."""

    def __init__(self, model: nn.Module, mode: str, device: torch.device):
        self.model = model
        self.mode = mode
        self.module: nn.Module = model
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if mode == "fsdp":
            self._shard(device)
        elif mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.module.register_comm_hook(None, _sum_all_reduce)
        elif mode not in ("none", "manual"):
            raise ValueError(f"unresolved data parallel mode {mode!r}")

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def _shard(self, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if device.type == "cuda":
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (self.world,))
        frozen = {p for p in self.model.parameters() if not p.requires_grad}
        for layer in self.model.model.layers:  # one all-gather / reduce-scatter unit per decoder layer
            fully_shard(layer, mesh=mesh, ignored_params=frozen)
        fully_shard(self.model, mesh=mesh, ignored_params=frozen)  # embeddings, final norm, head
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        # FSDP2 warns that the logits it returns are a view; the trainer never modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    # ------------------------------------------------------------------ a step
    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro batch's forward and backward: gradients are only reduced after the last one."""
        if self.mode == "ddp" and not last:
            with self.module.no_sync():
                yield
            return
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(last)
        yield

    def sync_gradients(self) -> None:
        """After the last micro batch. `manual` sums the gradients here (one flat all-reduce); the wrapped modes
        already did during the backward."""
        if self.mode != "manual":
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ checkpoints and export
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's state_dict with full tensors. Under fsdp a collective: every rank must call it; rank 0
        gets the tensors (on the CPU), the others an empty dict."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Full tensors (every rank read the same checkpoint) into the model, each rank keeping its shard."""
        if not self.sharded:
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def full_optimizer_state(self, state: dict) -> dict:
        """An optimizer state_dict with every DTensor gathered to a full CPU tensor (a collective under fsdp: the
        walk visits the same tensors in the same order on every rank)."""
        if not self.sharded:
            return state
        return _map_tensors(state, lambda t: t.full_tensor().cpu() if _is_dtensor(t) else t)

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """A saved (full) optimizer state_dict laid out like the optimizer's parameters: per-parameter tensors
        of a sharded parameter's shape become DTensors holding this rank's shard (no communication)."""
        if not self.sharded:
            return state
        from torch.distributed.tensor import distribute_tensor

        saved = [i for group in state["param_groups"] for i in group["params"]]
        live = [p for group in optimizer.param_groups for p in group["params"]]
        param_of = dict(zip(saved, live))

        def like(value: Any, p: torch.Tensor) -> Any:
            if _is_dtensor(p) and torch.is_tensor(value) and value.shape == p.shape:
                return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            return value

        per_param = {i: {k: like(v, param_of[i]) for k, v in s.items()} for i, s in state["state"].items()}
        return {**state, "state": per_param}

    def full_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The model with full tensors, for an export: the model itself unless sharded; under fsdp (a collective)
        a fresh unsharded copy made by `build` on rank 0, None on the other ranks."""
        if not self.sharded:
            return self.model
        state = self.full_model_state()
        if dist.get_rank() != 0:
            return None
        copy = build()
        copy.load_state_dict(state)
        return copy


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj
