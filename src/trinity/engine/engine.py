"""LLMEngine: add_request / abort / step / has_unfinished. One step = schedule -> run -> update.

The core (`step_core`) returns each request's delta of the step (`request.CoreOutput`: new tokens, logprobs,
finishes); `step` runs those through the requests' output processors (text, stop strings) and returns
RequestOutputs. The async engine calls `step_core` on its thread and processes outputs in the consumers'
coroutines instead."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from ..kernels import native
from ..model.model import TrinityForCausalLM
from .config import EngineConfig
from .kv_cache import KVCacheManager
from .output_processor import OutputProcessor, StopHit
from .request import ContextLengthError, CoreOutput, RequestOutput, SeqUpdate, Sequence
from .runner import build_runner
from .sampler import PendingSample, Sampler, position_logprobs
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .weight_update import check_weights, copy_weights

log = logging.getLogger("trinity.engine")


@dataclass(slots=True)
class _Launched:
    """A step whose forward and sampling are queued on the device, its tokens not yet read."""

    batch: ScheduledBatch
    sample_seqs: list[Sequence]  # the sequences that get a token from it, in sampling-row order
    pending: PendingSample | None
    # max_tokens=0 sequences whose prompt it completes: they end when it is read, with no token
    prompt_only: list[Sequence] = field(default_factory=list)


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    prompt_logprobs_sent: bool = False


def _take_prompt_only(batch: ScheduledBatch) -> list[Sequence]:
    """Take the max_tokens=0 sequences (prompt scoring) out of a step's sampling: their last prompt row would
    sample a token nobody asked for. The step's logits rows are the sampling rows, in `sample_seqs` order, then the
    prompt-logprob rows; theirs go. -> those sequences (the step completes their prompts)."""
    if not any(seq.max_tokens == 0 for seq in batch.sample_seqs):
        return []
    n = len(batch.sample_seqs)
    rows = batch.step.logits_rows
    keep = [i for i, seq in enumerate(batch.sample_seqs) if seq.max_tokens > 0]
    prompt_only = [seq for seq in batch.sample_seqs if seq.max_tokens == 0]
    batch.step.logits_rows = [rows[i] for i in keep] + rows[n:]
    batch.sample_seqs = [batch.sample_seqs[i] for i in keep]
    return prompt_only


def prepare_model(model: TrinityForCausalLM) -> TrinityForCausalLM:
    """The model as the engine runs it (every tensor-parallel rank too): eval mode, projections fused."""
    model = model.eval().fuse_projections()
    if model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16):
        native.library()  # build (or load) the CPU kernels now, not inside the first request (~3 s to build)
    return model


class LLMEngine:
    def __init__(self, model: TrinityForCausalLM, tokenizer=None, config: EngineConfig | None = None,
                 executor=None):
        """`executor`: rank 0's side of a tensor-parallel group (`parallel.executor.Executor`), `model` then
        rank 0's part; the engine sends each step to the other ranks through it."""
        self.model = model = prepare_model(model)
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        self.executor = executor
        cfg = model.config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        runner = build_runner(model, config, self.max_model_len, executor.agree_plan if executor else None)
        plan = runner.plan
        sliding = [cfg.is_sliding_layer(i) for i in range(cfg.num_hidden_layers)]
        self.kv = KVCacheManager(config.block_size, plan.num_full_blocks, plan.num_sliding_blocks,
                                 cfg.sliding_window, has_full_layers=not all(sliding), has_sliding_layers=any(sliding),
                                 prefix_caching=config.enable_prefix_caching)
        self.cache_plan = plan
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len, config.enable_prefix_caching,
                                                   config.fair_share_for(model.device.type)), self.kv)
        self.runner = executor.wrap(runner) if executor else runner
        self.sampler = Sampler(model.device, config.seed)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else model.device.type == "cuda")
        self._inflight: _Launched | None = None  # the look-ahead step queued by the last `step()`
        self.eos_token_ids = tuple(sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())))
        self.requests: dict[str, _Request] = {}
        self._processors: dict[str, OutputProcessor] = {}  # of the requests `step` returns outputs for
        self.num_steps = 0
        self.num_lookahead_steps = 0  # steps queued before the previous step's tokens were read
        # Expert load per MoE layer: cumulative token counts and a moving average of each step's share.
        self.expert_tokens_total = None
        self.expert_load_ema = None

    # ------------------------------------------------------------------ requests
    def prepare_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                        prompt_token_ids: list[int] | None = None, priority: int = 0,
                        cache_salt: str | None = None, fairness_key: str | None = None) -> _Request:
        """Validate and build a request without touching engine state (safe from any thread). `cache_salt`: the
        request shares prefix-cache blocks only with requests that give the same salt (tenants apart).
        `fairness_key`: requests that give the same key share one turn in the scheduler with each other key (the
        server gives each HTTP request its own, so a many-prompt completion cannot starve other clients)."""
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_token_ids")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty (0 tokens)")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {vocab})")
        if params.max_tokens is None:
            max_tokens = self.max_model_len - len(prompt_token_ids)
            if max_tokens < 1:
                raise ContextLengthError(f"prompt ({len(prompt_token_ids)} tokens) leaves no room to generate within "
                                         f"max_model_len ({self.max_model_len})", prompt_tokens=len(prompt_token_ids),
                                         max_tokens=None, max_model_len=self.max_model_len)
        else:
            max_tokens = params.max_tokens
        self.scheduler.check_fits(len(prompt_token_ids), max_tokens)
        params = dataclasses.replace(params, eos_token_ids=self.eos_token_ids)
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            seed = params.seed if params.n == 1 or params.seed is None else hash((params.seed, i)) % (1 << 62)
            seqs.append(Sequence(seq_id=request_id if params.n == 1 else f"{request_id}#{i}", request_id=request_id,
                                 index=i, prompt_token_ids=list(prompt_token_ids), params=params,
                                 max_tokens=max_tokens, priority=priority, sampling_seed=seed, arrival_time=now,
                                 cache_salt=cache_salt, fairness_key=fairness_key))
        return _Request(request_id, prompt, list(prompt_token_ids), seqs, now)

    def output_processor(self, request: _Request) -> OutputProcessor:
        """A processor for this request's outputs (text, stop strings); for `step_core`'s consumers."""
        return OutputProcessor(request.request_id, request.prompt, request.prompt_token_ids, request.seqs[0].params,
                               self.tokenizer)

    def enqueue(self, request: _Request, process_outputs: bool = True) -> None:
        """Queue a prepared request. `process_outputs`: `step` returns its outputs (else only `step_core` does:
        the caller processes them)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        for seq in request.seqs:
            if seq.params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]  # the first prompt token has no context to be scored in
            if seq.params.constraint_factory is not None:
                seq.constraint = seq.params.constraint_factory()
            self.scheduler.add(seq)
        self.requests[request.request_id] = request
        if process_outputs:
            self._processors[request.request_id] = self.output_processor(request)

    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> None:
        self.enqueue(self.prepare_request(request_id, prompt, params, prompt_token_ids, priority, cache_salt))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        core = self.abort_core(request_id)
        processor = self._processors.pop(request_id, None)
        return processor.process(core) if core is not None and processor is not None else None

    def abort_core(self, request_id: str) -> CoreOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        updates = []
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                updates.append(SeqUpdate(seq.index, finish_reason="abort"))
        return self._core_output(req, updates)

    def finish_sequences(self, stops: list[StopHit]) -> None:
        """End the sequences an output processor found a stop string in (their later tokens are not wanted)."""
        for hit in stops:
            req = self.requests.get(hit.request_id)
            if req is None:
                continue
            seq = req.seqs[hit.index]
            if not seq.finished:
                self.scheduler.finish(seq, "stop", hit.stop)
            if all(s.finished for s in req.seqs):
                del self.requests[hit.request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_generated_tokens(self) -> int:
        return self.scheduler.num_generated_tokens

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens computed (recomputation after a preemption included; cached ones not)."""
        return self.scheduler.num_prompt_tokens

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one step and return the outputs of the requests it advanced (`step_core`, processed)."""
        outputs, stops = [], []
        for core in self.step_core():
            processor = self._processors.get(core.request_id)
            if processor is None:
                continue  # its outputs go to whoever enqueued it with process_outputs=False
            outputs.append(processor.process(core, stops))
            if processor.finished:
                del self._processors[core.request_id]
        self.finish_sequences(stops)
        return outputs

    def step_core(self) -> list[CoreOutput]:
        """Run one step and return the deltas of the requests it advanced.

        With look-ahead (`async_scheduling`), a step of decodes launches the next one, each sequence fed the token
        still being sampled on the device, before it reads its own tokens back; the next `step()` call then starts
        from that queued step. Host work (bookkeeping, stop checks, the next step's metadata, the output processors)
        runs while the device computes. A sequence that turns out finished has one wasted row in the queued step,
        whose token is dropped; its results are as without look-ahead."""
        launched, self._inflight = self._inflight, None
        if launched is not None and all(s.finished for s in launched.sample_seqs):
            launched = None  # everything it computed was aborted meanwhile
        if launched is None:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                return []
            self.num_steps += 1
            try:
                launched = self._launch(batch)
            except Exception as e:  # a failed step fails its requests, never the engine or other requests
                return self._step_failed(batch, e)
        try:
            ahead = self._lookahead(launched)
            if ahead is not None:
                self.num_steps += 1
                self.num_lookahead_steps += 1
                self._inflight = self._launch(*ahead)
            outputs = self._complete(launched)
        except Exception as e:
            self._inflight = None
            return self._step_failed(launched.batch, e)
        if self._inflight is not None and all(s.finished for s in self._inflight.sample_seqs):
            self._inflight = None  # every sequence in it finished in the step just read: nothing to keep
        return outputs

    def _step_failed(self, batch: ScheduledBatch, error: Exception) -> list[CoreOutput]:
        log.error("step failed; failing the %d requests in it", len(batch.seqs), exc_info=error)
        return self._fail(batch, f"internal error while running the model: {type(error).__name__}")

    def _launch(self, batch: ScheduledBatch, input_tokens: torch.Tensor | None = None) -> _Launched:
        """Queue the forward and the sampling of a step; `input_tokens` (device) for a look-ahead step."""
        prompt_only = _take_prompt_only(batch)
        logits = self.runner.execute(batch.step, input_tokens)
        self.scheduler.on_launched(batch)
        self._update_expert_load()
        num_sampled = len(batch.sample_seqs)
        self._record_prompt_logprobs(logits[num_sampled:], batch.prompt_rows)
        pending = self.sampler.launch(logits[:num_sampled], batch.sample_seqs) if num_sampled else None
        return _Launched(batch, batch.sample_seqs, pending, prompt_only)

    def _complete(self, launched: _Launched) -> list[CoreOutput]:
        """Read a launched step's tokens and apply them (append, stop tokens, lengths); -> the deltas."""
        updates: dict[str, list[SeqUpdate]] = {}
        for seq in launched.prompt_only:
            if not seq.finished:  # (unless aborted meanwhile) its prompt is computed: all it asked for
                self.scheduler.finish(seq, "length")
                updates.setdefault(seq.request_id, []).append(SeqUpdate(seq.index, finish_reason="length"))
        if launched.pending is not None:
            self._apply_sampled(launched, updates)
        outputs = []
        for request_id, seq_updates in updates.items():
            req = self.requests[request_id]
            outputs.append(self._core_output(req, seq_updates))
            if all(s.finished for s in req.seqs):
                del self.requests[request_id]
        return outputs

    def _apply_sampled(self, launched: _Launched, updates: dict[str, list[SeqUpdate]]) -> None:
        result = launched.pending.result()
        rows = {id(seq): i for i, seq in enumerate(launched.sample_seqs)}
        appended = self.scheduler.update_from_output(launched.sample_seqs, result.token_ids)
        for seq in appended:
            i = rows[id(seq)]
            lps = result.logprobs[i]
            updates.setdefault(seq.request_id, []).append(SeqUpdate(
                seq.index, [result.token_ids[i]], None if lps is None else [lps],
                None if lps is None else [result.token_logprobs[i]], seq.finish_reason, seq.stop_reason))

    def _lookahead(self, launched: _Launched) -> tuple[ScheduledBatch, torch.Tensor] | None:
        """The decode step to queue behind `launched` before its tokens are known, with its input tokens on the
        device; None when the scheduler must decide the next step (new work to admit, a prompt still being
        prefilled, blocks running out) or a request's sampling needs the token it has not seen yet."""
        if not self.async_scheduling or launched.pending is None or self._admissible_waiting():
            return None
        if len(launched.sample_seqs) != len(self.scheduler.running):  # some running prompt is mid-prefill
            return None
        if not all(self._lookahead_safe(seq) for seq in launched.sample_seqs):
            return None
        # a sequence whose pending token is its last (max_tokens) stops there: known now, so no row for it
        keep = [i for i, seq in enumerate(launched.sample_seqs) if len(seq.output_token_ids) + 1 < seq.max_tokens]
        if not keep:
            return None
        batch = self.scheduler.schedule_lookahead([launched.sample_seqs[i] for i in keep])
        if batch is None:
            return None
        tokens = launched.pending.tokens
        if len(keep) < len(launched.sample_seqs):
            tokens = tokens.index_select(0, torch.tensor(keep, device=tokens.device))
        return batch, tokens

    def _admissible_waiting(self) -> bool:
        """Whether a waiting sequence could start next step (then the scheduler, not the look-ahead, runs it)."""
        return self.scheduler.admissible()  # a free slot, or one a fairness group is owed

    @staticmethod
    def _lookahead_safe(seq: Sequence) -> bool:
        """Sampling that does not depend on the token still pending: no penalties (they count the output), no
        grammar (it advances on each token), no per-request seed (its noise is keyed by output position), and
        min_tokens already met (its stop-token mask counts the output)."""
        p = seq.params
        return (not p.needs_penalties and seq.constraint is None and seq.sampling_seed is None
                and len(seq.output_token_ids) >= p.min_tokens)

    def _update_expert_load(self) -> None:
        counts = self.runner.take_expert_counts()
        if counts is None:
            return
        # kept on the model's device: read (one sync) only when expert_load() is asked for
        if self.expert_tokens_total is None:
            self.expert_tokens_total = counts
            self.expert_load_ema = counts.float()
        else:
            self.expert_tokens_total += counts
            self.expert_load_ema.mul_(0.9).add_(counts.float(), alpha=0.1)

    def expert_load(self) -> dict | None:
        """Per MoE layer: tokens routed to each expert so far, and max/mean of the recent load (1 = balanced)."""
        if self.expert_tokens_total is None:
            return None
        ema = self.expert_load_ema
        mean = ema.mean(dim=1)
        imbalance = torch.where(mean > 0, ema.amax(dim=1) / mean.clamp_min(1e-12), torch.ones_like(mean))
        return {"layers": list(self.runner.moe_layers), "tokens": self.expert_tokens_total.tolist(),
                "imbalance": imbalance.tolist()}

    def _record_prompt_logprobs(self, logits, prompt_rows) -> None:
        if not prompt_rows:
            return
        raw = torch.log_softmax(logits, dim=-1)
        for i, (seq, position) in enumerate(prompt_rows):
            if len(seq.prompt_logprobs) == position:  # skip positions recomputed after a preemption
                seq.prompt_logprobs.append(position_logprobs(raw[i], seq.prompt_token_ids[position],
                                                             seq.params.prompt_logprobs))

    def _fail(self, batch: ScheduledBatch, message: str) -> list[CoreOutput]:
        outputs = []
        for req_id in dict.fromkeys(s.request_id for s in batch.seqs):
            req = self.requests.pop(req_id, None)
            if req is None:
                continue
            updates = []
            for seq in req.seqs:
                if not seq.finished:
                    self.scheduler.finish(seq, "error")
                    seq.error = message
                    updates.append(SeqUpdate(seq.index, finish_reason="error"))
            out = self._core_output(req, updates)
            out.error = message
            outputs.append(out)
        return outputs

    # ------------------------------------------------------------------ outputs
    def _core_output(self, req: _Request, updates: list[SeqUpdate]) -> CoreOutput:
        first = req.seqs[0]
        finished = all(s.finished for s in req.seqs)
        metrics = {"arrival_time": req.arrival_time}
        for key in ("first_scheduled_time", "first_token_time"):
            times = [getattr(s, key) for s in req.seqs if getattr(s, key) is not None]
            if times:
                metrics[key] = min(times)
        prompt_logprobs = None
        if (first.prompt_logprobs is not None and not req.prompt_logprobs_sent
                and (finished or len(first.prompt_logprobs) == len(req.prompt_token_ids))):
            prompt_logprobs, req.prompt_logprobs_sent = list(first.prompt_logprobs), True
        return CoreOutput(request_id=req.request_id, seqs=updates, finished=finished,
                          error=next((s.error for s in req.seqs if s.error), None), metrics=metrics,
                          num_cached_tokens=max(s.num_cached_tokens for s in req.seqs),
                          prompt_logprobs=prompt_logprobs)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one device)."""
        if self.executor is not None:
            self.executor.shutdown()

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        kv = self.kv
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self.scheduler.paused),  # paused: not running either
            "num_paused": len(self.scheduler.paused),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_pauses": self.scheduler.num_pauses,
            "num_steps": self.num_steps,
            "num_lookahead_steps": self.num_lookahead_steps,
            "num_generated_tokens": self.scheduler.num_generated_tokens,
            "num_prompt_tokens": self.scheduler.num_prompt_tokens,
            "num_cached_prompt_tokens": self.scheduler.cached_prompt_tokens,  # taken from the prefix cache instead
            "kv_cache_usage": kv.usage(),
            "kv_blocks": {"full": {"used": kv.full.num_used, "total": kv.full.num_blocks},
                          "sliding": {"used": kv.sliding.num_used, "total": kv.sliding.num_blocks}},
            "block_size": kv.block_size,
            "sliding_window_blocks": kv.window_blocks,
            "prefix_cache": self.prefix_cache_stats(),
        }

    def prefix_cache_stats(self) -> dict:
        sched, kv = self.scheduler, self.kv
        queried, hits = sched.prefix_queried_tokens, sched.prefix_hit_tokens
        return {"enabled": sched.config.enable_prefix_caching, "queried_tokens": queried, "hit_tokens": hits,
                "hit_rate": hits / queried if queried else 0.0,
                "cached_blocks": {"full": kv.full.num_cached, "sliding": kv.sliding.num_cached}}

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (running requests keep theirs); later prompts compute from scratch."""
        self.kv.reset_prefix_cache()

    def update_weights(self, weights) -> int:
        """Serve new weights from now on: copy each (name, tensor) (a mapping or pairs, under the model's names,
        whole) into the model's tensor in place (`weight_update`), on every tensor-parallel rank, then forget the
        prefix cache, whose blocks hold keys and values the old weights computed. Only between requests: a running
        sequence's cache would mix two models. -> the number of tensors copied."""
        if self.has_unfinished():
            raise RuntimeError("update_weights while requests run: finish or abort them first")
        pairs = list(weights.items() if hasattr(weights, "items") else weights)
        check_weights(self.model, pairs)
        if self.executor is not None:
            self.executor.send_weights(pairs)  # each worker copies its slices as rank 0 does below
        copied = copy_weights(self.model, pairs)
        self.reset_prefix_cache()
        return copied

    def kv_tokens_held(self, request_id: str) -> dict[str, int]:
        """Token slots per layer each pool holds for a running request (its first sequence)."""
        req = self.requests[request_id]
        return self.kv.tokens_capacity(req.seqs[0].seq_id)
