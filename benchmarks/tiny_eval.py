"""Evaluate a model on the synthetic held-out tasks through the real server and the `openai` client.

    python benchmarks/tiny_eval.py --model src/trinity/assets/trinity-tiny --heldout runs/tiny/data/heldout.jsonl
    python benchmarks/tiny_eval.py --base-url http://127.0.0.1:8000/v1 --heldout ... --limit 50

Without --base-url it starts `trinity serve MODEL` on a free port of 127.0.0.1 with the trinity reasoning parser,
the hermes tool-call parser and auto tool choice, and stops it at the end. Every task is one chat request at
temperature 0 (with the task's `tools` when it has any); the reply is scored by `trinity.synthetic.scoring`.
Constrained decoding is used only where a task asks for it the way a client would: a `tool_choice` of
"required" or a named tool, or a `response_format` (the server constrains the answer after `</think>`); a forced
call that max_tokens cut short is a wrong reply, not a failed request. Whether the reasoning closed is read from
the generated tokens themselves (`logprobs: true`): the reasoning parser reports an unclosed block as all
reasoning and no content, which a reply with an empty answer would look like too.

The issues' targets: tool calls >= 95% right (name and arguments), arithmetic exact >= 80%, `</think>` closed
>= 99% of all replies, JSON valid >= 95%; unseen tools (names and domains never in training, see
trinity/synthetic/tool_domains.py) >= 90% right tool with right arguments (parallel calls all right); forced
calls (tool_choice required / named) >= 95% right. Besides the targets: `unseen_right_tool`, the unseen tools'
single calls that chose the right tool whatever their arguments (a wrong choice of tool and wrong values are two
failures to work on apart); `tools_listed`, on the tool-listing tasks ("Which tools do you have?", families
tool_list and unseen_tool_list, weight 0 unless a mix names them), the offered tools the reply names at their
place: whether the model can copy from the tool list at all. Prints a table, then one JSON object as the last
line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from trinity.jsonl import read_jsonl
from trinity.synthetic.conversations import HELDOUT_FAMILIES
from trinity.synthetic.scoring import Reply, Score, score

ROOT = Path(__file__).resolve().parents[1]
Task = dict[str, Any]


def _unseen(task: Task) -> bool:
    return task["family"] in HELDOUT_FAMILIES


def _forced(task: Task) -> bool:
    return "tool_choice" in task


def _checks(*checks: str, unseen: bool = False, forced: bool = False) -> Callable[[Task], bool]:
    """Tasks of these checks, in the unseen-tools split or not, with a forced tool_choice or not."""
    return lambda t: t["check"] in checks and _unseen(t) == unseen and _forced(t) == forced


# metric -> (which tasks it covers, target); think_closed covers every task
TARGETS: dict[str, tuple[Callable[[Task], bool], float]] = {
    "tool_call_accuracy": (_checks("tool_call"), 0.95),
    "arithmetic_exact": (_checks("arithmetic"), 0.80),
    "think_closed": (lambda t: True, 0.99),
    "json_valid": (lambda t: t["check"] == "json", 0.95),
    "unseen_tool_accuracy": (_checks("tool_call", "tool_calls", unseen=True), 0.90),
    "forced_call_accuracy": (_forced, 0.95),
}
EXTRA_METRICS: dict[str, Callable[[Task], bool]] = {
    "no_tool_accuracy": _checks("no_tool"),  # tools offered but not needed: no call, right answer
    "unseen_no_tool": _checks("no_tool", unseen=True),  # unseen tools offered, none fits
    "parallel_calls": lambda t: t["check"] == "tool_calls",  # two calls in one turn, both right
    "answer_contains": lambda t: t["check"] == "contains",  # answers from a tool result, capitals, definitions, ...
    "json_schema_reasoned": lambda t: "response_format" in t,  # think first, then JSON under the schema
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", required=True, help="heldout.jsonl from `python -m trinity.synthetic`")
    p.add_argument("--model", default=None, help="checkpoint folder to serve (default: the built-in model)")
    p.add_argument("--base-url", default=None, help="use a running server instead of starting one")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for `trinity serve` (repeat), e.g. --server-arg=--device=cpu")
    p.add_argument("--out", default=None, help="write one JSON line per task (reply and score) here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m trinity serve` in a subprocess, with the parsers the evaluation needs."""

    def __init__(self, model: str | None, extra: list[str], startup_timeout: float):
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="tiny-eval-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "trinity", "serve", *([model] if model else []), "--host", "127.0.0.1",
               "--port", str(self.port), "--reasoning-parser", "trinity", "--tool-call-parser", "hermes",
               "--enable-auto-tool-choice", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            self._wait(startup_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; its log:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:  # 503 while loading; the reason when loading failed
                message = _error_message(e)
                if "failed to load" in message:
                    raise RuntimeError(f"{message}; the server's log:\n{self.log_text()}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server was not healthy after {timeout:.0f} s; its log:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read())["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


# ---------------------------------------------------------------------------------------------- requests
def ask(client: openai.OpenAI, model: str, task: dict[str, Any], max_tokens: int) -> Reply:
    kwargs: dict[str, Any] = {"model": model, "messages": task["prompt"], "temperature": 0,
                              "max_tokens": max_tokens, "logprobs": True}
    if task.get("tools"):
        kwargs["tools"] = task["tools"]
    for field in ("tool_choice", "response_format"):  # what a client asking for a forced call or JSON sends
        if field in task:
            kwargs[field] = task[field]
    try:
        response = client.chat.completions.create(**kwargs)
    except openai.BadRequestError as e:
        if "tool_choice" in task and _cut_short(e):  # the model did not finish its forced call within max_tokens:
            return Reply(None, think_closed=False)  # a wrong answer (as a reply cut by length), not a failed request
        return Reply(None, error=f"{type(e).__name__}: {e}")
    except openai.OpenAIError as e:  # one failed request is one failed task, never the whole run
        return Reply(None, error=f"{type(e).__name__}: {e}")
    choice = response.choices[0]
    message = choice.message
    extra = message.model_extra or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    if choice.logprobs is not None and choice.logprobs.content is not None:
        closed = "</think>" in "".join(t.token for t in choice.logprobs.content)
    else:  # a server without logprobs: an answer or a call after the reasoning means it closed
        closed = choice.finish_reason != "length" and bool(message.content or calls)
    return Reply(message.content, reasoning, calls, closed)


def _cut_short(e: openai.BadRequestError) -> bool:
    """The server's 400 for a forced tool call that max_tokens (or the request's stops) ended before it was
    complete (serve/chat.py): code tool_call_incomplete, or the max_tokens parameter named."""
    return getattr(e, "code", None) == "tool_call_incomplete" or getattr(e, "param", None) == "max_tokens"


# ---------------------------------------------------------------------------------------------- scoring
def summarise(tasks: list[dict[str, Any]], scores: list[Score]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for name, (covers, target) in TARGETS.items():
        picked = [s for t, s in zip(tasks, scores) if covers(t)]
        hits = sum(s.think_closed if name == "think_closed" else s.passed for s in picked)
        value = hits / len(picked) if picked else None
        metrics[name] = {"value": value, "n": len(picked), "target": target,
                         "met": value is not None and value >= target}
    for name, covers in EXTRA_METRICS.items():
        picked = [s for t, s in zip(tasks, scores) if covers(t)]
        metrics[name] = {"value": sum(s.passed for s in picked) / len(picked) if picked else None, "n": len(picked)}
    # of the unseen tools' single calls, those that chose the right tool (with right or wrong arguments)
    chosen = [s.right_tool for t, s in zip(tasks, scores) if t["check"] == "tool_call" and _unseen(t)]
    metrics["unseen_right_tool"] = {"value": sum(chosen) / len(chosen) if chosen else None, "n": len(chosen)}
    # of the tools that listing tasks offered, those the reply names at their place (a long-range copy)
    offered = sum(len(t["expected"]["names"]) for t in tasks if "names" in t["expected"])
    listed = sum(s.listed or 0 for t, s in zip(tasks, scores) if "names" in t["expected"])
    metrics["tools_listed"] = {"value": listed / offered if offered else None, "n": offered}
    exact = [s.exact for t, s in zip(tasks, scores) if t["check"] == "json"]
    metrics["json_exact"] = {"value": sum(map(bool, exact)) / len(exact) if exact else None, "n": len(exact)}
    families: dict[str, list[Score]] = defaultdict(list)
    for t, s in zip(tasks, scores):
        families[t["family"]].append(s)
    by_family = {f: {"n": len(ss), "passed": sum(s.passed for s in ss) / len(ss),
                     "think_closed": sum(s.think_closed for s in ss) / len(ss)} for f, ss in sorted(families.items())}
    return {"metrics": metrics, "by_family": by_family}


def print_table(summary: dict[str, Any]) -> None:
    def pct(v: float | None) -> str:
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    print(f"{'metric':<20} {'n':>5} {'value':>7} {'target':>7}  met")
    for name, m in summary["metrics"].items():
        target = f"{100 * m['target']:5.0f}%" if "target" in m else "      "
        met = ("yes" if m["met"] else "NO") if "met" in m else ""
        print(f"{name:<20} {m['n']:>5} {pct(m['value']):>7} {target:>7}  {met}")
    print(f"\n{'family':<20} {'n':>5} {'passed':>7} {'closed':>7}")
    for family, f in summary["by_family"].items():
        print(f"{family:<20} {f['n']:>5} {pct(f['passed']):>7} {pct(f['think_closed']):>7}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    tasks = read_jsonl(args.heldout)
    tasks = tasks[:args.limit] if args.limit is not None else tasks
    if not tasks:
        raise ValueError(f"no tasks in {args.heldout}")
    server = None if args.base_url else Server(args.model, args.server_arg, args.startup_timeout)
    started = time.perf_counter()
    try:
        client = openai.OpenAI(base_url=args.base_url or server.base_url, api_key=args.api_key,
                               timeout=args.timeout, max_retries=0)
        model = client.models.list().data[0].id
        with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
            replies = list(pool.map(lambda t: ask(client, model, t, args.max_tokens), tasks))
    finally:
        if server is not None:
            server.stop()
    wall = time.perf_counter() - started
    scores = [score(t, r) for t, r in zip(tasks, replies)]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for t, r, s in zip(tasks, replies, scores):
                f.write(json.dumps({"id": t["id"], "family": t["family"], "check": t["check"], "passed": s.passed,
                                    "think_closed": s.think_closed, "right_tool": s.right_tool,
                                    "detail": s.detail, "content": r.content,
                                    "reasoning": r.reasoning, "tool_calls": r.tool_calls, "error": r.error}) + "\n")
    summary = summarise(tasks, scores)
    errors = [r.error for r in replies if r.error]
    return {"model": model, "tasks": len(tasks), "wall_s": round(wall, 2), "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "all_targets_met": all(summary["metrics"][m]["met"] for m in TARGETS), **summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
