"""trinity: load, run, serve and train the Arcee Trinity family (AfmoeForCausalLM)."""

from .config import ConfigError, TrinityConfig, preset
from .model import CheckpointError, TrinityForCausalLM

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "TrinityConfig", "TrinityForCausalLM", "preset"]
