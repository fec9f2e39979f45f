"""Tokenizer for the Trinity family: a thin, typed layer over a `tokenizers.Tokenizer`.

Loads a checkpoint's ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``,
``generation_config.json``), renders chat templates (see :mod:`trinity.chat_template`), and
streams text out of generated ids without splitting UTF-8 characters.

Tokenizers built here (``build_byte_level_tokenizer``, ``train_bpe_tokenizer``) are byte-level BPE
with a fixed id layout: ``SPECIAL_TOKENS`` take ids 0..9 (in list order), the 256 byte symbols
take ids 10..265 in byte order, and learned merges follow in merge order. Checkpoint tokenizers
keep whatever layout their ``tokenizer.json`` has.

``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and ``<|pad|>`` are *special* (dropped by
``skip_special_tokens=True``). The think / tool tags are added tokens too, so they always encode
to one id, but they are never skipped when decoding: the reasoning and tool-call parsers read them.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from trinity.chat_template import (
    BUILTIN_CHAT_TEMPLATE,
    ChatTemplateError,
    compile_chat_template,
    normalize_messages,
    normalize_tools,
    render_chat_template,
)

__all__ = [
    "BUILTIN_CHAT_TEMPLATE",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "SPECIAL_TOKENS",
    "TrinityTokenizer",
    "build_byte_level_tokenizer",
    "train_bpe_tokenizer",
]

# Skipped by decode(skip_special_tokens=True).
CONTROL_TOKENS: list[str] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# Always kept in decoded text.
TAG_TOKENS: list[str] = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
SPECIAL_TOKENS: list[str] = CONTROL_TOKENS + TAG_TOKENS

# Tokens that end a chat turn; generation stops on any of them when present in the vocabulary.
_STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")


# ----------------------------------------------------------------------------------------------
# Byte-level alphabet
# ----------------------------------------------------------------------------------------------


def _byte_to_char_table() -> list[str]:
    """The byte-level BPE alphabet: one visible character per byte value.

    Printable, non-space Latin-1 bytes stand for themselves; every other byte (controls, space,
    DEL, NBSP, soft hyphen) is moved, in byte order, to U+0100 onwards so a token string never
    holds whitespace or control characters. This is the mapping `tokenizers`' ByteLevel uses.
    """
    keeps_itself = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: list[str] = []
    moved = 0
    for byte in range(256):
        if byte in keeps_itself:
            table.append(chr(byte))
        else:
            table.append(chr(0x100 + moved))
            moved += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_to_char_table()
CHAR_TO_BYTE: dict[str, int] = {ch: b for b, ch in enumerate(BYTE_TO_CHAR)}


def _assemble_byte_level(merges: Sequence[tuple[str, str]]) -> Tokenizer:
    """Build a byte-level BPE tokenizer with the fixed id layout described in the module docstring."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *BYTE_TO_CHAR]:
        vocab[token] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))  # two merges can spell the same token
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Added tokens are matched in raw text before pre-tokenization, so "<think>" is always one id.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


def build_byte_level_tokenizer() -> TrinityTokenizer:
    """A merge-free byte-level tokenizer (vocab 266) for random-weight models with no tokenizer."""
    return TrinityTokenizer(_assemble_byte_level([]))


def _merges_of(trained: Tokenizer) -> list[tuple[str, str]]:
    raw = json.loads(trained.to_str())["model"]["merges"]
    # tokenizers writes merges as [left, right] pairs; older versions wrote "left right" strings.
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in raw]  # type: ignore[misc]


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, chat_template: str | None = None
) -> TrinityTokenizer:
    """Train a byte-level BPE tokenizer on ``texts``; the same input always gives the same tokenizer."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be at least {floor} (special tokens + 256 bytes), got {vocab_size}")
    corpus = list(texts)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # reserves their slots in the vocab budget
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, seen or not
        show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    # Rebuild from the merges alone so ids follow our fixed layout rather than the trainer's.
    return TrinityTokenizer(_assemble_byte_level(_merges_of(trainer_tok)), chat_template=chat_template)


# ----------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes tokens as a string or as an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a token from {value!r}")


def _template_from_config(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        # Named templates: the "default" one is for chat; without it, take the first.
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" in named:
            return named["default"]
        return value[0].get("template") if value and isinstance(value[0], Mapping) else None
    raise ValueError(f"chat_template in tokenizer_config.json has unsupported type {type(value).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


_CONFIG_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


class TrinityTokenizer:
    """Encode, decode, chat templates and streaming detokenization for one `tokenizers.Tokenizer`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str = "<|im_end|>",
        pad_token: str | None = "<|pad|>",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        # Checkpoints sometimes ship tokenizer.json with padding/truncation on; the engine does
        # its own batching and must see every token.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.model_max_length: int | None = self.extra_config.get("model_max_length")
        self._chat_template = chat_template if chat_template is not None else BUILTIN_CHAT_TEMPLATE

        self.bos_token = bos_token
        self.bos_token_id = self._require_id(bos_token, "bos_token") if bos_token is not None else None
        self.eos_token = eos_token
        self.eos_token_id: int = self._require_id(eos_token, "eos_token")
        # A missing pad token is not fatal: batching can pad with any id under an attention mask.
        self.pad_token_id = tokenizer.token_to_id(pad_token) if pad_token is not None else None
        self.pad_token = pad_token if self.pad_token_id is not None else None

        self.eos_token_ids: set[int] = {self.eos_token_id}
        for stop in _STOP_TOKENS:
            if (stop_id := tokenizer.token_to_id(stop)) is not None:
                self.eos_token_ids.add(stop_id)

        self.special_token_ids: frozenset[int] = self._skippable_ids()
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._token_bytes_cache: dict[int, bytes] = {}
        self._vocab_size: int | None = None
        self._max_token_bytes: int | None = None

    # -- construction ------------------------------------------------------------------------

    def _require_id(self, token: str, what: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def _skippable_ids(self) -> frozenset[int]:
        # Decided here rather than by tokenizers' own flag so that a checkpoint marking the
        # think/tool tags as special still keeps them in decoded text.
        return frozenset(
            i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special and tok.content not in TAG_TOKENS
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> TrinityTokenizer:
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {root} (looked for {tokenizer_file})")
        config = _read_json(root / "tokenizer_config.json")
        tokens = {key: _token_content(config.get(key)) for key in _CONFIG_TOKEN_KEYS}

        template_file = root / "chat_template.jinja"
        if template_file.is_file():
            template: str | None = template_file.read_text(encoding="utf-8")
        else:
            template = _template_from_config(config.get("chat_template"))

        extra = {k: v for k, v in config.items() if k not in (*_CONFIG_TOKEN_KEYS, "chat_template")}
        tok = cls(
            Tokenizer.from_file(str(tokenizer_file)),
            chat_template=template,
            bos_token=tokens["bos_token"],
            eos_token=tokens["eos_token"] or "<|im_end|>",
            pad_token=tokens["pad_token"],
            extra_config=extra,
        )
        tok._add_generation_config_eos(root / "generation_config.json")
        return tok

    def _add_generation_config_eos(self, path: Path) -> None:
        eos = _read_json(path).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids.update(i for i in ids if isinstance(i, int))

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(root / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.extra_config}
        config.update(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        with (root / "tokenizer_config.json").open("w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")
        (root / "chat_template.jinja").write_text(self._chat_template, encoding="utf-8")

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """One past the largest id, added tokens included (ids may have gaps in checkpoints)."""
        if self._vocab_size is None:
            self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their single ids.

        ``add_special_tokens`` runs the tokenizer's post-processor and, when a BOS token is
        configured and the post-processor did not add it, prepends it.
        """
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` that costs no tokenizing: the text's UTF-8 bytes over twice the
        longest token's. A token's string takes at least as many UTF-8 bytes as the text it covers (byte-level
        tokens spell each byte with a 1-2 byte character), and the factor 2 covers normalizers that shorten text
        (composing accents). Lets a server refuse a multi-megabyte prompt that cannot fit its context before
        spending seconds tokenizing it."""
        if self._max_token_bytes is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._max_token_bytes = max((len(t.encode("utf-8")) for t in vocab), default=1)
        return -(-len(text.encode("utf-8", "surrogatepass")) // (2 * self._max_token_bytes))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]  # accepts numpy / torch integer sequences
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_token_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one id contributes to decoded text (byte-level tokenizers only).

        Mirrors tokenizers' ByteLevel decoder: each character maps back to its byte, and a token
        with a character outside the byte alphabet (an unusual added token) contributes its own
        UTF-8 instead. Unknown ids contribute nothing, as in ``decode``.
        """
        cached = self._token_bytes_cache.get(token_id)
        if cached is None:
            token = self._tok.id_to_token(token_id)
            if token is None:
                cached = b""
            else:
                try:
                    cached = bytes(CHAR_TO_BYTE[ch] for ch in token)
                except KeyError:
                    cached = token.encode("utf-8")
            self._token_bytes_cache[token_id] = cached
        return cached

    # -- chat ---------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        self._chat_template = source if source is not None else BUILTIN_CHAT_TEMPLATE

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the chat template; raises ChatTemplateError on bad input."""
        template = compile_chat_template(self._chat_template)  # cached per template string
        variables: dict[str, Any] = {
            **template_kwargs,
            "messages": normalize_messages(messages),
            "tools": normalize_tools(tools),
            "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token,
        }
        text = render_chat_template(template, variables)
        return self.encode(text) if tokenize else text

    # -- streaming ----------------------------------------------------------------------------

    def detokenizer(self, skip_special_tokens: bool = False, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids)

    def __repr__(self) -> str:
        return f"TrinityTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, eos_ids={sorted(self.eos_token_ids)})"


class IncrementalDetokenizer:
    """Turns generated ids into text deltas without ever emitting half a UTF-8 character.

    Byte-level tokenizers (every Trinity tokenizer) stream exact bytes through an incremental
    UTF-8 decoder: an incomplete character is held back until its last byte arrives, and the
    deltas add up to exactly ``tokenizer.decode(ids)``. ``prompt_ids`` do not matter there.

    Other decoders (e.g. SentencePiece-style) fall back to re-decoding a short window of recent
    ids, with ``prompt_ids`` as left context, and hold text back while it ends in U+FFFD.
    """

    # How many prompt ids the fallback keeps as left context for the first decode.
    _CONTEXT_IDS = 6

    def __init__(self, tokenizer: TrinityTokenizer, skip_special_tokens: bool = False, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._pieces: list[str] = []  # the text so far (joined when read: `+=` on a str would copy it every token)
        self._utf8: codecs.IncrementalDecoder | None = None
        if tokenizer._byte_level:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Fallback state: ids[prefix:read] were already emitted and serve only as left context
        # (a SentencePiece decoder drops a leading space when a token starts the text).
        self._ids: list[int] = [int(i) for i in prompt_ids][-self._CONTEXT_IDS :]
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._skip:
            return ""
        if self._utf8 is not None:
            delta = self._utf8.decode(self._tokenizer.token_bytes(token_id))
        else:
            self._ids.append(token_id)
            delta = self._window_delta(final=False)
        self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_many(self, ids: Iterable[int]) -> str:
        return "".join([self.add(i) for i in ids])

    def flush(self) -> str:
        """Emit what is held back; a truly incomplete trailing sequence comes out as U+FFFD."""
        if self._utf8 is not None:
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._window_delta(final=True)
        self._pieces.append(delta)
        return delta

    def _window_delta(self, final: bool) -> str:
        decode = self._tokenizer.decode
        seen = decode(self._ids[self._prefix : self._read])
        full = decode(self._ids[self._prefix :])
        if len(full) <= len(seen) or (full.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or the last character is still incomplete
        # The ids just emitted become the left context of the next decode; older ones are dropped.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return full[len(seen) :]
