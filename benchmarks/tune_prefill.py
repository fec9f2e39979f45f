"""Time the Triton prefill attention's tiles on a GPU against torch's own attention; print the best per case.

    PYTHONPATH=src python3 benchmarks/tune_prefill.py [--models mini,nano,large] [--prompts 2048,8192]
    .venv/bin/python benchmarks/tune_prefill.py --smoke      # CPU, Triton's interpreter: checks the script runs

For each model's attention shape (query / KV heads, head_dim 128, its sliding window) and prompt length: one fresh
bf16 prompt packed as the engine packs it (contiguous key positions), causal, for a full layer (no window) and a
sliding layer. Each candidate tile (tokens per program, keys per step, warps, pipeline stages) is checked against
the default tile's output, then timed with CUDA events (median of `--reps` calls after a warm-up). Beside it: torch's
`scaled_dot_product_attention` (flash on an H100) on the same causal problem with its KV heads repeated, the
engine's fallback. Figures: milliseconds per layer and TFLOP/s over the query-key pairs a causal (and windowed)
attention really computes (4 * head_dim flops per pair and query head). Prints one line per case, then one JSON
object last, with each case's default and best tile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--models", default="mini")
parser.add_argument("--prompts", default="2048,8192")
parser.add_argument("--reps", type=int, default=10)
parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, two candidates")
args = parser.parse_args()

if args.smoke:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from timing import median_seconds  # noqa: E402
from trinity.kernels import attention_triton as tk  # noqa: E402

SHAPES = {"nano": (8, 2, 2048), "mini": (32, 4, 2048), "large": (48, 8, 4096)}  # heads, kv heads, window
HEAD_DIM = 128 if not args.smoke else 16


def candidates(group: int) -> list[dict | None]:
    """None is the default tile (`prefill_launch_settings`); the rest: rows of 64-256 (tokens x heads of the
    group), 32-128 keys, 4 or 8 warps, 2-4 stages."""
    if args.smoke:
        return [None, {"block_m": 2, "block_n": 16, "num_warps": 4, "num_stages": 2}]
    group_p2 = 1 << (group - 1).bit_length()
    out: list[dict | None] = [None]
    for rows, bn, warps, stages in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4)):
        if rows >= group_p2 * 2:
            out.append({"block_m": rows // group_p2, "block_n": bn, "num_warps": warps, "num_stages": stages})
    return out


def problem(heads: int, kv_heads: int, tokens: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(tokens)
    q, k, v = (torch.randn(tokens, h, HEAD_DIM, generator=g).to(device, torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    pos = torch.arange(tokens, device=device)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    return {"q": q, "k": k, "v": v, "cu": cu, "pos": pos}


def triton_call(p: dict, window: int | None, tile: dict | None):
    return lambda: tk.prefill_attention(p["q"], p["k"], p["v"], p["cu"], p["cu"], p["pos"], p["pos"], window,
                                        HEAD_DIM ** -0.5, max_q_len=p["q"].shape[0], contiguous_keys=True,
                                        **(tile or {}))


def torch_call(p: dict, window: int | None):
    """torch's attention on the same problem: [1, heads, T, D], KV heads repeated; the window as a boolean mask
    (which takes torch off its flash kernel), causality as is_causal otherwise."""
    group = p["q"].shape[1] // p["k"].shape[1]
    q = p["q"].transpose(0, 1)[None]
    k = p["k"].repeat_interleave(group, dim=1).transpose(0, 1)[None]
    v = p["v"].repeat_interleave(group, dim=1).transpose(0, 1)[None]
    if window is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=HEAD_DIM ** -0.5)
    t = q.shape[2]
    i = torch.arange(t, device=q.device)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=HEAD_DIM ** -0.5)


def seconds(fn) -> float:
    fn()  # compile / warm up
    if not torch.cuda.is_available():
        return median_seconds(fn, 1, cuda=False)
    torch.cuda.synchronize()
    return median_seconds(fn, args.reps, cuda=True)


def pairs(tokens: int, window: int | None) -> int:
    """Query-key pairs a causal attention over one fresh prompt computes (per query head)."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def tune_case(name: str, tokens: int, window: int | None, device: torch.device) -> dict:
    heads, kv_heads, _ = SHAPES[name]
    p = problem(heads, kv_heads, tokens, device)
    flops = 4 * HEAD_DIM * heads * pairs(tokens, window)
    reference = triton_call(p, window, None)()
    timed = []
    for tile in candidates(heads // kv_heads):
        try:
            out = triton_call(p, window, tile)()
        except Exception as e:  # a tile the GPU cannot run (shared memory): skipped, and said so
            print(f"  skip {tile}: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
            continue
        err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
        if err > 1e-2:
            raise SystemExit(f"{name} {tokens} window={window} tile {tile}: relative error {err:.3g} vs the default")
        timed.append((seconds(triton_call(p, window, tile)), tile))
    default_s = next(s for s, tile in timed if tile is None)
    best_s, best = min(timed, key=lambda x: x[0])
    torch_s = seconds(torch_call(p, window))
    row = {"model": name, "tokens": tokens, "window": window, "candidates": len(timed),
           "default_ms": round(default_s * 1e3, 3), "default_tflops": round(flops / default_s / 1e12, 1),
           "best_ms": round(best_s * 1e3, 3), "best_tflops": round(flops / best_s / 1e12, 1),
           "best_tile": best or tk.prefill_launch_settings(2, HEAD_DIM, heads // kv_heads, device.type == "cuda"),
           "torch_sdpa_ms": round(torch_s * 1e3, 3), "torch_sdpa_tflops": round(flops / torch_s / 1e12, 1)}
    print(f"{name} {tokens} tokens window={window}: default {row['default_ms']} ms ({row['default_tflops']} TFLOP/s)"
          f", best {row['best_ms']} ms ({row['best_tflops']} TFLOP/s) {row['best_tile']}, torch SDPA "
          f"{row['torch_sdpa_ms']} ms ({row['torch_sdpa_tflops']} TFLOP/s)", flush=True)
    return row


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    prompts = [24, 40] if args.smoke else [int(t) for t in args.prompts.split(",")]
    rows = []
    for name in args.models.split(","):
        window = SHAPES[name][2] if not args.smoke else 16
        for tokens in prompts:
            for w in (None, window):
                rows.append(tune_case(name, tokens, w, device))
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                      "torch": torch.__version__, "head_dim": HEAD_DIM, "cases": rows}))


if __name__ == "__main__":
    main()
