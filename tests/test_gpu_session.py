"""`benchmarks/gpu_session.sh`, the runbook a session with a GPU runs: every script and test file it names exists,
so a renamed benchmark is caught here, not in a paid device call."""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_step_names_an_existing_file():
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", "list"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    steps = run.stdout.splitlines()
    assert sum(line.startswith("part 2:") and "decode_gpu.py" in line for line in steps) == 2
    assert {line.split(":")[0] for line in steps} == {"part 1", "part 2", "part 3"}


def test_an_unknown_part_is_refused():
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", "4"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr
