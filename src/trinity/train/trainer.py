"""The trainer: report-style init, Muon + AdamW, bf16 autocast over fp32 master weights, gradient accumulation
and clipping, warmup + cosine / WSD, expert-bias balancing, checkpoint / resume, HF export, data parallel."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import TrinityConfig, preset
from ..model.checkpoint import parse_dtype
from ..model.model import TrinityForCausalLM
from .balance import BalanceConfig, ExpertBalancer, max_violation, moe_blocks
from .copy_task import CopyTaskLoader, ordinary_token_ids
from .data import DATA_ORDERS, load_documents, make_loader
from .losses import router_z_loss, sequence_balance_loss
from .optim import CombinedOptimizer
from .parallel import MODES as DATA_PARALLEL_MODES
from .parallel import DataParallel, clip_grad_norm_, resolve_mode


STAGES = ("supervised", "grpo")


@dataclass
class TrainConfig:
    # which trainer runs: "supervised" (next-token loss on documents, this file) or "grpo" (RL on verifiable
    # rewards, train/grpo.py, whose own options live in train/grpo_config.py)
    stage: str = "supervised"
    # model
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # config.json keys overriding the preset
    init_from: str | None = None  # an HF-layout checkpoint folder to continue from
    tokenizer: str = "byte"  # "byte" (built-in byte-level) or a folder with tokenizer.json
    # data
    data: list[str] = field(default_factory=list)
    data_order: str = "rsdb"  # rsdb | sequential | packed (whole documents per row: conversations, data.PackedLoader)
    buffer_size: int = 64
    # the first steps train on synthetic copy rows (train/copy_task.py: a span written twice, spans of
    # copy_span/2..copy_span tokens) instead of the corpus: they teach the long-range copy that tools need
    copy_warmup_steps: int = 0
    copy_span: int = 32
    # after the warm-up, this many rows of every batch are copy rows too (the rest from the corpus): the corpus
    # alone never needs the copy, so a model that learnt it in the warm-up unlearns it (logged as copy_loss)
    copy_rows: int = 0
    # sequential order: readers starting at evenly spaced documents (like data workers on separate shards);
    # a step's batch is split into this many equal runs, one per reader. Independent of ranks and micro batches,
    # so neither changes the data.
    data_streams: int = 1
    seq_len: int = 128
    batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 0  # sequences per forward on one rank; 0 = the whole rank share
    # optimisation
    steps: int = 100
    lr: float = 3e-3  # AdamW (embeddings, head, norms)
    muon_lr: float = 0.02  # Muon (hidden matrices)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | wsd | constant
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    grad_clip: float = 1.0
    autocast: bool = True  # bf16 autocast over fp32 master weights
    # MoE balancing and router losses
    balance: str = "smebu"  # none | sign | smebu
    balance_gamma: float = 1e-3
    balance_kappa: float = 2.0
    balance_beta: float = 0.9
    balance_lambda: float = 2e-3
    aux_loss_coeff: float | None = None  # None: the model config's load_balance_coeff (0 if absent)
    z_loss_coeff: float = 1e-4
    # run
    seed: int = 0
    out_dir: str = "runs/train"
    checkpoint_every: int = 0  # 0 = only at the end
    log_every: int = 10
    export_dir: str | None = None  # HF-layout export at the end (default out_dir/export)
    # the export's stored dtype: "bfloat16" halves the file (the built-in model's size budget counts stored bytes;
    # on the CPU trinity computes in fp32 whatever is stored); default: fp32, as trained
    export_dtype: str | None = None
    device: str = "auto"
    progress: bool = True
    # with several processes (torchrun): auto | fsdp | ddp | manual (see train/parallel.py)
    data_parallel: str = "auto"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r}: allowed {', '.join(STAGES)}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: allowed cosine, wsd, constant")
        if self.data_order not in DATA_ORDERS:
            raise ValueError(f"data_order {self.data_order!r}: allowed {', '.join(DATA_ORDERS)}")
        if self.data_parallel not in DATA_PARALLEL_MODES:
            raise ValueError(f"data_parallel {self.data_parallel!r}: allowed {', '.join(DATA_PARALLEL_MODES)}")
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.export_dtype is not None:  # the names save_pretrained reads (aliases too), checked before the run
            try:
                parse_dtype(self.export_dtype)
            except ValueError:
                raise ValueError(f"export_dtype {self.export_dtype!r}: allowed bfloat16, float16, float32") from None
        if not 0 <= self.copy_rows < self.batch_size:
            raise ValueError(f"copy_rows = {self.copy_rows}: allowed 0..{self.batch_size - 1} (batch_size "
                             f"{self.batch_size}), a batch keeps at least one corpus row")
        if (self.copy_warmup_steps or self.copy_rows) and not 2 <= self.copy_span <= (self.seq_len + 1) // 2:
            raise ValueError(f"copy_span = {self.copy_span}: a span is written twice in a row of seq_len + 1 = "
                             f"{self.seq_len + 1} tokens, so it must be 2..{(self.seq_len + 1) // 2}")


def load_train_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """A TOML or JSON file, then `--key value` overrides (typed by the field's default)."""
    data = _read_config_file(path) if path else {}
    cls = config_class(str(overrides.get("stage", data.get("stage", "supervised"))))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in list(data) + list(overrides) if k not in fields]
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(sorted(set(unknown)))}")
    for key, raw in overrides.items():
        data[key] = _coerce(raw, _default(fields[key]))
    return cls(**data)


def _read_config_file(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options of one file. `extends = "other.toml"` (relative to the file) starts from that file's options
    and lets this one change some: a later stage of a recipe states only what differs. A table such as [model]
    is merged key by key."""
    real = os.path.realpath(path)
    if real in seen:
        raise ValueError(f"{path}: `extends` loops back to itself ({' -> '.join((*seen, real))})")
    with open(path, "rb") as f:
        if path.endswith(".toml"):
            import tomllib

            data = tomllib.load(f)
        else:
            data = json.load(f)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ValueError(f"{path}: `extends` must be a file name, got {base_name!r}")
    merged = _read_config_file(os.path.join(os.path.dirname(path), base_name), (*seen, real))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _default(f: dataclasses.Field) -> Any:
    """A field's default without building the dataclass (a stage may require options that have none)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_class(stage: str) -> type[TrainConfig]:
    """The options dataclass of a training stage (GRPO adds its own fields to TrainConfig's)."""
    if stage == "grpo":
        from .grpo_config import GRPOConfig  # imported here: it subclasses TrainConfig

        return GRPOConfig
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: allowed {', '.join(STAGES)}")
    return TrainConfig


def _coerce(raw: Any, like: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(raw)
    if isinstance(like, float) or like is None and raw.replace(".", "", 1).replace("e-", "", 1).isdigit():
        return float(raw)
    if isinstance(like, list):
        return [s for s in raw.split(",") if s]
    if isinstance(like, dict):
        return json.loads(raw)
    return raw


@torch.no_grad()
def init_like_report_(model: TrinityForCausalLM, seed: int) -> None:
    """Truncated normal (±3σ) with σ = 0.5/√d for every matrix, norms at 1 except each sublayer's output norm at
    1/√L (depth-scaled sandwich norm), expert bias 0. muP's √d input scaling lives in the model."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    std = 0.5 / math.sqrt(cfg.hidden_size)
    for name, p in model.named_parameters():
        if name.endswith(("post_attention_layernorm.weight", "post_mlp_layernorm.weight")):
            value = torch.full(p.shape, 1 / math.sqrt(cfg.num_hidden_layers))
        elif name.endswith("norm.weight"):
            value = torch.ones(p.shape)
        elif name.endswith("expert_bias"):
            value = torch.zeros(p.shape)
        else:
            value = torch.empty(p.shape)
            nn.init.trunc_normal_(value, 0.0, std, -3 * std, 3 * std, generator=generator)
        p.copy_(value)


def lr_scale(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rates at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))  # WSD
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, cfg.steps - decay_start)
    return 1.0 - (1 - cfg.min_lr_ratio) * progress


# ---------------------------------------------------------------------- helpers shared with the GRPO trainer
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def build_tokenizer(name: str):
    """"byte" (the built-in byte-level tokenizer) or a folder with tokenizer.json."""
    from ..tokenizer import TrinityTokenizer, build_byte_level_tokenizer

    return build_byte_level_tokenizer() if name == "byte" else TrinityTokenizer.from_pretrained(name)


def build_model(cfg: TrainConfig, tokenizer) -> TrinityForCausalLM:
    """fp32 on the CPU: `init_from`'s weights, or the preset (with `cfg.model` overrides) initialised like the
    report with `cfg.seed` (so the same config always rebuilds the same starting weights)."""
    if cfg.init_from:
        return TrinityForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    config = preset(cfg.preset, **cfg.model)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens; the model's vocab_size is "
                         f"{config.vocab_size}")
    model = TrinityForCausalLM.empty(config, torch.float32, "cpu")
    init_like_report_(model, cfg.seed)
    return model


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]  # a weights_only load gives the tuple back as lists
    random.setstate((version, tuple(internal), gauss))


def save_atomic(state: dict, path: str) -> None:
    """torch.save through a temporary file: a run killed while saving keeps its previous checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def start_or_resume(trainer, writes_log: bool = True) -> None:
    """A trainer's run state: step 0, an empty history and `out_dir/log.jsonl`, or what `out_dir`'s checkpoint
    saved. A fresh run removes an old log (`writes_log`: the process that writes it), which would mix with its own."""
    trainer.step = 0
    trainer.history = []
    os.makedirs(trainer.cfg.out_dir, exist_ok=True)
    trainer.log_path = os.path.join(trainer.cfg.out_dir, "log.jsonl")
    if os.path.exists(trainer.checkpoint_path):
        trainer.load_checkpoint(trainer.checkpoint_path)
    elif writes_log and os.path.exists(trainer.log_path):
        os.remove(trainer.log_path)


def run_steps(trainer, label: str, describe, show: bool) -> None:
    """`trainer.train_step()` until `trainer.cfg.steps`, saving a checkpoint every `checkpoint_every` steps (the last
    is the caller's), with a progress bar (`label`, and `describe(record)` after each step) when `show`."""
    cfg = trainer.cfg
    progress = None
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn(label), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn())
        task = progress.add_task(label, total=cfg.steps, completed=trainer.step, info="")
        progress.start()
    try:
        while trainer.step < cfg.steps:
            record = trainer.train_step()
            if progress is not None:
                progress.update(task, completed=trainer.step, info=describe(record))
            if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.steps:
                trainer.save_checkpoint(trainer.checkpoint_path)
    finally:
        if progress is not None:
            progress.stop()


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if cfg.stage != "supervised":
            raise ValueError(f"Trainer runs the supervised stage; stage {cfg.stage!r} has its own (train/grpo.py)")
        self.cfg = cfg
        self.world, self.rank = 1, 0
        self._owns_process_group = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self._owns_process_group = True
        if dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {self.world} processes")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
        self._seed_everything(cfg.seed)
        self.tokenizer = self._tokenizer()
        self.model = self._model().to(self.device).train()
        self.model_config: TrinityConfig = self.model.config
        # before the optimizer: under fsdp the parameters it holds are the sharded ones
        self.parallel = DataParallel(self.model, resolve_mode(cfg.data_parallel, self.world), self.device)
        self.optimizer = CombinedOptimizer(self.model, lr=cfg.lr, muon_lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        self.balancer = ExpertBalancer(self.model, BalanceConfig(cfg.balance, cfg.balance_gamma, cfg.balance_kappa,
                                                                 cfg.balance_beta, cfg.balance_lambda))
        self.aux_coeff = cfg.aux_loss_coeff if cfg.aux_loss_coeff is not None \
            else (self.model_config.load_balance_coeff or 0.0)
        for block in moe_blocks(self.model):
            block.record_router = bool(self.aux_coeff or cfg.z_loss_coeff)
        eos = self.tokenizer.eos_token_id
        self.loader = make_loader(cfg.data_order, load_documents(cfg.data, self.tokenizer, eos), cfg.seq_len,
                                  cfg.seed, cfg.buffer_size, streams=cfg.data_streams, pad_id=eos)
        self.copy_loader = CopyTaskLoader(cfg.seq_len, cfg.copy_span, ordinary_token_ids(self.tokenizer), cfg.seed) \
            if cfg.copy_warmup_steps or cfg.copy_rows else None
        start_or_resume(self, writes_log=self.rank == 0)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        seed_everything(seed)

    def _tokenizer(self):
        return build_tokenizer(self.cfg.tokenizer)

    def _model(self) -> TrinityForCausalLM:
        return build_model(self.cfg, self.tokenizer)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoint.pt")

    # ------------------------------------------------------------------ one step
    def _micro_batches(self, ids: torch.Tensor, labels: torch.Tensor):
        share = self.cfg.batch_size // self.world
        ids, labels = ids[self.rank * share:(self.rank + 1) * share], labels[self.rank * share:(self.rank + 1) * share]
        size = self.cfg.micro_batch_size or share
        for start in range(0, share, size):
            yield ids[start:start + size], labels[start:start + size]

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        start = time.perf_counter()
        # Every rank draws the whole global batch (same seed) and keeps its share: the same data as one process.
        ids, labels, copy_from = self._next_batch()
        valid = (labels != -100).sum().clamp_min(1).float()  # loss tokens of the global batch
        scale = lr_scale(cfg, self.step)
        self.optimizer.set_lr_scale(scale)
        micro_ce: list[float] = []
        # ce, aux, z (global means, summed over micro batches); the copy rows' ce sum and their loss tokens
        totals = torch.zeros(5, dtype=torch.float64)
        blocks = moe_blocks(model)
        micro = list(self._micro_batches(ids, labels))
        first_row = self.rank * (cfg.batch_size // self.world)  # global index of this micro batch's first row
        for index, (mids, mlabels) in enumerate(micro):
            mids, mlabels = mids.to(self.device), mlabels.to(self.device)
            with self.parallel.micro_batch(last=index == len(micro) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
                    logits = self.parallel.module(mids)
                token_ce = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                       mlabels.reshape(-1), ignore_index=-100, reduction="none")
                ce_sum = token_ce.sum()
                share = mids.shape[0] / cfg.batch_size  # this micro batch's weight in the global mean
                aux, z = self._router_losses(blocks, mids.shape[0])
                loss = ce_sum / valid + share * (self.aux_coeff * aux + cfg.z_loss_coeff * z)
                loss.backward()
            micro_valid = (mlabels != -100).sum().clamp_min(1)
            micro_ce.append((ce_sum / micro_valid).item())
            copy_ce = copy_tokens = 0.0
            if copy_from < first_row + mids.shape[0]:  # the copy rows are last; only read them where there are any
                copy_part = slice(max(copy_from - first_row, 0) * mids.shape[1], None)
                copy_ce = token_ce[copy_part].sum().item()
                copy_tokens = (mlabels.reshape(-1)[copy_part] != -100).sum().item()
            totals += torch.tensor([(ce_sum / valid).item(), share * aux.item(), share * z.item(),
                                    copy_ce, copy_tokens], dtype=torch.float64)
            first_row += mids.shape[0]
        self.parallel.sync_gradients()
        grad_norm = clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        counts = self.balancer.take_counts()
        self.balancer.update(counts)
        totals, micro_ce = self._reduce_stats(totals, micro_ce)
        self.step += 1
        elapsed = time.perf_counter() - start
        maxvio = max_violation(counts) if counts is not None else None
        record = {"step": self.step, "loss": totals[0], "aux_loss": totals[1], "z_loss": totals[2],
                  "lr": cfg.lr * scale, "muon_lr": cfg.muon_lr * scale, "grad_norm": float(grad_norm),
                  "tokens_per_s": cfg.batch_size * cfg.seq_len / elapsed,
                  "batchhet": max(micro_ce) - sum(micro_ce) / len(micro_ce),
                  "maxvio": maxvio.mean().item() if maxvio is not None else None,
                  "maxvio_per_layer": maxvio.tolist() if maxvio is not None else None,
                  "copy_loss": totals[3] / totals[4] if totals[4] else None}
        self.history.append(record)
        if self.rank == 0:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ids, labels, index of the first copy row): copy rows alone in the warm-up, then `copy_rows` of them
        after the corpus rows (batch_size when there are none)."""
        cfg = self.cfg
        if self.step < cfg.copy_warmup_steps:
            return (*self.copy_loader.next_batch(cfg.batch_size), 0)
        corpus = cfg.batch_size - cfg.copy_rows
        ids, labels = self.loader.next_batch(corpus)
        if cfg.copy_rows:
            copy_ids, copy_labels = self.copy_loader.next_batch(cfg.copy_rows)
            ids, labels = torch.cat([ids, copy_ids]), torch.cat([labels, copy_labels])
        return ids, labels, corpus

    @staticmethod
    def _router_losses(blocks, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over MoE layers of the sequence balance loss and the router z-loss of the last forward."""
        recorded = [b.last_router for b in blocks if b.last_router is not None]
        for b in blocks:
            b.last_router = None
        if not recorded:
            return torch.zeros(()), torch.zeros(())
        aux = sum(sequence_balance_loss(torch.sigmoid(lg), ids, batch, lg.shape[-1]) for lg, ids in recorded)
        z = sum(router_z_loss(lg) for lg, _ in recorded)
        return aux / len(recorded), z / len(recorded)

    def _reduce_stats(self, totals: torch.Tensor, micro_ce: list[float]):
        if self.world == 1:
            return totals.tolist(), micro_ce
        dist.all_reduce(totals)
        gathered: list[list[float]] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(gathered, micro_ce)
        return totals.tolist(), [x for part in gathered for x in part]

    # ------------------------------------------------------------------ run, checkpoints, export
    def run(self) -> list[dict]:
        cfg = self.cfg

        def describe(record: dict) -> str:
            info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
            return info + (f" maxvio {record['maxvio']:.2f}" if record["maxvio"] is not None else "")

        run_steps(self, "step", describe, show=cfg.progress and self.rank == 0)
        self.save_checkpoint(self.checkpoint_path)
        self.export(cfg.export_dir or os.path.join(cfg.out_dir, "export"))
        self.close()
        return self.history

    def close(self) -> None:
        """Tear down the process group this trainer created. The barrier keeps the other ranks alive until rank 0
        has written the checkpoint and export; without an explicit destroy, gloo aborts at interpreter exit now
        and then, and torchrun reports a finished run as failed."""
        if self._owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._owns_process_group = False

    def save_checkpoint(self, path: str) -> None:
        # full tensors in every mode; under fsdp gathering them is a collective, so every rank comes this far
        model_state = self.parallel.full_model_state()
        optimizer_state = self.parallel.full_optimizer_state(self.optimizer.state_dict())
        if self.rank != 0:
            return
        state = {"step": self.step, "model": model_state, "optimizer": optimizer_state,
                 "balancer": self.balancer.state_dict(), "data": self.loader.state_dict(),
                 "rng": rng_state(), "config": dataclasses.asdict(self.cfg)}
        if self.copy_loader is not None:
            state["copy_data"] = self.copy_loader.state_dict()
        save_atomic(state, path)

    def load_checkpoint(self, path: str) -> None:
        # weights_only: a checkpoint cannot run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.parallel.load_full_model_state(state["model"])
        self.optimizer.load_state_dict({key: self.parallel.shard_optimizer_state(opt, state["optimizer"][key])
                                        for key, opt in self.optimizer.named_optimizers().items()})
        self.balancer.load_state_dict(state["balancer"])
        self.loader.load_state_dict(state["data"])
        if self.copy_loader is not None and "copy_data" in state:
            self.copy_loader.load_state_dict(state["copy_data"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    def export(self, path: str) -> None:
        """HF layout (config.json + safetensors) plus the tokenizer: loads in trinity and in transformers."""
        model = self.parallel.full_model(lambda: TrinityForCausalLM.empty(self.model_config, torch.float32, "cpu"))
        if self.rank != 0:
            return
        model.save_pretrained(path, dtype=self.cfg.export_dtype)
        self.tokenizer.save_pretrained(path)
