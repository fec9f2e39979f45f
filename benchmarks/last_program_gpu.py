"""Each last-program epilogue against the two launches it replaces, at the Nano and Mini decode shapes.

    PYTHONPATH=src python3 benchmarks/last_program_gpu.py            # on a GPU
    .venv/bin/python benchmarks/last_program_gpu.py --smoke          # CPU, Triton's interpreter: checks it runs

`kernels.last_program` lets the program that finishes last do what a second launch did. Whether that pays depends
on the shapes (the epilogue runs in one program; the split GEMV is Triton, not cuBLAS), so every user is timed both
ways, side by side, in the same run:
- projection + norm step (o_proj, dense down_proj): `linear_triton.linear_norm_add_rms_norm` vs cuBLAS `F.linear`
  then `norm_triton.norm_add_rms_norm`;
- decode attention: the split merge by the last split vs the merge launch (`merge_last=False`), 1K and 8K contexts;
- MoE routing: the router GEMM inside the routing + alignment launch vs cuBLAS then that launch;
- MoE down + norm step: in the down launch vs the per-choice outputs then the norm kernel (the whole fused MoE layer
  timed, routing and gate_up included, so the difference is the epilogue's).
Each variant is captured in a CUDA graph as many back-to-back calls (what a decode step's graph holds) over enough
copies of its weights to overflow the L2 cache, as a decode step reads them cold; the time is per call, the median of
several replays. Prints a table, then one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
parser.add_argument("--calls", type=int, default=40, help="calls per graph replay")
args = parser.parse_args()
if args.smoke:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["TRINITY_KERNELS"] = "triton"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from trinity.kernels import attention_triton, linear_triton, moe_triton, norm_triton  # noqa: E402

DEVICE = torch.device("cpu" if args.smoke else "cuda")
DTYPE = torch.bfloat16
COLD_BYTES = 256 << 20  # weights cycled per graph: more than an H100's 50 MB L2
# (hidden, heads, kv heads, dense intermediate, moe intermediate); 128 experts top-8 + 1 shared
SHAPES = {"nano": (1024, 8, 2, 3072, 256), "mini": (2048, 32, 4, 6144, 1024)}
if args.smoke:
    SHAPES = {"smoke": (64, 4, 2, 96, 32)}
NUM_EXPERTS, TOP_K, HEAD_DIM = (128, 8, 128) if not args.smoke else (8, 2, 16)


def copies_for(nbytes: int) -> int:
    return 1 if args.smoke else max(2, -(-COLD_BYTES // max(nbytes, 1)))


def per_call_us(calls: list) -> float:
    """Median microseconds per call of `calls` (closures, cycled) captured back to back in one CUDA graph."""
    if DEVICE.type != "cuda":  # the interpreter: run once, the time means nothing
        start = time.perf_counter()
        calls[0]()
        return (time.perf_counter() - start) * 1e6
    n = max(args.calls, len(calls))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, and allocate what persists (the arrival counters) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return statistics.median(times)


def randn(*shape, dtype=DTYPE, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def projection_norm(name: str, k: int, n: int, rows: int) -> dict:
    weights = [randn(n, k, scale=k ** -0.5) for _ in range(copies_for(n * k * 2))]
    x, res = randn(rows, k), randn(rows, n)
    post, nxt = torch.ones(n, device=DEVICE), torch.ones(n, device=DEVICE)
    fused = [lambda w=w: linear_triton.linear_norm_add_rms_norm(x, w, res, post, nxt, 1e-5) for w in weights]
    separate = [lambda w=w: norm_triton.norm_add_rms_norm(F.linear(x, w), res, post, nxt, 1e-5) for w in weights]
    return {"op": f"{name} [{n}x{k}] + norm", "rows": rows, "fused_us": per_call_us(fused),
            "separate_us": per_call_us(separate)}


def attention(heads: int, kv_heads: int, batch: int, context: int) -> dict:
    slots_total = batch * context + 1
    cache_bytes = 2 * slots_total * kv_heads * HEAD_DIM * 2
    caches = [(randn(slots_total, kv_heads, HEAD_DIM), randn(slots_total, kv_heads, HEAD_DIM))
              for _ in range(copies_for(cache_bytes))]
    slots = torch.arange(batch * context, device=DEVICE).view(batch, context)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q, gate = randn(batch, heads, HEAD_DIM), randn(batch, heads, HEAD_DIM)

    splits = 3 if args.smoke else None  # the smoke contexts are too short for the heuristic to split

    def variant(merge_last: bool):
        return [lambda kc=kc, vc=vc: attention_triton.decode_attention(q, kc, vc, slots, lens, HEAD_DIM ** -0.5,
                                                                       gate=gate, merge_last=merge_last,
                                                                       num_splits=splits)
                for kc, vc in caches]
    return {"op": f"decode attention {heads}/{kv_heads} heads @ {context}", "rows": batch,
            "fused_us": per_call_us(variant(True)), "separate_us": per_call_us(variant(False))}


def routing(hidden: int, tokens: int) -> dict:
    routers = [randn(NUM_EXPERTS, hidden, dtype=torch.float32, scale=hidden ** -0.5)
               for _ in range(copies_for(NUM_EXPERTS * hidden * 4))]
    x32 = randn(tokens, hidden, dtype=torch.float32)
    x = x32.to(DTYPE)
    bias = torch.zeros(NUM_EXPERTS, device=DEVICE)
    common = dict(expert_bias=bias, top_k=TOP_K, route_norm=True, route_scale=2.826, shared=1, counts=None,
                  count_mask=None, num_experts=NUM_EXPERTS + 1, block_m=16)
    fused = [lambda w=w: moe_triton._route_align_launch(x, None, (x32, w), **common) for w in routers]
    separate = [lambda w=w: moe_triton._route_align_launch(x, F.linear(x32, w), None, **common) for w in routers]
    return {"op": f"router [{NUM_EXPERTS}x{hidden}] + routing", "rows": tokens, "fused_us": per_call_us(fused),
            "separate_us": per_call_us(separate)}


def moe_norm(hidden: int, inter: int, tokens: int) -> dict:
    """The whole fused MoE layer with its norm step, the step in the down launch or in the norm kernel after it.
    Its expert weights are the layer's (routing picks 9 of 129 experts per token; the rest stay unread)."""
    e = NUM_EXPERTS + 1
    gate_up = randn(e, 2 * inter, hidden, scale=hidden ** -0.5)
    down = randn(e, hidden, inter, scale=inter ** -0.5)
    router = (randn(tokens, hidden, dtype=torch.float32), randn(NUM_EXPERTS, hidden, dtype=torch.float32))
    x, res = router[0].to(DTYPE), randn(tokens, hidden)
    norm = (res, torch.ones(hidden, device=DEVICE), torch.ones(hidden, device=DEVICE), 1e-5)
    bias = torch.zeros(NUM_EXPERTS, device=DEVICE)

    def layer():
        return moe_triton.fused_moe_layer(x, None, bias, TOP_K, True, 2.826, gate_up, down, 1, router=router,
                                          norm=norm)
    fused = per_call_us([layer])
    limit = moe_triton.DOWN_NORM_MAX_TOKENS
    moe_triton.DOWN_NORM_MAX_TOKENS = 0  # the norm kernel after the down launch
    try:
        separate = per_call_us([layer])
    finally:
        moe_triton.DOWN_NORM_MAX_TOKENS = limit
    return {"op": f"MoE layer [{e}x{inter}x{hidden}] + norm", "rows": tokens, "fused_us": fused,
            "separate_us": separate}


def main() -> None:
    results = []
    rows_list = (1, 4) if not args.smoke else (1, 2)
    contexts = (1024, 8192) if not args.smoke else (80,)
    for model, (hidden, heads, kv_heads, dense, moe_inter) in SHAPES.items():
        for rows in rows_list:
            measures = [lambda name=name, k=k, n=n: projection_norm(name, k, n, rows)
                        for name, k, n in (("o_proj", heads * HEAD_DIM, hidden), ("dense down", dense, hidden))]
            measures += [lambda c=c: attention(heads, kv_heads, rows, c) for c in contexts]
            measures += [lambda: routing(hidden, rows), lambda: moe_norm(hidden, moe_inter, rows)]
            for measure in measures:
                r = {"model": model, **measure()}
                results.append(r)
                print(f"{r['model']:6} {r['op']:45} rows {r['rows']}: fused {r['fused_us']:8.2f} us, "
                      f"separate {r['separate_us']:8.2f} us", flush=True)
    for r in results:
        r["fused_us"], r["separate_us"] = round(r["fused_us"], 2), round(r["separate_us"], 2)
    print(json.dumps({"benchmark": "last_program_gpu", "device": torch.cuda.get_device_name(DEVICE)
                      if DEVICE.type == "cuda" else "cpu (interpreter: times mean nothing)",
                      "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
