"""The layout's import rules (docs/layout.md): the model library imports no other room and
neither Ray nor MLflow; each room imports only the rooms below it; no module imports
itself back through others. Imports are read from the source, function-level ones too."""

import ast
from pathlib import Path

from tests.conftest import ROOT

# room -> the rooms it may import (the map in docs/layout.md)
ALLOWED = {
    "unilip": set(),
    "cluster": {"unilip"},
    "pipelines": {"unilip", "cluster"},
    "serve": {"unilip", "cluster"},
    "jobs": {"unilip", "cluster", "pipelines", "serve"},
    "cli": {"unilip", "cluster", "pipelines", "serve", "jobs"},
}
LIBRARY_NEVER = ("ray", "mlflow", "deepspeed")  # the model library runs without the cluster stack


def modules() -> dict[str, Path]:
    out = {}
    for room in ALLOWED:
        for path in (ROOT / room).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from jobs.training import checkpoint`
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_the_model_library_imports_no_other_room_nor_ray_or_mlflow():
    for module, path in modules().items():
        if module.split(".")[0] != "unilip":
            continue
        bad = sorted(i for i in imports(path) if i.split(".")[0] in set(ALLOWED) - {"unilip"} | set(LIBRARY_NEVER))
        assert not bad, f"{module} imports {bad}"


def test_rooms_import_only_the_rooms_below_them():
    for module, deps in graph().items():
        room = module.split(".")[0]
        bad = sorted(d for d in deps if d.split(".")[0] not in ALLOWED[room] | {room})
        assert not bad, (
            f"{module} ({room}) imports {bad}; {room} may import {sorted(ALLOWED[room]) or 'nothing of ours'}"
        )


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: each must be one module."""
    g = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_command_comes_from_the_module_the_table_names():
    import argparse
    import importlib

    from cli import COMMANDS

    for module in set(COMMANDS.values()):
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add(parser.add_subparsers())
        registered = set(parser._subparsers._group_actions[0].choices)
        assert registered == {c for c, m in COMMANDS.items() if m == module}, module
