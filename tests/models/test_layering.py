"""The model-source layer's import graph: no cycle inside ``models/``, and the sources (HF
directory, GGUF, orbax) share ``models.registry`` without importing each other or the loader.
Read from the source text (every ``import``, function-level ones included), so nothing runs."""

from __future__ import annotations

import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"


def import_graph() -> dict[str, set[str]]:
    """``models.x`` -> the ``models.*`` modules it imports anywhere in its text."""
    modules = {f"models.{p.stem}" for p in MODELS.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for p in MODELS.glob("*.py"):
        if p.stem == "__init__":
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[f"models.{p.stem}"] = deps & modules
    return graph


def test_no_import_cycle_inside_models() -> None:
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


def test_sources_share_the_registry_not_each_other() -> None:
    graph = import_graph()
    sources = {"models.hf_dir", "models.gguf", "models.orbax_source"}
    for src in sources:
        assert "models.registry" in graph[src], src
        assert graph[src] & (sources | {"models.loader"}) == set(), src
    assert graph["models.registry"] & (sources | {"models.loader"}) == set()
    assert graph["models.tokenizer"] & (sources | {"models.loader", "models.registry"}) == set()
