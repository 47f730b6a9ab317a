"""The project's library: plain Python under the ZenML steps (see docs/layout.md)."""

import importlib


def lazy_submodule(package: str, name: str):
    """`package.<name>` imports that submodule on first access (a package's PEP 562 __getattr__ calls this).

    ZenML loads a cache policy's source dependency "core.models" (core/runs/caching.py) as getattr(core, "models"). In a
    fresh step process (a container, a pod) nothing may have imported core.models yet, and the plain attribute
    lookup would fail: `AttributeError: module 'core' has no attribute 'models'`, before the step starts.
    """
    if name.startswith("__"):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{package}.{name}":  # the submodule exists but something it imports does not
            raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None


def __getattr__(name: str):
    return lazy_submodule(__name__, name)
