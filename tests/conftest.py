"""Shared by every test module: the markers, one intra-op thread, and the fixtures several modules use (a tiny
sharpened model, the byte-level tokenizer, the shared server). Helpers that tests import stay in engine_helpers.py
and server_helpers.py."""

import os
import sys

import pytest
import torch

# The test models are tiny: their steps are dominated by per-op overhead, and a second intra-op thread only
# adds spin contention with the server subprocesses some tests start (many times slower on 2 busy cores).
torch.set_num_threads(1)


def pytest_configure(config):
    # `make test-fast` deselects all three: -m "not slow and not server and not gpu"
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: minutes on 2 CPU cores (fuzzing, sustained load, training runs)")
    config.addinivalue_line("markers", "server: starts `trinity serve` in a subprocess (tests/server_helpers.py)")
    config.addinivalue_line("markers", "script_smoke: runs a benchmark script's --smoke mode in a subprocess, which "
                                       "sets Triton's interpreter itself: run once, by the main pass of `make test`")


def pytest_collection_modifyitems(config, items):
    # `make test`'s second pass (TRITON_INTERPRET=1) repeats its kernel files under the interpreter; a script smoke
    # test would only run the same subprocess again
    if os.environ.get("TRITON_INTERPRET") == "1":
        skip = pytest.mark.skip(reason="the main pass ran this script's smoke mode (the same subprocess)")
        for item in items:
            if "script_smoke" in item.keywords:
                item.add_marker(skip)


class _SwitchesMonkeyPatch(pytest.MonkeyPatch):
    """`monkeypatch` that also makes `trinity.switches` read the environment again after every change to it (the
    switches are parsed once and cached): a test sets TRINITY_* variables as before and the kernels see them."""

    def setenv(self, name, value, prepend=None):
        super().setenv(name, value, prepend)
        _forget_switches()

    def delenv(self, name, raising=True):
        super().delenv(name, raising)
        _forget_switches()

    def undo(self):
        super().undo()
        _forget_switches()


def _forget_switches():
    from trinity import switches

    switches.reset()  # parsed again on next use, so a bad value raises where it is used, not in setenv


@pytest.fixture
def monkeypatch():
    mp = _SwitchesMonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"


# ---------------------------------------------------------------------- models and tokenizers
@pytest.fixture(scope="module")
def model():
    """The engine tests' tiny fp32 random model, sharpened so greedy decoding is stable (shared: do not mutate)."""
    from engine_helpers import tiny_model

    return tiny_model(seed=0, scale=8)


@pytest.fixture(scope="module")
def tok():
    """The merge-free byte-level tokenizer (one id per UTF-8 byte). Modules testing another tokenizer define their
    own `tok`."""
    from trinity.tokenizer import build_byte_level_tokenizer

    return build_byte_level_tokenizer()


# ---------------------------------------------------------------------- the real server (server_helpers.py)
@pytest.fixture(scope="session")
def default_server():
    """The shared server with server_helpers.DEFAULT_FLAGS (one start for the session; SIGTERM at its end)."""
    from server_helpers import _stop_shared, shared_server

    yield shared_server()
    _stop_shared()


@pytest.fixture(scope="module")
def server(default_server):
    """The server a module's tests talk to: the shared one, unless the module defines its own."""
    return default_server


@pytest.fixture(autouse=True)
def log_on_failure(request):
    """When a test fails, print the logs of the servers it used (bypassing output capture)."""
    failed_before = request.session.testsfailed
    yield
    helpers = sys.modules.get("server_helpers")  # no server was started unless a test imported it
    if helpers is not None:
        helpers.report_failure(request.node.nodeid, request.session.testsfailed > failed_before)
