"""GRPO (`trinity train --stage grpo`): the loss against numbers worked out by hand, group advantages, rewards by
code, LoRA merging, the rollout engine serving updated weights with no stale prefix cache, and an end-to-end
run that checkpoints, exports and resumes."""

import json
import math
from pathlib import Path

import pytest
import torch

from trinity import LLM, SamplingParams, TrinityForCausalLM, preset
from trinity.cli import main as cli_main
from trinity.train.grpo import GRPOTrainer, pack_rollouts
from trinity.train.grpo_config import GRPOConfig
from trinity.train.grpo_loss import group_advantages, grpo_loss, token_logprobs
from trinity.train.lora import (AdapterOptimizer, LoRALinear, apply_lora, lora_disabled, merged_state_dict)
from trinity.train.rewards import parse_reply, task_reward
from trinity.train.rollouts import Rollout, RolloutEngine, round_tasks
from trinity.train.screening import screened_task_ids
from trinity.train.trainer import load_train_config


# ---------------------------------------------------------------------------------------------- the loss by hand
def test_grpo_loss_equals_the_hand_computed_value():
    # Two prompts, a group of 3 completions each; completions of 2 tokens, or 1 (then the 2nd is padding).
    # Rewards: prompt 1 -> [1, 0, 0]; prompt 2 -> [1, 1, 1].
    #   prompt 1: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.5773503
    #             A = (2/3) / (0.5773503 + 1e-4) = 1.1545006 and (-1/3) / 0.5774503 = -0.5772503 (twice)
    #   prompt 2: every reward equal -> A = 0 / (0 + 1e-4) = 0 for all three
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=3, eps=1e-4)
    assert adv.tolist() == pytest.approx([1.1545006, -0.5772503, -0.5772503, 0.0, 0.0, 0.0], abs=1e-6)

    new = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-2.0, -1.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    old = torch.tensor([[-1.5, -2.0], [-0.3, 0.0], [-2.0, -1.5], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    ref = torch.tensor([[-1.0, -2.5], [-0.5, 0.0], [-2.0, -1.0], [-2.0, 0.0], [-1.0, 0.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 0], [1, 0]], dtype=torch.float32)  # 8 tokens
    # Per token, ratio = exp(new - old), objective = min(ratio A, clip(ratio, 0.8, 1.2) A):
    #   seq 1 (A = 1.1545006): ratios e^0.5 = 1.6487213 and 1 -> min picks the clipped 1.2 A, then 1.0 A
    #                          -> 2.2 A = 2.5399013                                   (token 1 clipped)
    #   seq 2 (A = -0.5772503): ratio e^-0.2 = 0.8187308, inside the band -> 0.8187308 A = -0.4726150
    #   seq 3 (A = -0.5772503): ratios 1 and e^0.5 = 1.6487213; with A < 0 the min is the unclipped
    #                          1.6487213 A (more negative) -> 1 A + 1.6487213 A = -1.5289727   (not clipped)
    #   seqs 4-6 (A = 0): 0
    #   sum of objectives = 2.5399013 - 0.4726150 - 1.5289727 = 0.5383136
    # k3 = exp(ref - new) - (ref - new) - 1 per token:
    #   seq 1 token 2: d = -0.5 -> 0.6065307 + 0.5 - 1 = 0.1065307
    #   seq 4:         d = -1.0 -> 0.3678794 + 1.0 - 1 = 0.3678794
    #   seq 6:         d = +0.5 -> 1.6487213 - 0.5 - 1 = 0.1487213
    #   every other token d = 0 -> 0;  sum = 0.6231314
    # loss = (-0.5383136 + 0.1 * 0.6231314) / 8 tokens = -0.0595001
    out = grpo_loss(new, old, ref, adv, mask, clip_eps=0.2, kl_coeff=0.1)
    assert out.loss.item() == pytest.approx(-0.0595001, abs=1e-6)
    assert out.policy_loss == pytest.approx(-0.5383136 / 8, abs=1e-6)
    assert out.kl == pytest.approx(0.6231314 / 8, abs=1e-6)
    assert out.clip_fraction == pytest.approx(1 / 8)  # seq 1's first token only
    assert out.tokens == 8


def test_grpo_loss_gradient_is_the_policy_gradient_at_ratio_one():
    """One pass (old = new): d loss / d logp = -A / tokens on every completion token (no KL term)."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.2, 0.0).loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 0.5 / 3, 0.0])


def test_token_logprobs_and_packing():
    logits = torch.randn(2, 3, 5)
    tokens = torch.tensor([[1, 2, 3], [4, 0, 1]])
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens, 0.7), expected)
    batch = pack_rollouts([Rollout(0, [5, 6, 7], [8, 9], "", "stop"), Rollout(0, [5, 6], [8], "", "length")], 0)
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 8, 0, 0]]
    # position t's logits score token t + 1: completions start at target index len(prompt) - 1
    assert batch.mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]


def test_round_tasks_cover_every_task_once_per_epoch():
    drawn = [i for step in range(3) for i in round_tasks(6, step, 2, seed=1)]
    assert sorted(drawn) == list(range(6))
    assert round_tasks(6, 1, 2, seed=1) == drawn[2:4]  # a function of the step: resume draws the same


# ---------------------------------------------------------------------------------------------- rewards
def test_rewards_by_code():
    arithmetic = {"check": "arithmetic", "expected": {"answer": 936}}
    assert task_reward(arithmetic, "347 + 589\nresult: 936\n</think>\nThe answer is 936.").reward == 1.0
    assert task_reward(arithmetic, "...</think>\nThe answer is 935.").reward == 0.0
    assert task_reward(arithmetic, "...</think>\nThe answer is 935.", format_reward=0.1).reward == 0.1
    assert task_reward(arithmetic, "never closes The answer is 936.").reward == 0.0  # all reasoning, no content

    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}]
    call = {"check": "tool_call", "tools": tools,
            "expected": {"name": "weather", "arguments": {"city": "Osaka", "unit": "celsius"}}}
    good = '</think>\n<tool_call>\n{"name": "weather", "arguments": {"city": "Osaka", "unit": "celsius"}}\n</tool_call>'
    assert [(n, json.loads(a)) for n, a in parse_reply(good, tools).tool_calls] == \
        [("weather", {"city": "Osaka", "unit": "celsius"})]
    assert task_reward(call, good).passed
    assert not task_reward(call, good.replace("Osaka", "Kyoto")).passed
    assert not task_reward(call, "</think>\n<tool_call>{not json}</tool_call>").passed
    # the expected arguments are held to the tool's schema too: an expectation outside the enum fails
    off_schema = dict(call, expected={"name": "weather", "arguments": {"city": "Osaka", "unit": "kelvin"}})
    result = task_reward(off_schema, good.replace("celsius", "kelvin"))
    assert not result.passed and "kelvin" in result.detail

    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    json_task = {"check": "json", "expected": {"schema": schema, "value": {"age": 3}}}
    assert task_reward(json_task, '</think>\n{"age": 3}').passed
    assert not task_reward(json_task, '</think>\n{"age": "three"}', format_reward=0.2).passed
    assert task_reward(json_task, '</think>\n{"age": "three"}', format_reward=0.2).reward == 0.2
    assert task_reward(json_task, "</think>\nage three", format_reward=0.2).reward == 0.0
    # json_exact: a valid object with another value (an answer cut short) no longer passes
    assert task_reward(json_task, '</think>\n{"age": 31}').passed
    assert not task_reward(json_task, '</think>\n{"age": 31}', json_exact=True).passed
    assert task_reward(json_task, '</think>\n{"age": 3}', json_exact=True).passed
    assert task_reward(arithmetic, "...</think>\nThe answer is 936.", json_exact=True).passed  # json tasks only


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_merge_equals_the_adapted_forward():
    model = TrinityForCausalLM.random(preset("tiny"), seed=0)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(ids)
    adapted = apply_lora(model, rank=4, alpha=8.0)
    assert "model.layers.0.self_attn.q_proj" in adapted and "model.layers.0.mlp.down_proj" in adapted
    assert "model.layers.1.mlp.shared_experts.up_proj" in adapted
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():  # B starts at zero: the adapted model starts as the base one
        torch.testing.assert_close(model(ids), base_logits, rtol=0, atol=1e-6)
        gen = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)
    adapted_logits = model(ids)  # the training path (autograd on), as GRPO computes it
    merged = TrinityForCausalLM.empty(model.config)
    merged.load_state_dict(merged_state_dict(model))
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(merged(ids), adapted_logits, rtol=0, atol=1e-5)
    with torch.no_grad(), lora_disabled(model):  # the reference policy: the base weights untouched
        torch.testing.assert_close(model(ids), base_logits, rtol=0, atol=1e-6)
    # only the adapters move under the adapter optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = AdapterOptimizer(model, lr=1e-2)
    model(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


# ---------------------------------------------------------------------------------------------- engine weights
def _next_token_logprobs(llm: LLM, prompt: list[int]) -> tuple[dict[int, float], int]:
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1, temperature=0,
                                                                                 logprobs=20))[0]
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}, out.num_cached_tokens


def _assert_same_logprobs(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    assert max(abs(a[t] - b[t]) for t in a) < 1e-5


@pytest.mark.parametrize("lora", [False, True])
def test_rollout_engine_serves_updated_weights_with_no_stale_prefix_cache(lora):
    policy = TrinityForCausalLM.random(preset("tiny"), seed=0)
    if lora:
        apply_lora(policy, rank=4, alpha=8.0)
    engine = RolloutEngine(merged_state_dict(policy), policy.config, None, torch.device("cpu"), max_model_len=96,
                           max_num_seqs=4, num_kv_blocks=32, seed=0)
    prompt = torch.randint(10, 500, (40,), generator=torch.Generator().manual_seed(3)).tolist()  # 2 full blocks
    before, _ = _next_token_logprobs(engine.llm, prompt)
    again, cached = _next_token_logprobs(engine.llm, prompt)
    assert cached >= 32  # the prefix cache does serve this prompt: a stale entry could be reused
    _assert_same_logprobs(again, before)

    with torch.no_grad():  # an "optimizer step" on the policy
        gen = torch.Generator().manual_seed(5)
        for name, p in policy.named_parameters():
            if p.requires_grad and p.dim() == 2 and ("lora_B" in name or not lora):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    engine.sync(merged_state_dict(policy))
    after, cached = _next_token_logprobs(engine.llm, prompt)
    assert cached == 0  # nothing computed by the old weights was reused
    assert max(abs(after.get(t, -1e9) - before[t]) for t in before) > 1e-3

    fresh_model = TrinityForCausalLM.empty(policy.config)
    fresh_model.load_state_dict(merged_state_dict(policy))
    fresh, _ = _next_token_logprobs(LLM(fresh_model, max_model_len=96, num_kv_blocks=32), prompt)
    _assert_same_logprobs(after, fresh)
    # and the policy's own (training) forward agrees with what the engine serves
    with torch.no_grad():
        own = torch.log_softmax(policy(torch.tensor([prompt]))[0, -1], dim=-1)
    assert max(abs(own[t].item() - after[t]) for t in after) < 1e-4


def test_update_weights_refuses_unknown_names_and_running_requests():
    model = TrinityForCausalLM.random(preset("tiny"), seed=0)
    llm = LLM(TrinityForCausalLM.random(preset("tiny"), seed=0), max_model_len=64, num_kv_blocks=16)
    with pytest.raises(KeyError):
        llm.update_weights({"model.nope.weight": torch.zeros(1)})
    # every tensor is checked before any is copied: a refused update leaves the served model as it was
    served = llm.engine.model.model.embed_tokens.weight
    kept = served.clone()
    with pytest.raises(ValueError, match="shape"):
        llm.update_weights({"model.embed_tokens.weight": kept + 1, "model.norm.weight": torch.zeros(3)})
    assert torch.equal(served, kept)
    llm.engine.add_request("r", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError):
        llm.update_weights(model.state_dict())


# ---------------------------------------------------------------------------------------------- end to end
def _prompt_file(tmp_path: Path) -> Path:
    # "contains" tasks a random model passes now and then: groups whose rewards differ, so steps update
    path = tmp_path / "prompts.jsonl"
    tasks = [{"prompt": "Say a word.", "check": "contains", "expected": {"contains": ["a"]}},
             {"prompt": [{"role": "user", "content": "Name a colour."}], "check": "contains",
              "expected": {"contains": ["e"]}}]
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    return path


GRPO_ARGS = ["--prompts-per-step", "2", "--group-size", "3", "--rollout-max-tokens", "16", "--device", "cpu",
             "--progress", "false", "--autocast", "false", "--enable-thinking", "false"]


def test_train_grpo_command_checkpoints_exports_and_resumes(tmp_path, capsys):
    prompts, out = _prompt_file(tmp_path), tmp_path / "run"
    args = ["train", "--stage", "grpo", "--prompts", str(prompts), "--out-dir", str(out), *GRPO_ARGS]
    assert cli_main([*args, "--steps", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("reward_mean", "kl", "clip_fraction", "loss"):
        assert all(math.isfinite(r[key]) for r in log)
    assert any(r["updated"] for r in log)
    # a round with a group that disagreed is a round with a gradient, and only such a round updates
    assert all((r["mixed_groups"] > 0) == r["updated"] and 0 <= r["mixed_groups"] <= 1 for r in log)
    assert (out / "grpo_curves.png").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["stage"] == "grpo"
    exported = TrinityForCausalLM.from_pretrained(out / "export")
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, state["model"][name])

    # resumes at step 2; two passes over the round's samples (the old-policy log-probabilities then come from a
    # forward before the first update, and the ratio moves off 1 in the second pass)
    assert cli_main([*args, "--steps", "3", "--epochs-per-round", "2"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_filter_groups_trains_on_the_mixed_groups_only(tmp_path):
    prompts = _prompt_file(tmp_path)
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"filter_{flag}"
        assert cli_main(["train", "--stage", "grpo", "--prompts", str(prompts), "--out-dir", str(out), *GRPO_ARGS,
                         "--steps", "3", "--filter-groups", flag]) == 0
        runs[flag] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # the same seed draws the same first round: the filter changes what trains, not what is sampled
    assert runs["false"][0]["reward_mean"] == runs["true"][0]["reward_mean"]
    for r in runs["false"]:
        assert r["trained_samples"] == 2 * 3
    for r in runs["true"]:
        mixed = round(r["mixed_groups"] * 2)
        assert r["trained_samples"] == (3 * mixed if mixed else 2 * 3)
    assert any(0 < r["mixed_groups"] < 1 for r in runs["true"]), "no round had one group of each kind to filter"


def _forced_call_file(tmp_path: Path) -> Path:
    # a named tool_choice that the prompt does not name: only the server's constraint makes the call
    colour = {"type": "string", "enum": ["red", "blue"]}
    tools = [{"type": "function", "function": {"name": name, "description": "d", "parameters": {
        "type": "object", "properties": {"colour": colour}, "required": ["colour"]}}} for name in ("pick", "paint")]
    task = {"prompt": "Pick red.", "tools": tools, "tool_choice": {"type": "function", "function": {"name": "pick"}},
            "check": "tool_call", "expected": {"name": "pick", "arguments": {"colour": "red"}}}
    path = tmp_path / "forced.jsonl"
    path.write_text(json.dumps(task) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("constrained", [True, False])
def test_rollouts_decode_under_the_constraint_the_server_applies(tmp_path, constrained):
    cfg = GRPOConfig(prompts=str(_forced_call_file(tmp_path)), out_dir=str(tmp_path / "run"), prompts_per_step=1,
                     group_size=6, rollout_max_tokens=96, enable_thinking=False, device="cpu", progress=False,
                     autocast=False, rollout_constraints=constrained)
    record = GRPOTrainer(cfg).train_step()
    if constrained:
        # every sample is one call of the named tool with valid arguments: the reward then only tells red from blue
        assert record["well_formed"] == 1.0
        assert record["pass_rate"] == pytest.approx(record["reward_mean"])
    else:  # a random model's free text makes no call at all
        assert record["well_formed"] == 0.0 and record["reward_mean"] == 0.0


def test_screening_keeps_the_tasks_the_starting_policy_gets_wrong(tmp_path):
    # task 0 passes with any answer, task 1 with none a random model writes
    tasks = [{"prompt": "Say anything.", "check": "contains", "expected": {"contains": []}},
             {"prompt": "Say the code.", "check": "contains", "expected": {"contains": ["<<never written>>"]}}]
    prompts = tmp_path / "screen.jsonl"
    prompts.write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    args = ["train", "--stage", "grpo", "--prompts", str(prompts), "--out-dir", str(tmp_path / "run"), *GRPO_ARGS,
            "--solved-keep", "0"]
    assert cli_main([*args, "--steps", "1"]) == 0
    screened = json.loads((tmp_path / "run" / "screened_tasks.json").read_text())
    assert screened == {"tasks": 2, "solved": 1, "kept": [1]}
    (tmp_path / "run" / "screened_tasks.json").write_text(json.dumps({**screened, "kept": [0]}))
    # a resumed run reads the saved list (it does not screen again with its trained weights): only task 0 now,
    # which every sample passes
    assert cli_main([*args, "--steps", "2"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["pass_rate"] == 0.0 and log[1]["pass_rate"] == 1.0


def test_screening_keeps_each_familys_share_of_the_rounds():
    # family a: 6 tasks, all failed; family b: 12 tasks, all solved. Keeping half the solved ones would make a half
    # of the rounds (6 of ~12); with its share kept, a stays a third of them and b two thirds.
    solved = [False] * 6 + [True] * 12
    families = ["a"] * 6 + ["b"] * 12
    plain = screened_task_ids(solved, families, 0.5, seed=3, keep_family_shares=False)
    assert plain[:6] == list(range(6)) and all(i >= 6 for i in plain[6:])
    shared = screened_task_ids(solved, families, 0.5, seed=3, keep_family_shares=True)
    a = [i for i in shared if i < 6]
    b = [i for i in shared if i >= 6]
    assert len(shared) == len(plain)
    assert len(a) == round(len(plain) / 3) and len(b) == len(plain) - len(a)
    assert set(a) < set(range(6)) and set(b) == set(plain[6:])  # b's kept tasks cycled, none added
    assert screened_task_ids([True] * 4, ["a"] * 4, 0.0, seed=0, keep_family_shares=True) == []


def test_resume_without_the_screened_list_says_why(tmp_path, capsys):
    args = ["train", "--stage", "grpo", "--prompts", str(_prompt_file(tmp_path)), "--out-dir", str(tmp_path / "run"),
            *GRPO_ARGS]
    assert cli_main([*args, "--steps", "1"]) == 0
    capsys.readouterr()
    assert cli_main([*args, "--steps", "2", "--solved-keep", "0.5"]) != 0
    assert "no screened_tasks.json" in capsys.readouterr().err


def test_grpo_with_lora_serves_and_exports_the_merged_weights(tmp_path):
    cfg = load_train_config(None, {"stage": "grpo", "prompts": str(_prompt_file(tmp_path)),
                                   "out_dir": str(tmp_path / "lora"), "steps": "2", "lora_rank": "4",
                                   **{a[2:].replace("-", "_"): v for a, v in zip(GRPO_ARGS[::2], GRPO_ARGS[1::2])}})
    assert isinstance(cfg, GRPOConfig) and cfg.lora_rank == 4 and cfg.group_size == 3
    trainer = GRPOTrainer(cfg)
    history = trainer.run()
    assert any(r["updated"] for r in history)
    merged = merged_state_dict(trainer.policy)
    # the engine holds the trained weights (the adapters merged) and serves what a fresh engine on them serves
    served = dict(trainer.engine.llm.engine.model.named_parameters(remove_duplicate=False))
    for name, value in merged.items():
        if name in served:
            torch.testing.assert_close(served[name], value)
    prompt = trainer.prompts[0]
    fresh_model = TrinityForCausalLM.empty(trainer.model_config)
    fresh_model.load_state_dict(merged)
    _assert_same_logprobs(_next_token_logprobs(trainer.engine.llm, prompt)[0],
                          _next_token_logprobs(LLM(fresh_model, max_model_len=128, num_kv_blocks=32), prompt)[0])
    exported = TrinityForCausalLM.from_pretrained(tmp_path / "lora" / "export")
    assert not any("lora" in k for k in exported.state_dict())
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, merged[name])


def test_grpo_config_errors():
    with pytest.raises(ValueError, match="prompts"):
        load_train_config(None, {"stage": "grpo"})
    with pytest.raises(ValueError, match="solved_keep"):
        GRPOConfig(prompts="x.jsonl", solved_keep=1.5)
    with pytest.raises(ValueError, match="json_reward"):
        GRPOConfig(prompts="x.jsonl", json_reward="close")
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(prompts="x.jsonl", group_size=1)
    with pytest.raises(ValueError, match="stage"):
        load_train_config(None, {"stage": "dpo"})
    with pytest.raises(ValueError, match="unknown"):
        load_train_config(None, {"group_size": "4"})  # a GRPO key without the grpo stage
