"""The import graph of the project's packages, read from the source text (every ``import``,
function-level ones included), so nothing runs:

- no import cycle anywhere in ``serving/``, ``models/``, ``ops/``, ``sharding/``;
- the layers point one way: ``serving.api`` -> ``serving.engine`` -> ``models`` / ``sharding`` /
  ``ops``; ``models`` -> ``ops``; ``sharding`` -> ``ops``; ``ops`` -> nothing of ours;
- the model sources (HF directory, GGUF, orbax) share ``models.registry`` without importing
  each other or the loader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "models", "ops", "sharding")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its text."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module(p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[_module(p)] = {d for d in deps if d in modules} - {_module(p)}
    return graph


def test_no_import_cycle() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(mod):], mod]))
        if mod in done:
            return
        for dep in sorted(graph[mod]):
            visit(dep, [*path, mod])
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])


def _layer(mod: str) -> str:
    return "serving.api" if mod.startswith("serving.api") else mod.split(".")[0] \
        if not mod.startswith("serving.engine") else "serving.engine"


ALLOWED = {  # layer -> the layers it may import
    "ops": {"ops"},
    "sharding": {"sharding", "ops"},
    "models": {"models", "ops"},
    "serving.engine": {"serving.engine", "models", "ops", "sharding", "serving"},
    "serving.api": {"serving.api", "serving.engine", "models", "serving"},
    "serving": {"serving", "serving.api", "serving.engine", "models", "ops", "sharding"},
}


def test_layers_point_one_way() -> None:
    bad = [(mod, dep) for mod, deps in import_graph().items() for dep in deps
           if _layer(dep) not in ALLOWED[_layer(mod)]]
    assert bad == []


def test_model_sources_share_the_registry_not_each_other() -> None:
    graph = import_graph()
    sources = {"models.hf_dir", "models.gguf", "models.orbax_source"}
    for src in sources:
        assert "models.registry" in graph[src], src
        assert graph[src] & (sources | {"models.loader"}) == set(), src
    assert graph["models.registry"] & (sources | {"models.loader"}) == set()
    assert graph["models.tokenizer"] & (sources | {"models.loader", "models.registry"}) == set()
