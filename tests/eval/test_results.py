"""The results file and what is made from it: table, plot, series."""

import pytest
from PIL import Image

from dtr_scale.config import to_train_config
from dtr_scale.eval.settings import EvalSettings
from dtr_scale.eval.results import (
    append_result,
    find_result,
    log_to_wandb,
    main_metric,
    metric_series,
    plot_results,
    read_results,
    record_key,
    result_panels,
    results_path,
    results_table,
    wandb_metrics,
    write_report,
)

SETTINGS = {"sampler": "ddpm", "sampling_steps": 250, "cfg_scale": 1.5, "guided_channels": "all", "ddim_eta": 0.0,
            "num_samples": 50000, "labels": "balanced", "seed": 0, "reference": "VIRTUAL_imagenet256_labeled.npz"}


def record(step, averaging, fid, **extra):
    return {"step": step, "averaging": averaging, **SETTINGS, "fid": fid, "sfid": fid * 2, "inception_score": 150.0,
            "precision": 0.77, "recall": 0.51, "wall_s": 12.0, **extra}


@pytest.fixture
def run_dir(tmp_path):
    for r in (record(400_000, "ema", 8.9), record(200_000, "ema", 12.59), record(200_000, "phema:0.1", 11.0),
              record(400_000, "phema:0.1", 8.24)):
        append_result(tmp_path, r)
    return tmp_path


def test_table_is_sorted_by_step_and_holds_the_numbers(run_dir):
    lines = results_table(run_dir).splitlines()
    assert lines[0].startswith("| step | averaging |") and "| fid | sfid | inception_score | precision | recall |" in lines[0]
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("| 200000", "ema"), ("| 200000", "phema:0.1"), ("| 400000", "ema"),
                                           ("| 400000", "phema:0.1")]
    assert "| 12.59 | 25.18 | 150.00 | 0.770 | 0.510 |" in lines[2]
    assert "8.24" in lines[5] and "digits_fd" not in lines[0]  # only the metrics the records have


def test_digits_tables_end_with_the_floor_beside_the_numbers(tmp_path):
    digits = {**SETTINGS, "reference": "digits", "num_samples": 500}
    for step, fd in ((200, 96.5), (400, 41.25)):
        append_result(tmp_path, {"step": step, "averaging": "ema", **digits, "digits_fd": fd, "class_accuracy": 0.9,
                                 "digits_fd_floor": 17.28, "wall_s": 3.0})
    lines = results_table(tmp_path).splitlines()
    assert "| digits_fd | class_accuracy |" in lines[0] and "digits_fd_floor" not in lines[0]
    assert "41.25" in lines[3] and lines[-1].startswith("digits-FD floor 17.28: ")


def test_no_results_no_table(tmp_path):
    assert results_table(tmp_path) == ""


def test_plot_shows_every_metric_per_averaging(run_dir):
    records = read_results(run_dir)
    assert main_metric(records) == "fid"
    assert metric_series(records, "fid") == {"ema": [(200_000, 12.59), (400_000, 8.9)],
                                             "phema:0.1": [(200_000, 11.0), (400_000, 8.24)]}
    panels = result_panels(records)  # every metric the evaluation produced, not only the main one
    assert [p.title for p in panels] == ["fid", "sfid", "inception_score", "precision", "recall"]
    (ema, phema) = panels[1].curves
    assert (ema.label, list(ema.steps), list(ema.values)) == ("ema", [200_000, 400_000], [25.18, 17.8])
    assert phema.label == "phema:0.1" and list(panels[4].curves[0].values) == [0.51, 0.51]
    path = plot_results(run_dir)
    assert path == run_dir / "eval" / "results.png"
    width, height = Image.open(path).size
    assert (width, height) == (1350, 640)  # small multiples: 3 panels of 450 x 320 pixels a row, 2 rows


def test_other_sampler_settings_get_their_own_line(run_dir):
    append_result(run_dir, record(400_000, "ema", 5.0, cfg_scale=4.0))
    series = metric_series(read_results(run_dir), "fid")
    assert series["ema ddpm-250 cfg 4.0 n=50000"] == [(400_000, 5.0)]
    assert series["ema ddpm-250 cfg 1.5 n=50000"] == [(200_000, 12.59), (400_000, 8.9)]


def test_digits_records_plot_digits_fd(tmp_path):
    append_result(tmp_path, {"step": 200, "averaging": "ema", **SETTINGS, "reference": "digits", "digits_fd": 40.5,
                             "class_accuracy": 0.9})
    assert main_metric(read_results(tmp_path)) == "digits_fd"
    table, plot = write_report(tmp_path)
    assert "| 40.50 | 0.900 |" in table.read_text() and plot.exists()


def test_a_torn_last_line_is_skipped_and_the_next_record_still_lands(run_dir):
    with open(results_path(run_dir), "a") as f:
        f.write('{"step": 600000, "averaging": "ema", "fi')  # a writer killed mid-record
    assert len(read_results(run_dir)) == 4
    append_result(run_dir, record(600_000, "ema", 7.0))
    assert [r["step"] for r in read_results(run_dir)] == [400_000, 200_000, 200_000, 400_000, 600_000]
    assert find_result(run_dir, record_key(record(600_000, "ema", 0.0)))["fid"] == 7.0


def test_a_record_without_its_key_fields_is_refused(tmp_path):
    with pytest.raises(KeyError, match="cfg_scale"):
        append_result(tmp_path, {k: v for k, v in record(1, "ema", 1.0).items() if k != "cfg_scale"})


def test_wandb_gets_each_metric_under_its_averaging_against_the_training_step(tmp_path):
    assert wandb_metrics(record(400_000, "phema:0.1", 8.24)) == {
        "train_step": 400_000, "eval/phema:0.1/fid": 8.24, "eval/phema:0.1/sfid": 16.48,
        "eval/phema:0.1/inception_score": 150.0, "eval/phema:0.1/precision": 0.77, "eval/phema:0.1/recall": 0.51}
    cfg = to_train_config({"logging": {"wandb": "disabled"}})
    log_to_wandb(tmp_path, cfg, [record(1, "ema", 1.0)])
    assert not (tmp_path / "eval").exists()  # disabled: nothing written, wandb not started


def test_wandb_offline_resumes_one_evaluation_run_per_run_dir(tmp_path):
    cfg = to_train_config({"logging": {"wandb": "offline"}})
    log_to_wandb(tmp_path, cfg, [record(200_000, "ema", 12.59)])
    run_id = (tmp_path / "eval" / "wandb_id.txt").read_text()
    log_to_wandb(tmp_path, cfg, [record(400_000, "ema", 8.9)])
    assert (tmp_path / "eval" / "wandb_id.txt").read_text() == run_id
    runs = sorted(p.name for p in (tmp_path / "eval" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run_id in name for name in runs)


def test_a_result_stored_before_protocols_existed_is_the_full_protocols(run_dir):
    # SETTINGS has no "protocol": records written before the quick protocol existed
    settings = EvalSettings(**{k: v for k, v in SETTINGS.items() if k != "num_samples"}, num_samples=50000)
    assert find_result(run_dir, settings.result_key(400_000, "ema"))["fid"] == 8.9
    assert find_result(run_dir, EvalSettings(**{**settings.__dict__, "protocol": "quick"}).result_key(
        400_000, "ema")) is None
    append_result(run_dir, record(400_000, "ema", 9.5, protocol="quick", num_samples=10000))
    lines = results_table(run_dir).splitlines()
    quick_at = lines.index(next(line for line in lines if line.startswith("## Quick protocol")))
    assert lines[0].startswith("## Full protocol") and all("9.50" not in line for line in lines[:quick_at])
    assert any("| 400000 | ema |" in line and "9.50" in line for line in lines[quick_at:])


def test_a_stored_record_is_returned_as_given_and_a_rival_gets_the_first(tmp_path):
    mine = record(100, "ema", 3.0, provenance={"git": "abc"})
    assert append_result(tmp_path, mine) is mine  # the evaluator logs what it stored, to wandb too
    rival = append_result(tmp_path, record(100, "ema", 4.0, provenance={"git": "def"}))
    assert rival["fid"] == 3.0 and rival["provenance"] == {"git": "abc"}


def test_wandb_keeps_the_quick_protocol_under_its_own_keys_with_the_gpu_hours():
    quick = {"step": 50_000, "averaging": "ema", **SETTINGS, "protocol": "quick", "fid": 20.5, "gpu_hours": 6.25}
    assert wandb_metrics(quick) == {"train_step": 50_000, "train_gpu_hours": 6.25, "eval_quick/ema/fid": 20.5}
