"""Synthetic agentic corpus for the built-in tiny model: arithmetic worked column by column, tool calls with
fake backends, JSON replies, short plain answers and multi-turn conversations, all from this project's own
templates and word lists; plus a BPE tokenizer trained on it and the checks the evaluator applies.

    python -m trinity.synthetic --out DIR --train N --heldout M --seed S
    python -m trinity.synthetic tokenizer --corpus DIR --vocab 4096 --out DIR
"""

from .conversations import FAMILIES, HELDOUT_MIX, TRAIN_MIX, example_at
from .corpus import write_corpus
from .example import Checkpoint, Example

__all__ = ["FAMILIES", "HELDOUT_MIX", "TRAIN_MIX", "Checkpoint", "Example", "example_at", "write_corpus"]
