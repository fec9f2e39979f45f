"""Package attributes imported on first use (PEP 562), so that importing a torch-free module of the package
(the scheduler, the KV manager, the configuration) does not import torch through the package's __init__."""

from importlib import import_module


def lazy_getattr(package: str, names: dict[str, str]):
    """A module `__getattr__` for `package` that imports `names[name]` (a relative module) on first access."""
    namespace = import_module(package).__dict__

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(names[name], package), name)
        namespace[name] = value  # later reads find it without this hook
        return value

    return __getattr__
