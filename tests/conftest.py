"""A real single-node SLURM (slurm/start-cluster.sh), up for the session of any test that
asks for it with the `slurm_cluster` fixture; and a real two-node SLURM (slurm/start-cluster.sh
nodes=2, one network namespace per node) for the tests that ask for `slurm_two_nodes`.

The cluster is shared: every session that uses it holds a lease (a file named
by its PID); the last session out stops it, and only if a test session started
it. DTR_SLURM_KEEP=1 leaves it running for the next session.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
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
def _locked(state: Path = STATE):
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "tests.lock", "w") as lock:
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


def _leased_cluster(state: Path, is_up: Callable[[], bool], script_args: list[str]):
    """Start a test cluster (slurm/start-cluster.sh SCRIPT_ARGS) for this session, hold a lease
    on it, and stop it after the last session out if a test session started it."""
    leases, started_marker = state / "leases", state / "started-by-tests"
    with _locked(state):
        if not is_up():
            started_marker.parent.mkdir(parents=True, exist_ok=True)
            started_marker.touch()
        start = subprocess.run(["bash", str(REPO / "slurm/start-cluster.sh"), *script_args],
                               capture_output=True, text=True)
        if start.returncode != 0:
            pytest.fail(f"slurm/start-cluster.sh {' '.join(script_args)} failed:\n{start.stdout}\n{start.stderr}")
        leases.mkdir(exist_ok=True)
        (leases / str(os.getpid())).touch()
    yield
    with _locked(state):
        (leases / str(os.getpid())).unlink(missing_ok=True)
        last_out = not _live_leases(leases)
        if last_out and started_marker.exists() and os.environ.get("DTR_SLURM_KEEP") != "1":
            subprocess.run(["bash", str(REPO / "slurm/stop-cluster.sh"), *script_args], check=True,
                           capture_output=True)
            started_marker.unlink()


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    yield from _leased_cluster(STATE, cluster_up, [])


# The multi-node cluster of `slurm/start-cluster.sh nodes=2`: one network namespace per node.
NODES_STATE = Path(os.environ.get("DTR_SLURM_NODES_STATE", "/var/lib/dtr-scale-slurm-nodes"))


def namespaces_unavailable() -> str | None:
    """Why this machine cannot host the multi-node test cluster (None: it can, so tests must run)."""
    reason = slurm_unavailable()
    if reason:
        return reason
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the multi-node test cluster needs network namespaces: `unshare --net` fails ({probe.stderr.strip()})"
    return None


def nodes_cluster_up() -> bool:
    sinfo = NODES_STATE / "bin" / "sinfo"
    return sinfo.exists() and subprocess.run([str(sinfo), "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_two_nodes_session():
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    yield from _leased_cluster(NODES_STATE, nodes_cluster_up, ["nodes=2"])


@pytest.fixture
def slurm_two_nodes(slurm_two_nodes_session, monkeypatch) -> Path:
    """The two-node cluster's client commands (sbatch, sacct, scancel, ...) first on PATH for
    this test, as on its login node; submitit and the tests call them by name. Returns the
    cluster's state directory."""
    monkeypatch.setenv("PATH", f"{NODES_STATE / 'bin'}:{os.environ['PATH']}")
    return NODES_STATE


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 store on loopback (moto's standalone server) for data.remote=s3://...: no other address is used."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """An S3 client of the loopback store; the environment streaming's downloader reads, set for this test
    (and inherited by the processes it starts)."""
    import boto3

    for key, value in {"S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "NO_PROXY": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3", endpoint_url=s3_endpoint)
