"""Fast kernels, each beside its pure-torch reference, chosen at run time.

`TRINITY_KERNELS=reference` (or `use_reference(True)`) forces the references everywhere, for tests
and for debugging a fast path.
"""

from __future__ import annotations

import os

_force_reference: bool | None = None


def use_reference(force: bool | None) -> None:
    """True: always the references; False: fast paths where available; None: follow TRINITY_KERNELS."""
    global _force_reference
    _force_reference = force


def reference_forced() -> bool:
    if _force_reference is not None:
        return _force_reference
    return os.environ.get("TRINITY_KERNELS", "auto") == "reference"
