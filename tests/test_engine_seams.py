"""The engine's seams: the runner sees only the step contract (plain data), and the control plane loads no torch.

With tensor parallelism the same step message goes to every worker process, so it must be plain data that a worker
can act on alone: these tests send each step through pickle, as a process boundary would, and check the results are
those of the engine as it is.
"""

import ast
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

from engine_helpers import tiny_model

from trinity.engine import EngineConfig, LLMEngine, SamplingParams
from trinity.engine.step import StepInput, StepSeq, TableChanges

ENGINE_DIR = Path(__file__).resolve().parent.parent / "src" / "trinity" / "engine"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_runner_imports_nothing_from_the_kv_manager_or_the_scheduler():
    for name in ("runner.py", "cuda_graphs.py", "paged_attention.py"):
        imported = _imported_modules(ENGINE_DIR / name)
        assert not {m for m in imported if m.endswith(("kv_cache", "scheduler"))}, (name, imported)
        assert ".step" in imported or name == "paged_attention.py"


def test_the_control_plane_does_not_load_torch():
    code = ("import sys\n"
            "import trinity.engine.scheduler, trinity.engine.kv_cache, trinity.engine.kv_layout, trinity.engine.step\n"
            "import trinity.engine.request, trinity.engine.sampling_params\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
            "import trinity.engine.engine\n"
            "assert 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_PLAIN = (str, int, bool, type(None), StepInput, StepSeq, TableChanges)


def _assert_plain(value, where="step"):
    """Only plain data: no Sequence objects, tensors or anything a worker process would not have."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _assert_plain(k, f"{where} key")
            _assert_plain(v, f"{where}[{k!r}]")
    else:
        assert isinstance(value, _PLAIN), f"{where} is a {type(value).__name__}"
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                _assert_plain(getattr(value, f.name), f"{where}.{f.name}")


def _run(engine, prompts):
    params = SamplingParams(max_tokens=12, temperature=0.8, logprobs=2, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=p, params=params)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    return {k: (o.outputs[0].token_ids, [sorted(lp) for lp in o.outputs[0].logprobs]) for k, o in outs.items()}


def test_steps_through_pickle_give_the_same_results():
    """Chunked prefills, sliding windows moving on (window 8, block 4), prefix-cache hits, preemptions in a tight pool
    and look-ahead decodes: every step reaches the runner as a pickled copy of plain data."""
    model = tiny_model()
    prompts = [[5 + i % 7 for i in range(30)], [5 + i % 7 for i in range(30)] + [9, 9, 3], list(range(3, 21)),
               [11] * 40]
    config = dict(max_model_len=96, max_num_seqs=3, max_num_batched_tokens=16, block_size=4, num_kv_blocks=16,
                  async_scheduling=True)
    want = _run(LLMEngine(model, None, EngineConfig(**config)), prompts)

    engine = LLMEngine(model, None, EngineConfig(**config))
    execute, seen = engine.runner.execute, []

    def through_pickle(step, input_tokens=None):
        _assert_plain(step)
        seen.append(step)
        return execute(pickle.loads(pickle.dumps(step)), input_tokens)

    engine.runner.execute = through_pickle
    assert _run(engine, prompts) == want
    assert engine.stats()["num_preemptions"] > 0 and engine.stats()["num_lookahead_steps"] > 0
    assert engine.stats()["prefix_cache"]["hit_tokens"] > 0
    # sliding tables past the window: entries without a block (before an adopted prefix's window, or a chunk's
    # uncached blocks), and sequences far past their window, whose earlier blocks were let go (never addressed again)
    assert any(-1 in c.sliding for s in seen for c in s.tables.values())
    assert any(q.start >= 3 * model.config.sliding_window for s in seen for q in s.seqs)
    assert any(s.freed for s in seen)
    # frees reach the runner with the next step: after one more request, only its tables are left
    engine.add_request("late", prompt_token_ids=[3, 4, 5], params=SamplingParams(max_tokens=2))
    engine.step()
    assert set(engine.runner.tables.row) == {"late"}


def test_context_length_errors_carry_their_numbers():
    """One typed error for a request that can never run, checked by type (the server's 400), not by its text."""
    import pytest

    from trinity.engine.request import ContextLengthError

    engine = LLMEngine(tiny_model(), None, EngineConfig(max_model_len=32, block_size=4, num_kv_blocks=6))
    cases = [(list(range(3, 23)), SamplingParams(max_tokens=20), ("max_model_len", 20, 20)),
             (list(range(3, 35)), SamplingParams(max_tokens=None), ("max_model_len", 32, None)),
             (list(range(3, 23)), SamplingParams(max_tokens=8), ("kv_cache", 20, 8))]
    for prompt, params, (limit, prompt_tokens, max_tokens) in cases:
        with pytest.raises(ContextLengthError) as e:
            engine.add_request("r", prompt_token_ids=prompt, params=params)
        err = e.value
        assert (err.limit, err.prompt_tokens, err.max_tokens, err.max_model_len) == (limit, prompt_tokens, max_tokens,
                                                                                      32)
        total = prompt_tokens + (max_tokens or 0)
        assert str(prompt_tokens if limit == "max_model_len" else total) in str(err) and isinstance(err, ValueError)
    assert not engine.has_unfinished()


def test_expert_load_is_counted_through_the_step_metadata():
    """The runner's [moe_layers, experts] table travels in each step's metadata: every MoE layer but the last (which
    computes only the rows that give logits) counts top_k choices for every token the engine computed."""
    model = tiny_model()
    cfg = model.config
    engine = LLMEngine(model, None, EngineConfig(max_model_len=96, block_size=4, num_kv_blocks=40,
                                                 enable_prefix_caching=False))
    for i, n in enumerate((9, 17)):
        engine.add_request(str(i), prompt_token_ids=list(range(5, 5 + n)),
                           params=SamplingParams(max_tokens=6, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    load = engine.expert_load()
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert load is not None and load["layers"] == moe_layers and len(moe_layers) >= 2
    computed = engine.num_prompt_tokens + engine.num_generated_tokens - 2  # the last tokens are never computed
    assert [sum(t) for t in load["tokens"][:-1]] == [computed * cfg.num_experts_per_tok] * (len(moe_layers) - 1)
    assert all(not hasattr(model.model.layers[i].mlp, "count_mask") for i in moe_layers)


def test_the_kernels_block_table_addresses_as_the_kv_layout():
    """The Triton decode kernel's addressing (`kernels.attention.BlockTable`, on tensors) is `KVLayout.slot`, for
    tables read by row from the runner's persistent block tables, each context starting at its `context_start`."""
    import random

    import torch

    from trinity.engine.block_tables import WorkerBlockTables
    from trinity.engine.kv_layout import KVLayout
    from trinity.engine.step import StepInput, TableChanges
    from trinity.kernels.attention import BlockTable

    rng = random.Random(0)
    for block_size, window in ((4, 8), (16, 128), (3, 10)):
        layout = KVLayout(block_size, window)
        for sliding in (False, True):
            ends = [rng.randrange(1, 90) for _ in range(5)]
            tables = [[rng.randrange(100) for _ in range(layout.num_blocks(e))] for e in ends]
            worker = WorkerBlockTables(8, layout.num_blocks(90), torch.device("cpu"), {})
            # rows taken in another order than the batch's: the batch reads them by row index
            worker.apply(StepInput(tables={f"x{i}": TableChanges(new=True) for i in range(3)}))
            worker.apply(StepInput(tables={str(b): TableChanges(new=True, full=t) for b, t in enumerate(tables)},
                                   freed=["x1"]))
            assert [worker.entries(str(b), "full") for b in range(5)] == tables
            starts = [layout.context_start(e - 1, sliding) for e in ends]
            slots = BlockTable(worker.on_device["full"], torch.tensor(starts), block_size,
                               max(e - s for e, s in zip(ends, starts)),
                               rows=torch.tensor([worker.row[str(b)] for b in range(5)])).slots()
            for b, (t, start, end) in enumerate(zip(tables, starts, ends)):
                want = [layout.slot(t, p) for p in range(start, end)]
                assert slots[b, :end - start].tolist() == want
                assert layout.slots(t, start, end) == want
