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
    assert set(engine.runner.tables) == {"late"}
