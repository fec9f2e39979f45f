"""trinity: load, run, serve and train the Arcee Trinity family (AfmoeForCausalLM)."""

from .config import ConfigError, TrinityConfig, preset
from .engine import LLM, SamplingParams
from .model import CheckpointError, TrinityForCausalLM

__version__ = "0.1.0"
__all__ = ["LLM", "CheckpointError", "ConfigError", "SamplingParams", "TrinityConfig", "TrinityForCausalLM", "preset"]
