"""`trinity serve`: load the model in the background, serve HTTP with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import logging
import os
import threading
import time

import uvicorn

from ..engine.async_engine import AsyncEngine
from ..engine.engine import EngineConfig, LLMEngine
from .app import build_app
from .state import ServerSettings, ServerState

log = logging.getLogger("trinity.serve")


# After a tensor-parallel worker dies: how long in-flight requests have to receive their errors before the server
# exits (non-zero; the engine thread may be stuck in a collective with the dead rank).
FAILURE_EXIT_GRACE_S = 2.0
FAILURE_EXIT_CODE = 3


def load_engine(state: ServerState, model_spec: str | None, dtype: str, device: str,
                engine_config: EngineConfig, quantization: str | None = None) -> None:
    """Runs on a thread so /health can answer 503 while weights load."""
    try:
        from ..loading import load_model

        executor = None
        if engine_config.tensor_parallel_size > 1:
            from ..parallel.executor import start_rank0

            model, loaded, executor = start_rank0(model_spec, dtype, device, engine_config,
                                                  on_failure=lambda reason: _fail(state, reason),
                                                  quantization=quantization)
            loaded.model = model
        else:
            loaded = load_model(model_spec, dtype=dtype, device=device, quantization=quantization)
        log.info("weights: %.1f MB%s", weight_bytes(loaded.model) / 1e6,
                 " on rank 0" if executor is not None else "")
        if state.settings.chat_template:
            loaded.tokenizer.chat_template = state.settings.chat_template
        if state.settings.served_model_name is None:
            state.settings.served_model_name = loaded.name
        state.attach(AsyncEngine(LLMEngine(loaded.model, loaded.tokenizer, engine_config, executor=executor)))
        log.info("model %s ready on %s", state.settings.served_model_name, loaded.model.device)
    except Exception as e:  # noqa: BLE001 - reported by /health and every request
        log.exception("failed to load the model")
        state.load_error = f"the model failed to load: {type(e).__name__}: {e}"


def weight_bytes(model) -> int:
    """What the model's parameters occupy (FP8 weights count one byte each, their scales four)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _fail(state: ServerState, reason: str) -> None:
    """A tensor-parallel worker died: health says 503, requests in flight and new ones get errors, and the server
    exits with FAILURE_EXIT_CODE once they have had FAILURE_EXIT_GRACE_S to receive them."""
    state.failure = reason
    if state.engine is not None:
        state.engine.fail(reason)
    log.error("%s; the server exits in %.0f s", reason, FAILURE_EXIT_GRACE_S)

    def exit_later() -> None:
        time.sleep(FAILURE_EXIT_GRACE_S)
        executor = state.engine.engine.executor if state.engine is not None else None
        if executor is not None:
            executor.shutdown(timeout=1.0)  # the other workers are killed
        logging.shutdown()
        os._exit(FAILURE_EXIT_CODE)

    threading.Thread(target=exit_later, name="trinity-failure-exit", daemon=True).start()


# After --shutdown-timeout: how long the requests still running have to send their server_shutdown errors
END_STREAMS_GRACE_S = 5.0


class _DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: answer new requests with 503 while in-flight ones finish (up to the timeout),
    then end the ones still running with an error (a stream's error event and terminator) and stop. A second
    signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.trinity = state

    def handle_exit(self, sig, frame) -> None:
        state = self.trinity
        if state.draining:
            return super().handle_exit(sig, frame)
        state.draining = True
        log.info("draining %d in-flight requests (up to %.0f s)", state.in_flight, state.settings.shutdown_timeout)

        def drain() -> None:
            deadline = time.monotonic() + state.settings.shutdown_timeout
            while state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.in_flight > 0:
                # time is up: end what still runs with a server_shutdown error, so each stream sends its error
                # event and terminator (and each whole request its 503) before uvicorn closes the connections
                log.info("shutdown timeout: ending %d requests still running", state.in_flight)
                state.end_streams()
                deadline = time.monotonic() + END_STREAMS_GRACE_S
                while state.in_flight > 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
            self.should_exit = True

        threading.Thread(target=drain, daemon=True).start()


def serve(model_spec: str | None, settings: ServerSettings, engine_config: EngineConfig, host: str, port: int,
          dtype: str = "auto", device: str = "auto", log_level: str = "info",
          quantization: str | None = None) -> None:
    state = ServerState(settings)
    app = build_app(state)
    # Weights load while uvicorn starts: /health says 503 until they are in.
    threading.Thread(target=load_engine, args=(state, model_spec, dtype, device, engine_config, quantization),
                     daemon=True, name="trinity-load").start()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)))
    try:
        _DrainingServer(config, state).run()
    finally:
        if state.engine is not None:
            state.engine.shutdown()
            state.engine.engine.shutdown()  # the tensor-parallel workers
