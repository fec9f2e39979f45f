"""Tensor and expert parallelism over torch.distributed, applied to the single-device model from outside.

- `sharding`: which slice of every weight a rank holds (`ShardPlan`), and the model restructured around them.
- `comm`: the group's collectives (`TPGroup`).
- `launch`: joining the process group; local worker processes.
- `executor`: rank 0's runner that sends each step to the workers, and the workers' loop.
"""
