"""Where a run's numbers came from: the code (package version, git commit, uncommitted
changes), the Python and package versions, and the hardware.

Training appends one record per start to RUN/provenance.jsonl (a resumed run may run other
code or hardware than its first segment: each start is kept); `dtr-scale status` shows them
and each evaluation result carries the evaluating process's `collect_provenance()`.
Reading needs no torch, so `status` stays light.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from dtr_scale import __version__
from dtr_scale.io import append_jsonl, read_jsonl

PROVENANCE_FILE = "provenance.jsonl"
# Distribution names whose versions change results or speed; a missing one is recorded as null.
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "deepspeed", "mosaicml-streaming", "webdataset",
            "hydra-core", "omegaconf", "submitit", "safetensors", "diffusers", "torch-fidelity", "wandb")
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when the package runs from one


def provenance_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PROVENANCE_FILE


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit of the checkout the package runs from and whether tracked files differ from it.
    An installed wheel has no checkout: commit and dirty are null (the version still says which
    release). A checkout's root must be the package's parent, so a wheel installed into a venv
    inside some other repository is not credited with that repository's commit."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE_ROOT:
        return {"commit": None, "dirty": None}
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if changes is None else bool(changes)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """This process's machine: its GPUs (model of each, CUDA version) if torch sees any, and its CPU."""
    import torch  # the training and evaluation processes that call this have it loaded already

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"host": platform.node(), "gpus": gpus, "gpu_count": len(gpus), "cuda": torch.version.cuda,
            "cpu": cpu_model(), "cpu_cores": os.cpu_count()}


@functools.cache
def collect_provenance() -> dict[str, Any]:
    """The code, software and hardware of this process, as one JSON-ready dict (computed once)."""
    return {"dtr_scale": __version__, "git": git_state(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": package_versions(), "hardware": hardware()}


def write_provenance(run_dir: str | Path) -> dict[str, Any]:
    """Append this start's record (with its time and command line) to RUN/provenance.jsonl."""
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
              **collect_provenance()}
    append_jsonl(provenance_path(run_dir), record)
    return record


def read_provenance(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every start's record, oldest first (none for a run that predates provenance)."""
    return read_jsonl(provenance_path(run_dir))


def describe_code(record: dict[str, Any]) -> str:
    git = record.get("git", {})
    if git.get("commit") is None:
        return f"dtr-scale {record.get('dtr_scale')} (installed, no git checkout)"
    return f"dtr-scale {record.get('dtr_scale')}, commit {git['commit'][:12]}" + (" + uncommitted changes"
                                                                                    if git.get("dirty") else "")


def describe_hardware(hw: dict[str, Any]) -> str:
    cpu = f"{hw.get('cpu')} ({hw.get('cpu_cores')} cores)"
    if hw.get("gpu_count"):
        names = sorted(set(hw["gpus"]))
        return f"{hw['gpu_count']} x {', '.join(names)} (CUDA {hw.get('cuda')}), {cpu} on {hw.get('host')}"
    return f"CPU only: {cpu} on {hw.get('host')}"


def format_provenance(records: list[dict[str, Any]]) -> list[str]:
    """Status lines: the newest start's code, software and hardware, and other code run earlier."""
    if not records:
        return ["provenance none recorded"]
    last = records[-1]
    packages = last.get("packages", {})
    software = ", ".join(f"{name} {packages[name]}" for name in ("torch", "deepspeed", "mosaicml-streaming")
                         if packages.get(name))
    lines = [f"code       {describe_code(last)}",
             f"software   python {last.get('python')}, {software}",
             f"hardware   {describe_hardware(last.get('hardware', {}))}"]
    earlier = {describe_code(r) for r in records[:-1]} - {describe_code(last)}
    if earlier:
        lines.append(f"earlier    starts of this run ran {'; '.join(sorted(earlier))}")
    return lines
