"""Native CPU kernels: C sources in this folder, compiled on first use with the system C compiler, loaded with
ctypes.

The library is built for this machine (`-march=native`) into a cache folder (`TRINITY_CACHE`, default
`~/.cache/trinity`) under a name that hashes the source, the compiler and the CPU's feature flags, so a changed
source, compiler or CPU gets its own build. OpenMP comes from the `libgomp.so.1` that torch has already loaded
(the loader matches it by name), so these kernels and torch's own ops share one thread pool.

No compiler, a failed build or `TRINITY_CPU_NATIVE=0`: `library()` returns None and callers take their torch
paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .. import switches

log = logging.getLogger(__name__)

SOURCES = ("moe_cpu.c", "attention_cpu.c", "norm_cpu.c", "linear_cpu.c", "fp8_cpu.c", "int4_cpu.c")
HEADERS = ("skinny_gemm.h", "skinny_gemm_body.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def enabled() -> bool:
    """TRINITY_CPU_NATIVE (on unless a false spelling), parsed once by `trinity.switches`."""
    return switches.get().cpu_native


def cache_dir() -> Path:
    return Path(switches.get().cache or Path.home() / ".cache" / "trinity") / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    here = Path(__file__).parent
    sources = [here / name for name in SOURCES]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    headers = [here / name for name in HEADERS]
    for part in [*(f.read_bytes() for f in sources + headers), version.encode(), " ".join(FLAGS).encode(),
                 _cpu_flags().encode(), platform.machine().encode()]:
        digest.update(part)
    target = cache_dir() / f"trinity_cpu_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: two processes building at once each finish a whole file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, *map(str, sources), "-lm"], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be had or `TRINITY_CPU_NATIVE=0` (checked on every call,
    through `trinity.switches`: a test switches it with `switches.refresh()` after setting the variable)."""
    return _load() if enabled() else None


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


@functools.cache
def _load() -> ctypes.CDLL | None:
    """Build (or find the cached build) and load, once per process; None if that fails (logged once)."""
    compiler = find_compiler()
    if compiler is None:
        log.info("no C compiler found: native CPU kernels off")
        return None
    import torch  # noqa: F401  (loads torch's libgomp first, which the library then shares)

    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native CPU kernels unavailable (build or load failed): %s", detail)
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    signatures = {  # name: (argument types, result type); the C comments give the meanings
        "trinity_moe_experts": ([p] * 5 + [i] + [p] * 5 + [i] * 6, None),
        "trinity_moe_layer": ([p, p, p, i, i, f, i, p, p, p, i] + [p] * 8 + [i] * 5, None),
        "trinity_paged_decode_attention": ([p, p, p, i] + [p] * 9 + [i] * 5 + [f, i], i),
        "trinity_linear": ([p, p, i, p] + [i] * 4, None),
        "trinity_rms_norm": ([p, i, p, p, i, i, f, i], None),
        "trinity_norm_add_rms_norm": ([p, p, i, p, p, p, p, i, i, f, i], None),
        "trinity_qk_norm_rope": ([p, p, i] + [p] * 6 + [i] * 4 + [f, i], None),
        "trinity_linear_fp8": ([p, i, p, p, i, i, p] + [i] * 4, i),
        "trinity_fp8_dequantize": ([p, p, i, i, p] + [i] * 5, None),
        "trinity_moe_experts_fp8": ([p, i, p, p, p, p, i, i, p, p, i, i, p] + [i] * 6, i),
        "trinity_moe_layer_fp8": ([p, i, p, p, i, i, f, i, p, p, p, i, i, p, p, i, i, p] + [i] * 5, i),
        "trinity_linear_int4": ([p, i, p, p, p, p, i, i, p] + [i] * 4, i),
        "trinity_int4_dequantize": ([p] * 4 + [i, i, p] + [i] * 5, None),
        "trinity_moe_experts_int4": ([p, i, p, p] + [p] * 4 + [i] + [p] * 4 + [i, p] + [i] * 6, i),
        "trinity_moe_layer_int4": ([p, i, p, p, i, i, f, i, p] + [p] * 4 + [i] + [p] * 4 + [i, p] + [i] * 5, i),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib
