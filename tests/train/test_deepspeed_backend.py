"""DeepSpeed ZeRO 1/2/3: the DeepSpeed JSON comes from the config; on 2 gloo processes
every stage gives the single-process losses and weights, skips a step cleanly, and
resumes the same trajectory on the same and on another world size.

The distributed parts run this file as a script under torchrun (DeepSpeed's import
is slow, so one process group runs several jobs); the reference is a plain
single-process loop in the test process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtr_scale.config import ConfigError
from dtr_scale.train.backends.deepspeed import (
    DeepSpeedCheckpointError,
    deep_merge,
    deepspeed_config,
    needs_universal,
)
from dtr_scale.train.components import (
    DiffusionTrainModule,
    build_loader,
    build_model,
    build_objective,
    build_optimizer,
    config_from_dict,
    config_to_dict,
)
from dtr_scale.train.ema import ema_pairs, make_ema, update_ema
from dtr_scale.train.loop import draw_step
from dtr_scale.world import World

STEPS, SAVE_AT, SKIP_AT = 10, 5, 7
# fp32 throughout; only the order of the batch sums differs between 1 and 2 ranks
TOL = dict(rtol=1e-5, atol=1e-6)


# --- the DeepSpeed JSON ---------------------------------------------------------------

def test_deepspeed_config_comes_from_the_train_config(tiny_config):
    cfg = tiny_config(world_size=2, phema_stds=[], **{"backend.name": "deepspeed", "backend.zero_stage": 3,
                                       "backend.grad_accum": 2, "optimizer.grad_clip": 1.5})
    ds = deepspeed_config(cfg)
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (16, 4, 2)  # global = micro x accumulation x 2 ranks
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["gradient_clipping"] == 1.5
    assert not ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]

    no_clip_bf16 = deepspeed_config(tiny_config(**{"backend.precision": "bf16"}))
    assert no_clip_bf16["gradient_clipping"] == 0.0
    assert no_clip_bf16["torch_autocast"]["enabled"] and not no_clip_bf16["bf16"]["enabled"]
    assert (no_clip_bf16["train_micro_batch_size_per_gpu"], no_clip_bf16["gradient_accumulation_steps"]) == (16, 1)


def test_deepspeed_overrides_are_deep_merged(tiny_config):
    overrides = {"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True},
                 "steps_per_print": 10, "flops_profiler": {"enabled": True}}
    ds = deepspeed_config(tiny_config(**{"backend.zero_stage": 2, "backend.deepspeed_overrides": overrides}))
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True}
    assert ds["steps_per_print"] == 10 and ds["flops_profiler"] == {"enabled": True}
    assert ds["train_batch_size"] == 16  # untouched keys stay
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


@pytest.mark.parametrize("override, fix", [({"bf16": {"enabled": True}}, "backend.precision=bf16"),
                                           ({"gradient_clipping": 2.0}, "optimizer.grad_clip")])
def test_overrides_that_would_change_the_numbers_are_refused(tiny_config, override, fix):
    with pytest.raises(ConfigError, match=fix):
        deepspeed_config(tiny_config(**{"backend.deepspeed_overrides": override}))


def test_resume_route_by_world_size_and_stage():
    saved = {"world_size": 2, "zero_stage": 2}
    assert not needs_universal(saved, 2, 2) and not needs_universal(saved, 2, 1)  # shards load as they are
    assert needs_universal(saved, 1, 2) and needs_universal(saved, 4, 1)  # resharded via the universal form
    with pytest.raises(DeepSpeedCheckpointError, match="resume with backend.zero_stage=2"):
        needs_universal(saved, 2, 3)


# --- one training step, as the loop forms it --------------------------------------------

def train_steps(cfg, backend, objective, world, start, stop, *, skip_at=None, nan_at=None, save=None):
    """Steps [start, stop) through the backend interface, with the loop's NaN policy "skip";
    `skip_at` drops a healthy step, `nan_at` feeds rank 0 a NaN batch. Rank-mean losses and grad norms."""
    import torch.distributed as dist

    loader = build_loader(cfg, world.rank, world.size)
    loader.load_state_dict({"position": start * cfg.global_batch_size})
    accum = cfg.backend.grad_accum
    max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else math.inf
    losses, norms = [], []
    for step in range(start, stop):
        x0, y = next(loader)
        if step == nan_at and world.rank == 0:
            x0 = x0 * math.nan
        draws = draw_step(cfg, objective, step, world.rank, world.size)
        loss = torch.zeros(())
        for i, rows in enumerate(torch.arange(len(y)).chunk(accum)):
            with backend.micro_step(last=i == accum - 1):
                out = backend.forward(x0[rows], y[rows], draws.t[rows], draws.noise[rows], draws.drop[rows])
                backend.backward(out["loss"] / accum)
            loss += out["loss"].detach().cpu() / accum
        norm = backend.clip_grad_norm(max_norm)
        if world.size > 1:
            dist.all_reduce(loss)
            loss /= world.size
        losses.append(loss.item())
        norms.append(norm.item())
        if step == skip_at or not (torch.isfinite(loss) and torch.isfinite(norm)):
            backend.skip()
        else:
            backend.step()
            backend.update_ema(cfg.ema_decay)
        if save is not None and step + 1 == save[0]:
            backend.save(save[1])
    return losses, norms


class PlainBackend:
    """The single-process reference: the model itself and torch AdamW."""

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, module, ema):
        self.module, self.ema = module, ema
        self.optimizer = build_optimizer(module.model, module.objective, self.cfg)

    def micro_step(self, last):
        return contextlib.nullcontext()

    def forward(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self):
        self.optimizer.zero_grad(set_to_none=True)

    def update_ema(self, decay):
        update_ema(ema_pairs(self.ema, self.module.model), decay)


def build(cfg, backend):
    torch.manual_seed(cfg.seed)
    model, objective = build_model(cfg), build_objective(cfg)
    module = DiffusionTrainModule(model, objective)
    backend.setup(module, make_ema(model))
    return module, objective


def reference(cfg, **kwargs):
    backend = PlainBackend(cfg)
    module, objective = build(cfg, backend)
    losses, norms = train_steps(cfg, backend, objective, World(), 0, STEPS, **kwargs)
    return {"losses": losses, "norms": norms, "model": module.model.state_dict(), "ema": backend.ema.state_dict(),
            "uw": module.objective.uw.log_vars.detach().clone()}


# --- the distributed runs (this file under torchrun) ------------------------------------

def job_config(base: dict, job: dict, world_size: int):
    backend = {"name": "deepspeed", "zero_stage": job["stage"], "grad_accum": job.get("grad_accum", 1),
               # partition even the tiny model's small tensors under ZeRO-3
               "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
               **job.get("backend", {})}
    return config_from_dict(deep_merge(base, {"world_size": world_size, "backend": backend, "phema_stds": []}))


def run_job(base: dict, job: dict, world: World) -> dict | None:
    from deepspeed import zero

    from dtr_scale.train.backends.deepspeed import DeepSpeedBackend

    cfg = job_config(base, job, world.size)
    backend = DeepSpeedBackend(cfg, world)
    module, objective = build(cfg, backend)
    if job.get("load"):
        backend.load(Path(job["load"]))
    save = (job["save_at"], Path(job["save"])) if job.get("save") else None
    losses, norms = train_steps(cfg, backend, objective, world, job["start"], STEPS, skip_at=job.get("skip_at"),
                                nan_at=job.get("nan_at"), save=save)
    with zero.GatheredParameters(list(module.objective.parameters())):
        uw = module.objective.uw.log_vars.detach().clone()
    model, ema = backend.full_state("model"), backend.full_state("ema")
    if world.rank != 0:
        return None
    return {"losses": losses, "norms": norms, "model": model, "ema": ema, "uw": uw,
            "param_groups": [(g["name"], g["lr"], g["weight_decay"]) for g in backend.param_groups]}


def worker(spec_path: str) -> None:
    from dtr_scale.world import process_group

    spec = json.loads(Path(spec_path).read_text())
    world = World.from_env()
    with process_group(world, "cpu", alone=True):  # DeepSpeed wants a group, also on one process
        results = {job["name"]: run_job(spec["config"], job, world) for job in spec["jobs"]}
        if world.rank == 0:
            torch.save(results, spec["out"])


def launch(tmp_path: Path, name: str, nproc: int, config: dict, jobs: list[dict]) -> dict:
    spec = {"config": config, "jobs": jobs, "out": str(tmp_path / f"{name}.pt")}
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", __file__,
                           str(tmp_path / f"{name}.json")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return torch.load(spec["out"], weights_only=False)


def assert_same_run(got: dict, want: dict, steps: slice = slice(None), tol=TOL, what=""):
    for key in ("losses", "norms"):
        # a NaN gradient's norm is NaN for torch, inf for DeepSpeed: both say "not finite"
        a, b = (torch.tensor(x).nan_to_num(nan=math.inf, posinf=math.inf) for x in (got[key], want[key][steps]))
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what} {key}: {m}")
    for key in ("model", "ema"):
        for name, value in want[key].items():
            torch.testing.assert_close(got[key][name], value, **tol, msg=lambda m: f"{what} {key}.{name}: {m}")
    torch.testing.assert_close(got["uw"], want["uw"], **tol, msg=lambda m: f"{what} uw: {m}")


def test_zero_stages_match_one_process_skip_and_resume_across_world_sizes(tiny_config, tmp_path):
    base = config_to_dict(tiny_config(steps=STEPS, **{"optimizer.grad_clip": 0.5}))
    ref = reference(config_from_dict(base))
    assert min(ref["norms"]) > 0.5  # DeepSpeed's clipping acts at every step
    ref_skip = reference(config_from_dict(base), skip_at=SKIP_AT)  # a healthy step dropped
    ref_nan = reference(config_from_dict(base), nan_at=SKIP_AT)  # a NaN batch: loss NaN, step dropped
    ck = {name: str(tmp_path / name) for name in ("z1", "z2", "z3", "z2_one")}
    z3_nan = {"stage": 3, "nan_at": SKIP_AT}
    z2_skip = {"stage": 2, "grad_accum": 2, "skip_at": SKIP_AT}

    two = launch(tmp_path, "two", 2, base, [
        {"name": "z1", "stage": 1, "start": 0, "save_at": SAVE_AT, "save": ck["z1"]},
        {"name": "z2", **z2_skip, "start": 0, "save_at": SAVE_AT, "save": ck["z2"]},
        {"name": "z3", **z3_nan, "start": 0, "save_at": SAVE_AT, "save": ck["z3"]},
        {"name": "z3_resumed", **z3_nan, "start": SAVE_AT, "load": ck["z3"]},
        {"name": "z3_checkpointed", "stage": 3, "start": 0, "skip_at": SKIP_AT,
         "backend": {"activation_checkpointing": True}},
        {"name": "z2_bf16", "stage": 2, "start": 0, "backend": {"precision": "bf16"}},
    ])
    # (1) ZeRO 1/2/3 x2 == one process: losses, grad norms, weights, EMA, UW log-variances;
    # ZeRO-2 with 2 micro-batches dropping a healthy step, ZeRO-3 dropping a NaN step
    assert_same_run(two["z1"], ref, what="ZeRO-1")
    assert_same_run(two["z2"], ref_skip, what="ZeRO-2, grad_accum 2, skip")
    assert_same_run(two["z3"], ref_nan, what="ZeRO-3, NaN step")
    assert math.isnan(two["z3"]["losses"][SKIP_AT]) and math.isinf(two["z3"]["norms"][SKIP_AT])
    assert_same_run(two["z3_checkpointed"], ref_skip, what="ZeRO-3, activation checkpointing, skip")
    assert two["z3"]["param_groups"] == [("model", 1e-3, 0.0), ("uw", 0.025, 0.0)]
    # bf16 autocast: the same run to bf16 precision, and not the fp32 numbers. Adam moves a weight by
    # about lr (1e-3) per step whatever its gradient's size, so where bf16 flips the sign of a near-zero
    # gradient the weight goes the other way: atol allows that in up to 5 of the 10 steps.
    assert_same_run(two["z2_bf16"], ref, tol=dict(rtol=2e-2, atol=5e-3), what="ZeRO-2 bf16")
    assert two["z2_bf16"]["losses"] != two["z1"]["losses"]
    # (2) resumed on the same world size: bitwise the uninterrupted run
    assert_same_run(two["z3_resumed"], two["z3"], slice(SAVE_AT, None), tol=dict(rtol=0, atol=0), what="ZeRO-3 2->2")

    one = launch(tmp_path, "one", 1, base, [
        {"name": "z1_2to1", "stage": 1, "start": SAVE_AT, "load": ck["z1"]},
        {"name": "z3_2to1", **z3_nan, "start": SAVE_AT, "load": ck["z3"]},
        {"name": "z2_one", "stage": 2, "start": 0, "save_at": SAVE_AT, "save": ck["z2_one"]},
    ])
    # ZeRO on one process is the plain loop up to the order of the clipping norm's sum (DeepSpeed
    # sums its flat gradient buffer, torch each tensor): a float32 ulp in the clip factor
    assert one["z2_one"]["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=0)
    again = launch(tmp_path, "again", 2, base, [
        {"name": "z2_1to2", **z2_skip, "start": SAVE_AT, "load": ck["z2_one"]},
        {"name": "z1_to_z2", "stage": 2, "start": SAVE_AT, "load": ck["z1"]},
    ])
    # (2) across world sizes, through DeepSpeed's universal checkpoint: weights, EMA, UW and
    # AdamW moments carry over, and so does the trajectory; ZeRO-1 shards load into ZeRO-2
    assert_same_run(one["z1_2to1"], two["z1"], slice(SAVE_AT, None), what="ZeRO-1 2->1")
    assert_same_run(one["z3_2to1"], two["z3"], slice(SAVE_AT, None), what="ZeRO-3 2->1")
    assert_same_run(again["z2_1to2"], two["z2"], slice(SAVE_AT, None), what="ZeRO-2 1->2")
    assert_same_run(again["z1_to_z2"], two["z1"], slice(SAVE_AT, None), what="ZeRO-1 -> ZeRO-2")
    for run in (one["z3_2to1"], again["z2_1to2"]):
        assert run["param_groups"] == [("model", 1e-3, 0.0), ("uw", 0.025, 0.0)]


if __name__ == "__main__":
    worker(sys.argv[1])
