"""The synthetic copy rows (`trinity.train.copy_task`) and the trainer's use of them: a warm-up, then rows mixed in."""

import copy

import pytest
import torch

from trinity.train.copy_task import IGNORE, CopyTaskLoader, copy_accuracy, copy_batch, ordinary_token_ids
from trinity.train.trainer import TrainConfig, Trainer, build_tokenizer

SPAN, SEQ_LEN = 16, 100


def labelled_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(first, last) input positions of each run of consecutive labelled positions in one row."""
    runs, start = [], None
    for t, label in enumerate(labels.tolist() + [IGNORE]):
        if label != IGNORE and start is None:
            start = t
        elif label == IGNORE and start is not None:
            runs.append((start, t - 1))
            start = None
    return runs


def test_labels_are_the_repeat_of_each_span_and_the_distance_varies():
    pool = torch.arange(16, 5000)  # large: a chance repeat of filler is very unlikely
    ids, labels = copy_batch(8, SEQ_LEN, SPAN, pool, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (8, SEQ_LEN)
    distances = set()
    for row_ids, row_labels in zip(ids, labels):
        full = torch.cat([row_ids, row_labels[-1:].clamp_min(0)])  # the row of seq_len + 1 tokens
        runs = labelled_runs(row_labels)
        assert len(runs) == (SEQ_LEN + 1) // (2 * SPAN)  # one repeat per segment, none in the filler
        for first, last in runs:
            n = last - first + 2  # the repeat's first token is not labelled
            assert SPAN // 2 <= n <= SPAN
            for t in range(first, last + 1):
                assert row_labels[t] == full[t + 1] == full[t + 1 - n]  # the token n back: a copy
            distances.add(n)
    assert len(distances) > 3  # a content match, not a fixed offset, predicts the repeat
    assert bool(torch.isin(ids, pool).all())


def test_fixed_rows_repeat_at_one_distance():
    pool = torch.arange(16, 5000)
    _, labels = copy_batch(4, 2 * SPAN - 1, SPAN, pool, torch.Generator().manual_seed(1), fixed=True)
    assert all(labelled_runs(row) == [(SPAN, 2 * SPAN - 2)] for row in labels)


def test_a_span_longer_than_half_a_row_is_refused():
    with pytest.raises(ValueError, match="needs 34 tokens"):
        copy_batch(1, 20, 17, torch.arange(16, 100), torch.Generator())
    with pytest.raises(ValueError, match="copy_span = 40"):
        TrainConfig(seq_len=64, copy_warmup_steps=1, copy_span=40)


def test_the_loader_resumes_from_its_state():
    loader = CopyTaskLoader(SEQ_LEN, SPAN, torch.arange(16, 300), seed=3)
    loader.next_batch(2)
    state = loader.state_dict()
    expected = loader.next_batch(2)
    resumed = CopyTaskLoader(SEQ_LEN, SPAN, torch.arange(16, 300), seed=3)
    resumed.load_state_dict(state)
    got = resumed.next_batch(2)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_copy_accuracy_counts_the_labelled_positions_only():
    ids, labels = copy_batch(4, SEQ_LEN, SPAN, torch.arange(16, 300), torch.Generator().manual_seed(4))
    vocab = 301  # the pool's ids and one more, for a wrong guess

    def predicting(row_tokens):  # logits whose greedy token is the given one at every position
        return lambda _: torch.nn.functional.one_hot(row_tokens, vocab).float()

    assert copy_accuracy(predicting(labels.clamp_min(0)), ids, labels) == 1.0  # right on every repeat
    wrong_on_repeats = torch.where(labels != IGNORE, labels + 1, labels.clamp_min(0))  # right only off the repeats
    assert copy_accuracy(predicting(wrong_on_repeats), ids, labels) == 0.0
    half = labels.clone()
    half[:2] = torch.where(labels[:2] != IGNORE, labels[:2] + 1, labels[:2])
    expected = (labels[2:] != IGNORE).sum().item() / (labels != IGNORE).sum().item()
    assert copy_accuracy(predicting(half.clamp_min(0)), ids, labels) == pytest.approx(expected)


def test_ordinary_ids_leave_out_control_and_tag_tokens():
    tokenizer = build_tokenizer("byte")
    pool = ordinary_token_ids(tokenizer)
    for token in ("<|im_end|>", "<think>", "<tool_call>"):
        assert tokenizer.token_to_id(token) not in pool.tolist()
    assert len(pool) >= 256 and int(pool.max()) < tokenizer.vocab_size


def config(corpus_dir, out_dir, **overrides) -> TrainConfig:
    values = dict(preset="tiny", data=[str(corpus_dir)], seq_len=32, batch_size=2, steps=4, warmup_steps=2,
                  seed=0, out_dir=str(out_dir), progress=False, device="cpu", copy_warmup_steps=2, copy_span=8,
                  model={"num_hidden_layers": 2, "num_dense_layers": 1})
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "doc.txt").write_text("the cat sat on the mat. " * 20, encoding="utf-8")
    return root


def record_batches(trainer: Trainer) -> list[tuple[str, int]]:
    """(loader attribute, rows asked for) of every batch the trainer takes from now on."""
    taken = []
    for name in ("loader", "copy_loader"):
        source = getattr(trainer, name)
        source.next_batch = (lambda original, label: lambda size: taken.append((label, size)) or original(size))(
            source.next_batch, name)
    return taken


def test_the_trainer_takes_copy_rows_first_then_the_corpus(corpus_dir, tmp_path):
    trainer = Trainer(config(corpus_dir, tmp_path / "run"))
    taken = record_batches(trainer)
    trainer.run()
    assert [name for name, _ in taken] == ["copy_loader", "copy_loader", "loader", "loader"]


def test_a_run_resumed_inside_the_copy_warmup_matches_the_uninterrupted_one(corpus_dir, tmp_path):
    whole = Trainer(config(corpus_dir, tmp_path / "whole", copy_warmup_steps=3)).run()
    first = Trainer(config(corpus_dir, tmp_path / "parts", copy_warmup_steps=3, steps=2)).run()
    rest = Trainer(config(corpus_dir, tmp_path / "parts", copy_warmup_steps=3)).run()
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in whole]


def test_after_the_warmup_copy_rows_are_mixed_into_every_batch(corpus_dir, tmp_path):
    trainer = Trainer(config(corpus_dir, tmp_path / "run", copy_warmup_steps=1, copy_rows=1, steps=3))
    taken = record_batches(trainer)
    records = trainer.run()
    assert taken == [("copy_loader", 2)] + [("loader", 1), ("copy_loader", 1)] * 2
    assert records[0]["copy_loss"] == pytest.approx(records[0]["loss"])  # the warm-up: every row a copy row
    assert all(r["copy_loss"] is not None for r in records)


def test_copy_loss_is_the_cross_entropy_of_the_copy_rows_alone(corpus_dir, tmp_path):
    # two micro batches of one row: the copy row is the second, so the first micro batch must add nothing to it
    trainer = Trainer(config(corpus_dir, tmp_path / "run", copy_warmup_steps=0, copy_rows=1, micro_batch_size=1,
                             autocast=False))  # bf16 autocast would round the step's forward, not ours
    before = copy.deepcopy(trainer.model).eval()
    batch = []
    original = trainer._next_batch
    trainer._next_batch = lambda: batch.append(original()) or batch[-1]
    record = trainer.train_step()
    ids, labels, copy_from = batch[0]
    assert copy_from == 1
    with torch.no_grad():
        logits = before(ids[1:])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[1:].reshape(-1),
                                                 ignore_index=IGNORE)
    assert record["copy_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_without_copy_rows_no_copy_loss_is_logged(corpus_dir, tmp_path):
    record = Trainer(config(corpus_dir, tmp_path / "run", copy_warmup_steps=0, steps=1)).run()[0]
    assert record["copy_loss"] is None


def test_a_run_resumed_with_copy_rows_matches_the_uninterrupted_one(corpus_dir, tmp_path):
    whole = Trainer(config(corpus_dir, tmp_path / "whole", copy_warmup_steps=1, copy_rows=1)).run()
    first = Trainer(config(corpus_dir, tmp_path / "parts", copy_warmup_steps=1, copy_rows=1, steps=2)).run()
    rest = Trainer(config(corpus_dir, tmp_path / "parts", copy_warmup_steps=1, copy_rows=1)).run()
    assert [(r["loss"], r["copy_loss"]) for r in first + rest] == [(r["loss"], r["copy_loss"]) for r in whole]


def test_copy_rows_leave_at_least_one_corpus_row():
    with pytest.raises(ValueError, match="copy_rows = 4"):
        TrainConfig(seq_len=64, batch_size=4, copy_rows=4)
