"""trinity: load, run, serve and train the Arcee Trinity family (AfmoeForCausalLM).

The names below load on first use (`_lazy`): importing a torch-free part of the package does not load torch."""

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {"LLM": ".engine", "SamplingParams": ".engine", "CheckpointError": ".model",
            "TrinityForCausalLM": ".model", "ConfigError": ".config", "TrinityConfig": ".config", "preset": ".config"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
