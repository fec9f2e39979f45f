"""GRPO's options: TrainConfig's (model, optimiser, schedule, run) plus the RL stage's own.

Chosen by `stage = "grpo"` in the TOML file or `--stage grpo`; every field below is a TOML key or a
`--key value` override like the supervised trainer's."""

from __future__ import annotations

from dataclasses import dataclass, field

from .trainer import TrainConfig

LORA_TARGETS = ("attention", "mlp")


@dataclass
class GRPOConfig(TrainConfig):
    stage: str = "grpo"
    # tasks: a JSONL of prompts with their verifier fields (`python -m trinity.synthetic`'s heldout.jsonl /
    # train-task format: "prompt" (messages or a string), optional "tools", "check", "expected")
    prompts: str = ""
    prompts_per_step: int = 4  # prompts per rollout round; each round is one optimizer step
    group_size: int = 4  # G samples per prompt; advantages are normalised within each group
    # rollouts: trinity's own engine on the weights being trained
    rollout_max_tokens: int = 128
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_kv_blocks: int = 0  # KV blocks per pool for the rollout engine; 0 = enough for one round
    enable_thinking: bool = True  # the chat template's `<think>` prefill
    # decode each task under the constraint the server would apply to it (its tool_choice, response_format, and
    # valid calls under "auto"; train/rollout_constraints.py), so rewards score what the served model can reply
    rollout_constraints: bool = True
    # objective
    clip_eps: float = 0.2  # PPO clip: the ratio is held within [1 - eps, 1 + eps] where that lowers the objective
    kl_coeff: float = 0.04  # beta of the k3 KL penalty to the frozen reference policy
    advantage_eps: float = 1e-4  # (r - mean) / (std + eps): a group whose rewards all agree gets 0
    epochs_per_round: int = 1  # optimizer passes over a round's rollouts (> 1 makes the clip matter)
    skip_no_signal: bool = True  # no optimizer step for a round whose every group's rewards agree
    # before the first step, the tasks are screened greedily: those the starting policy gets wrong all stay, this
    # share of those it gets right too (1 = no screening)
    solved_keep: float = 1.0
    keep_family_shares: bool = True  # after screening, each task "family" keeps its share of the rounds
    filter_groups: bool = False  # train on the round's mixed groups only (the others' advantages are all 0)
    format_reward: float = 0.0  # partial credit for a well-formed but wrong reply (answer/call/JSON parsed)
    json_reward: str = "valid"  # "valid": a JSON answer passes when its schema validates it; "exact": and its value
    # LoRA: 0 = full fine-tuning; otherwise only rank-r adapters train, merged into the weights for export
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # RL fine-tunes from a trained model: gentler defaults than pretraining's
    lr: float = 1e-4
    muon_lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "constant"
    balance: str = "none"  # routing is left as the supervised run settled it
    z_loss_coeff: float = 0.0
    steps: int = 20
    log_every: int = 1
    out_dir: str = "runs/grpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage != "grpo":
            raise ValueError(f"GRPOConfig is the grpo stage's, got stage {self.stage!r}")
        if not self.prompts:
            raise ValueError("grpo needs prompts: set `prompts` to a JSONL of tasks (e.g. a heldout.jsonl of "
                             "python -m trinity.synthetic)")
        for name in ("prompts_per_step", "rollout_max_tokens", "epochs_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size = {self.group_size} must be >= 2: advantages compare samples of a group")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps = {self.clip_eps} must be in (0, 1)")
        if self.kl_coeff < 0 or self.advantage_eps < 0:
            raise ValueError("kl_coeff and advantage_eps must be >= 0")
        if self.rollout_temperature <= 0:
            raise ValueError(f"rollout_temperature = {self.rollout_temperature} must be > 0: GRPO needs samples "
                             "that differ within a group")
        if not 0 <= self.solved_keep <= 1:
            raise ValueError(f"solved_keep = {self.solved_keep} must be in [0, 1]")
        if self.json_reward not in ("valid", "exact"):
            raise ValueError(f"json_reward = {self.json_reward!r}: allowed valid, exact")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank = {self.lora_rank} must be >= 0 (0 = full fine-tuning)")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"lora_targets {bad}: allowed {', '.join(LORA_TARGETS)}")
