"""Quality of `trinity quantize` on the built-in model: W4A16 by RTN, AWQ and GPTQ, and FP8 block, against fp32.

    python benchmarks/quantize_quality.py [--group-size 32] [--num-samples 128] [--eval 64]
        [--heldout out/tiny/data/heldout.jsonl --tiny-eval-limit 60]

Each scheme is written by `trinity quantize` (AWQ and GPTQ calibrated on the default synthetic conversations,
reasoning included; `awq-noreason` is AWQ calibrated on the same conversations with the reasoning removed, to see
what the reasoning in the calibration buys) and loaded back. On held-out synthetic conversations (a split of their
own), teacher-forced in fp32 activations, it reports KL(fp32 || quantized) of the next-token distributions and top-1
agreement, for the tokens inside `<think>...</think>` (reasoning, the closing tag included) and the tokens after it
up to the turn's end (answer) separately; prompt tokens are not scored. With --heldout, also the
`benchmarks/tiny_eval.py` scores of each model (the first --tiny-eval-limit tasks). Prints a table, then one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trinity import TrinityForCausalLM
from trinity.cli import main as trinity_main
from trinity.loading import builtin_model_path, load_model
from trinity.quant.calibration import synthetic_conversations

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 7  # the held-out conversations: another seed than the calibration's (0), split "calibration" too


def variants(group: int, samples: int, noreason_file: str) -> dict[str, list[str]]:
    w4 = ["--scheme", "w4a16", "--group-size", str(group), "--num-samples", str(samples)]
    return {
        "w4a16-rtn": w4 + ["--method", "rtn"],
        "w4a16-awq": w4 + ["--method", "awq"],
        "w4a16-awq-noreason": w4 + ["--method", "awq", "--calibration", noreason_file],
        "w4a16-gptq": w4 + ["--method", "gptq"],
        "fp8-block": ["--scheme", "fp8-block"],
    }


def write_noreason(path: str, samples: int) -> None:
    """The default calibration conversations without their reasoning."""
    with open(path, "w", encoding="utf-8") as f:
        for c in synthetic_conversations(samples):
            messages = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in c["messages"]]
            f.write(json.dumps({"messages": messages, "tools": c["tools"]}) + "\n")


def eval_sequences(tokenizer, count: int, max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [T], kind [T]) per conversation; kind of token t: 1 reasoning, 2 answer, 0 not scored."""
    think, end_think, im_end = (tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<|im_end|>"))
    out = []
    for c in synthetic_conversations(count, seed=EVAL_SEED):
        ids = tokenizer.apply_chat_template(c["messages"], tools=c["tools"], add_generation_prompt=False,
                                            tokenize=True)[:max_tokens]
        kind, state = [], 0
        for t in ids:
            if t == think:
                kind.append(0)
                state = 1
            elif t == end_think and state == 1:
                kind.append(1)
                state = 2
            elif t == im_end and state == 2:
                kind.append(2)
                state = 0
            else:
                kind.append(state)
        out.append((torch.tensor(ids), torch.tensor(kind)))
    return out


@torch.no_grad()
def log_probs(model, seqs) -> list[torch.Tensor]:
    return [model(ids[None]).float()[0].log_softmax(-1) for ids, _ in seqs]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], seqs) -> dict:
    """KL(ref || got) and top-1 agreement, by kind of the predicted token (position t predicts token t + 1)."""
    sums = {1: [0.0, 0.0, 0], 2: [0.0, 0.0, 0]}
    for p, q, (_, kind) in zip(ref, got, seqs):
        target = kind[1:]
        kl = (p.exp() * (p - q)).sum(-1)[:-1]
        agree = (p.argmax(-1) == q.argmax(-1))[:-1].float()
        for k in (1, 2):
            m = target == k
            sums[k][0] += kl[m].sum().item()
            sums[k][1] += agree[m].sum().item()
            sums[k][2] += int(m.sum())
    out = {}
    for k, name in ((1, "reasoning"), (2, "answer")):
        n = max(sums[k][2], 1)
        out[f"kl_{name}"] = sums[k][0] / n
        out[f"top1_{name}"] = sums[k][1] / n
        out[f"tokens_{name}"] = sums[k][2]
    return out


def tiny_eval(model_dir: str, heldout: str, limit: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tiny_eval.py"), "--model", model_dir, "--heldout", heldout,
           "--limit", str(limit)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if run.returncode not in (0, 1):  # 1: a target missed, the scores are still printed
        return {"error": run.stderr[-500:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=128, help="calibration conversations")
    p.add_argument("--eval", type=int, default=64, help="held-out conversations for the KL")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--heldout", default=None, help="heldout.jsonl for benchmarks/tiny_eval.py (skipped without)")
    p.add_argument("--tiny-eval-limit", type=int, default=60)
    p.add_argument("--work", default=None, help="folder for the quantized checkpoints (default: a temporary one)")
    args = p.parse_args(argv)

    work = args.work or tempfile.mkdtemp(prefix="quantize-quality-")
    noreason = os.path.join(work, "calibration-noreason.jsonl")
    os.makedirs(work, exist_ok=True)
    write_noreason(noreason, args.num_samples)
    ref = load_model("trinity-tiny", dtype="float32", device="cpu")
    seqs = eval_sequences(ref.tokenizer, args.eval, args.max_tokens)
    ref_lp = log_probs(ref.model, seqs)
    rows: dict[str, dict] = {}
    for name, flags in variants(args.group_size, args.num_samples, noreason).items():
        out = os.path.join(work, name)
        t0 = time.perf_counter()
        code = trinity_main(["quantize", "trinity-tiny", "--out", out, *flags])
        if code != 0:
            rows[name] = {"error": f"trinity quantize exited {code}"}
            continue
        seconds = time.perf_counter() - t0
        model = TrinityForCausalLM.from_pretrained(out, dtype=torch.float32)
        rows[name] = {**compare(ref_lp, log_probs(model, seqs), seqs), "quantize_s": round(seconds, 1)}
        del model
    if args.heldout:
        rows.setdefault("fp32", {})["tiny_eval"] = tiny_eval(builtin_model_path(), args.heldout,
                                                             args.tiny_eval_limit)
        for name in list(rows):
            if name != "fp32" and "error" not in rows[name]:
                rows[name]["tiny_eval"] = tiny_eval(os.path.join(work, name), args.heldout, args.tiny_eval_limit)

    print(f"built-in model, W4A16 group {args.group_size}, {args.num_samples} calibration conversations, "
          f"{args.eval} held-out conversations "
          f"({next(iter(rows.values())).get('tokens_reasoning')} reasoning / "
          f"{next(iter(rows.values())).get('tokens_answer')} answer tokens scored)")
    print(f"{'scheme':<20} {'KL reason':>10} {'KL answer':>10} {'top1 reason':>12} {'top1 answer':>12}")
    for name, r in rows.items():
        if "kl_reasoning" in r:
            print(f"{name:<20} {r['kl_reasoning']:>10.5f} {r['kl_answer']:>10.5f} {r['top1_reasoning']:>12.4f} "
                  f"{r['top1_answer']:>12.4f}")
    if args.heldout:
        metrics = ["tool_call_accuracy", "arithmetic_exact", "think_closed", "json_valid"]
        print(f"tiny_eval, first {args.tiny_eval_limit} held-out tasks")
        print(f"{'scheme':<20} " + " ".join(f"{m:>18}" for m in metrics))
        for name, r in rows.items():
            te = r.get("tiny_eval", {})
            vals = [(te.get("metrics") or {}).get(m, {}).get("value") for m in metrics]
            print(f"{name:<20} " + " ".join(f"{v if v is None else round(v, 3)!s:>18}" for v in vals))
    print(json.dumps({"group_size": args.group_size, "num_samples": args.num_samples, "eval": args.eval,
                      "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
