"""GPU utilisation, memory, power and temperature through NVML (the `nvidia-ml-py` package, module `pynvml`).

Optional in every way: without the package, without a driver or without a GPU, `read_gpu_stats()` returns
None and the dashboard says "no GPU". Nothing here may fail the server, so every NVML call is guarded and a
reading that one device cannot give (power on some boards, say) is left out as None rather than dropping
the whole row.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("trinity.serve.dashboard")

_lock = threading.Lock()
_nvml: Any = None          # the pynvml module once NVML is initialised
_unavailable = False       # NVML failed to start once: do not retry on every tick


def _init() -> Any:
    """pynvml, initialised, or None. Imported lazily: the package is an optional extra (`.[gpu]`)."""
    global _nvml, _unavailable
    with _lock:
        if _nvml is not None or _unavailable:
            return _nvml
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception as e:  # noqa: BLE001 - no package, no driver, no device: all mean "no GPU"
            log.info("no GPU statistics: %s: %s", type(e).__name__, e)
            _unavailable = True
        return _nvml


def _guarded(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - one missing reading must not hide the others
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_gpu_stats() -> list[dict] | None:
    """One dict per GPU: name, util_percent, memory_used_bytes, memory_total_bytes, power_watts,
    power_limit_watts, temperature_c (each None when the device does not report it); None without a GPU."""
    nvml = _init()
    if nvml is None:
        return None
    count = _guarded(nvml.nvmlDeviceGetCount)
    if not count:
        return None
    gpus = []
    for index in range(count):
        handle = _guarded(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            continue
        util = _guarded(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = _guarded(nvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = _guarded(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = _guarded(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        temperature = _guarded(nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        name = _guarded(nvml.nvmlDeviceGetName, handle)
        gpus.append({
            "index": index,
            "name": _text(name) if name is not None else f"GPU {index}",
            "util_percent": None if util is None else float(util.gpu),
            "memory_used_bytes": None if memory is None else int(memory.used),
            "memory_total_bytes": None if memory is None else int(memory.total),
            "power_watts": None if power_mw is None else power_mw / 1000.0,
            "power_limit_watts": None if limit_mw is None else limit_mw / 1000.0,
            "temperature_c": None if temperature is None else float(temperature),
        })
    return gpus or None
