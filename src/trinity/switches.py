"""The environment switches, read in one place.

Every `TRINITY_*` variable the package reads (and `TRITON_INTERPRET`, as Triton reads it) is parsed here, once, on
first use, into one frozen `Switches`; the kernels' dispatchers ask `get()` (a global read) instead of reading
`os.environ` on every call. Importing this module reads nothing and imports no torch.

A process that changes its environment after the first read calls `refresh()` (parse now) or `reset()` (parse
on next use); the test suite's `monkeypatch` fixture (tests/conftest.py) calls `reset()` after every `setenv` /
`delenv` and on undo.

- `TRINITY_KERNELS`: auto (default: Triton on CUDA), triton (also on the CPU under TRITON_INTERPRET=1) or
  reference (the pure-torch references everywhere: no Triton, no C kernels).
- `TRITON_INTERPRET`: boolean, off; Triton's CPU interpreter (Triton's own variable).
- `TRINITY_CPU_NATIVE`: boolean, on; the C kernels for CPU inference (`kernels/native.py`).
- `TRINITY_PDL`: boolean, off; programmatic dependent launch (`kernels/pdl.py`).
- `TRINITY_LAST_PROGRAM`: boolean, on; the last-program epilogues (`kernels/last_program.py`).
- `TRINITY_CACHE`: a folder, default ~/.cache/trinity; where the C kernels are built.
- `TRINITY_API_KEY`: `trinity serve`'s API key where --api-key is not given.
(TRINITY_COMPILE_CHECK and TRINITY_KERNEL_AOT are read by the tests only, at collection, never by the package.)

Booleans: 1, true, on, yes turn a switch on and 0, false, off, no turn it off, in any case, surrounding spaces
ignored; unset or empty means the default. Any other value raises ValueError naming the variable and the allowed
values, except for `TRITON_INTERPRET`, which belongs to Triton: there any other value means off, as Triton reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

KERNEL_MODES = ("auto", "triton", "reference")
TRUE = ("1", "true", "on", "yes")
FALSE = ("0", "false", "off", "no")


def parse_bool(name: str, raw: str | None, default: bool) -> bool:
    """One boolean switch: unset or empty -> `default`; otherwise one of TRUE / FALSE, or ValueError."""
    value = (raw or "").strip().lower()
    if not value:
        return default
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean: use one of {', '.join(TRUE)} (on) or "
                     f"{', '.join(FALSE)} (off)")


def parse_kernels(raw: str | None) -> str:
    value = (raw or "").strip().lower()
    if not value:
        return "auto"
    if value not in KERNEL_MODES:
        raise ValueError(f"TRINITY_KERNELS={raw!r} is not a kernel mode: use one of {', '.join(KERNEL_MODES)}")
    return value


@dataclass(frozen=True, slots=True)
class Switches:
    kernels: str = "auto"  # one of KERNEL_MODES
    triton_interpret: bool = False
    cpu_native: bool = True
    pdl: bool = False
    last_program: bool = True
    cache: str | None = None  # TRINITY_CACHE as given (None: unset or empty)
    api_key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Switches:
        return cls(
            kernels=parse_kernels(env.get("TRINITY_KERNELS")),
            # as Triton reads it: its own spellings, anything else off (never an error: not our variable)
            triton_interpret=(env.get("TRITON_INTERPRET") or "").strip().lower() in TRUE,
            cpu_native=parse_bool("TRINITY_CPU_NATIVE", env.get("TRINITY_CPU_NATIVE"), True),
            pdl=parse_bool("TRINITY_PDL", env.get("TRINITY_PDL"), False),
            last_program=parse_bool("TRINITY_LAST_PROGRAM", env.get("TRINITY_LAST_PROGRAM"), True),
            cache=env.get("TRINITY_CACHE") or None,
            api_key=env.get("TRINITY_API_KEY") or None,
        )


_current: Switches | None = None


def get() -> Switches:
    """The switches, parsed from the environment on the first call (a bad value raises then, and again on every
    call until it is fixed)."""
    current = _current
    return current if current is not None else refresh()


def refresh(env: Mapping[str, str] | None = None) -> Switches:
    """Parse the environment (or `env`) again and make that the current switches."""
    global _current
    _current = Switches.from_env(os.environ if env is None else env)
    return _current


def reset() -> None:
    """Forget the parsed switches: the next `get()` reads the environment again (and raises there on a bad value,
    not here)."""
    global _current
    _current = None
