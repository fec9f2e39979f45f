"""PNG charts of a bench run, after seed 000's figures: throughput over time, latency, KV cache usage.

matplotlib is imported here only, with the Agg backend: charts render without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .bench_client import RequestRecord


def write_charts(result: dict, records: Sequence[RequestRecord], out_dir: Path) -> list[Path]:
    """Writes the charts that have data into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never try to open a window
    import matplotlib.pyplot as plt

    paths = [_throughput(plt, result, out_dir / "throughput.png"),
             _latency(plt, result, records, out_dir / "latency.png")]
    if result["metrics"]["samples"]:
        paths.append(_kv_cache(plt, result, out_dir / "kv_cache.png"))
    if result.get("levels"):
        paths.append(_sweep(plt, result, out_dir / "sweep.png"))
    return paths


def _title(result: dict, what: str) -> str:
    return f"{what} — {result['model']} ({result['mode']})"


def _mark_levels(ax, result: dict) -> None:
    """Sweep: a line and a label where each concurrency level starts."""
    for level in result.get("levels") or ():
        ax.axvline(level["t0"], color="0.7", linewidth=0.8, linestyle=":")
        ax.annotate(f"c={level['concurrency']}", (level["t0"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(2, -10), textcoords="offset points", fontsize=8, color="0.4")


def _finish_two_axes(plt, fig, ax, ax2, result: dict, what: str, path: Path) -> Path:
    """Sweep-level marks, one legend for both y axes, the title; write the PNG and free the figure."""
    _mark_levels(ax, result)
    lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title(_title(result, what))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput(plt, result: dict, path: Path) -> Path:
    tp = result["throughput"]
    out = tp["output_tokens_per_s_series"]
    prompt = tp["prompt_tokens_per_s_series"]
    # window edges; the last window ends with the run and may be shorter than the others
    edges = [result["t0"] + i * tp["window_s"] for i in range(len(out))] + [result["t0"] + result["duration_s"]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.stairs(out, edges, color="tab:blue", linewidth=1.5, label="generation tok/s")
    ax.axhline(tp["output_tokens_per_s"], color="tab:blue", linestyle="--", linewidth=1,
               label=f"average {tp['output_tokens_per_s']:.1f} tok/s")
    ax.axhline(tp["peak_output_tokens_per_s"], color="tab:red", linestyle=":", linewidth=1,
               label=f"peak {tp['peak_output_tokens_per_s']:.1f} tok/s (best 1 s)")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()  # prompt ingest is often 10-100x larger than generation: its own axis
    ax2.stairs(prompt, edges, color="tab:orange", alpha=0.6, label="prompt ingest tok/s")
    ax2.set_ylabel("prompt tokens / s")
    ax2.set_ylim(bottom=0)
    return _finish_two_axes(plt, fig, ax, ax2, result, "Throughput", path)


def _latency(plt, result: dict, records: Sequence[RequestRecord], path: Path) -> Path:
    ok = sorted((r for r in records if r.ok and r.ttft is not None), key=lambda r: r.end)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    if ok:
        ends = [r.end for r in ok]
        for values, name, color in (([r.ttft for r in ok], "TTFT", "tab:green"),
                                    ([r.e2e for r in ok], "E2E", "tab:purple")):
            cumulative = [sum(values[:i + 1]) / (i + 1) for i in range(len(values))]
            left.scatter(ends, values, s=10, color=color, alpha=0.35, label=f"{name} per request")
            left.plot(ends, cumulative, color=color, linewidth=1.6, label=f"{name} cumulative average")
        _mark_levels(left, result)
    left.set_xlabel("request finished at (s since start)")
    left.set_ylabel("seconds")
    left.set_ylim(bottom=0)
    left.legend(loc="upper left", fontsize=8)
    left.set_title(_title(result, "Latency"))

    lat = [(name, [v * 1e3 for v in values]) for name, values in (
        ("TTFT", [r.ttft for r in ok]), ("TPOT", [r.tpot for r in ok if r.tpot is not None]),
        ("ITL", [g for r in ok for g in r.itls]), ("E2E", [r.e2e for r in ok]))]
    lat = [(name, values) for name, values in lat if values]
    if lat:
        right.boxplot([values for _, values in lat], showfliers=True,
                      whis=(1, 99))  # whiskers at p1/p99, the percentiles the summary reports
        right.set_xticks(range(1, len(lat) + 1), [name for name, _ in lat])
        right.set_yscale("log")
    right.set_ylabel("milliseconds (log)")
    right.set_title("Distribution (whiskers: p1-p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _kv_cache(plt, result: dict, path: Path) -> Path:
    series = result["metrics"]["series"]
    ts = [s["t"] for s in series]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    pools = sorted({pool for s in series for pool in s["kv_usage"]})
    for pool in pools:
        points = [(s["t"], 100 * s["kv_usage"][pool]) for s in series if pool in s["kv_usage"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"KV usage ({pool} pool)")
    ax.set_ylabel("KV cache blocks in use (%)")
    ax.set_xlabel("time since start (s)")
    ax.set_ylim(0, 105)
    ax2 = ax.twinx()
    for key, style in (("running", "-"), ("waiting", "--")):
        if any(s[key] is not None for s in series):
            ax2.plot(ts, [s[key] if s[key] is not None else float("nan") for s in series], color="0.3",
                     linestyle=style, linewidth=1, label=f"requests {key}")
    ax2.set_ylabel("requests")
    ax2.set_ylim(bottom=0)
    return _finish_two_axes(plt, fig, ax, ax2, result, "KV cache utilisation", path)


def _sweep(plt, result: dict, path: Path) -> Path:
    levels = result["levels"]
    cs = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(cs, [lv["throughput"]["output_tokens_per_s"] for lv in levels], marker="o", label="average")
    left.plot(cs, [lv["throughput"]["peak_output_tokens_per_s"] for lv in levels], marker="^", label="peak (1 s)")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrency")
    left.set_ylabel("generated tokens / s")
    left.legend(fontsize=8)
    left.set_title(_title(result, "Throughput by concurrency"))
    for key, marker in (("ttft", "o"), ("tpot", "s"), ("e2e", "^")):
        ys = [lv["latency_s"][key]["median"] for lv in levels]
        if any(y is not None for y in ys):
            right.plot(cs, [y if y is not None else float("nan") for y in ys], marker=marker, label=f"{key} median")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("concurrency")
    right.set_ylabel("seconds (log)")
    right.legend(fontsize=8)
    right.set_title("Latency by concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
