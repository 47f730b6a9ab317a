"""Cache keys that cover the code a step runs, not just the step function.

ZenML's cache key hashes a step's own source (and its parameters and inputs), not the library code it
calls: an edit to core/ would otherwise leave a stale cached result in place. `step_cache_policy(__name__)`
adds the step's whole file and every project module it reaches, found by reading the imports (also the
ones inside functions) of the step file and, transitively, of each project module it imports. One helper
computes every step's list, so the lists cannot drift from the code.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("core", "materializers")  # the library code steps call; steps never import each other


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imported(name: str, path: Path) -> set[str]:
    """Project modules that `path` (module `name`) imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                package = name.rsplit(".", node.level)[0] if path.name != "__init__.py" or node.level > 1 else name
                base = f"{package}.{base}" if base else package
            # `from core import models` names a submodule; `from core.models import load_base` does not
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate.split(".")[0] in PROJECT_PACKAGES and _module_file(candidate) is not None:
                found.add(candidate)
    return found


@cache
def project_dependencies(module_name: str) -> tuple[str, ...]:
    """`module_name` and every project module it reaches through its imports, sorted."""
    seen: set[str] = set()
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        # a package's __init__ runs on any import of its submodules
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [p for p in parents if p.split(".")[0] in PROJECT_PACKAGES] + sorted(_imported(name, path))
    return tuple(sorted(seen))


def step_cache_policy(module_name: str):
    """ZenML's default cache policy plus the source of `module_name` and every project module it reaches."""
    from zenml.config.cache_policy import CachePolicy

    return CachePolicy(source_dependencies=list(project_dependencies(module_name)))
