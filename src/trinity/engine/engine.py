"""LLMEngine: add_request / abort / step / has_unfinished. One step = schedule -> run -> update."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from ..kernels import native
from ..model.model import TrinityForCausalLM
from .kv_cache import KVCacheManager
from .request import CompletionOutput, RequestOutput, Sequence
from .runner import ModelRunner, plan_cache
from .sampler import PendingSample, Sampler, position_logprobs
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig

log = logging.getLogger("trinity.engine")


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # True: no CUDA graphs for decode (they are captured only on CUDA with Triton)
    seed: int | None = 0
    # Look-ahead decoding: launch the next decode step before reading this one's tokens, so the host's work on a
    # step overlaps the device's. None: on where the model runs asynchronously (CUDA); True forces it anywhere.
    async_scheduling: bool | None = None
    # Automatic prefix caching: a prompt whose leading blocks were computed before (a shared system prompt, the
    # earlier turns of a chat) takes their K/V from the cache instead of computing them again.
    enable_prefix_caching: bool = True


@dataclass(slots=True)
class _Launched:
    """A step whose forward and sampling are queued on the device, its tokens not yet read."""

    batch: ScheduledBatch
    sample_seqs: list[Sequence]  # the sequences that get a token from it, in sampling-row order
    pending: PendingSample | None


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float


class LLMEngine:
    def __init__(self, model: TrinityForCausalLM, tokenizer=None, config: EngineConfig | None = None):
        self.model = model.eval().fuse_projections()
        if model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16):
            native.library()  # build (or load) the CPU kernels now, not inside the first request (~3 s to build)
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        plan = plan_cache(model, config.block_size, config.max_num_seqs, self.max_model_len, config.num_kv_blocks,
                          config.kv_cache_memory, config.gpu_memory_utilization, config.enable_prefix_caching)
        sliding = [cfg.is_sliding_layer(i) for i in range(cfg.num_hidden_layers)]
        self.kv = KVCacheManager(config.block_size, plan.num_full_blocks, plan.num_sliding_blocks,
                                 cfg.sliding_window, has_full_layers=not all(sliding), has_sliding_layers=any(sliding),
                                 prefix_caching=config.enable_prefix_caching)
        self.cache_plan = plan
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len, config.enable_prefix_caching), self.kv)
        self.runner = ModelRunner(model, plan, self.kv.layout, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len, enforce_eager=config.enforce_eager)
        self.sampler = Sampler(model.device, config.seed)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else model.device.type == "cuda")
        self._inflight: _Launched | None = None  # the look-ahead step queued by the last `step()`
        self.eos_token_ids = tuple(sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())))
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0
        self.num_lookahead_steps = 0  # steps queued before the previous step's tokens were read
        # Expert load per MoE layer: cumulative token counts and a moving average of each step's share.
        self.expert_tokens_total = None
        self.expert_load_ema = None

    # ------------------------------------------------------------------ requests
    def prepare_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                        prompt_token_ids: list[int] | None = None, priority: int = 0,
                        cache_salt: str | None = None) -> _Request:
        """Validate and build a request without touching engine state (safe from any thread). `cache_salt`: the
        request shares prefix-cache blocks only with requests that give the same salt (tenants apart)."""
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
                raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) leaves no room to generate within "
                                 f"max_model_len ({self.max_model_len})")
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
                                 cache_salt=cache_salt))
        return _Request(request_id, prompt, list(prompt_token_ids), seqs, now)

    def enqueue(self, request: _Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        for seq in request.seqs:
            if self.tokenizer is not None:
                seq.detokenizer = self.tokenizer.detokenizer(skip_special_tokens=seq.params.skip_special_tokens)
            if seq.params.logprobs is not None:
                seq.logprobs = []
            if seq.params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]  # the first prompt token has no context to be scored in
            if seq.params.constraint_factory is not None:
                seq.constraint = seq.params.constraint_factory()
            self.scheduler.add(seq)
        self.requests[request.request_id] = request

    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> None:
        self.enqueue(self.prepare_request(request_id, prompt, params, prompt_token_ids, priority, cache_salt))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        return self._output(req)

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
        """Run one step and return the outputs of the requests it advanced.

        With look-ahead (`async_scheduling`), a step of decodes launches the next one, each sequence fed the token
        still being sampled on the device, before it reads its own tokens back; the next `step()` call then starts
        from that queued step. Host work (bookkeeping, detokenizing, stop checks, the next step's metadata) runs
        while the device computes. A sequence that turns out finished has one wasted row in the queued step,
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

    def _step_failed(self, batch: ScheduledBatch, error: Exception) -> list[RequestOutput]:
        log.error("step failed; failing the %d requests in it", len(batch.seqs), exc_info=error)
        return self._fail(batch, f"internal error while running the model: {type(error).__name__}")

    def _launch(self, batch: ScheduledBatch, input_tokens: torch.Tensor | None = None) -> _Launched:
        """Queue the forward and the sampling of a step; `input_tokens` (device) for a look-ahead step."""
        logits = self.runner.execute(batch.step, input_tokens)
        self.scheduler.on_launched(batch)
        self._update_expert_load()
        num_sampled = len(batch.sample_seqs)
        self._record_prompt_logprobs(logits[num_sampled:], batch.prompt_rows)
        pending = self.sampler.launch(logits[:num_sampled], batch.sample_seqs) if num_sampled else None
        return _Launched(batch, batch.sample_seqs, pending)

    def _complete(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens and apply them: append, stop checks, outputs."""
        if launched.pending is None:
            return []
        result = launched.pending.result()
        for i, seq in enumerate(launched.sample_seqs):
            lps = result.logprobs[i]
            if lps is not None and not seq.finished:
                # the same special-token rule as the text, so that the tokens' strings add up to the text
                self._decode_logprob_tokens(lps, seq.params.skip_special_tokens)
                seq.logprobs.append(lps)
                seq.cumulative_logprob += result.token_logprobs[i]
        appended = self.scheduler.update_from_output(launched.sample_seqs, result.token_ids, self._add_text)
        touched: dict[str, _Request] = {}
        for seq in appended:
            if (seq.finished and seq.detokenizer is not None and seq.finish_reason in ("length", "stop")
                    and seq.stop_reason is None):
                seq.text += seq.detokenizer.flush()
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if all(s.finished for s in req.seqs):
                del self.requests[req.request_id]
        return outputs

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
        sched = self.scheduler
        return bool(sched.waiting) and len(sched.running) < sched.config.max_num_seqs

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
                lps = position_logprobs(raw[i], seq.prompt_token_ids[position], seq.params.prompt_logprobs)
                self._decode_logprob_tokens(lps)
                seq.prompt_logprobs.append(lps)

    def _add_text(self, seq: Sequence, token: int) -> str | None:
        """Detokenize a sampled token (not a stop token); -> the stop string it completed, if any."""
        if seq.detokenizer is None:
            return None
        before = len(seq.text)
        seq.text += seq.detokenizer.add(token)
        if seq.params.stop and len(seq.output_token_ids) >= seq.params.min_tokens:  # min_tokens holds them back too
            return self._check_stop_strings(seq, before)
        return None

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_from: int) -> str | None:
        """The stop string that now appears (the text is cut to end before it, or after it if asked), or None.
        A new match must end in the text added since `new_from`, so the search starts just before it."""
        p = seq.params
        longest = max(len(s) for s in p.stop)
        window_start = max(0, new_from - longest + 1)
        hits = [(seq.text.find(s, window_start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        i, s = min(hits)
        seq.text = seq.text[:i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
        return s

    def _decode_logprob_tokens(self, lps, skip_special_tokens: bool = False) -> None:
        if self.tokenizer is not None:
            for tid, lp in lps.items():
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=skip_special_tokens)

    def _fail(self, batch: ScheduledBatch, message: str) -> list[RequestOutput]:
        outputs = []
        for req_id in dict.fromkeys(s.request_id for s in batch.seqs):
            req = self.requests.pop(req_id, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.finished:
                    self.scheduler.finish(seq, "error")
                    seq.error = message
            out = self._output(req)
            out.error = message
            outputs.append(out)
        return outputs

    # ------------------------------------------------------------------ outputs
    def _visible_text(self, seq: Sequence) -> str:
        """While running, hold back a tail that could still become a stop string."""
        if seq.finished or not seq.params.stop:
            return seq.text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.text[:max(0, len(seq.text) - hold)] if hold else seq.text

    def _output(self, req: _Request) -> RequestOutput:
        outs = [CompletionOutput(index=s.index, text=self._visible_text(s), token_ids=list(s.output_token_ids),
                                 cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                 logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                 finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in req.seqs]
        first = req.seqs[0]
        finished = all(s.finished for s in req.seqs)
        metrics = {"arrival_time": req.arrival_time}
        for key in ("first_scheduled_time", "first_token_time"):
            times = [getattr(s, key) for s in req.seqs if getattr(s, key) is not None]
            if times:
                metrics[key] = min(times)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             prompt_logprobs=first.prompt_logprobs, outputs=outs, finished=finished,
                             error=next((s.error for s in req.seqs if s.error), None), metrics=metrics,
                             num_cached_tokens=max(s.num_cached_tokens for s in req.seqs))

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        kv = self.kv
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "num_lookahead_steps": self.num_lookahead_steps,
            "num_generated_tokens": self.scheduler.num_generated_tokens,
            "num_prompt_tokens": self.scheduler.num_prompt_tokens,
            "num_cached_prompt_tokens": self.scheduler.cached_prompt_tokens,  # taken from the prefix cache instead
            "kv_cache_usage": kv.usage(),
            "kv_blocks": {"full": {"used": kv.full.num_used, "total": kv.full.num_blocks},
                          "sliding": {"used": kv.sliding.num_used, "total": kv.sliding.num_blocks}},
            "block_size": kv.block_size,
            "sliding_ring_blocks": kv.ring_blocks,
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

    def kv_tokens_held(self, request_id: str) -> dict[str, int]:
        """Token slots per layer each pool holds for a running request (its first sequence)."""
        req = self.requests[request_id]
        return self.kv.tokens_capacity(req.seqs[0].seq_id)
