"""GRPO's rollouts: tasks read from a JSONL, rendered with the chat template, sampled G times each by trinity's
own engine, which serves the policy's current weights (copied in place after every optimizer step)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.llm import LLM
from ..engine.sampling_params import SamplingParams
from ..jsonl import iter_jsonl
from ..model.model import TrinityForCausalLM


@dataclass(slots=True)
class Rollout:
    task_index: int  # into the task list
    prompt_ids: list[int]
    completion_ids: list[int]  # the end-of-turn token included when the sample stopped on it
    text: str
    finish_reason: str | None


def load_tasks(path: str) -> list[dict[str, Any]]:
    """One task per line: "prompt" (a list of chat messages, or a plain user string), optional "tools", and the
    verifier fields "check" and "expected" (the format of `python -m trinity.synthetic`'s heldout.jsonl)."""
    tasks = []
    for number, task in iter_jsonl(path):
        missing = [k for k in ("prompt", "check", "expected") if k not in task]
        if missing:
            raise ValueError(f"{path}:{number}: task without {', '.join(missing)}")
        if isinstance(task["prompt"], str):
            task["prompt"] = [{"role": "user", "content": task["prompt"]}]
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def render_prompt(tokenizer, task: dict[str, Any], enable_thinking: bool = True) -> list[int]:
    return tokenizer.apply_chat_template(task["prompt"], tools=task.get("tools"), add_generation_prompt=True,
                                         tokenize=True, enable_thinking=enable_thinking)


def round_tasks(num_tasks: int, step: int, per_step: int, seed: int) -> list[int]:
    """The task indices of rollout round `step`: epochs of seeded shuffles, read in order. A function of the step
    alone, so a resumed run draws the same prompts as an uninterrupted one."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(k, num_tasks)
        order = list(range(num_tasks))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[position])
    return out


class RolloutEngine:
    """An `LLM` over its own copy of the policy's weights.

    The copy (not the training module itself) because the engine prepares the model it serves for inference
    (projections fused into one weight whose views become the parameters) and serves plain weights, while the
    policy may carry LoRA adapters. `sync` copies the merged weights in place and drops the prefix cache
    (`LLM.update_weights`): no trip through disk, and nothing computed from the old weights is reused."""

    def __init__(self, policy_state: dict[str, torch.Tensor], config, tokenizer, device: torch.device,
                 max_model_len: int, max_num_seqs: int, num_kv_blocks: int | None, seed: int):
        model = TrinityForCausalLM.empty(config, torch.float32, device)
        model.load_state_dict(policy_state)
        self.llm = LLM(model, tokenizer=tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       num_kv_blocks=num_kv_blocks, seed=seed)

    def sync(self, policy_state: dict[str, torch.Tensor]) -> None:
        self.llm.update_weights(policy_state)

    def generate(self, prompts: list[list[int]], task_indices: list[int], group_size: int, max_tokens: int,
                 temperature: float, top_p: float, seed: int, constraints: list | None = None) -> list[Rollout]:
        """G samples per prompt, group by group in the prompts' order. Each request has its own seed, so a round's
        samples depend only on the weights and the step (resume reproduces them). `constraints`: per prompt, the
        constraint factory its samples decode under (None: free text)."""
        constraints = constraints or [None] * len(prompts)
        params = [SamplingParams(n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 seed=seed * 7919 + i, constraint_factory=constraints[i]) for i in range(len(prompts))]
        outputs = self.llm.generate(prompt_token_ids=prompts, sampling_params=params)
        rollouts = []
        for index, prompt, out in zip(task_indices, prompts, outputs):
            if out.error:
                raise RuntimeError(f"rollout of task {index} failed: {out.error}")
            for seq in sorted(out.outputs, key=lambda s: s.index):
                rollouts.append(Rollout(index, list(prompt), list(seq.token_ids), seq.text, seq.finish_reason))
        return rollouts
