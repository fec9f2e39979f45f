"""The engine. The names below load on first use (`trinity._lazy`): the control plane (scheduler, KV manager,
requests, the step contract) imports no torch, and importing it through this package must not load torch."""

from .._lazy import lazy_getattr

_EXPORTS = {"EngineConfig": ".config", "LLMEngine": ".engine", "LLM": ".llm", "CompletionOutput": ".request",
            "ContextLengthError": ".request", "Logprob": ".request", "RequestOutput": ".request",
            "SamplingError": ".sampling_params",
            "SamplingParams": ".sampling_params"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
