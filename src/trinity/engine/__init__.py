"""The engine. The names below load on first use: the control plane (scheduler, KV manager, requests, the step
contract) imports no torch, and importing it through this package must not load torch either."""

from importlib import import_module

_LAZY = {"EngineConfig": ".engine", "LLMEngine": ".engine", "LLM": ".llm", "CompletionOutput": ".request",
         "Logprob": ".request", "RequestOutput": ".request", "SamplingError": ".sampling_params",
         "SamplingParams": ".sampling_params"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
