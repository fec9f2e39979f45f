"""The sampler: logits of the rows that produce a token this step -> token ids and logprobs.

Order per row: logit_bias, min_tokens (stop ids masked), repetition / frequency / presence penalties,
then greedy argmax, or temperature, top-k, top-p, min-p and a draw. A request with a `seed` draws its
noise from a generator seeded by (seed, output position) alone, so its tokens do not depend on what else
is in the batch or on preemption. Logprobs are those of the raw model distribution (before penalties and
temperature), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import Logprob, PositionLogprobs, Sequence

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, position) over the seed space


def token_seed(seed: int, position: int) -> int:
    return (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # per row, when the request asked for them
    token_logprobs: list[float | None]  # raw logprob of each chosen token, when computed


def position_logprobs(raw: torch.Tensor, token: int, top_n: int) -> PositionLogprobs:
    """raw: [V] log-probabilities -> the chosen token (with its rank) plus the top-N alternatives."""
    value = raw[token]
    out: PositionLogprobs = {token: Logprob(float(value), int((raw > value).sum()) + 1)}
    if top_n:
        top = torch.topk(raw, top_n)
        for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            out.setdefault(tid, Logprob(lp, rank))
    return out


@dataclass(slots=True)
class PendingSample:
    """Sampling queued on the device: `tokens` [N] there now, the host values and logprobs on `result()`."""

    tokens: torch.Tensor
    top_logprobs: list[int | None]  # per row: the request's top-N, None when it asked for no logprobs
    raw: torch.Tensor | None  # [N, V] log-probabilities of the model, when a row wants logprobs
    host: torch.Tensor | None = None  # pinned copy of `tokens`, filled when `event` completes
    event: torch.cuda.Event | None = None

    def result(self) -> SampleResult:
        if self.event is not None:
            self.event.synchronize()
        ids = (self.host if self.host is not None else self.tokens).tolist()
        logprobs: list[PositionLogprobs | None] = []
        chosen: list[float | None] = []
        for i, (token, top_n) in enumerate(zip(ids, self.top_logprobs)):
            if top_n is None:
                logprobs.append(None)
                chosen.append(None)
            else:
                lps = position_logprobs(self.raw[i], token, top_n)
                logprobs.append(lps)
                chosen.append(lps[token].logprob)
        return SampleResult(ids, logprobs, chosen)


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None):
        self.device = device
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [N, V] fp32, one row per sequence in `seqs`."""
        return self.launch(logits, seqs).result()

    def launch(self, logits: torch.Tensor, seqs: list[Sequence]) -> PendingSample:
        """Queue the sampling on the logits' device without waiting for it: the chosen ids stay on the device
        (a look-ahead step feeds them straight to the next forward) and are copied to pinned host memory in the
        background; `result()` waits for that copy."""
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        raw = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        tokens = self._choose(self._process(logits, seqs), seqs)
        host = event = None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return PendingSample(tokens, [s.params.logprobs for s in seqs], raw, host, event)

    # ------------------------------------------------------------------ logits processing
    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        x = logits
        vocab = logits.shape[-1]
        cloned = False
        for i, seq in enumerate(seqs):
            p = seq.params
            bias = p.logit_bias
            block = p.stop_ids() if len(seq.output_token_ids) < p.min_tokens else None
            if not (bias or block):
                continue
            if not cloned:
                x, cloned = x.clone(), True
            if bias:
                ids = [t for t in bias if 0 <= t < vocab]
                x[i, ids] += torch.tensor([float(bias[t]) for t in ids], device=x.device)
            if block:
                x[i, [t for t in block if 0 <= t < vocab]] = float("-inf")
        rows = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
        if rows:
            if not cloned:
                x, cloned = x.clone(), True
            x[rows] = self._penalise(x[rows], [seqs[i] for i in rows])
        for i, seq in enumerate(seqs):  # structured output: only tokens the grammar allows
            if seq.constraint is not None:
                if not cloned:
                    x, cloned = x.clone(), True
                allowed = seq.constraint.allowed_tokens(vocab).to(x.device)
                x[i] = x[i].masked_fill(~allowed, float("-inf"))
        return x

    def _penalise(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        n, vocab = x.shape
        dev = x.device
        counts = torch.zeros(n, vocab, device=dev)
        in_prompt = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
        for i, seq in enumerate(seqs):
            if seq.output_token_ids:
                ids = torch.tensor(seq.output_token_ids, device=dev).clamp(max=vocab - 1)
                counts[i].scatter_add_(0, ids, torch.ones(len(ids), device=dev))
            in_prompt[i, torch.tensor(seq.prompt_token_ids, device=dev).clamp(max=vocab - 1)] = True
        # a penalty below fp32's smallest normal would round to 0: x / 0 and -inf * 0 give inf and NaN
        rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev)[:, None].clamp(
            min=torch.finfo(x.dtype).tiny)
        freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev)[:, None]
        pres = torch.tensor([s.params.presence_penalty for s in seqs], device=dev)[:, None]
        seen = in_prompt | (counts > 0)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        # a tiny penalty can still overflow a logit to +inf (softmax of inf is NaN): keep it the largest finite one
        return (x - freq * counts - pres * (counts > 0).float()).clamp(max=torch.finfo(x.dtype).max)

    # ------------------------------------------------------------------ choosing
    def _choose(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        tokens = x.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            probs = self._filtered_probs(x[rows], [seqs[i].params for i in rows])
            drawn = self._draw(probs, [seqs[i] for i in rows])
            # never draw from NaN or an all-zero row (its CDF points at no real token): such a row, which only
            # extreme sampling values can produce, takes the greedy choice instead
            broken = ~(torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0))
            tokens[rows] = torch.where(broken, tokens[rows], drawn)
        return tokens

    def _draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row drawn from `probs` by inverse CDF: one uniform number per row, where the exponential race
        it replaced drew one per vocabulary entry and cost far more than the greedy path (benchmarks/README.md,
        fairness). A row with a seed takes its number from a generator seeded by (seed, position), so it does not
        depend on the batch; the others share the sampler's generator."""
        u = torch.empty(len(seqs), 1, device=probs.device)
        free = [j for j, s in enumerate(seqs) if s.sampling_seed is None]
        if free:
            u[free] = torch.rand(len(free), 1, generator=self.generator, device=probs.device)
        for j, seq in enumerate(seqs):
            if seq.sampling_seed is not None:
                g = torch.Generator(device=self.device)
                g.manual_seed(token_seed(seq.sampling_seed, len(seq.output_token_ids)))
                u[j] = torch.rand(1, generator=g, device=probs.device)
        # the first token whose cumulative probability reaches (1 - u) * total: 1 - u lies in (0, 1], so a token of
        # probability 0 (a flat step of the CDF) is never the first to reach it; fp64 keeps a 200k-token vocabulary's
        # running sum exact enough for the tail
        cdf = probs.double().cumsum(dim=-1)
        target = (1 - u.double()) * cdf[:, -1:]
        return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=probs.shape[-1] - 1)

    @staticmethod
    def _filtered_probs(x: torch.Tensor, params: list) -> torch.Tensor:
        dev = x.device
        temp = torch.tensor([p.temperature for p in params], device=dev)[:, None]
        # greedy rows never come here, so temp >= GREEDY_TEMPERATURE; the quotient can still overflow: keep it finite
        x = (x / temp).clamp(max=torch.finfo(x.dtype).max)
        if any(p.top_k or p.top_p < 1 for p in params):
            sorted_x, order = x.sort(dim=-1, descending=True)
            vocab = x.shape[-1]
            k = torch.tensor([min(p.top_k, vocab) if p.top_k else vocab for p in params], device=dev)[:, None]
            drop = torch.arange(vocab, device=dev)[None, :] >= k
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
            sorted_probs = torch.softmax(sorted_x, dim=-1)
            # drop a token once the tokens ranked above it already cover top_p (the first always stays, even where a
            # tiny top_p rounds to 0 in fp32)
            drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            drop[:, 0] = False
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(-1, order, sorted_x)
        probs = torch.softmax(x, dim=-1)
        if any(p.min_p for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        return probs
