"""trinity: load, run, serve and train the Arcee Trinity family (AfmoeForCausalLM).

The names below load on first use, so that importing a torch-free part of the package (the scheduler, the KV
manager, the configuration) does not load torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"LLM": ".engine", "SamplingParams": ".engine", "CheckpointError": ".model",
         "TrinityForCausalLM": ".model", "ConfigError": ".config", "TrinityConfig": ".config", "preset": ".config"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
