"""Sharded checkpoint loading: every rank of every split reads exactly its part of the whole model's weights.

No processes: a `ShardPlan` is built for any rank without a process group, and loading does not communicate. The
reference is the whole model cut in memory (`shard_model`)."""

import copy
import os

import pytest
import torch
from safetensors import safe_open
from test_checkpoint import file_tensors, make_model, write_checkpoint

from trinity import CheckpointError, TrinityForCausalLM, preset
from trinity.parallel.sharding import ShardPlan, shard_model

# KV heads split (4, and 2 over tp 2), replicated (1, and 2 over tp 4); a vocabulary that leaves padding rows on
# every split (301 = 2 * 151 - 1 = 4 * 76 - 3); heads tied and not.
CONFIGS = {
    "kv2-vocab301": dict(num_key_value_heads=2, vocab_size=301),
    "kv1-vocab301-tied": dict(num_key_value_heads=1, vocab_size=301, tie_word_embeddings=True),
    "kv4-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}
LAYOUTS = ("per_expert", "stacked")


@pytest.fixture(scope="module", params=[(c, lay) for c in CONFIGS for lay in LAYOUTS],
                ids=[f"{c}-{lay}" for c in CONFIGS for lay in LAYOUTS])
def saved(request, tmp_path_factory):
    """(config, whole model, checkpoint folder): several shard files."""
    name, layout = request.param
    cfg = preset("tiny", **CONFIGS[name])
    model = make_model(cfg)
    path = tmp_path_factory.mktemp(f"{name}-{layout}")
    model.save_pretrained(path, max_shard_size="150KB", expert_layout=layout)
    assert sum(f.endswith(".safetensors") for f in os.listdir(path)) >= 3
    return cfg, model, path


def assert_same_shard(got: TrinityForCausalLM, want: TrinityForCausalLM, where: str) -> None:
    g, w = dict(got.named_parameters()), dict(want.named_parameters())
    assert g.keys() == w.keys(), where
    for name, p in w.items():
        assert g[name].shape == p.shape, (where, name, tuple(g[name].shape), tuple(p.shape))
        assert g[name].dtype == p.dtype, (where, name)
        assert torch.equal(g[name], p), (where, name)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-experts", "ep-experts"])
@pytest.mark.parametrize("tp", [2, 4])
def test_every_rank_loads_its_shard(saved, tp, expert_parallel):
    cfg, model, path = saved
    for rank in range(tp):
        got = TrinityForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 shard=ShardPlan(cfg, rank, tp, expert_parallel))
        want = shard_model(copy.deepcopy(model), ShardPlan(cfg, rank, tp, expert_parallel))
        assert_same_shard(got, want, f"rank {rank} of {tp}")
        assert got.shard_plan.rank == rank
        if cfg.tie_word_embeddings:
            assert got.lm_head.weight is got.model.embed_tokens.weight


def test_reads_in_pieces_and_releases_the_map(tmp_path, monkeypatch):
    """With a read budget of a few rows, every tensor is read in pieces and the files reopened between them (what
    bounds a rank's mapped pages on a big checkpoint); the result is the same."""
    from trinity.model import checkpoint

    cfg = preset("tiny", vocab_size=301, num_key_value_heads=1)
    model = make_model(cfg)
    for layout in LAYOUTS:
        model.save_pretrained(tmp_path / layout, max_shard_size="150KB", expert_layout=layout)
    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", counting_open)
    monkeypatch.setattr(checkpoint, "RELEASE_FRACTION", 0)
    monkeypatch.setattr(checkpoint, "RELEASE_MIN_BYTES", 3000)  # 11 rows of 64 fp32; stacked: one expert a read
    for layout in LAYOUTS:
        for expert_parallel in (False, True):
            for rank in range(4):
                opened.clear()
                plan = ShardPlan(cfg, rank, 4, expert_parallel)
                got = TrinityForCausalLM.from_pretrained(tmp_path / layout, dtype=torch.float32, shard=plan)
                want = shard_model(copy.deepcopy(model), ShardPlan(cfg, rank, 4, expert_parallel))
                assert_same_shard(got, want, f"{layout} rank {rank}, expert parallel {expert_parallel}")
                files = sum(f.endswith(".safetensors") for f in os.listdir(tmp_path / layout))
                assert len(opened) > 10 * files


def test_empty_allocates_local_shapes_with_zero_padding():
    cfg = preset("tiny", vocab_size=301)
    plan = ShardPlan(cfg, 3, 4)
    model = TrinityForCausalLM.empty(cfg, shard=plan)
    embed = model.model.embed_tokens.weight
    assert embed.shape == (76, cfg.hidden_size) and embed.device.type == "cpu"
    assert plan.vocab_range == (228, 301)
    assert not embed[73:].any() and not model.lm_head.weight[73:].any()  # rows 301..303: padding
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape == (8, 2 * 32 // 4, cfg.hidden_size)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_missing_expert_named_on_the_rank_that_holds_it(tmp_path, expert_parallel):
    cfg = preset("tiny")
    model = make_model(cfg)
    model.save_pretrained(tmp_path / "whole")
    missing = "model.layers.2.mlp.experts.5.down_proj.weight"
    tensors = file_tensors(tmp_path / "whole")
    del tensors[missing]
    write_checkpoint(tmp_path / "ckpt", tensors, cfg)
    for rank in range(4):
        plan = ShardPlan(cfg, rank, 4, expert_parallel)
        holds = not expert_parallel or rank == 2  # expert-parallel: experts 4 and 5 are rank 2's
        if not holds:
            got = TrinityForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, shard=plan)
            assert_same_shard(got, shard_model(copy.deepcopy(model), ShardPlan(cfg, rank, 4, True)), f"rank {rank}")
            continue
        with pytest.raises(CheckpointError) as info:
            TrinityForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, shard=plan)
        assert str(info.value).endswith(f"is missing tensors: {missing}"), (rank, str(info.value))


def test_missing_whole_tensor_names_its_full_shape(tmp_path):
    cfg = preset("tiny")
    make_model(cfg).save_pretrained(tmp_path / "whole")
    tensors = file_tensors(tmp_path / "whole")
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    write_checkpoint(tmp_path / "ckpt", tensors, cfg)
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.0\.self_attn\.o_proj\.weight "
                                              r"\(shape \(64, 64\)\)$"):
        TrinityForCausalLM.from_pretrained(tmp_path / "ckpt", shard=ShardPlan(cfg, 1, 2))


@pytest.mark.parametrize("name, shape, message", [
    ("model.layers.0.mlp.bogus.weight", (3, 4), "unexpected tensor 'model.layers.0.mlp.bogus.weight'"),
    ("model.layers.1.mlp.experts.8.gate_proj.weight", (32, 64), "unexpected tensor"),
    ("model.layers.2.mlp.experts.0.down_proj.weight", (64, 16), "has shape (64, 16) but the model expects (64, 32)"),
])
def test_errors_on_every_rank(tmp_path, name, shape, message):
    """A tensor that fits no parameter, or the wrong shape, is refused by every rank, whichever experts it holds,
    and shapes are the checkpoint's (full), not the rank's."""
    cfg = preset("tiny")
    make_model(cfg).save_pretrained(tmp_path / "whole")
    tensors = file_tensors(tmp_path / "whole")
    tensors[name] = torch.zeros(shape)
    write_checkpoint(tmp_path / "ckpt", tensors, cfg)
    for rank in range(4):
        with pytest.raises(CheckpointError) as info:
            TrinityForCausalLM.from_pretrained(tmp_path / "ckpt", shard=ShardPlan(cfg, rank, 4, True))
        assert message in str(info.value), (rank, str(info.value))
