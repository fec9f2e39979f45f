"""Muon for hidden matrices, AdamW for the rest, with parameter groups read off the model.

Muon (momentum + Newton-Schulz orthogonalisation) updates every hidden weight matrix. Stacked expert
weights are orthogonalised per expert (and per projection: the gate and up halves of `gate_up_proj` are two
matrices), never as one big matrix. Embeddings, the output head, norms and biases go to AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # a torch build without torch.distributed: parameters are never sharded
    DTensor = None  # type: ignore[assignment,misc]

# Quintic Newton-Schulz coefficients (a, b, c): five steps push the singular values of a Frobenius-normalised
# matrix into a band around 1 (deliberately not exactly 1: speed over precision). For square, tall and wide
# matrices whose condition number is at most 10, and for Gaussian matrices with aspect ratio >= 4, every singular
# value of the result lies in NS_BAND (tests/test_train_optim.py). Directions with far smaller singular values are
# amplified strongly but can stay below the band.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_BAND = (0.6, 1.25)


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of `g` (batched over leading dims), in bf16:
    returns ~U V^T of the SVD G = U S V^T, without computing an SVD."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def _as_matrices(p: torch.Tensor, name: str) -> torch.Tensor:
    """A view of the parameter as a batch of the matrices Muon should treat separately."""
    if name.endswith("experts.gate_up_proj"):  # [E, 2I, H] -> [E, 2, I, H]: gate and up apart
        e, two_i, h = p.shape
        return p.view(e, 2, two_i // 2, h)
    return p


def _orthogonalised(g: torch.Tensor, name: str, steps: int) -> torch.Tensor:
    """Newton-Schulz per matrix, scaled so each matrix's update RMS matches a typical AdamW update."""
    update = newton_schulz(_as_matrices(g, name), steps)
    rows, cols = update.shape[-2:]
    return update.reshape(g.shape) * (0.2 * max(rows, cols) ** 0.5)


def muon_update(g: torch.Tensor, name: str, steps: int = NS_STEPS) -> torch.Tensor:
    """Muon's update for a momentum `g`, in g's layout. Under FSDP2 `g` is a DTensor sharded on dim 0, and
    Newton-Schulz needs whole matrices: a rank's shard of stacked experts [E, out, in] holds whole experts
    when E divides by the world size, so those are orthogonalised where they are; anything else (2-D
    matrices, uneven expert splits) is gathered, orthogonalised whole on every rank (the same result
    everywhere) and cut back to this rank's rows."""
    if DTensor is None or not isinstance(g, DTensor):
        return _orthogonalised(g, name, steps)
    whole_experts = (g.dim() >= 3 and tuple(g.placements) == (Shard(0),)
                     and g.shape[0] % g.device_mesh.size() == 0)
    if whole_experts:
        local = _orthogonalised(g.to_local(), name, steps)
        return DTensor.from_local(local, g.device_mesh, g.placements, shape=g.shape, stride=g.stride())
    full = _orthogonalised(g.full_tensor(), name, steps)
    # src_data_rank=None: every rank holds the same full update and keeps its own rows, no scatter
    return distribute_tensor(full, g.device_mesh, g.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov by default) whose update is orthogonalised by Newton-Schulz.

    Scaling: each matrix's update is multiplied by `0.2 * sqrt(max(rows, cols))` so its RMS matches a typical
    AdamW update, which lets Muon and AdamW share one learning rate schedule. Weight decay is decoupled.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = NS_STEPS):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            names = group.get("names", [""] * len(group["params"]))
            for p, name in zip(group["params"], names):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                buf = state["momentum_buffer"]
                grad = p.grad.float()
                buf.mul_(group["momentum"]).add_(grad)
                g = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = muon_update(g, name, group["ns_steps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


@dataclass(slots=True)
class ParamSplit:
    muon: list[tuple[str, nn.Parameter]]
    adamw_decay: list[tuple[str, nn.Parameter]]  # embeddings and the output head
    adamw_no_decay: list[tuple[str, nn.Parameter]]  # norms and biases


def split_parameters(model: nn.Module) -> ParamSplit:
    """Hidden matrices (>= 2-D, inside the decoder layers) -> Muon; embeddings and the head -> AdamW with decay;
    1-D parameters (norm gains, biases) -> AdamW without decay. Parameters that gradients do not train
    (the expert bias) go nowhere."""
    split = ParamSplit([], [], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            split.adamw_no_decay.append((name, p))
        elif name.startswith(("model.embed_tokens", "lm_head")):
            split.adamw_decay.append((name, p))
        else:
            split.muon.append((name, p))
    return split


class CombinedOptimizer:
    """Muon and AdamW stepped together; one state_dict; one learning-rate multiplier for the schedule."""

    def __init__(self, model: nn.Module, lr: float = 3e-3, muon_lr: float | None = None, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.95, eps: float = 1e-8):
        split = split_parameters(model)
        self.split = split
        self.muon = Muon([{"params": [p for _, p in split.muon], "names": [n for n, _ in split.muon]}],
                         lr=muon_lr or lr, momentum=momentum, weight_decay=weight_decay)
        groups = [{"params": [p for _, p in split.adamw_decay], "weight_decay": weight_decay},
                  {"params": [p for _, p in split.adamw_no_decay], "weight_decay": 0.0}]
        self.adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
        self.optimizers = [self.muon, self.adamw]
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]

    def set_lr_scale(self, scale: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers under their keys in `state_dict`."""
        return {"muon": self.muon, "adamw": self.adamw}

    def state_dict(self) -> dict:
        return {key: opt.state_dict() for key, opt in self.named_optimizers().items()}

    def load_state_dict(self, state: dict) -> None:
        for key, opt in self.named_optimizers().items():
            opt.load_state_dict(state[key])
