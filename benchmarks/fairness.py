"""One request must not hold the server: a short request's latency while another client's pathological request runs.

Starts `trinity serve` (the tiny model) and times a short completion alone, then while other clients send
(1) `--big-requests` completions of `--prompts` prompts times `n` (issue 26 measured 200 x n=16 making a 0.36 s
request time out at 30 s under first come first served), and (2) a ~4 MB prompt (tokenized on the server, then
refused for its length), and (3) `--schemas` structured-output schemas as big as the server allows, then one over its
limit. Prints the ratios loaded / alone; the last line is one JSON object.

    .venv/bin/python benchmarks/fairness.py [--prompts 200 --n 16 --big-max-tokens 16 --big-requests 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from server_helpers import ServerProcess  # noqa: E402

SMALL = {"prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


def small_time(server: ServerProcess, repeats: int) -> float:
    """Median seconds of the short completion over `repeats` tries."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = server.http.post("/v1/completions", json=SMALL, timeout=600)
        r.raise_for_status()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def enum_schema(values: int, tag: str) -> dict:
    return {"type": "object", "required": ["x"], "properties": {
        "x": {"type": "string", "enum": [f"{tag}value number {i}" for i in range(values)]}}}


def _timed_post(server: ServerProcess, body: dict) -> tuple[int | str, float]:
    t = time.perf_counter()
    try:
        return server.http.post("/v1/completions", json=body, timeout=600).status_code, time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - reported
        return repr(e), time.perf_counter() - t


def in_background(server: ServerProcess, body: dict, results: list, timeout: float = 1200) -> threading.Thread:
    def send() -> None:
        t = time.perf_counter()
        try:
            r = server.http.post("/v1/completions", json=body, timeout=timeout)
            results.append((r.status_code, time.perf_counter() - t))
        except Exception as e:  # noqa: BLE001 - reported
            results.append((repr(e), time.perf_counter() - t))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def wait_queued(server: ServerProcess, timeout: float = 60) -> None:
    """Until the engine holds the background work (running or waiting sequences)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.http.get("/metrics").text
        busy = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting",
                                    "trinity:num_requests_running", "trinity:num_requests_waiting"))]
        if sum(busy) > 0:
            return
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--big-max-tokens", type=int, default=16)
    ap.add_argument("--big-requests", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15, help="short requests timed (the median is reported)")
    ap.add_argument("--huge-prompt-mb", type=float, default=4.0, help="0: skip the huge-prompt case")
    ap.add_argument("--schema-enum", type=int, default=1000,
                    help="enum values of the pathological schemas (the server's limit by default; 0: skip the case)")
    ap.add_argument("--schemas", type=int, default=16, help="distinct schemas sent one after another")
    ap.add_argument("--flag", action="append", default=[], help="extra server flag (repeatable, e.g. --flag=--x)")
    args = ap.parse_args()

    out: dict = {"prompts": args.prompts, "n": args.n, "big_max_tokens": args.big_max_tokens,
                 "big_requests": args.big_requests}
    flags = ["--max-request-bytes", str(int(max(args.huge_prompt_mb, 1) * 1.1 * (1 << 20))), *args.flag]
    with ServerProcess(*flags, name="fairness") as server:
        small_time(server, 2)  # warm-up (kernels, first-request costs)
        alone = small_time(server, args.repeats)
        out["small_alone_s"] = round(alone, 4)
        print(f"short request alone: {alone:.3f} s", flush=True)

        big = {"prompt": [f"Document {i}: the weather today is" for i in range(args.prompts)], "n": args.n,
               "max_tokens": args.big_max_tokens, "temperature": 1.0, "ignore_eos": True}
        results: list = []
        threads = [in_background(server, big, results) for _ in range(args.big_requests)]
        wait_queued(server)
        loaded = small_time(server, args.repeats)
        big_busy = any(t.is_alive() for t in threads)
        for t in threads:
            t.join()
        out["small_with_big_s"] = round(loaded, 4)
        out["big_ratio"] = round(loaded / alone, 2)
        out["big_still_running_when_small_done"] = big_busy
        out["big_request_s"] = [round(s, 2) for _, s in results]
        out["big_status"] = [c for c, _ in results]
        print(f"short request during {args.big_requests} x ({args.prompts} prompts x n={args.n}): {loaded:.3f} s "
              f"({loaded / alone:.2f}x); the big request(s) took {out['big_request_s']} s", flush=True)

        if args.huge_prompt_mb > 0:
            huge = {"prompt": "word " * int(args.huge_prompt_mb * (1 << 20) / 5), "max_tokens": 1}
            results = []
            thread = in_background(server, huge, results)
            # the short request over and over while the huge one uploads, tokenizes and is refused: the worst one
            times = []
            while thread.is_alive():
                times.append(small_time(server, 1))
            thread.join()
            loaded = max(times) if times else alone
            out["small_with_huge_prompt_s"] = round(loaded, 4)
            out["huge_prompt_ratio"] = round(loaded / alone, 2)
            out["huge_prompt_status"], out["huge_prompt_s"] = results[0][0], round(results[0][1], 2)
            print(f"short request during a {args.huge_prompt_mb} MB prompt: {loaded:.3f} s ({loaded / alone:.2f}x); "
                  f"the huge request answered {results[0][0]} after {results[0][1]:.2f} s", flush=True)

        if args.schema_enum > 0:
            # schemas as big as the limits allow (a distinct one each time: the compile cache cannot help), sent one
            # after another, then one over the limit; the short request over and over meanwhile: median and worst
            schemas = [enum_schema(args.schema_enum, f"{i}-") for i in range(args.schemas)]
            schemas.append(enum_schema(5 * args.schema_enum, "over-"))
            results, times = [], []
            thread = threading.Thread(target=lambda: [results.append(_timed_post(server, {
                "prompt": "x", "max_tokens": 4, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})) for schema in schemas],
                daemon=True)
            thread.start()
            while thread.is_alive():
                times.append(small_time(server, 1))
            thread.join()
            med, worst = (statistics.median(times), max(times)) if times else (alone, alone)
            out["small_with_schemas_s"] = {"median": round(med, 4), "worst": round(worst, 4), "n": len(times)}
            out["schema_ratio"] = {"median": round(med / alone, 2), "worst": round(worst / alone, 2)}
            out["schema_results"] = [(c, round(t, 2)) for c, t in results]
            print(f"short request during {args.schemas} schemas of {args.schema_enum} enum values and one of "
                  f"{5 * args.schema_enum}: median {med:.3f} s ({med / alone:.2f}x), worst {worst:.3f} s "
                  f"({worst / alone:.2f}x) over {len(times)}; the schema requests: {out['schema_results']}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
