"""What a checkpoint holds is registered with the checkpoint manager as named stateful objects:
plain values go into meta.json, tensors into the backend's files, and a resume loads both back."""

import pytest
import torch

from dtr_scale.train.backends import make_backend
from dtr_scale.train.checkpoint import CheckpointError, CheckpointManager, latest_checkpoint, read_manifest, read_meta
from dtr_scale.train.components import DiffusionTrainModule, build_loader, build_model, build_objective
from dtr_scale.train.ema import make_ema
from dtr_scale.world import World


def manager(cfg):
    backend = make_backend(cfg, World())
    model = build_model(cfg)
    backend.setup(DiffusionTrainModule(model, build_objective(cfg)), make_ema(model))
    return CheckpointManager(cfg.run_dir, cfg.checkpoint, backend, World(), last_step=cfg.steps)


def test_registered_states_are_saved_and_loaded_back(tiny_config):
    cfg = tiny_config()
    saving, loader, probe = manager(cfg), build_loader(cfg, 0, 1), torch.nn.Linear(3, 2)
    next(loader), next(loader)
    saving.register("data", loader)
    saving.register("probe", probe, tensors=True)
    saving.describe_run(backend="ddp")
    saving.save(2, last=True)
    saving.finish()
    assert read_meta(latest_checkpoint(cfg.run_dir)) == {"step": 2, "data": {"position": 2 * 16}, "backend": "ddp"}

    loading, resumed, fresh = manager(cfg), build_loader(cfg, 0, 1), torch.nn.Linear(3, 2)
    loading.register("data", resumed)
    loading.register("probe", fresh, tensors=True)
    assert loading.load_latest()["step"] == 2
    loading.finish()
    assert resumed.state_dict() == {"position": 2 * 16}
    assert torch.equal(fresh.weight, probe.weight) and torch.equal(fresh.bias, probe.bias)


def test_a_checkpoint_without_a_registered_state_is_named(tiny_config):
    cfg = tiny_config()
    saving = manager(cfg)
    saving.save(1, last=True)
    saving.finish()
    loading = manager(cfg)
    loading.register("data", build_loader(cfg, 0, 1))
    with pytest.raises(CheckpointError, match=r"meta.json has no 'data'.*move .*step_00000001 aside"):
        loading.load_latest()
    loading.finish()


def test_a_name_is_registered_once(tiny_config):
    checkpoints = manager(tiny_config())
    checkpoints.register("data", build_loader(tiny_config(), 0, 1))
    for name, tensors in (("data", True), ("step", False)):
        with pytest.raises(ValueError, match=f"checkpoint state name '{name}' is taken"):
            checkpoints.register(name, torch.nn.Linear(1, 1), tensors=tensors)
    checkpoints.finish()


def test_a_save_is_due_every_n_steps_and_at_the_last(tiny_config):
    checkpoints = manager(tiny_config(steps=25, **{"checkpoint.every": 10}))
    assert [s for s in range(1, 26) if checkpoints.due(s)] == [10, 20, 25]
    checkpoints.finish()


def test_save_writes_only_when_due_and_always_at_the_last_step(tiny_config):
    checkpoints = manager(tiny_config(steps=25, **{"checkpoint.every": 10, "checkpoint.async_save": True}))
    saved = [s for s in range(1, 26) if checkpoints.save(s)]
    assert saved == [10, 20, 25]
    assert checkpoints.save(7, last=True)  # a stop: saved although not due, synchronously
    checkpoints.finish()
    assert [e["step"] for e in read_manifest(tiny_config().run_dir)] == [7, 10, 20, 25]


def test_the_before_commit_hook_runs_before_the_checkpoint_is_complete(tiny_config):
    cfg = tiny_config(steps=4, **{"checkpoint.every": 2, "checkpoint.async_save": False})
    seen = []

    def hook(step):  # e.g. the post-hoc EMA snapshots: on disk before a resume could start from step
        seen.append((step, [e["step"] for e in read_manifest(cfg.run_dir)]))

    checkpoints = manager(cfg)
    checkpoints.before_commit = hook
    for step in range(1, 5):
        checkpoints.save(step)
    checkpoints.finish()
    assert seen == [(2, []), (4, [2])]
