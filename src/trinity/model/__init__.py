from .attention import AttentionMetadata, ContiguousKVCache, PackedSequences
from .checkpoint import CheckpointError
from .model import TrinityForCausalLM

__all__ = ["AttentionMetadata", "CheckpointError", "ContiguousKVCache", "PackedSequences", "TrinityForCausalLM"]
