"""The W4A16 Triton kernels (`kernels.int4_triton`) timed against what they replace, and checked, at model shapes.

    PYTHONPATH=src python3 benchmarks/w4a16_gpu.py            # on a GPU
    .venv/bin/python benchmarks/w4a16_gpu.py --smoke          # CPU, Triton's interpreter: checks it runs

- projections (Mini's q_proj, o_proj, dense gate_up and down) at decode and prefill rows, 4-bit in groups of 128
  (asymmetric, as AWQ): cuBLAS on the bf16 weight (the unquantized model), the reference
  (`kernels.int4.linear_int4_reference`: dequantize, then cuBLAS) and the W4A16 kernel, with its largest error
  relative to the reference's largest value, and its weight bandwidth at decode (code + scale + zero bytes / time);
- routed experts (Nano and Mini: 128 experts, top-8) at decode and prefill tokens: `moe_triton.fused_moe` on bf16
  experts, `fused_moe_int4` on the 4-bit ones (with its error against `experts_int4_reference`), and that reference
  loop (eager: it syncs with the host, so the time includes its launch gaps).

Timing and shapes: `quant_gpu_timing.py` (CUDA-graph replays over copies of the weights that overflow the L2
cache, as a decode step reads them cold; the time per call is the median of several replays). Prints a table, then one JSON
object last. The tile configs (`int4_triton.gemm_config`, the MoE table) are fp8_triton's first guesses, checked by
the sm_90 compile: these numbers are what tuning starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
parser.add_argument("--calls", type=int, default=20, help="calls per graph replay")
args = parser.parse_args()
if args.smoke:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["TRINITY_KERNELS"] = "triton"

import torch  # noqa: E402

from quant_gpu_timing import Shapes, Timer, max_rel  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from trinity import kernels  # noqa: E402
from trinity.kernels import int4_triton, moe_triton  # noqa: E402
from trinity.kernels.int4 import experts_int4_reference, linear_int4_reference  # noqa: E402
from trinity.quant import int4  # noqa: E402

DEVICE = torch.device("cpu" if args.smoke else "cuda")
DTYPE = torch.bfloat16
GROUP, SYMMETRIC = 128, False
SHAPES = Shapes(args.smoke)
PROJECTIONS, ROWS, EXPERTS, TOKENS = SHAPES.projections, SHAPES.rows, SHAPES.experts, SHAPES.tokens
NUM_EXPERTS, TOP_K = SHAPES.num_experts, SHAPES.top_k
TIMER = Timer(DEVICE, args.smoke, args.calls)
copies_for, per_call_us, eager_us = TIMER.copies_for, TIMER.per_call_us, TIMER.eager_us


def weight_bytes(w: int4.Int4Weight) -> int:
    return sum(t.numel() * t.element_size() for t in (w.codes, w.scale, w.zero_point, w.g_idx) if t is not None)


def stacked(ws: list[int4.Int4Weight]) -> int4.Int4Weight:
    """Per-expert weights (or gate and up halves, dim 0) stacked along a new leading dim."""
    return ws[0]._replace(**{f: torch.stack([getattr(w, f) for w in ws]) for f in ("codes", "scale", "zero_point")
                             if getattr(ws[0], f) is not None})


def projection(name: str, n: int, k: int, rows: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    weights = [torch.randn(n, k, device=DEVICE, generator=g) * k ** -0.5 for _ in range(copies_for(n * k // 2))]
    quantized = [int4.quantize(w, GROUP, SYMMETRIC) for w in weights]
    dense = [w.to(DTYPE) for w in weights]
    del weights
    x = torch.randn(rows, k, device=DEVICE, generator=g).to(DTYPE)
    q = quantized[0]
    row = {"op": f"{name} [{n}x{k}]", "rows": rows,
           "bf16_cublas_us": per_call_us([lambda w=w: torch.nn.functional.linear(x, w) for w in dense]),
           "reference_us": per_call_us([lambda q=q: linear_int4_reference(x, q) for q in quantized]),
           "w4a16_us": per_call_us([lambda q=q: int4_triton.linear_int4_gpu(x, q) for q in quantized]),
           "w4a16_err": max_rel(int4_triton.linear_int4_gpu(x, q), linear_int4_reference(x, q))}
    row["vs_bf16"] = row["bf16_cublas_us"] / row["w4a16_us"]
    if rows <= 16:
        row["w4a16_weight_gbps"] = weight_bytes(q) / row["w4a16_us"] / 1e3
    return row


def experts(name: str, hidden: int, inter: int, tokens: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    gate_up = torch.randn(NUM_EXPERTS, 2 * inter, hidden, device=DEVICE, generator=g) * hidden ** -0.5
    down = torch.randn(NUM_EXPERTS, hidden, inter, device=DEVICE, generator=g) * inter ** -0.5
    # each expert's gate and up quantized as separate matrices (as a checkpoint's are); no act order
    q_gate_up = stacked([int4.quantize(gate_up[e], GROUP, SYMMETRIC) for e in range(NUM_EXPERTS)])
    q_down = stacked([int4.quantize(down[e], GROUP, SYMMETRIC) for e in range(NUM_EXPERTS)])
    gate_up, down = gate_up.to(DTYPE), down.to(DTYPE)
    x = torch.randn(tokens, hidden, device=DEVICE, generator=g).to(DTYPE)
    # routings cycled from call to call, so that a small batch's experts are not the L2-resident ones of the call
    # before (8 experts of Mini are 13 MB in 4 bits)
    routings = []
    for _ in range(1 if args.smoke else 16):
        w, ids = torch.topk(torch.rand(tokens, NUM_EXPERTS, device=DEVICE, generator=g), TOP_K)
        routings.append((w / w.sum(-1, keepdim=True), ids))
    w, ids = routings[0]
    kernels.use_reference(True)  # the reference loop as written, whatever `linear_int4` dispatches to
    try:
        ref = experts_int4_reference(x, w, ids, q_gate_up, q_down)
        reference_us = eager_us(lambda: experts_int4_reference(x, w, ids, q_gate_up, q_down))
    finally:
        kernels.use_reference(None)
    row = {"op": f"{name} experts H{hidden} I{inter}", "rows": tokens,
           "bf16_fused_us": per_call_us([lambda w=w, ids=ids: moe_triton.fused_moe(x, w, ids, gate_up, down)
                                         for w, ids in routings]),
           "int4_fused_us": per_call_us([lambda w=w, ids=ids: int4_triton.fused_moe_int4(x, w, ids, q_gate_up, q_down)
                                         for w, ids in routings]),
           "reference_eager_us": reference_us,
           "int4_fused_err": max_rel(int4_triton.fused_moe_int4(x, w, ids, q_gate_up, q_down), ref)}
    row["vs_bf16"] = row["bf16_fused_us"] / row["int4_fused_us"]
    return row


def main() -> None:
    device = "interpreter" if args.smoke else torch.cuda.get_device_name(DEVICE)
    results = []
    with torch.no_grad():
        for name, (n, k) in PROJECTIONS.items():
            for rows in ROWS:
                results.append(projection(name, n, k, rows))
                print(results[-1], flush=True)
        for name, (hidden, inter) in EXPERTS.items():
            for tokens in TOKENS:
                results.append(experts(name, hidden, inter, tokens))
                print(results[-1], flush=True)
    print(json.dumps({"benchmark": "w4a16_gpu", "device": device, "results": results}))


if __name__ == "__main__":
    main()
