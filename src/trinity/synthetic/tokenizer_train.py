"""A BPE tokenizer for the tiny model, trained on the synthetic corpus as the model will see it.

- Byte-level BPE with the project's fixed id layout (special tokens 0..9, bytes 10..265, merges after), so
  any text encodes and `trinity.tokenizer.TrinityTokenizer` loads it like every other Trinity tokenizer.
- Digits are split one per token before BPE: a merge like "37" would make column arithmetic unlearnable for
  a small model (the digit it needs would be hidden inside another token).
- Training text is each conversation rendered through the chat template (tools section, think tags, tool
  call blocks), so the merges fit the prompts the server will send.
- `tokenizer_config.json` carries the chat template too, for clients (transformers) that read it there.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from ..chat_template import BUILTIN_CHAT_TEMPLATE
from ..jsonl import read_jsonl
from ..tokenizer import SPECIAL_TOKENS, TrinityTokenizer, _assemble_byte_level, _merges_of  # same id layout

DEFAULT_VOCAB = 4096


# the pre-token pattern of each split before byte-level BPE; None: ByteLevel's own (GPT-2) regex
SPLIT_PATTERNS: dict[str, str | None] = {
    "words": None,
    "bare": r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+",  # letters, one digit, punctuation, whitespace: each apart
    "spaces": r" ?[^\s]+|\s+",
}
SPLITS = tuple(SPLIT_PATTERNS)


def digit_splitting_pre_tokenizer(split: str = "words") -> pre_tokenizers.PreTokenizer:
    """Digits first: ByteLevel's own regex would otherwise keep "1234" as one pre-token for BPE to merge.

    `words` (default): the GPT-2 regex, letters and punctuation apart, but a word keeps the space before it, so
    "ferry" is other tokens in "a ferry" (`Ġf er ry`) than in `"ferry_schedule"` (`fer ry`). `bare`: the space
    is a token of its own, so a word is the same tokens in the user's text, a tool's name and a JSON value, and
    copying one into another is a plain copy (about 30% more tokens on this corpus). `spaces`: split only at
    whitespace, so merges may join punctuation and words (`{"type":`): about 30% fewer tokens, less regular copying.
    """
    if split not in SPLIT_PATTERNS:
        raise ValueError(f"split {split!r}: allowed {', '.join(SPLITS)}")
    pattern = SPLIT_PATTERNS[split]
    pieces = [] if pattern is None else [pre_tokenizers.Split(Regex(pattern), "isolated")]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), *pieces, byte_level])


def rendered_texts(records: Iterable[dict[str, Any]], renderer: TrinityTokenizer) -> Iterator[str]:
    """Each conversation as the full chat-template text the trainer tokenizes."""
    for record in records:
        yield renderer.apply_chat_template(record["messages"], tools=record.get("tools"), add_generation_prompt=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB, model_max_length: int | None = None,
                    split: str = "words") -> TrinityTokenizer:
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be at least {floor} (special tokens + 256 bytes), got {vocab_size}")
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = digit_splitting_pre_tokenizer(split)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    tok = _assemble_byte_level(_merges_of(trainer_tok))
    tok.pre_tokenizer = digit_splitting_pre_tokenizer(split)
    extra: dict[str, Any] = {"chat_template": BUILTIN_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        extra["model_max_length"] = model_max_length
    return TrinityTokenizer(tok, chat_template=BUILTIN_CHAT_TEMPLATE, extra_config=extra)


def _sample_records(path: str, max_docs: int | None, seed: int) -> list[dict[str, Any]]:
    records = read_jsonl(path)
    if max_docs is not None and len(records) > max_docs:
        records = random.Random(seed).sample(records, max_docs)
    return records


def train_from_corpus(corpus: str, out: str, vocab_size: int = DEFAULT_VOCAB, max_docs: int | None = 20000,
                      seed: int = 0, model_max_length: int | None = None, split: str = "words") -> TrinityTokenizer:
    """`corpus`: a folder with train.jsonl (the held-out file is never read) or a .jsonl file."""
    path = os.path.join(corpus, "train.jsonl") if os.path.isdir(corpus) else corpus
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training corpus at {path}; write one with `python -m trinity.synthetic`")
    records = _sample_records(path, max_docs, seed)
    renderer = TrinityTokenizer(_assemble_byte_level([]))  # only its chat template is used here
    tok = train_tokenizer(rendered_texts(records, renderer), vocab_size, model_max_length, split)
    tok.save_pretrained(out)
    return tok
