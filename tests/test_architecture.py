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
