"""GRPO's curves at the end of a run: mean reward and KL per step, from the run's log.jsonl.

A PNG (`grpo_curves.png`) when matplotlib is importable (Agg backend: no display needed), else the same two
series as `grpo_curves.csv`."""

from __future__ import annotations

import csv
import os

from ..jsonl import read_jsonl


def write_curves(log_path: str, out_dir: str) -> str | None:
    """-> the file written (None when the log is empty)."""
    records = read_jsonl(log_path) if os.path.exists(log_path) else []
    if not records:
        return None
    steps = [r["step"] for r in records]
    reward = [r["reward_mean"] for r in records]
    kl = [r["kl"] for r in records]
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        path = os.path.join(out_dir, "grpo_curves.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "reward_mean", "kl"])
            writer.writerows(zip(steps, reward, kl))
        return path
    # Figure + Agg canvas rather than pyplot: no global backend switch inside a library call
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_reward, ax_kl = fig.subplots(1, 2)
    ax_reward.plot(steps, reward, marker="o", markersize=3)
    ax_reward.set(title="mean reward", xlabel="step", ylabel="reward")
    ax_kl.plot(steps, kl, marker="o", markersize=3, color="tab:red")
    ax_kl.set(title="KL to the reference (k3)", xlabel="step", ylabel="KL")
    for ax in (ax_reward, ax_kl):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "grpo_curves.png")
    fig.savefig(path, dpi=100)
    return path
