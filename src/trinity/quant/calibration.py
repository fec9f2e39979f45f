"""Calibration text for `trinity quantize`: chat conversations rendered with the model's own chat template, the
reasoning (`<think>` blocks) included, and tokenized.

The quantizers weigh a weight's error by the activations it meets; a thinking model spends most of its tokens inside
`<think>`, so the calibration text must carry the reasoning, not only the final answers (the template renders an
assistant turn's `reasoning_content` on every turn).

Input: a jsonl whose lines hold `messages` (OpenAI chat messages; assistant turns may carry `reasoning_content`) and
optionally `tools`; the held-out file's lines (`prompt` + `reference`) are read as their whole conversation. Without
a file, conversations come from the built-in model's corpus generator (`trinity.synthetic`), drawn from a split of
their own ("calibration"), so they are neither the training nor the held-out conversations.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..jsonl import iter_jsonl

CALIBRATION_SPLIT = "calibration"


def read_conversations(path: str, limit: int) -> list[dict[str, Any]]:
    out = []
    for n, record in iter_jsonl(path):
        if "messages" in record:
            messages = record["messages"]
        elif "prompt" in record:
            messages = list(record["prompt"]) + ([record["reference"]] if record.get("reference") else [])
        else:
            raise ValueError(f"{path}:{n}: a calibration line needs `messages` (or `prompt` + `reference`)")
        out.append({"messages": messages, "tools": record.get("tools")})
        if len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def synthetic_conversations(count: int, seed: int = 0) -> list[dict[str, Any]]:
    from ..synthetic import TRAIN_MIX, example_at

    out = []
    for i in range(count):
        example = example_at(seed, CALIBRATION_SPLIT, i, TRAIN_MIX)
        out.append({"messages": example.messages, "tools": example.tools})
    return out


def load_tokenizer(model_path: str):
    """(tokenizer, note): the checkpoint's own, else the built-in model's (a random test checkpoint ships none; its
    ids are then folded into the model's vocabulary, which only exercises the machinery)."""
    from ..loading import builtin_model_path
    from ..tokenizer import TrinityTokenizer

    if os.path.exists(os.path.join(model_path, "tokenizer.json")):
        return TrinityTokenizer.from_pretrained(model_path), None
    return (TrinityTokenizer.from_pretrained(builtin_model_path()),
            "the checkpoint has no tokenizer.json: calibrating with the built-in model's tokenizer, ids modulo the "
            "vocabulary")


def calibration_ids(model_path: str, vocab_size: int, calibration: str | None, num_samples: int,
                    max_tokens: int, seed: int = 0) -> tuple[list[torch.Tensor], list[str]]:
    """Token id sequences ([T_i] int64 each, at most `max_tokens`) and notes for the command's output."""
    tokenizer, note = load_tokenizer(model_path)
    notes = [note] if note else []
    if calibration:
        conversations = read_conversations(calibration, num_samples)
        notes.append(f"calibration: {len(conversations)} conversations from {calibration}")
    else:
        conversations = synthetic_conversations(num_samples, seed)
        notes.append(f"calibration: {len(conversations)} synthetic conversations (trinity.synthetic, split "
                     f"'{CALIBRATION_SPLIT}', seed {seed}) with their reasoning")
    out = []
    for c in conversations:
        ids = tokenizer.apply_chat_template(c["messages"], tools=c["tools"], add_generation_prompt=False,
                                            tokenize=True)
        ids = torch.tensor(ids[:max_tokens], dtype=torch.long) % vocab_size
        if ids.numel() >= 2:
            out.append(ids)
    if not out:
        raise ValueError("no calibration conversation has two tokens or more")
    return out, notes
