"""LoRA adapters on a Trinity model's projections: W x + (alpha / r) B A x, with only A and B trained.

An adapted projection keeps its module path and its `weight` parameter (the same object, frozen), and gains
`lora_A` [r, in] and `lora_B` [out, r] beside it; B starts at zero, so an adapted model starts as the base one.
Targets: "attention" (q, k, v, gate and o projections) and "mlp" (the dense SwiGLU layers and each MoE layer's
shared expert). The routed experts keep their stacked weights untouched (their kernels take whole stacked
tensors; an adapter there would need its own routed pass).

`merged_state_dict` folds the adapters into plain weights under the checkpoint's names: what the rollout engine
and the export take, so neither needs to know about adapters."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import GatedAttention, Linear, SwiGLU

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LoRALinear(Linear):
    """A bias-free projection plus a low-rank update. Built around an existing projection's weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        if base.bias is not None:
            raise ValueError("LoRA here adapts bias-free projections only")
        out_features, in_features = base.weight.shape
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.weight = base.weight  # the very parameter: its name and storage stay the base model's
        self.weight.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        # A: Kaiming-uniform like nn.Linear's default, so B A x is well scaled once B moves; B: zeros (no change yet)
        bound = 1 / math.sqrt(in_features)
        a = torch.empty(rank, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=base.weight.device))
        self.enabled = True  # off: the base projection alone (the reference policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.enabled:
            return out
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return out + update.to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, in the weight's dtype (computed in fp32)."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return (self.weight.detach().float() + delta).to(self.weight.dtype)


def _targets(model: nn.Module, kinds: list[str] | tuple[str, ...]):
    """(parent module, attribute name) of every projection the kinds name."""
    for module in model.modules():
        if isinstance(module, GatedAttention) and "attention" in kinds:
            yield from ((module, name) for name in ATTENTION_PROJECTIONS)
        elif isinstance(module, SwiGLU) and "mlp" in kinds:
            yield from ((module, name) for name in MLP_PROJECTIONS)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=("attention", "mlp"), seed: int = 0) -> list[str]:
    """Freeze every parameter of `model` and put rank-`rank` adapters on the targets' projections, in place.
    -> the adapted projections' module names. The adapters are created on each projection's device in fp32."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    names = {id(m): n for n, m in model.named_modules()}
    adapted = []
    for parent, attr in list(_targets(model, targets)):
        base = getattr(parent, attr)
        if isinstance(base, LoRALinear):
            continue
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{names[id(parent)]}.{attr} is a {type(base).__name__}: LoRA adapts float projections")
        setattr(parent, attr, LoRALinear(base, rank, alpha, generator))
        adapted.append(f"{names[id(parent)]}.{attr}")
    if not adapted:
        raise ValueError(f"no projection matches the LoRA targets {list(targets)}")
    return adapted


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model inside the block: with adapters, the frozen reference policy costs no second copy."""
    modules = lora_modules(model)
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def is_adapter_key(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


@torch.no_grad()
def merged_state_dict(model: nn.Module, adapted_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's state under the base checkpoint's names, each adapted weight replaced by W + (alpha/r) B A.
    Without adapters: the state dict itself (detached). `adapted_only`: just the adapted weights (all that an
    adapter step changes: what a copy of the model needs to follow it)."""
    merged = {f"{name}.weight": m.merged_weight() for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if adapted_only:
        return merged
    state = {}
    for key, value in model.state_dict().items():
        if not is_adapter_key(key):
            state[key] = merged.get(key, value.detach())
    return state


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if is_adapter_key(n)]


class AdapterOptimizer:
    """AdamW over the adapters, with CombinedOptimizer's interface (the trainer's schedule and checkpoints use
    either). Muon's orthogonalised update suits full hidden matrices, not the thin A and B of an adapter."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        params = [p for _, p in adapter_parameters(model)]
        if not params:
            raise ValueError("the model has no LoRA adapters to train")
        self.adamw = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for g in self.adamw.param_groups:
            g["base_lr"] = g["lr"]

    def set_lr_scale(self, scale: float) -> None:
        for g in self.adamw.param_groups:
            g["lr"] = g["base_lr"] * scale

    def step(self) -> None:
        self.adamw.step()

    def zero_grad(self) -> None:
        self.adamw.zero_grad(set_to_none=True)

    def named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.adamw}

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
