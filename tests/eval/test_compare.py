"""`dtr-scale compare`: runs found in a sweep folder, named by what differs, on shared settings."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dtr_scale.eval.compare import compare, find_runs, main, run_names
from dtr_scale.eval.results import append_result

SETTINGS = {"averaging": "ema", "sampler": "ddpm", "sampling_steps": 50, "cfg_scale": 1.5, "guided_channels": "all",
            "ddim_eta": 0.0, "num_samples": 500, "labels": "balanced", "seed": 0, "reference": "digits"}


def make_run(path, routing: str, weighting: str, fds: dict[int, float], **settings) -> None:
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save({"model": {"name": "DiT-S/2"}, "routing": {"kind": routing}, "weighting": {"kind": weighting},
                    "seed": 0}, path / ".hydra" / "config.yaml")
    for step, fd in fds.items():
        append_result(path, {"step": step, **(SETTINGS | settings), "digits_fd": fd, "class_accuracy": 0.5})


@pytest.fixture
def sweep(tmp_path):
    make_run(tmp_path / "0", "none", "uniform", {300: 900.0, 600: 500.0})
    make_run(tmp_path / "1", "dtr", "uniform", {300: 800.0, 600: 400.0})
    make_run(tmp_path / "2", "dtr", "ant_uw", {300: 700.0, 600: 300.0})
    # a result with other sampler settings is not mixed into the comparison
    append_result(tmp_path / "2", {"step": 600, **SETTINGS, "sampling_steps": 10, "digits_fd": 1.0})
    (tmp_path / "multirun.yaml").write_text("not a run\n")
    return tmp_path


def test_runs_are_named_by_the_settings_that_differ(sweep):
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["0", "1", "2"]
    assert list(run_names(runs).values()) == ["routing none, weighting uniform",
                                              "routing dtr, weighting uniform", "routing dtr, weighting ant_uw"]


def test_the_table_has_one_column_per_run_on_common_settings(sweep):
    table, plot = compare(find_runs([sweep]), sweep)
    rows = table.splitlines()
    assert rows[0].startswith("digits_fd (averaging ema, sampler ddpm, sampling_steps 50")
    assert rows[-2:] == ["| 300 | 900.00 | 800.00 | 700.00 |", "| 600 | 500.00 | 400.00 | 300.00 |"]
    assert (sweep / "comparison.md").read_text() == table + "\n"
    assert plot == sweep / "comparison.png" and plot.read_bytes()[:4] == b"\x89PNG"


def test_the_command_writes_beside_the_sweep_and_names_a_missing_one(sweep, tmp_path, capsys):
    main([str(sweep)])
    assert "| 600 | 500.00 | 400.00 | 300.00 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no evaluated run under .*nothing"):
        main([str(tmp_path / "nothing")])
