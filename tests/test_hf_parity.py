"""Trinity vs HF transformers' AfmoeForCausalLM: same weights, same logits, same greedy tokens."""

import pytest
import torch

from trinity import TrinityForCausalLM, preset
from trinity.generate import GenerationParams, generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # six HF models built and run in fp32: about a minute on 2 cores

# Each varies what the issue names: dense layers (0, 1, 3), kv heads (1, 2, = heads), muP on/off,
# explicit layer_types, a window shorter than the sequence, top-k 1 and > 1.
CONFIGS = {
    "dense0_kv1_top1": dict(num_dense_layers=0, num_key_value_heads=1, num_experts_per_tok=1, sliding_window=6),
    "dense1_kv2_top2": dict(num_dense_layers=1, num_key_value_heads=2, num_experts_per_tok=2, sliding_window=5),
    "dense3_mha_nomup": dict(num_hidden_layers=5, num_dense_layers=3, num_key_value_heads=4, mup_enabled=False,
                             sliding_window=7),
    "explicit_layer_types": dict(num_hidden_layers=5, layer_types=["full_attention", "sliding_attention",
                                                                   "full_attention", "sliding_attention",
                                                                   "sliding_attention"], sliding_window=4),
    "top4_of_16_shared2": dict(num_experts=16, num_experts_per_tok=4, num_shared_experts=2, sliding_window=3,
                               route_scale=2.448),
    "every2_window_long": dict(num_hidden_layers=6, global_attn_every_n_layers=2, num_dense_layers=2,
                               sliding_window=64, rope_theta=500.0),
}


def hf_random_model(cfg, seed: int, scale: float = 4.0):
    """An HF model with random weights (HF's own init zeroes the router, which would make routing ties)."""
    hf_cfg = transformers.AfmoeConfig.from_dict(cfg.to_dict())
    torch.manual_seed(seed)
    model = transformers.AfmoeForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("expert_bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * cfg.initializer_range * scale)
    return model


def successor_language(cfg, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences of a toy language where every token has one fixed successor (a random permutation)."""
    succ = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(1234))
    seq = [torch.randint(0, cfg.vocab_size, (batch,), generator=generator)]
    for _ in range(length - 1):
        seq.append(succ[seq[-1]])
    return torch.stack(seq, dim=1)


def train_briefly(model, cfg, steps: int = 150) -> None:
    """A random model's next-token distribution is nearly flat (top-1 margins far below bf16 rounding), so
    bf16 top-1 agreement would measure noise. Real checkpoints are trained; so is this one, for a few seconds."""
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = successor_language(cfg, 16, 24, generator)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = preset("tiny", **CONFIGS[request.param])
    hf = hf_random_model(cfg, seed=len(request.param), scale=1.0)
    train_briefly(hf, cfg)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = TrinityForCausalLM.from_pretrained(path, dtype=torch.float32)
    return cfg, hf, ours, path


def test_fp32_logits_match(pair):
    cfg, hf, ours, _ = pair
    ids = torch.randint(0, cfg.vocab_size, (3, 19), generator=torch.Generator().manual_seed(0))
    assert ids.shape[1] > cfg.sliding_window or cfg.sliding_window == 64
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (3, 19, cfg.vocab_size)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_bf16_top1_agrees(pair):
    cfg, _, _, path = pair
    hf = transformers.AfmoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = TrinityForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ids = successor_language(cfg, 8, 32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        agree = (hf(ids).logits.argmax(-1) == ours(ids).argmax(-1)).float().mean().item()
    assert agree >= 0.99


def test_greedy_decode_32_tokens_identical(pair):
    cfg, hf, ours, _ = pair
    prompt = [5, 17, 3, 99, 42, 7, 250, 11, 8]
    got = generate(ours, [prompt], GenerationParams(max_tokens=32, temperature=0))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


def test_reverse_trinity_save_hf_load(pair, tmp_path):
    cfg, _, ours, _ = pair
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.AfmoeForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_batched_ragged_greedy_equals_single(pair):
    _, _, ours, _ = pair
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [14]]
    params = GenerationParams(max_tokens=12, temperature=0)
    together = generate(ours, prompts, params)
    alone = [generate(ours, [p], params)[0] for p in prompts]
    assert together == alone
