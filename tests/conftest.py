"""A real single-node SLURM (slurm/start-cluster.sh), up for the session of any test that
asks for it with the `slurm_cluster` fixture.

The cluster is shared: every session that uses it holds a lease (a file named
by its PID); the last session out stops it, and only if a test session started
it. DTR_SLURM_KEEP=1 leaves it running for the next session.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("DTR_SLURM_STATE", "/var/lib/dtr-scale-slurm"))


def slurm_unavailable() -> str | None:
    """Why this machine cannot host the test cluster (None: it can, so tests must run)."""
    if os.geteuid() != 0:
        return "the SLURM tests start daemons and install packages: run them as root"
    if not Path("/etc/debian_version").exists():
        return "the test cluster is built from Debian's packages: not a Debian machine"
    return None


def cluster_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return ping.returncode == 0 and "UP" in ping.stdout


@contextmanager
def _locked():
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _live_leases(leases: Path) -> list[Path]:
    live = []
    for lease in leases.glob("*"):
        if Path(f"/proc/{lease.name}").exists():
            live.append(lease)
        else:
            lease.unlink(missing_ok=True)
    return live


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    leases, started_marker = STATE / "leases", STATE / "started-by-tests"
    with _locked():
        if not cluster_up():
            started_marker.parent.mkdir(parents=True, exist_ok=True)
            started_marker.touch()
        start = subprocess.run(["bash", str(REPO / "slurm/start-cluster.sh")], capture_output=True, text=True)
        if start.returncode != 0:
            pytest.fail(f"slurm/start-cluster.sh failed:\n{start.stdout}\n{start.stderr}")
        leases.mkdir(exist_ok=True)
        (leases / str(os.getpid())).touch()
    yield
    with _locked():
        (leases / str(os.getpid())).unlink(missing_ok=True)
        last_out = not _live_leases(leases)
        if last_out and started_marker.exists() and os.environ.get("DTR_SLURM_KEEP") != "1":
            subprocess.run(["bash", str(REPO / "slurm/stop-cluster.sh")], check=True, capture_output=True)
            started_marker.unlink()
