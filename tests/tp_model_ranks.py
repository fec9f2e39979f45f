"""Rank functions of the tensor-parallel tests (run by `distributed_helpers.run_ranks` in spawned processes)."""

from __future__ import annotations

import torch

from trinity import TrinityForCausalLM
from trinity.config import TrinityConfig
from trinity.parallel.sharding import ShardPlan, shard_model


def sharded_logits(group, cases: list[tuple[dict, int, bool, bool]], ids: list[list[int]]) -> list:
    """For each (config, seed, expert_parallel, fused): the full random model (the same on every rank: same seed),
    cut to this rank's part, run over `ids` (whole sequences, no cache) -> logits as numpy arrays."""
    out = []
    for config, seed, expert_parallel, fused in cases:
        cfg = TrinityConfig.from_dict(config)
        model = TrinityForCausalLM.random(cfg, seed=seed).eval()
        shard_model(model, ShardPlan(cfg, group.rank, group.size, expert_parallel, group))
        if fused:
            model.fuse_projections()
        with torch.inference_mode():
            out.append(model(torch.tensor(ids)).numpy())
    return out



def checkpoint_sharded_logits(group, path: str, expert_parallel: bool, ids: list[list[int]], fused: bool = False):
    """This rank's part of a checkpoint (FP8, 4-bit), loaded sharded, run over `ids` -> logits. `fused`: with its
    projections fused for inference first (the whole-layer C kernels' stacked shared expert)."""
    model = TrinityForCausalLM.from_pretrained(
        path, dtype=torch.float32,
        shard=ShardPlan(TrinityConfig.from_pretrained(path), group.rank, group.size, expert_parallel, group))
    if fused:
        model.fuse_projections()
    with torch.inference_mode():
        return model(torch.tensor(ids)).numpy()
