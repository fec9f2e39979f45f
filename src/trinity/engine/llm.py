"""`trinity.LLM`: the offline API, shaped like vLLM's."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence as Seq

from .config import EngineConfig
from .engine import LLMEngine
from .request import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """Batch generation over the engine.

    `model`: a checkpoint folder, a preset name, or a `TrinityForCausalLM` (then pass `tokenizer`, or use
    token ids only). `quantization="fp8"` (or `dtype="fp8"`): FP8 weights quantized while loading. The other
    keywords are `EngineConfig`'s fields (max_model_len, max_num_seqs, block_size, seed, ...: see
    `inspect.signature(LLM)`), derived from it so that a new engine setting needs no edit here.
    """

    def __init__(self, model=None, tokenizer=None, dtype: str = "auto", device: str = "auto",
                 quantization: str | None = None, **engine_settings):
        from ..model.model import TrinityForCausalLM

        config = EngineConfig.from_kwargs("LLM", **engine_settings)  # checked before a model is loaded
        executor = None
        if config.tensor_parallel_size > 1:
            from ..parallel.executor import start_rank0

            model, loaded, executor = start_rank0(model, dtype, device, config, quantization=quantization)
            tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else None)
        elif not isinstance(model, TrinityForCausalLM):
            from ..loading import load_model

            loaded = load_model(model, dtype=dtype, device=device, seed=config.seed or 0, quantization=quantization)
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        self.engine = LLMEngine(model, tokenizer, config, executor=executor)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (they also stop when this process exits)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def update_weights(self, weights) -> int:
        """Serve new weights (name -> tensor, the checkpoint's names), copied in place; the prefix cache is
        forgotten. For a trainer that generates with this LLM between optimizer steps (`LLMEngine.update_weights`)."""
        return self.engine.update_weights(weights)

    def generate(self, prompts=None, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: Seq[Seq[int]] | None = None, priority: Seq[int] | None = None) \
            -> list[RequestOutput]:
        """`prompts`: a string, a list of strings, or dicts with "prompt" or "prompt_token_ids"; or give
        `prompt_token_ids` (a list of id lists). One `SamplingParams` for all, or one per prompt.
        Outputs come back in the prompts' order."""
        items = self._normalise(prompts, prompt_token_ids)
        if isinstance(sampling_params, Seq) and not isinstance(sampling_params, SamplingParams):
            if len(sampling_params) != len(items):
                raise ValueError(f"{len(sampling_params)} sampling params for {len(items)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(items)
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"{len(priority)} priorities for {len(items)} prompts")
        # Validate every request before queuing any, so a bad one leaves nothing half-submitted.
        prepared = [self.engine.prepare_request(f"offline-{next(self._ids)}", text, params, ids,
                                                priority[i] if priority else 0)
                    for i, ((text, ids), params) in enumerate(zip(items, params_list))]
        for req in prepared:
            self.engine.enqueue(req)
        order = {req.request_id: i for i, req in enumerate(prepared)}
        results: list[RequestOutput | None] = [None] * len(prepared)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[order[out.request_id]] = out
        return results  # type: ignore[return-value]

    def chat(self, messages, sampling_params: SamplingParams | None = None, tools: list[dict] | None = None,
             enable_thinking: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """`messages`: one conversation (a list of message dicts) or a list of conversations."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [tokenizer.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=True,
                                             enable_thinking=enable_thinking, **(chat_template_kwargs or {}))
               for conv in conversations]
        return self.generate(prompt_token_ids=ids, sampling_params=sampling_params)

    @staticmethod
    def _normalise(prompts, prompt_token_ids) -> list[tuple[str | None, list[int] | None]]:
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("give prompts or prompt_token_ids, not both")
            return [(None, list(ids)) for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("give prompts or prompt_token_ids")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        items = []
        for p in prompts:
            if isinstance(p, str):
                items.append((p, None))
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                items.append((p.get("prompt"), list(p["prompt_token_ids"])))
            elif isinstance(p, dict) and "prompt" in p:
                items.append((p["prompt"], None))
            else:
                raise ValueError(f"cannot read prompt {p!r}: give a string or a dict with 'prompt' or "
                                 "'prompt_token_ids'")
        return items


def _derived_signature(init) -> inspect.Signature:
    """`LLM.__init__`'s own parameters, then EngineConfig's fields as keyword-only parameters (for help() and
    editors; the call itself goes through `EngineConfig.from_kwargs`)."""
    sig = inspect.signature(init)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return sig.replace(parameters=own + EngineConfig.signature_parameters())


LLM.__init__.__signature__ = _derived_signature(LLM.__init__)
