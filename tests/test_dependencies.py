"""The dependency contract (pyproject.toml): declared ranges are the tested ones (constraints.txt at
the top, constraints-lowest.txt at the bottom), the base install trains on its own, and every
optional module belongs to an extra that a missing-extra error names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from dtr_scale.extras import EXTRAS

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Code that relies on private parts of these (DCP's metadata classes, streaming's MDS reader), so
# their ranges must be closed at both ends by a version CI tests.
INTERNALS = ("torch", "torchvision", "mosaicml-streaming")


def pins(name: str) -> dict[str, str]:
    """name -> version of a constraints file (`pkg==1.2.3` lines)."""
    found = (re.fullmatch(r"([A-Za-z0-9_.\-]+)===?([^+\s]+)\S*", line) for line in (ROOT / name).read_text().splitlines())
    return {canonicalize_name(m[1]): m[2] for m in found if m}


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, listed)}


@pytest.mark.parametrize("package", sorted(requirements()))
def test_each_base_dependency_admits_both_tested_sets_and_its_floor_is_the_lowest_tested(package):
    spec = requirements()[package].specifier
    newest, lowest = pins("constraints.txt")[package], pins("constraints-lowest.txt")[package]
    assert newest in spec and lowest in spec
    floor = next(s.version for s in spec if s.operator == ">=")
    assert Version(lowest) == Version(floor), f"{package}: the floor is {floor} but CI's lowest is {lowest}"


@pytest.mark.parametrize("package", INTERNALS)
def test_a_package_whose_internals_we_use_stops_at_the_newest_minor_version_tested(package):
    spec = requirements()[package].specifier
    newest = Version(pins("constraints.txt")[package])
    assert f"{newest.major}.{newest.minor}.99" in spec  # its patch releases
    assert f"{newest.major}.{newest.minor + 1}.0" not in spec  # the next minor release is untested


def test_every_optional_module_belongs_to_an_extra_that_installs_it_and_all_has_them():
    extras = PROJECT["optional-dependencies"]
    distributions = packages_distributions()
    for module, (extra, why) in EXTRAS.items():
        assert extra in extras, f"{module}: no extra [{extra}] in pyproject.toml"
        installs = {canonicalize_name(d) for d in distributions[module]}
        assert installs & set(requirements(extra)), f"[{extra}] does not install {module}"
        assert why
    everything = Requirement(extras["all"][0]).extras
    assert everything == set(extras) - {"all", "dev"}


def imported_modules(package: Path) -> set[str]:
    """The top-level names of every absolute import in the package's source (read, not imported)."""
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_module_the_code_imports_is_declared_not_borrowed_from_another_packages_dependencies():
    """xxhash came with mosaicml-streaming and yaml with hydra: a release of either that drops them
    would break an install that pip calls consistent."""
    third_party = imported_modules(ROOT / "dtr_scale") - set(sys.stdlib_module_names) - {"dtr_scale"}
    distributions, base = packages_distributions(), set(requirements())
    undeclared = {module for module in third_party - set(EXTRAS)
                  if not {canonicalize_name(d) for d in distributions.get(module, [])} & base}
    assert {"torch", "streaming", "xxhash", "yaml"} <= third_party  # the scan sees what the code imports
    assert undeclared == set()


def test_the_base_install_leaves_out_what_only_digits_nash_and_benchmarks_need():
    base = set(requirements())
    assert {"scikit-learn", "cvxpy", "ecos", "psutil"}.isdisjoint(base)
    assert {"torch", "mosaicml-streaming", "hydra-core", "submitit"} <= base


# As a base install sees it: every module of an extra is missing.
BASE_ONLY_TRAIN = """
import sys
for module in {extras!r}:
    sys.modules[module] = None
sys.argv = ["dtr-scale", *sys.argv[1:]]
from dtr_scale.cli import main
main()
"""


def test_the_base_install_trains_and_a_missing_extra_is_named(tmp_path):
    code = BASE_ONLY_TRAIN.format(extras=sorted(EXTRAS))
    common = ["cluster=none", "world_size=1", "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
              "steps=2", "global_batch_size=8", "checkpoint.every=2", "eval.inline=false", "phema_stds=[]"]
    trained = subprocess.run([sys.executable, "-c", code, "train", "data=synthetic", "logging.wandb=disabled",
                              "sample_at_end=0", f"run_dir={tmp_path}/run", *common],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
    digits = subprocess.run([sys.executable, "-c", code, "train", "logging.wandb=disabled",
                             f"run_dir={tmp_path}/digits", f"data.path={tmp_path}/data", *common],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert digits.returncode == 2 and digits.stderr == (
        "dtr-scale train: config error: sklearn is not installed (the embedded digits (data=digits, `dtr-scale prep "
        "digits`) come from scikit-learn; training on prepared shards does not need it): pip install "
        "'dtr-scale[digits]' (or 'dtr-scale[all]')\n")
