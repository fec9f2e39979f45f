"""New weights copied into a served model in place (`LLMEngine.update_weights`, for GRPO's rollouts).

In place, so that everything built on the weights follows them: the fused projections' concatenated weights (the
parameters are views of them), copies keyed on a tensor's version (packed CPU weights, the router's fp32 copy) and
CUDA graphs (they read the same storage). Weights arrive whole, under the model's own names; a tensor-parallel
rank's model (one carrying `shard_plan`) takes its own slice of each, so every rank applies the same list.
"""

from __future__ import annotations

import torch


def weight_targets(model) -> dict[str, torch.Tensor]:
    """The tensors an update may name: parameters (tied ones under each name) and buffers."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    return targets


def check_weights(model, pairs: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse an update naming a tensor the model lacks or giving another shape, before anything is copied (a
    half-applied update would serve a mix of two models)."""
    targets, cut = weight_targets(model), _cut_shapes(model)
    for name, value in pairs:
        target = targets.get(name)
        if target is None:
            raise KeyError(f"update_weights: the served model has no tensor {name!r}")
        want = tuple(cut.get(name) or target.shape)
        if tuple(value.shape) != want:
            raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, the served model's {want}")


def copy_weights(model, pairs) -> int:
    """Copy each (name, whole tensor) into the model, this rank's slice of it when the model is sharded. `pairs`
    may be a generator (a worker receives the tensors one at a time). -> the number of tensors copied."""
    targets, cut, plan = weight_targets(model), _cut_shapes(model), getattr(model, "shard_plan", None)
    copied = 0
    with torch.no_grad():
        for name, value in pairs:
            split = plan.split(name) if name in cut else None
            targets[name].copy_(split.take(value) if split is not None else value)
            copied += 1
    return copied


def _cut_shapes(model) -> dict[str, tuple]:
    """Name -> full shape of the parameters a tensor-parallel plan cut (none on one device; buffers stay whole on
    every rank); a tied head is cut as the embedding is."""
    plan = getattr(model, "shard_plan", None)
    if plan is None:
        return {}
    shapes = dict(plan.full_shapes)
    if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes
