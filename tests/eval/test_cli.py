"""run_eval, the function a command line calls: one checkpoint, or one pass over a run."""

import pytest

from dtr_scale.eval.cli import main
from dtr_scale.eval.watcher import resolve_checkpoint, run_eval
from dtr_scale.eval.results import read_results, result_panels

SMALL = {"eval.num_samples": 20, "eval.batch_size": 10, "diffusion.sampling_steps": 5}


def test_one_checkpoint_by_step_then_a_pass_over_the_run(run_copy, eval_config):
    cfg = eval_config(run_copy, **SMALL)
    assert resolve_checkpoint(run_copy, "100") == run_copy / "checkpoints" / "step_00000100"

    assert [r["step"] for r in run_eval(cfg, checkpoint="100", progress=False)] == [100]
    assert [r["step"] for r in run_eval(cfg, progress=False)] == [200, 250]  # every=200, and the newest
    assert run_eval(cfg, progress=False) == []  # nothing left to do

    assert sorted(r["step"] for r in read_results(run_copy)) == [100, 200, 250]
    table = (run_copy / "eval" / "results.md").read_text()
    for record in read_results(run_copy):
        assert f"| {record['step']} | ema |" in table and f"{record['digits_fd']:.2f}" in table
    assert (run_copy / "eval" / "results.png").stat().st_size > 1000


def test_the_command_line_scores_with_the_runs_own_config_and_its_overrides(run_copy, capsys):
    main([f"run_dir={run_copy}", "--checkpoint", "200", "eval.num_samples=20", "eval.batch_size=10",
          "diffusion.sampling_steps=5", "eval.averaging=[ema,raw]"])
    records = read_results(run_copy)
    assert [(r["step"], r["averaging"], r["num_samples"], r["sampling_steps"]) for r in records] == [
        (200, "ema", 20, 5), (200, "raw", 20, 5)]
    assert records[0]["cfg_scale"] == 1.5 and records[0]["reference"] == "digits"  # the run's own settings


def test_the_command_line_needs_the_run(tmp_path, capsys):
    # refused before anything is sampled or written: a config error, exit 2, one line naming the fix
    for args, words in ((["eval.num_samples=20"], "run_dir: name the run"),
                        ([f"run_dir={tmp_path}"], "no complete checkpoint")):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("dtr-scale eval: config error: ") and words in err and err.count("\n") == 1


def test_the_quick_protocol_between_the_milestones_is_scored_and_shown_apart(run_copy):
    # the paper presets' schedule in miniature: FID from 10 samples every 100 steps, the full suite
    # from 20 samples at the last step only
    main([f"run_dir={run_copy}", "eval.num_samples=20", "eval.batch_size=10", "diffusion.sampling_steps=5",
          "eval.quick.every=100", "eval.quick.num_samples=10", "eval.milestones=[-1]"])
    records = read_results(run_copy)
    assert sorted((r["step"], r["protocol"], r["num_samples"]) for r in records) == [
        (100, "quick", 10), (200, "quick", 10), (250, "full", 20), (250, "quick", 10)]
    full, quick = (run_copy / "eval" / "results.md").read_text().split("## Quick protocol")
    assert full.startswith("## Full protocol") and "| 250 | ema |" in full and "| 100 |" not in full
    assert "| 100 | ema |" in quick and "| 250 | ema |" in quick
    # time to FID: what training had spent by each checkpoint (its logged step times here: no job ledger)
    hours = {r["step"]: r["gpu_hours"] for r in records if r["protocol"] == "quick"}
    assert 0 < hours[100] < hours[200] < hours[250]
    assert all(r["train_wall_s"] == pytest.approx(r["gpu_hours"] * 3600) for r in records)  # one process
    assert [p.title for p in result_panels(records)][:4] == [
        "digits_fd", "digits_fd against GPU-hours", "class_accuracy", "digits_fd (quick protocol)"]
