"""The readable form of a `trinity plan` result: a few rich tables (the numbers come from ops/plan.py)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .plan import PlanInputs


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f} GB"


def _bytes(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} B"


def _tokens(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:,.1f}{unit}"
    return f"{x:,.0f}"


def _section(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def print_plan(plan: dict[str, Any], inputs: PlanInputs, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    m, w, kv, gpu, fit, dec, cost = (plan[k] for k in ("model", "weights", "kv_cache", "gpu", "fit", "decode", "cost"))
    console.print(f"[bold]trinity plan[/bold] · {m['name']} ({m['total_params'] / 1e9:.2f}B total, "
                  f"{m['active_params'] / 1e9:.2f}B active) · {w['dtype']} weights, {kv['dtype']} KV · "
                  f"{gpu['count']}x {gpu['name']} ({gpu['memory_gb']:g} GB, {gpu['bandwidth_tbps']:g} TB/s)")

    groups = Table(title="Weights", title_justify="left")
    groups.add_column("group")
    groups.add_column("params", justify="right")
    groups.add_column("bytes", justify="right")
    for name, g in w["groups"].items():
        if g["params"]:
            groups.add_row(name, f"{g['params']:,}", _bytes(g["bytes"]))
    groups.add_row("[bold]total[/bold]", f"[bold]{m['total_params']:,}[/bold]", f"[bold]{_bytes(w['bytes'])}[/bold]")
    console.print(groups)

    console.print(_section("KV cache", [
        ("full pool", f"{_bytes(kv['full_bytes_per_token'])} per token ({m['full_layers']} layers, every token)"),
        ("sliding pool", f"{_bytes(kv['sliding_bytes_per_token'])} per token ({m['sliding_layers']} layers), "
                         f"capped at {_bytes(kv['sliding_bytes_cap_per_sequence'])} per sequence "
                         f"({kv['sliding_window']} tokens)"),
        (f"one {kv['max_model_len']:,}-token sequence",
         f"{_bytes(kv['bytes_per_sequence'])} (full {_bytes(kv['full_bytes_per_sequence'])} + sliding "
         f"{_bytes(kv['sliding_bytes_per_sequence'])})"),
    ]))

    tp = fit["tensor_parallel_size"]
    if fit["fits"]:
        verdict = (f"[green]fits[/green] with TP={tp}: {fit['replicas']} replica(s)"
                   + (f", {fit['idle_gpus']} GPU(s) idle" if fit["idle_gpus"] else ""))
        conc = (f"{fit['concurrency']} requested, {fit['max_sequences']} max-length sequences fit "
                + ("[green](ok)[/green]" if fit["concurrency_fits"] else "[yellow](the rest would wait)[/yellow]"))
        rows = [("verdict", verdict), ("weights per GPU", _gb(fit["weights_gb_per_gpu"])),
                ("KV budget per GPU", _gb(fit["kv_budget_gb_per_gpu"])),
                ("one sequence per GPU", _gb(fit["kv_gb_per_sequence_per_gpu"])), ("concurrency", conc),
                ("headroom per GPU", _gb(fit["headroom_gb_per_gpu"]) + " after the requested sequences")]
    else:
        rows = [("verdict", f"[red]does not fit[/red] on {gpu['count']}x {gpu['name']}: at best (TP={tp}) "
                            f"{_gb(fit['shortfall_gb_per_gpu'])} short per GPU, {_gb(fit['shortfall_gb'])} in all"),
                ("weights per GPU", _gb(fit["weights_gb_per_gpu"])),
                ("room per GPU", f"{_gb(fit['kv_budget_gb_per_gpu'])} left for KV, "
                                 f"{_gb(fit['kv_gb_per_sequence_per_gpu'])} needed for one sequence")]
    tried = ", ".join(f"TP={t['tensor_parallel_size']} " + ("fits" if t.get("fits") else
                      ("too small" if "fits" in t else "invalid")) for t in fit["tried"])
    rows.append(("tried", tried or "-"))
    console.print(_section("Fit", rows))

    if dec:
        rows = [("batch 1", f"{dec['batch1_tokens_per_s']:,.0f} tok/s per replica "
                            f"({_bytes(dec['batch1_bytes_per_token'])} read per token)")]
        if dec["batch_per_replica"] > 1:
            rows.append((f"batch {dec['batch_per_replica']}",
                         f"{dec['batch_tokens_per_s_per_replica']:,.0f} tok/s per replica "
                         f"({dec['expected_experts_per_layer']:.1f} experts per layer, "
                         f"{_bytes(dec['batch_bytes_per_step'])} per step)"))
        rows.append(("whole node", f"{dec['total_tokens_per_s']:,.0f} tok/s"))
        console.print(_section("Decode upper bounds (memory bandwidth, no efficiency factor)", rows))
    if cost:
        rows = [("GPU cost", f"${cost['usd_per_hour']:,.2f}/h, ${cost['monthly_usd']:,.0f}/month "
                             f"({cost['hours_per_month']:g} h)"),
                ("cost per 1M output tokens", f"${cost['usd_per_mtok_output']:,.2f} at the bound (a lower bound)"),
                ("monthly capacity", f"{_tokens(cost['monthly_capacity_tokens'])} output tokens at the bound")]
        if cost["api_usd_per_mtok"] is not None:
            api = cost["api_usd_per_mtok"]
            if cost["beats_api"]:
                note = (f"{_tokens(cost['break_even_tokens_per_month'])} output tokens/month "
                        f"({cost['break_even_utilization']:.0%} of capacity); below that the API is cheaper")
            else:
                note = "none: even at full use this costs more per token than the API"
            rows.append((f"break-even vs ${api:g}/M", note))
        console.print(_section("Cost", rows))
