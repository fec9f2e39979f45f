"""The bytes a decode step must read (`benchmarks/decode_gpu.py`), which set the rooflines its figures are judged
against: the active weights at batch 1, every expert once a batch is large, the KV per sequence."""

import pathlib
import sys

import pytest

from trinity import preset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from decode_gpu import bytes_per_step  # noqa: E402


@pytest.mark.parametrize("name", ["nano", "mini", "large"])
def test_weights_run_from_the_active_ones_to_all_of_them(name):
    cfg = preset(name)
    embedding = cfg.vocab_size * cfg.hidden_size  # one row per token: left out
    assert bytes_per_step(cfg, 2, 0, 1) == pytest.approx(2 * (cfg.num_parameters(active_only=True) - embedding))
    assert bytes_per_step(cfg, 2, 0, 10**6) == pytest.approx(2 * (cfg.num_parameters() - embedding))
    steps = [bytes_per_step(cfg, 2, 0, b) for b in (1, 8, 32, 64)]
    assert steps == sorted(steps) and len(set(steps)) == 4


def test_kv_grows_with_the_batch_and_stops_at_the_window():
    cfg = preset("mini")
    kv_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    full = sum(not cfg.is_sliding_layer(i) for i in range(cfg.num_hidden_layers))
    base = bytes_per_step(cfg, 2, 0, 4)
    assert bytes_per_step(cfg, 2, 1000, 4) - base == pytest.approx(4 * 1000 * cfg.num_hidden_layers * kv_token_layer)
    # past the window only the full-attention layers keep growing
    far, farther = (bytes_per_step(cfg, 2, n, 1) for n in (cfg.sliding_window + 10, cfg.sliding_window + 110))
    assert farther - far == pytest.approx(100 * full * kv_token_layer)
