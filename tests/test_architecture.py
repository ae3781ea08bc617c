"""The dependency direction (DESIGN.md): cli/run -> eval, plan -> launch -> train -> diffusion,
data, models -> config. Every module of the package imports in a fresh interpreter, and no
import statement (at the top, inside a function or under TYPE_CHECKING) points upward."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

# What sits above each layer: a module of the layer on the left may import none of these.
TOP = ("dtr_scale.cli", "dtr_scale.run", "dtr_scale.status", "dtr_scale.benchmarks")
ABOVE = {
    "dtr_scale.models": (*TOP, "dtr_scale.eval", "dtr_scale.plan", "dtr_scale.launch", "dtr_scale.train",
                         "dtr_scale.data_prep", "dtr_scale.plots", "dtr_scale.command_line"),
    "dtr_scale.diffusion": (*TOP, "dtr_scale.eval", "dtr_scale.plan", "dtr_scale.launch", "dtr_scale.train",
                            "dtr_scale.data_prep", "dtr_scale.plots", "dtr_scale.command_line"),
    "dtr_scale.data": (*TOP, "dtr_scale.eval", "dtr_scale.plan", "dtr_scale.launch", "dtr_scale.train",
                       "dtr_scale.data_prep", "dtr_scale.plots", "dtr_scale.command_line"),
    "dtr_scale.data_prep": (*TOP, "dtr_scale.eval", "dtr_scale.plan", "dtr_scale.launch", "dtr_scale.train"),
    "dtr_scale.train": (*TOP, "dtr_scale.eval", "dtr_scale.plan", "dtr_scale.launch", "dtr_scale.data_prep",
                        "dtr_scale.command_line"),
    "dtr_scale.launch": (*TOP, "dtr_scale.eval", "dtr_scale.plan", "dtr_scale.command_line"),
    "dtr_scale.eval": TOP,
    "dtr_scale.plan": (*TOP, "dtr_scale.eval"),
}

LIST_MODULES = """
import importlib, json, pkgutil, dtr_scale
found = {"dtr_scale": dtr_scale.__file__}
for info in pkgutil.walk_packages(dtr_scale.__path__, "dtr_scale."):
    if info.name.rsplit(".", 1)[-1] == "__main__":  # runs its command when imported
        continue
    found[info.name] = importlib.import_module(info.name).__file__
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    """Every module of the package and its file, each imported in one fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", LIST_MODULES], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: Path(path) for name, path in json.loads(done.stdout.splitlines()[-1]).items()}


def imported_names(module: str, path: Path) -> list[tuple[int, list[str]]]:
    """(line, the module names it may import) of every import statement in `path`: `import a, b`
    gives [a, b]; `from p import x, y` gives [p, p.x, p.y] (x may be a submodule of p)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    statements = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            statements.append((node.lineno, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            statements.append((node.lineno, [base, *(f"{base}.{alias.name}" for alias in node.names)]))
    return sorted(statements)


def upward_imports(module: str, path: Path) -> list[str]:
    layer = next((layer for layer in ABOVE if module == layer or module.startswith(layer + ".")), None)
    if layer is None:
        return []

    def upward(name: str) -> bool:
        return any(name == above or name.startswith(above + ".") for above in ABOVE[layer])

    found = []
    for line, names in imported_names(module, path):
        hits = [name for name in names if upward(name)]
        if hits:
            found.append(f"{path}:{line}: {module} imports {hits[0]}")
    return found


def test_every_layer_imports_only_what_is_below_it(modules):
    found = [line for module, path in sorted(modules.items()) for line in upward_imports(module, path)]
    assert found == [], "imports against the dependency direction:\n" + "\n".join(found)


def test_each_layer_is_checked(modules):
    for layer in ABOVE:
        assert any(name.startswith(layer + ".") for name in modules), f"no module of {layer} was found"


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    source = tmp_path / "loop.py"
    source.write_text("import torch\n\ndef train():\n    from dtr_scale.eval.watcher import sweep\n"
                      "    from ..launch import task\n")
    assert upward_imports("dtr_scale.train.loop", source) == [
        f"{source}:4: dtr_scale.train.loop imports dtr_scale.eval.watcher",
        f"{source}:5: dtr_scale.train.loop imports dtr_scale.launch",
    ]
    assert upward_imports("dtr_scale.eval.watcher", source) == []  # eval may use launch


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (top level, inside a
    function, under TYPE_CHECKING); `from p import x` names p.x where that is a module, else p."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for _, names in imported_names(module, path):
            base, *members = names
            found = [name for name in members if name in modules]
            targets.update(found if found else [base] if base in modules else [])
        graph[module] = targets - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each set of modules that import each other (directly or through others): the strongly
    connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_module_imports_one_that_imports_it_back(modules):
    cycles = import_cycles(import_graph(modules))
    assert cycles == [], "modules that import each other (directly or in a loop):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_config_imports_nothing_of_the_project(modules):
    assert import_graph(modules)["dtr_scale.config"] == set()


def test_a_loop_of_imports_is_found(tmp_path):
    files = {"a": "from dtr_scale.b import f\n", "b": "def f():\n    import dtr_scale.c\n",
             "c": "from dtr_scale import a\n", "d": "from dtr_scale.a import g\n"}
    modules = {}
    for name, source in files.items():
        (tmp_path / f"{name}.py").write_text(source)
        modules[f"dtr_scale.{name}"] = tmp_path / f"{name}.py"
    assert import_cycles(import_graph(modules)) == [["dtr_scale.a", "dtr_scale.b", "dtr_scale.c"]]
