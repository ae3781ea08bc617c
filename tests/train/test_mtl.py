"""ANT-Nash and PCGrad in the trainer: the same numbers on 1 process, DDP x2 and FSDP2 x2,
an exact resume between two Nash solves, what they log, and the configs they refuse."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dtr_scale.config import ConfigError
from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.local import run_processes, stop_after
from dtr_scale.train.loop import train

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")
NASH_STEPS = 30  # solves at steps 0 and 25 (every 25, as ANT)
PCGRAD_STEPS = 6


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def checkpoint_state(run_dir, tmp_path) -> dict:
    out = tmp_path / f"{Path(run_dir).name}.pt"
    dcp_to_torch_save(latest_checkpoint(run_dir), out)
    return torch.load(out, weights_only=False)


def mtl_config(tiny_config, tmp_path, kind, name, backend="ddp", world_size=1, steps=NASH_STEPS, **overrides):
    return tiny_config(run_dir=str(tmp_path / name), steps=steps, world_size=world_size, phema_stds=[],
                       **{"weighting.kind": kind, "backend.name": backend, "logging.every": 1,
                          "checkpoint.every": 100, **overrides})


def launch(cfg, stop_at=None):
    if cfg.world_size == 1:
        return train(cfg, stop_requested=None if stop_at is None else stop_after(stop_at))
    return run_processes(cfg, cfg.world_size, stop_at=stop_at)


def test_nash_is_the_same_on_every_backend_and_resumes_bitwise_between_solves(tiny_config, tmp_path):
    tol = dict(rtol=2e-5, atol=1e-6)  # fp32 sums over a batch split differently across ranks
    single = mtl_config(tiny_config, tmp_path, "ant_nash", "single")
    launch(single)
    reference = records(single.run_dir)
    assert [r["step"] for r in reference] == list(range(1, NASH_STEPS + 1))
    alphas = [r["nash_alpha"] for r in reference]
    # alpha changes exactly at the solves (before steps 0 and 25), and is logged every step
    assert alphas[0] != [1.0] * 4 and alphas[1:25] == [alphas[0]] * 24 and alphas[25] != alphas[24]
    assert alphas[26:] == [alphas[25]] * 4
    assert [r["nash_solved_at"] for r in reference] == [0] * 25 + [25] * 5
    # the method's own time is its own entry of the step-time breakdown, spent on solve steps only
    assert reference[0]["time_mtl_ms"] > 0 and reference[25]["time_mtl_ms"] > 0 and reference[3]["time_mtl_ms"] == 0
    # ANT's max-norm 1 clipping, and the Nash condition: |sum_i alpha_i g_i / k|^2 = k / k^2 on a solve step
    assert reference[0]["grad_norm"] == pytest.approx(0.5, rel=1e-3)
    state = checkpoint_state(single.run_dir, tmp_path)["module"]
    assert state["objective.nash.alpha"].tolist() == alphas[-1] and state["objective.nash.solved_at"].item() == 25

    for backend in ("ddp", "fsdp"):
        cfg = mtl_config(tiny_config, tmp_path, "ant_nash", backend, backend=backend, world_size=2)
        launch(cfg)
        logged = records(cfg.run_dir)
        torch.testing.assert_close(torch.tensor([r["loss"] for r in logged]),
                                   torch.tensor([r["loss"] for r in reference]), **tol, msg=backend)
        torch.testing.assert_close(torch.tensor([r["nash_alpha"] for r in logged], dtype=torch.float64),
                                   torch.tensor(alphas, dtype=torch.float64), rtol=1e-4, atol=1e-6, msg=backend)

    # stopped at step 13, between the solves at 0 and 25, and resumed: bitwise the uninterrupted run
    split = mtl_config(tiny_config, tmp_path, "ant_nash", "split")
    assert launch(split, stop_at=13).step == 13
    launch(split)
    resumed = records(split.run_dir)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["nash_alpha"] for r in resumed] == alphas
    a, b = checkpoint_state(single.run_dir, tmp_path), checkpoint_state(split.run_dir, tmp_path)
    for key in ("module", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


def test_pcgrad_is_the_same_on_every_backend_and_logs_the_conflicts(tiny_config, tmp_path):
    tol = dict(rtol=2e-5, atol=1e-6)
    single = mtl_config(tiny_config, tmp_path, "pcgrad", "single", steps=PCGRAD_STEPS)
    launch(single)
    reference = records(single.run_dir)
    conflicts = [r["pcgrad_conflicting_pairs"] for r in reference]
    assert all(isinstance(c, int) and 0 <= c <= 6 for c in conflicts)  # k = 4: at most 6 pairs
    assert all(r["time_mtl_ms"] > 0 for r in reference)
    weights = checkpoint_state(single.run_dir, tmp_path)["module"]
    for backend in ("ddp", "fsdp"):
        cfg = mtl_config(tiny_config, tmp_path, "pcgrad", backend, backend=backend, world_size=2, steps=PCGRAD_STEPS)
        launch(cfg)
        logged = records(cfg.run_dir)
        torch.testing.assert_close(torch.tensor([r["loss"] for r in logged]),
                                   torch.tensor([r["loss"] for r in reference]), **tol, msg=backend)
        assert [r["pcgrad_conflicting_pairs"] for r in logged] == conflicts
        for name, value in checkpoint_state(cfg.run_dir, tmp_path)["module"].items():
            torch.testing.assert_close(value, weights[name], **tol, msg=f"{backend}: {name}")


def test_pcgrad_is_plain_summing_when_no_interval_conflicts(tiny_config, tmp_path):
    # one step from the same start: PCGrad with no conflicting pair updates the weights exactly
    # like uniform weighting of the stratified batch (sum_i L_i / k = the batch mean)
    runs = {}
    for kind in ("pcgrad", "uniform"):
        cfg = mtl_config(tiny_config, tmp_path, kind, kind, steps=1, **{"weighting.stratified": True})
        launch(cfg)
        runs[kind] = (records(cfg.run_dir)[0], checkpoint_state(cfg.run_dir, tmp_path)["module"])
    (pc_record, pc_state), (uniform_record, uniform_state) = runs["pcgrad"], runs["uniform"]
    assert pc_record["pcgrad_conflicting_pairs"] == 0  # at initialisation the intervals agree
    assert pc_record["loss"] == pytest.approx(uniform_record["loss"], rel=1e-6)
    for name, value in uniform_state.items():
        torch.testing.assert_close(pc_state[name], value, rtol=1e-5, atol=1e-7, msg=name)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DTR_SCALE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("overrides, message", [
    (["weighting=ant_nash", "backend=deepspeed"],
     "backend.name: weighting=ant_nash needs the k per-interval gradients, which DeepSpeed ZeRO does not expose; "
     "use backend=ddp or backend=fsdp"),
    (["weighting=pcgrad", "global_batch_size=36"],  # 18 per rank on 2 processes, k = 8
     "global_batch_size: per-rank batch 18 (= 36 / world_size 2 / grad_accum 1) is not divisible by "
     "weighting.num_intervals=8"),
])
def test_a_config_these_weightings_cannot_run_fails_before_any_process_starts(tmp_path, overrides, message):
    done = run_cli("train", f"run_dir={tmp_path}/run", *overrides, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout + done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "data").exists()


def test_gradient_accumulation_is_refused_naming_the_key(tiny_config):
    with pytest.raises(ConfigError, match=r"backend.grad_accum: weighting=pcgrad takes the k per-interval gradients"):
        tiny_config(**{"weighting.kind": "pcgrad", "backend.grad_accum": 2})
