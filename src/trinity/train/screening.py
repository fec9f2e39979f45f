"""Which tasks GRPO trains on after the starting policy has answered each one greedily (`solved_keep`).

A group whose samples all score the same carries no gradient, so most of a policy's solved tasks are wasted
rollouts: every task it gets wrong stays, and a seeded share of those it gets right (DAPO-style difficulty
filtering, done once). Filtering alone changes the mix of task families, though: the families the policy is worst
at crowd the others out, and RL then learns a prior instead of a skill (issue 24's second run kept a third
gen_tool_none tasks and learnt to refuse calls). `keep_family_shares` redraws the kept tasks so that each family
keeps the share of the rounds it had in the task file: within a family, the hard tasks still dominate."""

from __future__ import annotations

import random
from collections import Counter, defaultdict


def screened_task_ids(solved: list[bool], families: list[str], solved_keep: float, seed: int,
                      keep_family_shares: bool) -> list[int]:
    """Task indices to train on (a task may appear more than once when its family is short of kept tasks)."""
    rng = random.Random(seed)
    kept = [i for i, ok in enumerate(solved) if not ok or rng.random() < solved_keep]
    if not keep_family_shares or not kept:
        return kept
    by_family: dict[str, list[int]] = defaultdict(list)
    for i in kept:
        by_family[families[i]].append(i)
    share = Counter(families)  # each family's size in the task file
    total = sum(share[f] for f in by_family)  # families with nothing kept drop out of the shares
    out: list[int] = []
    for family in sorted(by_family):
        pool = by_family[family]
        rng.shuffle(pool)
        count = max(1, round(len(kept) * share[family] / total))
        out.extend(pool[k % len(pool)] for k in range(count))
    return out
