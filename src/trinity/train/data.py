"""Training data: corpora -> token streams -> fixed-length training sequences, in two orders.

- Corpora: text files (one document per file) and JSONL files (one document per line: {"text": ...} for
  pretraining, {"messages": [...]} for chat SFT), given as files or folders. Documents end with EOS.
- Chat SFT documents are rendered through the chat template; only assistant tokens carry loss.
- `sequential`: documents packed back to back in corpus order (long documents fill many sequences in a row).
- `rsdb` (Random Sequential Document Buffer): a buffer of documents, each read sequentially from its own
  cursor; every sequence is filled by drawing a random buffered document and reading on from its cursor,
  refilling the buffer from the corpus as documents run out. Long documents are spread over many steps.
Both loaders are resumable: `state_dict()` holds every cursor and the RNG.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..jsonl import iter_jsonl

IGNORE = -100


@dataclass(slots=True)
class Document:
    ids: np.ndarray  # int64 tokens, EOS-terminated
    loss_mask: np.ndarray | None = None  # bool per token (None: every token counts)


def corpus_files(paths: list[str] | str) -> list[str]:
    paths = [paths] if isinstance(paths, str) else list(paths)
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".md", ".jsonl"))]
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus path not found: {path}")
    if not files:
        raise ValueError(f"no .txt, .md or .jsonl files under {paths}")
    return files


def iter_raw_documents(paths: list[str] | str) -> Iterator[str | dict]:
    for file in corpus_files(paths):
        if file.endswith(".jsonl"):
            for n, record in iter_jsonl(file):
                if "messages" in record:
                    yield record
                elif "text" in record:
                    yield record["text"]
                else:
                    raise ValueError(f"{file}:{n}: a JSONL record needs 'text' or 'messages'")
        else:
            with open(file, encoding="utf-8") as f:
                yield f.read()


def tokenize_document(doc: str | dict, tokenizer, eos_id: int) -> Document:
    if isinstance(doc, str):
        return Document(np.array(tokenizer.encode(doc) + [eos_id], dtype=np.int64))
    return chat_document(doc["messages"], tokenizer, eos_id, tools=doc.get("tools"))


def chat_document(messages: list[dict], tokenizer, eos_id: int, tools=None) -> Document:
    """Render a conversation; loss only on the assistant turns' tokens (their content through <|im_end|>).

    Found by rendering growing prefixes: the tokens an assistant message adds after its generation prompt
    are the ones the model must learn to produce."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # thinking prefill is part of the prompt when the turn has reasoning, as at inference
        prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, tokenize=True,
                                               enable_thinking=bool(message.get("reasoning_content")))
        full = tokenizer.apply_chat_template(messages[:i + 1], tools=tools, add_generation_prompt=False,
                                             tokenize=True)
        if full[:len(prompt)] != prompt:
            # The template renders this turn differently as history (e.g. no prefill): learn all of it.
            prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True,
                                                   tokenize=True, enable_thinking=False)
        if full[:len(ids)] != ids or len(prompt) < len(ids):
            raise ValueError("the chat template does not render conversations as growing prefixes; "
                             "cannot locate assistant tokens")
        mask += [False] * (len(prompt) - len(ids)) + [True] * (len(full) - len(prompt))
        ids = full
    if not ids:
        raise ValueError("a chat document needs at least one assistant message")
    ids.append(eos_id)
    mask.append(False)
    return Document(np.array(ids, dtype=np.int64), np.array(mask, dtype=bool))


def load_documents(paths, tokenizer, eos_id: int) -> list[Document]:
    return [tokenize_document(d, tokenizer, eos_id) for d in iter_raw_documents(paths)]


class _Loader:
    """Shared shape: `next_sequence()` gives seq_len + 1 tokens (+ mask); batches are stacks of those."""

    def __init__(self, documents: list[Document], seq_len: int, seed: int):
        if not documents:
            raise ValueError("the corpus has no documents")
        self.docs = documents
        self.seq_len = seq_len
        self.rng = random.Random(seed)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, seq_len] and labels [B, seq_len] (next tokens; IGNORE where no loss)."""
        rows = [self.next_sequence() for _ in range(batch_size)]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
        mask = torch.from_numpy(np.stack([r[1] for r in rows]))
        labels = tokens[:, 1:].clone()
        labels[~mask[:, 1:]] = IGNORE
        return tokens[:, :-1].contiguous(), labels

    def _read(self, doc_index: int, start: int, want: int) -> tuple[np.ndarray, np.ndarray]:
        doc = self.docs[doc_index]
        ids = doc.ids[start:start + want]
        mask = doc.loss_mask[start:start + want] if doc.loss_mask is not None else np.ones(len(ids), dtype=bool)
        return ids, mask


class SequentialLoader(_Loader):
    """Documents back to back in corpus order, cycling.

    `streams`: independent readers starting at evenly spaced documents, as data-parallel workers each reading
    their own shard; a batch's rows are split into `streams` equal runs, one per reader (the trainer uses one
    stream per micro batch). With one stream, a long document fills every micro batch of a step."""

    def __init__(self, documents: list[Document], seq_len: int, seed: int = 0, streams: int = 1):
        super().__init__(documents, seq_len, seed)
        self.cursors = [[(i * len(documents)) // streams, 0] for i in range(max(1, streams))]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size % len(self.cursors):
            raise ValueError(f"batch of {batch_size} does not split over {len(self.cursors)} streams")
        self._order = [i * len(self.cursors) // batch_size for i in range(batch_size)]
        return super().next_batch(batch_size)

    def next_sequence(self) -> tuple[np.ndarray, np.ndarray]:
        order = getattr(self, "_order", None)
        cursor = self.cursors[order.pop(0) if order else 0]
        need = self.seq_len + 1
        ids, masks = [], []
        while need:
            part, mask = self._read(cursor[0], cursor[1], need)
            ids.append(part)
            masks.append(mask)
            need -= len(part)
            cursor[1] += len(part)
            if cursor[1] >= len(self.docs[cursor[0]].ids):
                cursor[0], cursor[1] = (cursor[0] + 1) % len(self.docs), 0
        return np.concatenate(ids), np.concatenate(masks)

    def state_dict(self) -> dict:
        return {"cursors": [list(c) for c in self.cursors], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.cursors = [list(c) for c in state["cursors"]]
        self.rng.setstate(_as_rng_state(state["rng"]))


class RSDBLoader(_Loader):
    """Random Sequential Document Buffer."""

    def __init__(self, documents: list[Document], seq_len: int, seed: int = 0, buffer_size: int = 64):
        super().__init__(documents, seq_len, seed)
        self.order = list(range(len(documents)))
        self.rng.shuffle(self.order)
        self.next_doc = 0
        self.buffer: list[list[int]] = []  # [document index, cursor]
        for _ in range(min(buffer_size, len(documents))):
            self.buffer.append([self._take_document(), 0])

    def _take_document(self) -> int:
        if self.next_doc == len(self.order):  # an epoch ends: reshuffle for the next
            self.rng.shuffle(self.order)
            self.next_doc = 0
        index = self.order[self.next_doc]
        self.next_doc += 1
        return index

    def next_sequence(self) -> tuple[np.ndarray, np.ndarray]:
        need = self.seq_len + 1
        ids, masks = [], []
        while need:
            need -= self._read_slot(self.rng.randrange(len(self.buffer)), need, ids, masks)
        return np.concatenate(ids), np.concatenate(masks)

    def _read_slot(self, slot: int, need: int, ids: list, masks: list) -> int:
        """Read up to `need` tokens of a buffered document into ids/masks (a finished document's slot takes the
        next one); -> how many."""
        doc, cursor = self.buffer[slot]
        part, mask = self._read(doc, cursor, need)
        ids.append(part)
        masks.append(mask)
        cursor += len(part)
        self.buffer[slot] = [self._take_document(), 0] if cursor >= len(self.docs[doc].ids) else [doc, cursor]
        return len(part)

    def state_dict(self) -> dict:
        return {"order": list(self.order), "next_doc": self.next_doc, "buffer": [list(b) for b in self.buffer],
                "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.order = list(state["order"])
        self.next_doc = state["next_doc"]
        self.buffer = [list(b) for b in state["buffer"]]
        self.rng.setstate(_as_rng_state(state["rng"]))


class PackedLoader(RSDBLoader):
    """Whole documents per row, for conversations: a row starts at a document's start and goes on with whole
    documents, drawn from the same buffer as RSDB, while they fit; the space none fits is padding (no loss). Only a
    document longer than a row is cut, its rest starting later rows. RSDB cuts a document wherever a row fills, so
    a reply is often trained in a row that lacks what it answers (a conversation's tool list, its schema): at
    seq_len 512, 55% of the generated-tool conversations' loss tokens (benchmarks/README.md)."""

    def __init__(self, documents: list[Document], seq_len: int, seed: int = 0, buffer_size: int = 64,
                 pad_id: int = 0):
        super().__init__(documents, seq_len, seed, buffer_size)
        self.pad_id = pad_id

    def next_sequence(self) -> tuple[np.ndarray, np.ndarray]:
        need = self.seq_len + 1
        ids, masks = [], []
        slot = self.rng.randrange(len(self.buffer))  # any document may start a row
        while slot is not None:
            need -= self._read_slot(slot, need, ids, masks)
            fitting = [i for i, (d, c) in enumerate(self.buffer) if 0 < len(self.docs[d].ids) - c <= need]
            slot = self.rng.choice(fitting) if fitting else None
        if need:
            ids.append(np.full(need, self.pad_id, dtype=np.int64))
            masks.append(np.zeros(need, dtype=bool))
        return np.concatenate(ids), np.concatenate(masks)


def _as_rng_state(state) -> tuple:
    """random.Random state back from a checkpoint (lists where tuples were)."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


DATA_ORDERS = ("rsdb", "sequential", "packed")


def make_loader(order: str, documents: list[Document], seq_len: int, seed: int, buffer_size: int = 64,
                streams: int = 1, pad_id: int = 0) -> _Loader:
    if order == "rsdb":
        return RSDBLoader(documents, seq_len, seed, buffer_size)
    if order == "sequential":
        return SequentialLoader(documents, seq_len, seed, streams)
    if order == "packed":
        return PackedLoader(documents, seq_len, seed, buffer_size, pad_id)
    raise ValueError(f"data order {order!r}: allowed {', '.join(DATA_ORDERS)}")
