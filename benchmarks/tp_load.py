"""Peak memory of a tensor-parallel rank loading its part of a checkpoint: each rank should hold ~1/tp of it.

    .venv/bin/python benchmarks/tp_load.py                      # tp 1, 2, 4; experts split tensor-parallel
    .venv/bin/python benchmarks/tp_load.py --expert-parallel    # experts whole, split over the ranks

Writes a random Trinity-shaped checkpoint (~360 MB in fp32, in 40 MB shards, experts per expert as released),
then, for each tp and each rank, loads that rank's part (`TrinityForCausalLM.from_pretrained(..., shard=plan)`) in
a fresh process and records its peak RSS (`ru_maxrss`: anonymous and file-mapped pages alike) above its RSS before
the load, twice: in a process that has only run `import torch, trinity` ("cold"), and in one that first loaded a
tiny checkpoint (the target's figure): a process's first load faults in ~6.5 MB of library code (libtorch's copy
kernels, safetensors) that stays resident, a fixed cost that is not weights. No process group: loading does not
communicate, so ranks run one at a time. The checkpoint is written in a process of its own: a child starts with its
parent's `ru_maxrss` (Linux keeps it across fork and exec), so the parent must stay small. Prints a table, then one
JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# ~90.6M parameters (363 MB in fp32): 5 MoE layers of 24 experts (3/4 of the weights) and an untied 32000-row
# vocabulary; every split size divides by 2 and 4 (heads 8, KV heads 4, experts 24, widths 1536 and 256).
OVERRIDES = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                 num_hidden_layers=6, num_dense_layers=1, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                 num_experts=24, num_experts_per_tok=2)
TPS = (1, 2, 4)
SLACK = 0.10  # the target: a rank's peak extra memory <= (1 + SLACK) * checkpoint bytes / tp

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--expert-parallel", action="store_true", help="routed experts whole, split over the ranks")
parser.add_argument("--max-shard-size", default="40MB", help="the checkpoint's shard size (default 40MB)")
parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
# the processes the parent runs: writing the checkpoint, one rank's load
parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
parser.add_argument("--tp", type=int, default=None, help=argparse.SUPPRESS)
parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
args = parser.parse_args()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def vm_status() -> dict[str, int]:
    """This process's resident memory now, in bytes (VmRSS, and its anonymous and file-mapped parts)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def load_rank(folder: str, rank: int, tp: int, expert_parallel: bool, cold: bool) -> dict:
    """One rank's sharded load, measured in this (fresh) process; unless `cold`, after a warm-up load."""
    import resource

    import torch
    import trinity
    import trinity.model.checkpoint  # noqa: F401  (the loader's code: imported, not yet run)
    from trinity.parallel.sharding import ShardPlan

    def sharded_load(path: str, rank: int, tp: int):
        plan = ShardPlan(trinity.TrinityConfig.from_pretrained(path), rank, tp, expert_parallel)
        return trinity.TrinityForCausalLM.from_pretrained(path, dtype=torch.float32, shard=plan)

    torch.set_num_threads(2)
    if not cold:
        sharded_load(os.path.join(folder, "warmup"), 0, 2)  # the code a load runs, faulted in (the model dropped)
    base = vm_status()
    start = time.perf_counter()
    model = sharded_load(os.path.join(folder, "ckpt"), rank, tp)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    after = vm_status()
    return dict(tp=tp, rank=rank, base_rss=base["VmRSS"], peak_rss=peak, peak_extra=peak - base["VmRSS"],
                vm_hwm_extra=after["VmHWM"] - base["VmRSS"],  # the same peak from /proc, as a cross-check
                local_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                anon_after=after["RssAnon"] - base["RssAnon"], file_after=after["RssFile"] - base["RssFile"],
                load_s=round(seconds, 3))


def write_checkpoints(folder: str) -> None:
    """The random model saved in shards, and the tiny one of the warm-up (run in a process of its own)."""
    import torch

    from trinity import TrinityForCausalLM, preset

    torch.set_num_threads(2)
    TrinityForCausalLM.random(preset("tiny", **OVERRIDES), seed=0).save_pretrained(
        os.path.join(folder, "ckpt"), max_shard_size=args.max_shard_size)
    TrinityForCausalLM.random(preset("tiny"), seed=0).save_pretrained(os.path.join(folder, "warmup"))


def run_self(*flags: str) -> str:
    cmd = [sys.executable, os.path.abspath(__file__), "--max-shard-size", args.max_shard_size, *flags]
    if args.expert_parallel:
        cmd.append("--expert-parallel")
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout


def run_rank(folder: str, rank: int, tp: int) -> dict:
    """The rank's figures after a warm-up, with the cold process's peak beside them."""
    def run(*flags: str) -> dict:
        return json.loads(run_self("--path", folder, "--rank", str(rank), "--tp", str(tp), *flags)
                          .strip().splitlines()[-1])

    r = run()
    r["peak_extra_cold"] = run("--cold")["peak_extra"]
    return r


def main(folder: str) -> None:
    path = os.path.join(folder, "ckpt")
    start = time.perf_counter()
    run_self("--write", folder)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        nbytes = json.load(f)["metadata"]["total_size"]
    shards = sum(f.endswith(".safetensors") for f in os.listdir(path))
    print(f"checkpoint: {nbytes / 1e6:.1f} MB of tensors in {shards} shards (written in "
          f"{time.perf_counter() - start:.1f} s); experts {'expert' if args.expert_parallel else 'tensor'}-parallel")
    print(f"{'tp':>3} {'rank':>4} {'local MB':>9} {'1/tp MB':>8} {'peak extra MB':>14} {'x 1/tp':>7} "
          f"{'cold MB':>8} {'x 1/tp':>7} {'anon after':>10} {'file after':>10} {'load s':>7}  target (cold)")
    ranks = []
    for tp in TPS:
        for rank in range(tp):
            r = run_rank(folder, rank, tp)
            share = nbytes / tp
            r["met"] = r["peak_extra"] <= (1 + SLACK) * share
            r["met_cold"] = r["peak_extra_cold"] <= (1 + SLACK) * share
            r["peak_over_share"] = round(r["peak_extra"] / share, 3)
            r["peak_cold_over_share"] = round(r["peak_extra_cold"] / share, 3)
            ranks.append(r)
            print(f"{tp:>3} {rank:>4} {r['local_bytes'] / 1e6:>9.1f} {share / 1e6:>8.1f} "
                  f"{r['peak_extra'] / 1e6:>14.1f} {r['peak_over_share']:>7.3f} "
                  f"{r['peak_extra_cold'] / 1e6:>8.1f} {r['peak_cold_over_share']:>7.3f} "
                  f"{r['anon_after'] / 1e6:>10.1f} {r['file_after'] / 1e6:>10.1f} {r['load_s']:>7.2f}  "
                  f"{'met' if r['met'] else 'MISSED'} ({'met' if r['met_cold'] else 'missed'})")
    print(json.dumps({"benchmark": "tp_load", "checkpoint_bytes": nbytes, "shards": shards,
                      "expert_parallel": args.expert_parallel, "dtype": "float32", "ranks": ranks,
                      "target": f"<= 1/tp of the weights + {SLACK:.0%}",
                      "all_met": all(r["met"] for r in ranks), "all_met_cold": all(r["met_cold"] for r in ranks)}))


if __name__ == "__main__":
    if args.write:
        write_checkpoints(args.write)
    elif args.rank is not None:
        print(json.dumps(load_rank(args.path, args.rank, args.tp, args.expert_parallel, args.cold)))
    elif args.dir:
        main(args.dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
