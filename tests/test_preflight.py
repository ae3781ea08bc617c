"""Launch checks (dtr_scale/preflight.py): a launch that would fail after it was submitted or its
run directory written stops before either, one line per problem naming the key or file and the
fix, and leaves nothing behind (no runs/DATE/TIME)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dtr_scale.config import to_train_config
from dtr_scale.extras import MissingExtraError, import_extra, missing_extra
from dtr_scale.preflight import LaunchCheckError, check_launch, launch_problems

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")
PAPER = "experiment=dtr_paper/dit_l2_dtr_antuw_2m"


def write_manifest(directory: Path, *, shape=(4, 32, 32), classes=1000, format="mds") -> Path:
    """A prepared dataset as far as a launch can see it: its manifest (the shards are read by the job)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({"format": format, "latent_shape": list(shape),
                                                         "num_classes": classes, "num_samples": 8}))
    return directory


def config(tmp_path: Path, **overrides) -> object:
    data = {"kind": "shards", "path": str(tmp_path / "data"), "format": "mds"}
    settings = {"model": {"name": "DiT-B/2"}, "data": data, "run_dir": str(tmp_path / "run"), "global_batch_size": 8,
                "logging": {"wandb": "disabled"}, "eval": {"inline": False}}
    return to_train_config(settings | overrides)


def run(*args: str, cwd: Path, hide: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; `hide` makes a module look uninstalled (as without its extra)."""
    code = (f"import sys; sys.modules[{hide!r}] = None\n" if hide else "import sys\n") + (
        "sys.argv = ['dtr-scale', *sys.argv[1:]]\nfrom dtr_scale.cli import main\nmain()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_dataset_that_fits_the_model_passes(tmp_path):
    write_manifest(tmp_path / "data")
    assert launch_problems(config(tmp_path)) == []
    write_manifest(tmp_path / "data", classes=100)  # a subset of the model's classes: its labels fit
    assert launch_problems(config(tmp_path)) == []


def test_a_dataset_of_another_shape_class_count_or_format_is_named_with_the_fix(tmp_path):
    write_manifest(tmp_path / "data", shape=(4, 8, 8), classes=1001, format="webdataset")
    where = f"data.path={tmp_path / 'data'}"
    assert launch_problems(config(tmp_path)) == [
        f"{where} holds webdataset shards but data.format=mds: set data.format=webdataset",
        f"{where} holds 4 x 8 x 8 latents but the model takes in_channels x input_size x input_size = 4 x 32 x 32: "
        f"set model.in_channels=4 model.input_size=8, or point data.path at latents of the model's size",
        f"{where} has 1001 classes but model.num_classes=1000: set model.num_classes=1001",
    ]


def test_a_missing_or_unreadable_manifest_is_named(tmp_path):
    [missing] = launch_problems(config(tmp_path))
    assert missing.startswith(f"data.path: no manifest.json at {tmp_path / 'data'}") and "dtr-prep" in missing
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text('{"format": "mds", ')
    [damaged] = launch_problems(config(tmp_path))
    assert damaged.startswith("data.path: ") and "manifest.json is not valid JSON" in damaged


def test_gpu_training_on_a_cluster_without_gpus_is_refused(tmp_path):
    write_manifest(tmp_path / "data")
    cluster = {"kind": "local", "gpus_per_node": 0, "tasks_per_node": 8}
    assert launch_problems(config(tmp_path, device="cuda", world_size=8, cluster=cluster)) == [
        "device=cuda but cluster.gpus_per_node=0 (cluster.kind=local): the job's ranks would find no GPU. "
        "Set cluster.gpus_per_node=8 (one GPU per rank) on a GPU machine or cluster, or device=cpu"]
    gpus = {"kind": "slurm", "nodes": 2, "gpus_per_node": 4}
    assert launch_problems(config(tmp_path, device="cuda", world_size=8, cluster=gpus)) == []


def test_a_run_dir_that_cannot_be_a_directory_and_missing_weights_are_named(tmp_path):
    write_manifest(tmp_path / "data")
    (tmp_path / "file").write_text("")
    problems = launch_problems(config(tmp_path, run_dir=str(tmp_path / "file" / "run"),
                                      model={"name": "DiT-B/2", "init_from": str(tmp_path / "DiT-B-2.pt")}))
    assert problems == [
        f"model.init_from={tmp_path / 'DiT-B-2.pt'}: no such file; give the path of a DiT state dict (.pt or "
        f".safetensors), or drop model.init_from to start from random weights",
        f"run_dir={tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, so no directory can be made under it; "
        f"give another run_dir"]
    with pytest.raises(LaunchCheckError) as err:
        check_launch(config(tmp_path, run_dir=str(tmp_path / "file")))
    assert err.value.problems == [f"run_dir={tmp_path / 'file'} is a file, not a directory: give a directory path"]


def test_a_missing_extra_is_named_without_importing_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "cvxpy", raising=False)
    assert missing_extra("cvxpy") is None and "cvxpy" not in sys.modules  # installed ([all]), and not imported
    monkeypatch.setitem(sys.modules, "cvxpy", None)  # as if `pip install dtr-scale` without [nash]
    message = ("cvxpy is not installed (weighting=ant_nash solves its bargaining problem with it; the other "
               "weightings do not): pip install 'dtr-scale[nash]' (or 'dtr-scale[all]')")
    assert missing_extra("cvxpy") == message
    with pytest.raises(MissingExtraError) as err:
        import_extra("cvxpy")
    assert str(err.value) == message


def test_the_cli_refuses_a_wrong_data_path_before_writing_anything(tmp_path):
    done = run("train", "model=dit_b2", "data=imagenet256", f"data.path={tmp_path}/nowhere", "global_batch_size=16",
               cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    data, reference = done.stderr.splitlines()  # every problem, one line each
    assert data.startswith(f"dtr-scale train: config error: data.path: no manifest.json at {tmp_path}/nowhere")
    assert reference.startswith("dtr-scale train: config error: eval.reference is not set")
    assert list(tmp_path.iterdir()) == []  # no runs/DATE/TIME, no .hydra, no train.log


def test_the_paper_preset_on_the_default_cluster_without_wandb_lists_both_problems(tmp_path):
    write_manifest(tmp_path / "data")
    done = run("train", PAPER, f"data.path={tmp_path}/data", cwd=tmp_path, hide="wandb")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "dtr-scale train: config error: device=cuda but cluster.gpus_per_node=0 (cluster.kind=local): the job's "
        "ranks would find no GPU. Set cluster.gpus_per_node=8 (one GPU per rank) on a GPU machine or cluster, "
        "or device=cpu",
        "dtr-scale train: config error: wandb is not installed (logging.wandb=offline|online needs it; set "
        "logging.wandb=disabled to train without it): pip install 'dtr-scale[wandb]' (or 'dtr-scale[all]')"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_resume_with_a_wrong_run_dir_leaves_the_existing_directory_as_it_was(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    done = run("train", f"run_dir={tmp_path}/run", f"data.path={tmp_path}/nowhere", "data.embedded=false",
               cwd=tmp_path)
    assert done.returncode == 2 and "data.path: no manifest.json" in done.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_the_checks_see_the_config_as_the_job_will_with_hydras_own_interpolations(tmp_path):
    done = run("train", f"run_dir={tmp_path}/runs/${{hydra:job.name}}", f"data.path={tmp_path}/nowhere",
               "data.embedded=false", cwd=tmp_path)
    assert done.returncode == 2 and "data.path: no manifest.json" in done.stderr
    assert "HydraConfig" not in done.stderr and list(tmp_path.iterdir()) == []


def test_evaluating_beside_training_needs_its_reference_batch_before_training_starts(tmp_path):
    write_manifest(tmp_path / "data")
    reference = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    [problem] = launch_problems(config(tmp_path, eval={"inline": True, "reference": str(reference)}))
    assert problem.startswith(f"eval.reference={reference}: no such file.")
    assert problem.endswith("(or set eval.inline=false eval.at_save=false and score the run later with `dtr-scale eval`)")
    [unset] = launch_problems(config(tmp_path, eval={"at_save": True}))
    assert unset.startswith("eval.reference is not set: point it at an ADM reference batch")
    # A SLURM job nobody follows is scored by `dtr-scale eval` jobs: nothing to check at launch.
    slurm = {"kind": "slurm", "gpus_per_node": 0, "tasks_per_node": 1}
    assert launch_problems(config(tmp_path, eval={"inline": True}, cluster=slurm)) == []


@pytest.fixture(scope="module")
def remote_digits(s3_endpoint, tmp_path_factory):
    """The digits (4 x 8 x 8 latents, 10 classes) uploaded to s3://digits/ds, as `aws s3 sync` would."""
    import boto3

    from dtr_scale.data_prep.digits import prepare_digits

    local = tmp_path_factory.mktemp("digits") / "ds"
    prepare_digits(str(local))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    s3.create_bucket(Bucket="digits")
    for path in local.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            s3.upload_file(str(path), "digits", f"ds/{path.relative_to(local)}")
    return "s3://digits/ds"


TINY = {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 10, "depth": 1, "hidden_size": 32,
        "num_heads": 2}


def test_a_remote_dataset_needs_a_writable_cache_and_its_manifest_is_checked_against_the_model(
        tmp_path, remote_digits, s3):
    (tmp_path / "file").write_text("")
    remote = {"kind": "shards", "path": str(tmp_path / "cache"), "remote": remote_digits, "embedded": False}
    assert launch_problems(config(tmp_path, data=remote, model=TINY)) == []
    assert not (tmp_path / "cache").exists()  # read into a scratch file: the job's node fills its own cache
    assert launch_problems(config(tmp_path, data=remote, model=TINY | {"input_size": 32, "num_classes": 5})) == [
        f"data.remote={remote_digits} holds 4 x 8 x 8 latents but the model takes in_channels x input_size x "
        f"input_size = 4 x 32 x 32: set model.in_channels=4 model.input_size=8, or point data.path at latents of the "
        f"model's size",
        f"data.remote={remote_digits} has 10 classes but model.num_classes=5: set model.num_classes=10"]
    blocked = remote | {"path": str(tmp_path / "file" / "cache")}
    assert launch_problems(config(tmp_path, data=blocked, model=TINY)) == [
        f"data.path={tmp_path / 'file' / 'cache'}: {tmp_path / 'file'} is a file, so no directory can be made under "
        f"it; give another data.path"]


def test_an_unreachable_store_is_named_before_the_launch(tmp_path, s3, monkeypatch):
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("S3_ENDPOINT_URL", closed)
    remote = {"kind": "shards", "path": str(tmp_path / "cache"), "remote": "s3://digits/ds", "embedded": False}
    [problem] = launch_problems(config(tmp_path, data=remote, model=TINY))
    assert problem.startswith(f"data.remote=s3://digits/ds: cannot fetch s3://digits/ds/manifest.json through "
                              f"S3_ENDPOINT_URL={closed} into the cache {tmp_path / 'cache'} (EndpointConnectionError")
    assert "that the store is reachable from this node" in problem and list(tmp_path.iterdir()) == []


TRAIN_FROM_REMOTE = ["cluster=none", "world_size=1", "model=tiny", "model.depth=1", "model.hidden_size=32",
                     "model.num_heads=2", "data.kind=shards", "data.embedded=false", "logging.wandb=disabled",
                     "eval.inline=false", "phema_stds=[]", "sample_at_end=0", "global_batch_size=8"]


def test_a_bucket_without_the_manifest_stops_the_launch_naming_it_and_writes_nothing(tmp_path, remote_digits,
                                                                                     s3):
    done = run("train", *TRAIN_FROM_REMOTE, "data.remote=s3://digits/missing", f"data.path={tmp_path}/cache",
               f"run_dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("dtr-scale train: config error: data.remote=s3://digits/missing: cannot fetch "
                           "s3://digits/missing/manifest.json through S3_ENDPOINT_URL=")
    assert "must hold manifest.json" in line
    assert list(tmp_path.iterdir()) == []  # no run directory, no cache, no runs/DATE/TIME


def test_a_run_trains_from_a_remote_dataset_end_to_end(tmp_path, remote_digits, s3):
    done = run("train", *TRAIN_FROM_REMOTE, f"data.remote={remote_digits}", f"data.path={tmp_path}/cache",
               f"run_dir={tmp_path}/run", "steps=2", "checkpoint.every=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
    fetched = [p for p in (tmp_path / "cache").rglob("*.mds")]
    assert (tmp_path / "cache" / "manifest.json").is_file() and fetched  # the shards came through the cache
