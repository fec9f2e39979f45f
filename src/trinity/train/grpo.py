"""GRPO: reinforcement learning on rewards computed by code (`trinity train --stage grpo`).

One step = one round: P prompts, G samples each from trinity's engine on the current weights (rollouts.py),
rewards by code (rewards.py), advantages normalised within each group, then `epochs_per_round` optimizer
passes over the round's samples with the clipped-ratio loss and a k3 KL penalty to the frozen starting policy
(grpo_loss.py). After each pass the engine serves the updated weights: copied in place, prefix cache dropped.

Rollouts decode under the constraint the server would apply to the same request (rollout_constraints.py). The loss
reads the unconstrained policy's log-probabilities of the sampled tokens, so a token the grammar forced is trained
as if sampled: the model learns the form the constraint would otherwise impose. Optionally the tasks are screened
once with the starting policy (`solved_keep`) and only the groups whose samples differ are trained (`filter_groups`).

Full fine-tuning (Muon + AdamW, as the supervised trainer) or LoRA adapters (AdamW on the adapters only, the
reference policy then being the same model with its adapters switched off). Checkpoints, resume, the log and the
HF export work as the supervised trainer's; one process only (no data parallel)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import torch

from ..model.model import TrinityForCausalLM
from .grpo_config import GRPOConfig
from .grpo_loss import group_advantages, grpo_loss, token_logprobs
from .grpo_report import write_curves
from .lora import AdapterOptimizer, apply_lora, lora_disabled, merged_state_dict
from .optim import CombinedOptimizer
from .parallel import clip_grad_norm_
from .rewards import task_reward
from .rollout_constraints import RolloutConstraints
from .rollouts import Rollout, RolloutEngine, load_tasks, render_prompt, round_tasks
from .screening import screened_task_ids
from .trainer import build_model, build_tokenizer, lr_scale, rng_state, run_steps, save_atomic, seed_everything, \
    set_rng_state, start_or_resume

THINK_PREFILL = "<think>\n"


def _mixed_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: the groups whose samples did not all score the same."""
    groups = rewards.view(-1, group_size)
    return groups.amax(dim=1) > groups.amin(dim=1)


@dataclasses.dataclass(slots=True)
class RolloutBatch:
    """A round's samples as padded tensors. ids [N, T] (prompt + completion, right-padded); the loss reads
    position t's logits for token t + 1, so targets = ids[:, 1:] and mask [N, T - 1] marks completion tokens."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def targets(self) -> torch.Tensor:
        return self.ids[:, 1:]


def pack_rollouts(rollouts: list[Rollout], pad_id: int) -> RolloutBatch:
    length = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rollouts), length - 1)
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.completion_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        # target index j predicts token j + 1: the completion's tokens are targets len(prompt) - 1 ...
        mask[i, len(r.prompt_ids) - 1:len(seq) - 1] = 1.0
    return RolloutBatch(ids, mask)


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("grpo runs in one process: start it without torchrun")
        self.cfg = cfg
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        self.tasks = load_tasks(cfg.prompts)
        self.prompts = [render_prompt(self.tokenizer, t, cfg.enable_thinking) for t in self.tasks]
        # whether each reply starts inside the reasoning (the template prefilled `<think>\n`): the reward's parser
        # needs to know, as the server's does
        self.starts_in_reasoning = [
            self.tokenizer.apply_chat_template(t["prompt"], tools=t.get("tools"), add_generation_prompt=True,
                                               enable_thinking=cfg.enable_thinking).endswith(THINK_PREFILL)
            for t in self.tasks]
        self.policy = build_model(cfg, self.tokenizer).to(self.device)
        self.model_config = self.policy.config
        self.constraints = RolloutConstraints(self.tokenizer, self.model_config.vocab_size) \
            if cfg.rollout_constraints else None
        self.reference: TrinityForCausalLM | None = None
        if cfg.lora_rank:
            apply_lora(self.policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
            self.optimizer = AdapterOptimizer(self.policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            if cfg.kl_coeff:  # the starting weights, frozen (rebuilt the same on resume: build_model is deterministic)
                self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
            self.optimizer = CombinedOptimizer(self.policy, lr=cfg.lr, muon_lr=cfg.muon_lr,
                                               weight_decay=cfg.weight_decay)
        self.policy.train()
        self.pad_id = self.tokenizer.pad_token_id if getattr(self.tokenizer, "pad_token_id", None) is not None \
            else self.tokenizer.eos_token_id
        start_or_resume(self)
        self.engine = self._rollout_engine()
        self.task_ids = self._screened_tasks() if cfg.solved_keep < 1 else list(range(len(self.tasks)))

    # ------------------------------------------------------------------ setup
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoint.pt")

    def _rollout_engine(self) -> RolloutEngine:
        cfg = self.cfg
        longest = max(len(p) for p in self.prompts)
        max_model_len = longest + cfg.rollout_max_tokens
        if max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"a prompt of {longest} tokens plus rollout_max_tokens {cfg.rollout_max_tokens} exceeds "
                             f"the model's max_position_embeddings ({self.model_config.max_position_embeddings})")
        seqs = cfg.prompts_per_step * cfg.group_size
        block_size = 16  # EngineConfig's default
        # every sequence of a round at full length at once, plus one block each for a window's partial block
        blocks = cfg.rollout_kv_blocks or seqs * (math.ceil(max_model_len / block_size) + 1)
        return RolloutEngine(merged_state_dict(self.policy), self.model_config, self.tokenizer, self.device,
                             max_model_len, seqs, blocks, cfg.seed)

    def _constraints(self, indices: list[int]) -> list | None:
        if self.constraints is None:
            return None
        return [self.constraints.for_task(self.tasks[i], self.starts_in_reasoning[i], self.cfg.rollout_max_tokens)
                for i in indices]

    def _screened_tasks(self) -> list[int]:
        """The tasks RL trains on (screening.py), chosen from the starting policy's greedy replies. Saved in out_dir,
        so a resumed run trains on the same tasks whatever its weights now answer."""
        cfg = self.cfg
        path = os.path.join(cfg.out_dir, "screened_tasks.json")
        if self.step > 0:
            if not os.path.exists(path):
                raise ValueError(f"{cfg.out_dir} holds a run at step {self.step} but no screened_tasks.json: it was "
                                 f"started without screening; resume it with solved_keep = 1, or start a new out_dir")
            with open(path, encoding="utf-8") as f:
                return json.load(f)["kept"]
        everything = list(range(len(self.tasks)))
        replies = self.engine.generate(self.prompts, everything, 1, cfg.rollout_max_tokens, 0.0, 1.0, seed=cfg.seed,
                                       constraints=self._constraints(everything))
        solved = [self._reward(r.task_index, r.text, 0.0).passed for r in replies]
        families = [str(t.get("family", "")) for t in self.tasks]
        kept = screened_task_ids(solved, families, cfg.solved_keep, cfg.seed, cfg.keep_family_shares)
        if not kept:
            raise ValueError(f"the starting policy solves every task greedily and solved_keep = {cfg.solved_keep} "
                             "keeps none of them: nothing to train on")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"tasks": len(everything), "solved": sum(solved), "kept": kept}, f)
        return kept

    def _reward(self, task_index: int, text: str, format_reward: float):
        return task_reward(self.tasks[task_index], text, format_reward, self.starts_in_reasoning[task_index],
                           json_exact=self.cfg.json_reward == "exact")

    # ------------------------------------------------------------------ one step
    def _forward_logprobs(self, model, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T - 1] log-probabilities of each next token at the rollouts' temperature."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            logits = model(ids)
        return token_logprobs(logits[:, :-1], ids[:, 1:], self.cfg.rollout_temperature)

    def _micro_slices(self, n: int) -> list[slice]:
        size = self.cfg.micro_batch_size or n
        return [slice(start, min(n, start + size)) for start in range(0, n, size)]

    @torch.no_grad()
    def _frozen_logprobs(self, batch: RolloutBatch, reference: bool) -> torch.Tensor:
        parts = []
        for sl in self._micro_slices(batch.ids.shape[0]):
            ids = batch.ids[sl].to(self.device)
            if not reference:
                parts.append(self._forward_logprobs(self.policy, ids))
            elif self.reference is not None:
                parts.append(self._forward_logprobs(self.reference, ids))
            else:
                with lora_disabled(self.policy):
                    parts.append(self._forward_logprobs(self.policy, ids))
        return torch.cat(parts)

    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        indices = [self.task_ids[k] for k in round_tasks(len(self.task_ids), self.step, cfg.prompts_per_step,
                                                          cfg.seed)]
        constraints = self._constraints(indices)
        rollouts = self.engine.generate([self.prompts[i] for i in indices], indices, cfg.group_size,
                                        cfg.rollout_max_tokens, cfg.rollout_temperature, cfg.rollout_top_p,
                                        seed=cfg.seed * 100_003 + self.step, constraints=constraints)
        rollout_s = time.perf_counter() - start
        results = [self._reward(r.task_index, r.text, cfg.format_reward) for r in rollouts]
        rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.group_size, cfg.advantage_eps).to(self.device)
        mixed = _mixed_groups(rewards, cfg.group_size)
        trained = rollouts
        if cfg.filter_groups and mixed.any():
            # only the groups whose samples differ carry a policy gradient; the others would cost two forwards and a
            # backward for their KL term alone (DAPO's dynamic sampling keeps only these too)
            keep = mixed.repeat_interleave(cfg.group_size)
            trained = [r for r, k in zip(rollouts, keep.tolist()) if k]
            advantages = advantages[keep.to(self.device)]
        batch = pack_rollouts(trained, self.pad_id)
        mask = batch.mask.to(self.device)
        num_tokens = int(mask.sum().clamp_min(1).item())
        ref_logp = self._frozen_logprobs(batch, reference=True) if cfg.kl_coeff else None
        # one pass: the sampling policy is the one being differentiated, so old = new (detached) exactly
        old_logp = self._frozen_logprobs(batch, reference=False) if cfg.epochs_per_round > 1 else None
        scale = lr_scale(cfg, self.step)
        self.optimizer.set_lr_scale(scale)
        sums = dict(loss=0.0, policy_loss=0.0, kl=0.0, clip_fraction=0.0, ratio_mean=0.0)
        grad_norms = []
        # A round whose every group agreed (all right or all wrong) carries no policy signal: its gradient is the
        # KL term alone (0 on the first step) plus rounding noise, which Muon's and Adam's normalised updates would
        # blow up into a full-size random step. Such a round is logged and skipped (DAPO drops those groups too).
        signal = bool(advantages.abs().max() > 0) or not cfg.skip_no_signal
        passes = cfg.epochs_per_round if signal else 1  # a skipped round still measures its loss and KL
        for _ in range(passes):
            for sl in self._micro_slices(batch.ids.shape[0]):
                with torch.set_grad_enabled(signal):
                    logp = self._forward_logprobs(self.policy, batch.ids[sl].to(self.device))
                    old = old_logp[sl] if old_logp is not None else logp.detach()
                    ref = ref_logp[sl] if ref_logp is not None else logp.detach()
                    out = grpo_loss(logp, old, ref, advantages[sl], mask[sl], cfg.clip_eps, cfg.kl_coeff,
                                    num_tokens)
                if signal:
                    out.loss.backward()
                share = out.tokens / num_tokens  # the micro batch's share of the token mean
                sums["loss"] += out.loss.item()
                sums["policy_loss"] += out.policy_loss
                for key in ("kl", "clip_fraction", "ratio_mean"):
                    sums[key] += getattr(out, key) * share
            if not signal:
                continue
            params = [p for p in self.policy.parameters() if p.requires_grad]
            grad_norms.append(float(clip_grad_norm_(params, cfg.grad_clip)) if cfg.grad_clip else 0.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
        if signal:  # the engine serves the new weights from the next round on (nothing cached from the old survives)
            self.engine.sync(merged_state_dict(self.policy, adapted_only=bool(cfg.lora_rank)))
        self.step += 1
        epochs = passes
        completion_tokens = [len(r.completion_ids) for r in rollouts]
        record = {"step": self.step, **{k: v / epochs for k, v in sums.items()},
                  "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                  "pass_rate": sum(r.passed for r in results) / len(results),
                  # the groups that hold both better and worse samples: only they carry a policy gradient
                  "mixed_groups": mixed.float().mean().item(),
                  "trained_samples": len(trained),
                  "well_formed": sum(r.well_formed for r in results) / len(results),
                  "completion_tokens": sum(completion_tokens) / len(completion_tokens),
                  "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
                  "lr": cfg.lr * scale, "grad_norm": sum(grad_norms) / max(1, len(grad_norms)), "updated": signal,
                  "rollout_s": rollout_s, "step_s": time.perf_counter() - start}
        self.history.append(record)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return record

    # ------------------------------------------------------------------ run, checkpoints, export
    def run(self) -> list[dict]:
        cfg = self.cfg
        run_steps(self, "grpo", lambda r: f"reward {r['reward_mean']:.3f} kl {r['kl']:.4f} "
                                          f"clip {r['clip_fraction']:.3f} loss {r['loss']:.4f}", show=cfg.progress)
        self.save_checkpoint(self.checkpoint_path)
        self.export(cfg.export_dir or os.path.join(cfg.out_dir, "export"))
        self.curves = write_curves(self.log_path, cfg.out_dir)
        return self.history

    def close(self) -> None:
        """(The supervised trainer's interface: nothing to tear down in one process.)"""

    def save_checkpoint(self, path: str) -> None:
        state = {"stage": "grpo", "step": self.step, "model": self.policy.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                 "config": dataclasses.asdict(self.cfg)}
        save_atomic(state, path)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("stage") != "grpo":
            raise ValueError(f"{path} is a {state.get('stage', 'supervised')} checkpoint; grpo continues from one "
                             "through init_from (its export folder), with its own out_dir")
        saved_rank = state.get("config", {}).get("lora_rank", 0)
        if saved_rank != self.cfg.lora_rank:
            raise ValueError(f"{path} was trained with lora_rank {saved_rank}, this run asks for {self.cfg.lora_rank}: "
                             "resume with the same setting, or start a new out_dir")
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    def export(self, path: str) -> None:
        """HF layout, LoRA adapters merged into the weights: a normal checkpoint any loader reads."""
        model = TrinityForCausalLM.empty(self.model_config, torch.float32, "cpu")
        model.load_state_dict({k: v.cpu() for k, v in merged_state_dict(self.policy).items()})
        model.save_pretrained(path, dtype=self.cfg.export_dtype)
        self.tokenizer.save_pretrained(path)
