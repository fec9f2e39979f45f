"""Training maths: Newton-Schulz, Muon (per-expert), the Muon/AdamW split, expert-bias balancing, router losses."""

import math

import pytest
import torch
from torch import nn

from trinity import TrinityForCausalLM, preset
from trinity.train.balance import BalanceConfig, ExpertBalancer, max_violation, moe_blocks
from trinity.train.losses import next_token_loss, router_z_loss, sequence_balance_loss
from trinity.train.optim import NS_BAND, CombinedOptimizer, Muon, newton_schulz, split_parameters
from trinity.train.trainer import init_like_report_


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def well_conditioned(m: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """G = U diag(s) V^T with s log-spaced over one decade (condition number 10), and its polar factor U V^T."""
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    s = torch.logspace(0, -1, k, dtype=torch.float64)
    return (u @ torch.diag(s) @ v.T).float(), (u @ v.T).float()


def assert_in_band(x: torch.Tensor) -> None:
    sv = torch.linalg.svdvals(x.double())
    lo, hi = NS_BAND
    assert sv.min().item() >= lo and sv.max().item() <= hi, (sv.min().item(), sv.max().item(), NS_BAND)


# ---------------------------------------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128), (96, 48)], ids=["square", "tall", "wide", "tall2"])
def test_newton_schulz_well_conditioned_is_near_orthogonal(shape):
    g, polar = well_conditioned(*shape, _gen(sum(shape)))
    out = newton_schulz(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    assert_in_band(out)
    # ... and it is the polar factor's direction (singular vectors kept), not just any near-orthogonal matrix
    cos = (out * polar).sum() / (out.norm() * polar.norm())
    assert cos.item() > 0.97


@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (512, 32), (32, 512), (128, 32)])
def test_newton_schulz_gaussian_aspect_ratio_at_least_4(shape):
    assert max(shape) / min(shape) >= 4
    g = torch.randn(*shape, generator=_gen(max(shape) + min(shape)))
    assert_in_band(newton_schulz(g))


def test_newton_schulz_is_scale_invariant():
    g, _ = well_conditioned(48, 48, _gen(3))
    a, b = newton_schulz(g), newton_schulz(1000.0 * g)
    assert ((a - b).norm() / a.norm()).item() < 0.05  # equal up to bf16 rounding
    assert_in_band(b)


@pytest.mark.parametrize("shape", [(5, 96, 24), (5, 24, 96), (3, 2, 16, 40)], ids=["tall", "wide", "4d"])
def test_newton_schulz_batched_equals_per_matrix(shape):
    g = torch.randn(*shape, generator=_gen(len(shape)))
    out = newton_schulz(g)
    assert out.shape == g.shape
    flat_in, flat_out = g.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])
    for i in range(flat_in.shape[0]):
        single = newton_schulz(flat_in[i])
        assert torch.allclose(flat_out[i], single, atol=1e-6), i
        assert_in_band(flat_out[i])


# ---------------------------------------------------------------------------------------------- Muon

def _scale(rows: int, cols: int) -> float:
    return 0.2 * max(rows, cols) ** 0.5


def test_muon_on_stacked_experts_is_per_expert_and_per_half():
    e, i, h = 4, 16, 24
    lr, mom = 0.05, 0.9
    gen = _gen(7)
    w0 = torch.randn(e, 2 * i, h, generator=gen)
    d0 = torch.randn(e, h, i, generator=gen)
    grads = [(torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen)) for _ in range(2)]
    gate_up, down = nn.Parameter(w0.clone()), nn.Parameter(d0.clone())
    opt = Muon([{"params": [gate_up, down],
                 "names": ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]}],
               lr=lr, momentum=mom, nesterov=True)

    # the per-matrix computation, written out: Nesterov momentum, then one NS per expert and per gate/up half
    ref_w, ref_d = w0.clone(), d0.clone()
    buf_w, buf_d = torch.zeros_like(w0), torch.zeros_like(d0)
    for gw, gd in grads:
        gate_up.grad, down.grad = gw.clone(), gd.clone()
        opt.step()
        buf_w, buf_d = mom * buf_w + gw, mom * buf_d + gd
        nw, nd = gw + mom * buf_w, gd + mom * buf_d
        for x in range(e):
            for half in (slice(0, i), slice(i, 2 * i)):
                ref_w[x, half] -= lr * _scale(i, h) * newton_schulz(nw[x, half])
            ref_d[x] -= lr * _scale(h, i) * newton_schulz(nd[x])
    assert torch.allclose(gate_up.data, ref_w, atol=1e-6, rtol=0)
    assert torch.allclose(down.data, ref_d, atol=1e-6, rtol=0)

    # the test tells the layouts apart: one NS over each whole [2I, H] matrix is a different update
    whole = w0.clone()
    for x in range(e):
        whole[x] -= lr * _scale(2 * i, h) * newton_schulz(grads[0][0][x] * (1 + mom))
    one_step = nn.Parameter(w0.clone())
    opt1 = Muon([{"params": [one_step], "names": ["model.layers.1.mlp.experts.gate_up_proj"]}], lr=lr, momentum=mom)
    one_step.grad = grads[0][0].clone()
    opt1.step()
    assert (one_step.data - whole).abs().max().item() > 1e-2


def test_muon_plain_matrix_and_decoupled_weight_decay():
    gen = _gen(11)
    w0, g = torch.randn(32, 48, generator=gen), torch.randn(32, 48, generator=gen)
    p = nn.Parameter(w0.clone())
    opt = Muon([{"params": [p], "names": ["model.layers.0.self_attn.q_proj.weight"]}], lr=0.1, momentum=0.95,
               nesterov=False, weight_decay=0.5)
    p.grad = g.clone()
    opt.step()
    expected = w0 * (1 - 0.1 * 0.5) - 0.1 * _scale(32, 48) * newton_schulz(g)
    assert torch.allclose(p.data, expected, atol=1e-6, rtol=0)
    # update RMS ~ 0.2 (matches AdamW's typical RMS): singular values in the band, scaled by 0.2 sqrt(max dim)
    rms = (newton_schulz(g) * _scale(32, 48)).pow(2).mean().sqrt().item()
    assert 0.2 * NS_BAND[0] <= rms <= 0.2 * NS_BAND[1]


@pytest.fixture(scope="module")
def tiny_model():
    model = TrinityForCausalLM.empty(preset("tiny"), torch.float32, "cpu")
    init_like_report_(model, 0)
    return model


def test_split_parameters_owns_exactly_the_intended_parameters(tiny_model):
    split = split_parameters(tiny_model)
    named = dict(tiny_model.named_parameters())
    muon = {n for n, _ in split.muon}
    decay = {n for n, _ in split.adamw_decay}
    no_decay = {n for n, _ in split.adamw_no_decay}
    trainable = {n for n, p in named.items() if p.requires_grad}

    assert muon == {n for n in trainable if n.startswith("model.layers.") and named[n].dim() >= 2}
    assert any(n.endswith("experts.gate_up_proj") for n in muon) and any(n.endswith("router.gate.weight") for n in muon)
    assert decay == {"model.embed_tokens.weight", "lm_head.weight"}
    assert no_decay == {n for n in trainable if named[n].dim() == 1}
    assert any(n.endswith("layernorm.weight") for n in no_decay) and "model.norm.weight" in no_decay
    biases = {n for n in named if n.endswith("expert_bias")}
    assert len(biases) == 3 and not biases & (muon | decay | no_decay)
    assert not (muon & decay or muon & no_decay or decay & no_decay)
    assert muon | decay | no_decay == trainable
    assert trainable | biases == set(named)


def test_combined_optimizer_groups_match_the_split(tiny_model):
    opt = CombinedOptimizer(tiny_model, lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    ids = lambda pairs: {id(p) for _, p in pairs}  # noqa: E731
    muon_params = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon_params == ids(opt.split.muon)
    decay_group, no_decay_group = opt.adamw.param_groups
    assert {id(p) for p in decay_group["params"]} == ids(opt.split.adamw_decay) and decay_group["weight_decay"] == 0.1
    assert {id(p) for p in no_decay_group["params"]} == ids(opt.split.adamw_no_decay)
    assert no_decay_group["weight_decay"] == 0.0
    assert opt.muon.param_groups[0]["lr"] == 0.02 and decay_group["lr"] == 1e-3
    opt.set_lr_scale(0.5)
    assert opt.muon.param_groups[0]["lr"] == 0.01 and decay_group["lr"] == 5e-4


# ---------------------------------------------------------------------------------------------- balancing

def _balancer(model, rule: str, **kw) -> ExpertBalancer:
    for block in moe_blocks(model):
        block.expert_bias.data.zero_()
    return ExpertBalancer(model, BalanceConfig(rule, **kw))


# expert 0 overloaded, expert 1 underloaded, the rest at the mean (n̄ = 10)
COUNTS = torch.tensor([20.0, 0.0, 10.0, 10.0, 10.0, 10.0, 5.0, 15.0])


def _counts(layers: int) -> torch.Tensor:
    return COUNTS.repeat(layers, 1)


def test_sign_rule_moves_biases_against_the_load(tiny_model):
    bal = _balancer(tiny_model, "sign", gamma=1e-3)
    bal.update(_counts(len(bal.blocks)))
    for block in bal.blocks:
        b = block.expert_bias.data
        assert b[0] < 0 < b[1]  # overloaded down, underloaded up
        assert b[6] > 0 > b[7]
        # by hand: gamma * sign(mean - n) = [-1, +1, 0, 0, 0, 0, +1, -1] * gamma, already centred
        expected = 1e-3 * torch.tensor([-1.0, 1, 0, 0, 0, 0, 1, -1])
        assert torch.allclose(b, expected, atol=1e-9)
        assert abs(b.mean().item()) < 1e-9


def test_sign_rule_recentres():
    counts = torch.tensor([[30.0, 5, 5, 0]])  # three below the mean: uncentred step would have mean +gamma/2
    model = TrinityForCausalLM.empty(preset("tiny", num_experts=4, num_hidden_layers=2), torch.float32, "cpu")
    init_like_report_(model, 0)
    bal = _balancer(model, "sign", gamma=1.0)
    bal.update(counts)
    b = bal.blocks[0].expert_bias.data
    assert torch.allclose(b, torch.tensor([-1.0, 1, 1, 1]) - 0.5)
    assert abs(b.mean().item()) < 1e-7


def test_smebu_one_step_by_hand(tiny_model):
    kappa, beta, lam = 2.0, 0.9, 2e-3
    bal = _balancer(tiny_model, "smebu", kappa=kappa, beta=beta, lam=lam)
    bal.update(_counts(len(bal.blocks)))
    v = torch.tanh(kappa * (10 - COUNTS) / 10)
    m = (1 - beta) * v
    expected = lam * m - (lam * m).mean()
    for block, mom in zip(bal.blocks, bal.momentum):
        b = block.expert_bias.data
        assert torch.allclose(mom, m, atol=1e-7)
        assert torch.allclose(b, expected, atol=1e-8)
        assert b[0] < 0 < b[1] and abs(b.mean().item()) < 1e-8


def test_smebu_momentum_converges_with_constant_counts(tiny_model):
    kappa, beta, lam = 2.0, 0.9, 2e-3
    bal = _balancer(tiny_model, "smebu", kappa=kappa, beta=beta, lam=lam)
    target = torch.tanh(kappa * (10 - COUNTS) / 10)
    steps = []
    for _ in range(200):
        before = bal.blocks[0].expert_bias.data.clone()
        bal.update(_counts(len(bal.blocks)))
        steps.append(bal.blocks[0].expert_bias.data - before)
    for mom in bal.momentum:
        assert torch.allclose(mom, target, atol=1e-6)  # m_t = (1 - beta^t) v -> v
    # the bias step converges too: lam * (v - mean v), constant and bounded by lam (soft clamp)
    assert torch.allclose(steps[-1], steps[-2], atol=1e-9)
    assert torch.allclose(steps[-1], lam * (target - target.mean()), atol=1e-7)
    assert steps[-1].abs().max() <= 2 * lam
    for block in bal.blocks:
        assert abs(block.expert_bias.data.mean().item()) < 1e-6


def test_none_rule_changes_nothing(tiny_model):
    bal = _balancer(tiny_model, "none")
    for block in bal.blocks:
        block.expert_bias.data.copy_(torch.linspace(-1, 1, block.expert_bias.numel()))
    before = [b.expert_bias.data.clone() for b in bal.blocks]
    bal.update(_counts(len(bal.blocks)))
    for block, b0, mom in zip(bal.blocks, before, bal.momentum):
        assert torch.equal(block.expert_bias.data, b0)
        assert not mom.any()
    for block in bal.blocks:
        block.expert_bias.data.zero_()


def test_balance_config_rejects_unknown_rule():
    with pytest.raises(ValueError, match="balance rule"):
        BalanceConfig("adaptive")


def test_take_counts_from_a_forward(tiny_model):
    bal = _balancer(tiny_model, "sign")
    ids = torch.randint(0, 256, (2, 12), generator=_gen(1))
    with torch.no_grad():
        tiny_model(ids)
    counts = bal.take_counts()
    cfg = tiny_model.config
    assert counts.shape == (cfg.num_hidden_layers - cfg.num_dense_layers, cfg.num_experts)
    assert torch.all(counts.sum(dim=-1) == ids.numel() * cfg.num_experts_per_tok)
    assert not bal.take_counts().any()  # counters were reset


def test_max_violation_by_hand():
    counts = torch.tensor([[4, 2, 2, 0], [3, 3, 3, 3], [8, 0, 0, 0]])
    # means 2, 3, 2: (4-2)/2 = 1, 0, (8-2)/2 = 3
    assert torch.allclose(max_violation(counts), torch.tensor([1.0, 0.0, 3.0]))


# ---------------------------------------------------------------------------------------------- losses

def test_sequence_balance_loss_uniform_is_one_and_skew_is_larger():
    b, t, e, k = 2, 8, 8, 2
    tok = torch.arange(t)
    uniform_ids = torch.stack([tok % e, (tok + 1) % e], dim=-1).repeat(b, 1)  # every expert chosen twice per seq
    flat_scores = torch.full((b * t, e), 0.5)
    assert sequence_balance_loss(flat_scores, uniform_ids, b, e).item() == pytest.approx(1.0, abs=1e-6)
    # with balanced choices the loss is 1 whatever the scores: sum_i f_i P_i = sum_i P_i
    random_scores = torch.rand(b * t, e, generator=_gen(2))
    assert sequence_balance_loss(random_scores, uniform_ids, b, e).item() == pytest.approx(1.0, abs=1e-6)

    # every token picks experts 0 and 1, which also hold most of the score mass
    skew_ids = torch.tensor([[0, 1]]).repeat(b * t, 1)
    skew_scores = torch.full((b * t, e), 0.1)
    skew_scores[:, :2] = 0.9
    loss = sequence_balance_loss(skew_scores, skew_ids, b, e).item()
    # by hand: f_0 = f_1 = E/k = 4, P_0 = P_1 = 0.9 / (2*0.9 + 6*0.1) = 0.375 -> 2 * 4 * 0.375 = 3
    assert loss == pytest.approx(3.0, abs=1e-5)
    assert loss > 1.0


def test_sequence_balance_loss_averages_sequences():
    e, t = 4, 4
    balanced = torch.tensor([[0], [1], [2], [3]])
    skewed = torch.tensor([[0], [0], [0], [0]])
    scores = torch.full((2 * t, e), 0.3)
    # seq 1 is balanced (1); seq 2 sends everything to expert 0 (f_0 = 4), where its scores are sharpened
    scores[t:, 0] = 0.9
    p0 = 0.9 / (0.9 + 3 * 0.3)
    both = sequence_balance_loss(scores, torch.cat([balanced, skewed]), 2, e).item()
    assert both == pytest.approx((1.0 + 4 * p0) / 2, abs=1e-6)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [1.0, 1.0]])
    # logsumexp rows: log 2, log 4, 1 + log 2
    expected = (math.log(2) ** 2 + math.log(4) ** 2 + (1 + math.log(2)) ** 2) / 3
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32


def test_next_token_loss_ignores_masked_labels():
    logits = torch.randn(1, 4, 10, generator=_gen(4))
    labels = torch.tensor([[3, -100, 5, -100]])
    manual = -(torch.log_softmax(logits[0, 0], -1)[3] + torch.log_softmax(logits[0, 2], -1)[5]) / 2
    assert next_token_loss(logits, labels).item() == pytest.approx(manual.item(), rel=1e-6)
