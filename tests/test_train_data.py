"""Training data: corpora, chat SFT masking, sequential packing, RSDB (every token once per epoch), resume,
and RSDB vs sequential batch heterogeneity."""

import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trinity import TrinityForCausalLM, preset
from trinity.train.data import (IGNORE, Document, PackedLoader, RSDBLoader, SequentialLoader, chat_document,
                                corpus_files, load_documents, make_loader)
from trinity.train.trainer import init_like_report_

STRIDE = 100_000  # synthetic token value = doc * STRIDE + position: every token says where it came from


def encoded_docs(lengths) -> list[Document]:
    return [Document(np.arange(n, dtype=np.int64) + d * STRIDE) for d, n in enumerate(lengths)]


def read_values(loader, n: int) -> list[np.ndarray]:
    return [loader.next_sequence()[0] for _ in range(n)]


# ---------------------------------------------------------------------------------------------- corpora

def test_corpus_text_files_in_order_with_eos(tmp_path, tok):
    (tmp_path / "b.txt").write_text("second doc", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first doc", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert [p.rsplit("/", 1)[-1] for p in corpus_files(str(tmp_path))] == ["a.txt", "b.txt", "c.md"]
    docs = load_documents(str(tmp_path), tok, tok.eos_token_id)
    assert [tok.decode(d.ids[:-1].tolist()) for d in docs] == ["first doc", "second doc", "third"]
    assert all(d.ids[-1] == tok.eos_token_id and d.loss_mask is None for d in docs)


def test_jsonl_text_and_messages(tmp_path, tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path = tmp_path / "mix.jsonl"
    path.write_text(json.dumps({"text": "plain pretraining text"}) + "\n\n"
                    + json.dumps({"messages": messages, "id": 7}) + "\n", encoding="utf-8")
    docs = load_documents([str(path)], tok, tok.eos_token_id)
    assert len(docs) == 2
    assert docs[0].ids.tolist() == tok.encode("plain pretraining text") + [tok.eos_token_id]
    assert docs[0].loss_mask is None
    chat = chat_document(messages, tok, tok.eos_token_id)
    assert docs[1].ids.tolist() == chat.ids.tolist() and docs[1].loss_mask.tolist() == chat.loss_mask.tolist()
    assert docs[1].loss_mask.any() and not docs[1].loss_mask.all()


def test_bad_jsonl_line_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        load_documents([str(path)], tok, tok.eos_token_id)
    path.write_text('{"text": "ok"}\n{"prompt": "no text key"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:2: .*'text' or 'messages'"):
        load_documents([str(path)], tok, tok.eos_token_id)


def test_missing_and_empty_corpora(tmp_path, tok):
    with pytest.raises(FileNotFoundError):
        corpus_files(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no .txt"):
        corpus_files(str(tmp_path))
    with pytest.raises(ValueError, match="no documents"):
        SequentialLoader([], 8)
    with pytest.raises(ValueError, match="data order"):
        make_loader("shuffled", encoded_docs([5]), 4, 0)


# ---------------------------------------------------------------------------------------------- chat SFT

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello.", "reasoning_content": "The user wants a greeting."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def loss_runs(ids, mask) -> list[list[int]]:
    runs, current = [], []
    for token, keep in zip(list(ids), list(mask)):
        if keep:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_chat_sft_loss_only_on_assistant_tokens(tok):
    doc = chat_document(CONVERSATION, tok, tok.eos_token_id)
    assert tok.decode(doc.ids[:-1].tolist()) == tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert doc.ids[-1] == tok.eos_token_id and not doc.loss_mask[-1]
    runs = [tok.decode(r) for r in loss_runs(doc.ids, doc.loss_mask)]
    # exactly two loss spans: each assistant turn's reasoning/content through <|im_end|> (the template's
    # newline after it may ride along); the <think>\n prefill and the assistant header are prompt
    expected = ["The user wants a greeting.\n</think>\nHello.<|im_end|>", "4<|im_end|>"]
    assert len(runs) == 2
    for run, want in zip(runs, expected):
        assert run in (want, want + "\n"), run
    # nothing from the system or user turns, or from the headers, carries loss
    masked_text = tok.decode([int(t) for t, k in zip(doc.ids, doc.loss_mask) if not k])
    for piece in ("Be brief.", "Say hello.", "What is 2+2?", "<|im_start|>assistant\n<think>\n", "<|im_start|>user"):
        assert piece in masked_text
    assert "Hello." not in masked_text and "greeting" not in masked_text

    # through the loader: labels are the next tokens, IGNORE (-100) wherever the next token is not assistant's
    loader = SequentialLoader([doc], seq_len=len(doc.ids) - 1)
    ids, labels = loader.next_batch(1)
    assert ids[0].tolist() == doc.ids[:-1].tolist()
    want = [int(t) if k else IGNORE for t, k in zip(doc.ids[1:], doc.loss_mask[1:])]
    assert labels[0].tolist() == want
    assert tok.decode([t for t in labels[0].tolist() if t != IGNORE]) == "".join(runs)


def test_chat_document_needs_an_assistant_turn(tok):
    with pytest.raises(ValueError, match="assistant"):
        chat_document([{"role": "user", "content": "hi"}], tok, tok.eos_token_id)


# ---------------------------------------------------------------------------------------------- sequential

def test_sequential_packs_documents_in_order_with_eos(tmp_path, tok):
    texts = ["alpha beta gamma", "delta", "epsilon zeta eta theta"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    docs = load_documents(str(tmp_path), tok, tok.eos_token_id)
    stream = np.concatenate([d.ids for d in docs])
    loader = SequentialLoader(docs, seq_len=9)
    n = 3 * len(stream) // 10 + 1  # three passes and a bit
    got = np.concatenate(read_values(loader, n))
    assert np.array_equal(got, np.tile(stream, 4)[: len(got)])
    eos = tok.eos_token_id
    assert tok.decode(stream.tolist()) == "".join(t + tok.decode([eos]) for t in texts)
    # next_batch: inputs are the first seq_len tokens of each seq_len + 1 window, labels the next tokens
    loader = SequentialLoader(docs, seq_len=9)
    ids, labels = loader.next_batch(2)
    assert ids.shape == labels.shape == (2, 9)
    assert ids[0].tolist() == stream[:9].tolist() and labels[0].tolist() == stream[1:10].tolist()
    assert ids[1].tolist() == stream[10:19].tolist()


# ---------------------------------------------------------------------------------------------- RSDB

@pytest.mark.parametrize("buffer_size", [1, 5, 64])
def test_rsdb_reads_every_token_exactly_once_per_epoch(buffer_size):
    rng = np.random.default_rng(buffer_size)
    lengths = [int(x) for x in rng.integers(1, 60, size=30)] + [700, 450]  # short ones and two long ones
    docs = encoded_docs(lengths)
    loader = RSDBLoader(docs, seq_len=31, seed=buffer_size, buffer_size=buffer_size)
    taken = [slot[0] for slot in loader.buffer]  # documents taken so far, in order
    original = loader._take_document

    def logged():
        index = original()
        taken.append(index)
        return index

    loader._take_document = logged
    total = sum(lengths)
    sequences = read_values(loader, 5 * total // 32)  # about five epochs

    # a sequence reads one document forward (value + 1 each token) and jumps only where that document ends
    for seq in sequences:
        assert len(seq) == 32
        for a, b in zip(seq[:-1].tolist(), seq[1:].tolist()):
            assert b == a + 1 or a % STRIDE == lengths[a // STRIDE] - 1, (a, b)

    # every epoch takes each document once (a permutation), the last one possibly partly
    n = len(docs)
    for e in range(0, len(taken), n):
        chunk = taken[e:e + n]
        assert len(set(chunk)) == len(chunk)
    assert len(taken) >= 4 * n

    # the multiset of tokens read = every taken document in full, less what the buffered ones have not read yet
    read = Counter(np.concatenate(sequences).tolist())
    expected = Counter()
    for index in taken:
        expected.update(docs[index].ids.tolist())
    for index, cursor in loader.buffer:
        expected.subtract(docs[index].ids[cursor:].tolist())
    assert all(v >= 0 for v in expected.values())
    assert read == +expected


# ---------------------------------------------------------------------------------------------- packed

def test_packed_rows_hold_whole_documents_and_cut_only_longer_ones():
    """Conversations: a row starts at a document's start and holds only whole documents, then padding without
    loss; only a document longer than a row is cut, its rest starting the rows after. Every document is read in
    full, once per epoch, as with RSDB."""
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(2, 30, size=40)] + [75]  # one longer than a row (31 + 1 tokens)
    docs = encoded_docs(lengths)
    loader = PackedLoader(docs, seq_len=31, seed=3, buffer_size=8, pad_id=-1)
    taken = [slot[0] for slot in loader.buffer]
    original = loader._take_document
    loader._take_document = lambda: taken.append(original()) or taken[-1]
    rows = [loader.next_sequence() for _ in range(300)]
    read: Counter = Counter()
    for ids, mask in rows:
        assert len(ids) == len(mask) == 32
        pad = ids == -1
        assert not mask[pad].any() and (pad[pad.argmax():].all() if pad.any() else True)  # padding only at the end
        tokens = ids[~pad].tolist()
        read.update(tokens)
        # pieces: runs of consecutive positions of one document
        starts = [0] + [i for i in range(1, len(tokens)) if tokens[i] != tokens[i - 1] + 1]
        for k, i in enumerate(starts):
            doc, pos = divmod(tokens[i], STRIDE)
            end = starts[k + 1] if k + 1 < len(starts) else len(tokens)
            if lengths[doc] <= 32:
                assert pos == 0 and end - i == lengths[doc]  # whole
            else:
                assert k == 0 or pos + end - i == lengths[doc]  # the long one: a row's first piece, or its end
    # every taken document read in full, less what the buffered ones have not read yet; epochs are permutations
    expected: Counter = Counter()
    for index in taken:
        expected.update(docs[index].ids.tolist())
    for index, cursor in loader.buffer:
        expected.subtract(docs[index].ids[cursor:].tolist())
    assert read == +expected and len(taken) >= 3 * len(docs)
    assert all(len(set(taken[e:e + len(docs)])) == len(taken[e:e + len(docs)]) for e in range(0, len(taken), len(docs)))
    # padding is what no buffered document fitted: a few per cent here
    assert sum(int((ids == -1).sum()) for ids, _ in rows) < 0.25 * 32 * len(rows)


# ---------------------------------------------------------------------------------------------- resume

def _mixed_docs(tok):
    docs = [Document(np.arange(1, n + 1, dtype=np.int64) + 1000 * d) for d, n in enumerate([50, 3, 200, 17, 9])]
    docs.append(chat_document(CONVERSATION, tok, tok.eos_token_id))
    return docs


@pytest.mark.parametrize("order", ["sequential", "rsdb", "packed"])
@pytest.mark.parametrize("transport", ["torch", "json", "pickle"])
def test_loader_resumes_from_state_dict(order, transport, tok, tmp_path):
    docs = _mixed_docs(tok)
    a = make_loader(order, docs, seq_len=16, seed=5, buffer_size=3)
    for _ in range(9):
        a.next_batch(2)
    state = a.state_dict()
    if transport == "torch":  # as the trainer's checkpoint does
        torch.save(state, tmp_path / "s.pt")
        state = torch.load(tmp_path / "s.pt", weights_only=True)
    elif transport == "json":
        state = json.loads(json.dumps(state))
    else:
        state = pickle.loads(pickle.dumps(state))
    b = make_loader(order, docs, seq_len=16, seed=99, buffer_size=3)  # different seed: the state must win
    b.load_state_dict(state)
    for _ in range(25):
        (ia, la), (ib, lb) = a.next_batch(2), b.next_batch(2)
        assert torch.equal(ia, ib) and torch.equal(la, lb)


def test_state_dict_is_a_snapshot(tok):
    loader = RSDBLoader(_mixed_docs(tok), seq_len=8, seed=1, buffer_size=2)
    state = loader.state_dict()
    frozen = json.dumps(state)
    loader.next_batch(4)
    assert json.dumps(state) == frozen  # later reads do not alter an earlier state_dict


# ---------------------------------------------------------------------------------------------- RSDB vs sequential

SEQ_LEN = 64
MICRO = 1  # sequences per micro batch
MICROS = 4  # micro batches per step


@pytest.fixture(scope="module")
def long_doc_losses():
    """Per-sequence losses of one fixed, briefly trained tiny model on every sequence of one pass over a corpus of
    3 long documents (a repeating 17-token pattern: easy once learnt) among 80 short ones (random tokens)."""
    rng = np.random.default_rng(0)

    def long_doc():
        pattern = rng.integers(3, 259, size=17)
        return np.concatenate([np.tile(pattern, 2000 // 17 + 1)[:2000], [2]])

    def short_doc():
        return np.concatenate([rng.integers(3, 259, size=int(rng.integers(40, 160))), [2]])

    arrays = [short_doc() for _ in range(80)]
    for at in (20, 50, 83):
        arrays.insert(at - 1, long_doc())
    docs = [Document(a.astype(np.int64)) for a in arrays]
    longs = [a for a in arrays if len(a) > 1000]

    torch.manual_seed(0)
    model = TrinityForCausalLM.empty(preset("tiny"), torch.float32, "cpu")
    init_like_report_(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    shorts = np.concatenate([a for a in arrays if len(a) <= 1000])
    for step in range(6):  # learn that the long documents are easy: half long windows, half short
        rows = [longs[i % 3][s:s + 33] for i, s in enumerate(rng.integers(0, 1900, size=4))]
        rows += [shorts[s:s + 33] for s in rng.integers(0, len(shorts) - 40, size=4)]
        batch = torch.from_numpy(np.stack(rows))
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    total = sum(len(d.ids) for d in docs)
    n = total // (SEQ_LEN + 1) // (MICRO * MICROS) * (MICRO * MICROS)  # one pass, whole steps
    out = {}
    for order in ("sequential", "rsdb"):
        # as the trainer draws them: a step's batch, one sequential reader per micro batch
        loader = make_loader(order, docs, SEQ_LEN, seed=0, streams=MICROS)
        steps = [loader.next_batch(MICRO * MICROS) for _ in range(n // (MICRO * MICROS))]
        ids, labels = torch.cat([i for i, _ in steps]), torch.cat([lab for _, lab in steps])
        with torch.no_grad():
            ce = torch.cat([F.cross_entropy(model(i).reshape(-1, 512), lab.reshape(-1), reduction="none")
                            for i, lab in zip(ids.split(64), labels.split(64))])
        per_micro = ce.view(n // MICRO, MICRO * SEQ_LEN).mean(-1).view(-1, MICROS)  # [steps, micro batches]
        out[order] = per_micro
    return out


def batchhet(per_micro: torch.Tensor) -> torch.Tensor:
    return per_micro.max(-1).values - per_micro.mean(-1)


def test_long_documents_are_easy_for_the_probe_model(long_doc_losses):
    # the probe must see a difference between the kinds of data, or heterogeneity would be noise
    seq = long_doc_losses["sequential"].flatten()
    assert seq.max() - seq.min() > 1.0


def test_rsdb_steadier_step_losses_than_sequential(long_doc_losses):
    """Sequential packing spends runs of whole steps inside one long document: the step loss jumps between
    long-document steps and short-document steps. RSDB mixes them in every step."""
    var = {k: v.mean(-1).var().item() for k, v in long_doc_losses.items()}
    assert var["rsdb"] < 0.5 * var["sequential"], var  # the report: 2.4x lower step-to-step loss variance


def test_rsdb_lower_batchhet_than_sequential(long_doc_losses):
    het = {k: batchhet(v).mean().item() for k, v in long_doc_losses.items()}
    assert het["rsdb"] < het["sequential"], het
