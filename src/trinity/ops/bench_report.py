"""The rich tables `trinity bench` prints at the end of a run."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    ms = value * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"  # three digits are enough to compare runs


def print_report(result: dict, console: Console) -> None:
    console.print(_summary_table(result))
    if result.get("levels"):
        console.print(_sweep_table(result))


def _summary_table(result: dict) -> Table:
    req, tp = result["requests"], result["throughput"]
    table = Table(title=f"trinity bench · {result['mode']} · {result['model']} @ {result['base_url']}",
                  show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    table.add_row("duration", f"{result['duration_s']:.1f} s")
    table.add_row("requests", f"{req['total']} sent · {req['succeeded']} ok · {req['failed']} failed")
    if result["errors"]:
        table.add_row("errors by kind", ", ".join(f"{kind}: {n}" for kind, n in result["errors"].items()))
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "inter-token latency"), ("e2e", "end-to-end")):
        d = result["latency_s"][key]
        table.add_row(f"{name} (ms)", f"mean {_ms(d['mean'])} · median {_ms(d['median'])} · p90 {_ms(d['p90'])} · "
                                      f"p99 {_ms(d['p99'])}")
    cached = "" if tp.get("cached_prompt_tokens") is None else f", {tp['cached_prompt_tokens']:,} of it cached"
    table.add_row("output tokens", f"{tp['output_tokens']:,} (prompt {tp['prompt_tokens']:,}{cached})")
    table.add_row("output tok/s", f"average {tp['output_tokens_per_s']:.1f} · under load "
                                  f"{tp['output_tokens_per_s_under_load']:.1f} · peak (1 s) "
                                  f"{tp['peak_output_tokens_per_s']:.1f}")
    table.add_row("requests/s", f"{tp['requests_per_s']:.2f}")
    if result["goodput"]:
        g = result["goodput"]
        limits = ", ".join(f"{k}<={v:g}s" for k, v in g["slo_s"].items())
        table.add_row("goodput", f"{g['requests']} requests ({100 * g['fraction']:.1f}%) · "
                                 f"{g['requests_per_s']:.2f}/s within {limits}")
    m = result["metrics"]
    if m["available"]:
        kv = ", ".join(f"{pool} mean {100 * v['mean']:.1f}% max {100 * v['max']:.1f}%"
                       for pool, v in m["kv_cache_usage"].items())
        table.add_row("KV cache", kv or "-")
        table.add_row("queue", f"running max {m['running_max']} · waiting max {m['waiting_max']} "
                               f"({m['samples']} scrapes)")
    else:
        table.add_row("/metrics", m["note"] or "not scraped")
    if result.get("charts"):
        table.add_row("charts", ", ".join(result["charts"]))
    return table


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _sweep_table(result: dict) -> Table:
    headers = ("conc.", "ok", "err", "tok/s", "peak", "TTFT p50", "TTFT p99", "TPOT p50", "ITL p99", "E2E p50",
               "good")
    rows = []
    for lv in result["levels"]:
        lat, tp, req = lv["latency_s"], lv["throughput"], lv["requests"]
        good = "-" if not lv["goodput"] else f"{100 * lv['goodput']['fraction']:.0f}%"
        rows.append((str(lv["concurrency"]), str(req["succeeded"]), str(req["failed"]),
                     _rate(tp["output_tokens_per_s"]), _rate(tp["peak_output_tokens_per_s"]),
                     _ms(lat["ttft"]["median"]), _ms(lat["ttft"]["p99"]), _ms(lat["tpot"]["median"]),
                     _ms(lat["itl"]["p99"]), _ms(lat["e2e"]["median"]), good))
    table = Table(title="per concurrency level (latencies in ms)", title_justify="left", box=box.SIMPLE_HEAD)
    for i, name in enumerate(headers):
        # numbers keep their width (headers wrap instead), so an 80-column terminal never cuts a value
        table.add_column(name, justify="right", min_width=max(len(row[i]) for row in rows))
    for row in rows:
        table.add_row(*row)
    return table
