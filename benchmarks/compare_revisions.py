"""Run one benchmark on two checkouts, alternating, to compare a change with what it replaced on the same machine.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/compare_revisions.py --before /tmp/before --after . --rounds 2 \\
        cpu_throughput.py --requests 16

Each round runs `benchmarks/<script>` of the `--before` checkout, then the `--after` one (each with its own `src`
first on PYTHONPATH), so slow and fast phases of a shared machine fall on both. Every run's last line is the
script's JSON object; the numeric leaves are collected per side and the medians printed side by side with their
ratio (after / before). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def numeric_leaves(obj, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(numeric_leaves(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numeric_leaves(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def run(checkout: str, script: str, args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(checkout), "src"))
    proc = subprocess.run([sys.executable, os.path.join(checkout, "benchmarks", script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(a.rounds):
        for side in ("before", "after"):
            runs[side].append(numeric_leaves(run(getattr(a, side), a.script, a.args, a.timeout)))
            print(f"round {r + 1}: {side} done", file=sys.stderr)
    keys = [k for k in runs["before"][0] if all(k in x for x in runs["before"] + runs["after"])]
    table = {}
    for k in keys:
        before = statistics.median(x[k] for x in runs["before"])
        after = statistics.median(x[k] for x in runs["after"])
        table[k] = {"before": round(before, 4), "after": round(after, 4),
                    "ratio": round(after / before, 3) if before else None}
        print(f"{k:60s} {before:12.4g} {after:12.4g} {table[k]['ratio']}", file=sys.stderr)
    print(json.dumps({"script": a.script, "args": a.args, "rounds": a.rounds, "medians": table}))


if __name__ == "__main__":
    main()
