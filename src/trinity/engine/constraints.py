"""The engine's hook for constrained decoding (structured output), free of any grammar library.

A request's SamplingParams may carry `constraint_factory`: called once per generated sequence, it returns
an object with this protocol. Each step the sampler masks the sequence's logits to `allowed_tokens`, and
after a token is chosen the engine calls `accept`. When `is_finished` turns true the sequence ends with
finish_reason "stop" (the grammar is complete). `trinity.serve.structured` implements it with xgrammar.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TokenConstraint(Protocol):
    def allowed_tokens(self, vocab_size: int) -> torch.Tensor:
        """Bool mask [vocab_size] of the tokens that may come next."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past a chosen token (always one `allowed_tokens` permitted)."""
        ...

    def is_finished(self) -> bool:
        ...
