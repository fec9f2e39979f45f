"""Prompts for `trinity bench`: 15 built-in long technical prompts, or the user's own from a file.

The built-in set follows seed 000's load protocol (a rotating batch of long-form technical questions): each
asks for a multi-part answer so that output lengths are long and comparable from run to run.
"""

from __future__ import annotations

import json
from pathlib import Path

# Written for this project. Long on purpose: prefill work per request should resemble real technical chat.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain how a paged key-value cache works in a large language model inference server. Start from why a "
    "contiguous per-request cache wastes memory, then describe blocks, block tables, allocation and freeing, "
    "copy-on-write for shared prefixes, and what happens when the pool runs out. Finish with the trade-offs of "
    "choosing a small versus a large block size, with a worked numeric example.",

    "Compare tensor parallelism, pipeline parallelism and expert parallelism for serving a 400-billion-parameter "
    "mixture-of-experts model on eight accelerators. For each scheme, describe what is split, which collective "
    "operations run per layer, how latency and throughput are affected at batch size 1 and at batch size 256, "
    "and which failure modes operators typically see in production.",

    "Walk through the numerical behaviour of softmax attention in bfloat16. Explain why the maximum is "
    "subtracted, where precision is lost in the accumulation, how online softmax lets a kernel process keys in "
    "tiles, and why some implementations keep the running sum in float32. Include a short pseudo-code sketch of "
    "a tiled attention kernel and explain each step.",

    "Describe how a continuous-batching scheduler for LLM inference decides which requests run in each step. "
    "Cover admission control, chunked prefill, mixing prefill and decode tokens in one batch, preemption by "
    "recomputation versus swapping, fairness between long and short requests, and the metrics you would watch "
    "to tell whether the scheduler or the model is the bottleneck.",

    "A service answers 95% of requests in under two seconds but the remaining 5% take more than thirty. Lay "
    "out a systematic investigation: which measurements to take first, how to separate queueing delay from "
    "compute time, how garbage collection, cache eviction, lock contention and network retries each show up in "
    "latency histograms, and how you would confirm a root cause before changing anything.",

    "Explain rotary position embeddings from first principles. Derive why rotating query and key pairs by an "
    "angle proportional to position makes their dot product depend only on relative distance, discuss the "
    "choice of base frequency, what context-extension methods change, and why some architectures leave "
    "positional encoding out of certain layers entirely.",

    "Design a rate limiter for a public HTTP API that must allow short bursts, enforce a per-key sustained "
    "rate, and work across twenty stateless server replicas. Compare token bucket, leaky bucket, fixed window "
    "and sliding log algorithms, explain where the shared state lives, how clock skew and network partitions "
    "affect correctness, and what response headers clients should receive.",

    "Explain how a mixture-of-experts layer routes tokens. Describe top-k gating, why a load-balancing signal "
    "is needed, the difference between auxiliary-loss balancing and bias-based balancing, how capacity limits "
    "and token dropping work, and what grouped matrix multiplication kernels do to make many small expert "
    "computations efficient on a GPU.",

    "Write a detailed guide to profiling a slow Python data pipeline that reads Parquet files, transforms "
    "them with pandas and writes results to object storage. Cover sampling and tracing profilers, memory "
    "profiling, how to spot serialization overhead and accidental quadratic behaviour, when to move work into "
    "vectorised or compiled code, and how to verify that each optimisation actually helped.",

    "Describe the life of a packet from the moment a browser calls fetch() on an HTTPS URL until the response "
    "body is available to JavaScript. Include DNS resolution, TCP and TLS handshakes, HTTP/2 stream "
    "multiplexing, congestion control, certificate validation, and the caches that may short-circuit each "
    "stage. Point out where most of the latency usually goes on a mobile network.",

    "Explain how quantising the weights of a transformer to 8-bit floating point works. Compare the E4M3 and "
    "E5M2 formats, per-tensor versus per-channel versus block-wise scaling, where dequantisation happens in a "
    "matrix multiplication kernel, which layers are usually kept in higher precision and why, and how you "
    "would measure the quality loss on a held-out evaluation set.",

    "A relational database table with two billion rows needs a new non-null column and an index, and the "
    "application cannot tolerate more than a few seconds of write unavailability. Describe a step-by-step "
    "online migration plan, including backfilling in batches, dual writes, verification, how to roll back "
    "at each stage, and the locking behaviour of the database operations involved.",

    "Explain speculative decoding for language models. Describe the draft-and-verify loop, why the acceptance "
    "rule preserves the target model's output distribution exactly, how the expected speed-up depends on the "
    "acceptance rate and the draft model's cost, and compare separate draft models with self-speculative "
    "approaches such as extra prediction heads.",

    "Describe how you would build an observability stack for a fleet of GPU inference servers. Cover which "
    "metrics to export (queue depth, cache utilisation, time to first token, inter-token latency, accelerator "
    "utilisation, memory, power), how to choose histogram buckets, how to set alerts that page only for real "
    "user impact, and how to correlate a latency spike with a specific deployment.",

    "Explain the Muon optimiser and how it differs from Adam. Describe the Newton-Schulz iteration used to "
    "orthogonalise the momentum update, why it is applied only to two-dimensional weight matrices, how "
    "learning rates are scaled with matrix shape, what it costs compared with an element-wise optimiser, and "
    "what evidence exists about its stability when training large mixture-of-experts models.",
)


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: `.json` (a list of strings, or of {"prompt": str}), `.jsonl` (one string or
    {"prompt": str} per line), or plain text (one prompt per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            items = json.loads(text)
            if not isinstance(items, list):
                raise ValueError(f"--prompts {path}: a .json file must hold a list")
        elif suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"--prompts {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    prompts = [_prompt_text(item, path, i) for i, item in enumerate(items)]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompts")
    return prompts


def _prompt_text(item: object, path: Path, i: int) -> str:
    if isinstance(item, dict):
        item = item.get("prompt")
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"--prompts {path}: entry {i} is not a non-empty string or {{\"prompt\": str}}")
    return item
