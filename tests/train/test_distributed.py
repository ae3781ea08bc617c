"""Same numbers everywhere: 1 process, DDP x2 and FSDP2 x2 give the same losses and
weights, and a run resumes exactly, also on another world size (2 gloo processes)."""

import dataclasses
import json

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.local import run_processes, stop_after
from dtr_scale.train.loop import train

STEPS = 8


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(f"{run_dir}/metrics.jsonl")]


def final_weights(run_dir, tmp_path):
    out = tmp_path / f"{run_dir.replace('/', '_')}.pt"
    dcp_to_torch_save(latest_checkpoint(run_dir), out)
    state = torch.load(out, weights_only=False)
    return {**{f"module.{k}": v for k, v in state["module"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def variant(tiny_config, tmp_path, name, backend="ddp", world_size=1, **overrides):
    cfg = tiny_config(run_dir=str(tmp_path / name), steps=STEPS, world_size=world_size,
                      **{"backend.name": backend, "logging.every": 1, "checkpoint.every": 100, **overrides})
    return cfg


def launch(cfg, stop_at=None):
    if cfg.world_size == 1:
        train(cfg, stop_requested=None if stop_at is None else stop_after(stop_at))
    else:
        run_processes(cfg, cfg.world_size, stop_at=stop_at)


def test_backends_agree_and_resume_across_world_sizes(tiny_config, tmp_path):
    # rtol: fp32 sums over a batch split differently across ranks differ in the last bits
    tol = dict(rtol=2e-5, atol=1e-6)
    single = variant(tiny_config, tmp_path, "single")
    launch(single)
    reference_losses, reference_weights = losses(single.run_dir), final_weights(single.run_dir, tmp_path)
    assert len(reference_losses) == STEPS

    for name, backend, extra in (("ddp", "ddp", {}), ("fsdp", "fsdp", {}), ("ddp_accum", "ddp", {"backend.grad_accum": 2})):
        cfg = variant(tiny_config, tmp_path, name, backend=backend, world_size=2, **extra)
        launch(cfg)
        torch.testing.assert_close(torch.tensor(losses(cfg.run_dir)), torch.tensor(reference_losses), **tol)
        weights = final_weights(cfg.run_dir, tmp_path)
        for key, value in reference_weights.items():
            torch.testing.assert_close(weights[key], value, **tol, msg=f"{name}: {key}")

    # DDP x2 stopped at step 3 and resumed on DDP x2: bitwise the uninterrupted DDP run
    ddp_split = variant(tiny_config, tmp_path, "ddp_split", world_size=2)
    launch(ddp_split, stop_at=3)
    launch(ddp_split)
    assert losses(ddp_split.run_dir) == losses(tmp_path / "ddp")
    ddp_weights = final_weights(str(tmp_path / "ddp"), tmp_path)
    for key, value in final_weights(ddp_split.run_dir, tmp_path).items():
        assert torch.equal(value, ddp_weights[key]), key

    # FSDP x2 -> 1 process, and 1 process -> FSDP x2: the trajectory carries on
    two_to_one = variant(tiny_config, tmp_path, "two_to_one", backend="fsdp", world_size=2)
    launch(two_to_one, stop_at=4)
    launch(dataclasses.replace(two_to_one, world_size=1, backend=dataclasses.replace(two_to_one.backend, name="ddp")))
    one_to_two = variant(tiny_config, tmp_path, "one_to_two")
    launch(one_to_two, stop_at=4)
    launch(dataclasses.replace(one_to_two, world_size=2, backend=dataclasses.replace(one_to_two.backend, name="fsdp")))
    for cfg in (two_to_one, one_to_two):
        torch.testing.assert_close(torch.tensor(losses(cfg.run_dir)), torch.tensor(reference_losses), **tol)
        weights = final_weights(cfg.run_dir, tmp_path)
        for key, value in reference_weights.items():
            torch.testing.assert_close(weights[key], value, **tol, msg=f"{cfg.run_dir}: {key}")
