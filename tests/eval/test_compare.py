"""`dtr-scale compare`: runs found in a sweep folder, grouped by what differs except the seed,
shown as mean ± std over the seeds on shared sampler settings."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from dtr_scale.eval.compare import compare, find_runs, main, protocol_comparison, run_groups, seed_statistics
from dtr_scale.eval.results import append_result, read_results

SETTINGS = {"averaging": "ema", "sampler": "ddpm", "sampling_steps": 50, "cfg_scale": 1.5, "guided_channels": "all",
            "ddim_eta": 0.0, "num_samples": 500, "labels": "balanced", "seed": 0, "reference": "digits"}
CONFIGS = (("none", "uniform"), ("dtr", "uniform"), ("dtr", "ant_uw"))
# digits-FD at steps 300 and 600 of each configuration's seeds 0, 1, 2
FDS = {("none", "uniform"): [(900.0, 560.0), (950.0, 590.0), (870.0, 575.0)],
       ("dtr", "uniform"): [(800.0, 520.0), (820.0, 505.0), (790.0, 530.0)],
       ("dtr", "ant_uw"): [(700.0, 300.0), (720.0, 330.0), (760.0, 310.0)]}
ACCURACY = {0: 0.5, 1: 0.6, 2: 0.7}


def make_run(path, routing: str, weighting: str, seed: int, fds: dict[int, float], **settings) -> None:
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save({"model": {"name": "DiT-S/2"}, "routing": {"kind": routing}, "weighting": {"kind": weighting},
                    "seed": seed}, path / ".hydra" / "config.yaml")
    for step, fd in fds.items():
        append_result(path, {"step": step, **(SETTINGS | settings), "digits_fd": fd, "class_accuracy": ACCURACY[seed]})


@pytest.fixture
def sweep(tmp_path):
    """Hydra's numbering of `-m experiment=...vanilla,...dtr,...dtr_antuw seed=0,1,2`: folders 0..8."""
    job = 0
    for config in CONFIGS:
        for seed, (fd300, fd600) in enumerate(FDS[config]):
            make_run(tmp_path / str(job), *config, seed, {300: fd300, 600: fd600})
            job += 1
    # a result with other sampler settings is not mixed into the comparison
    append_result(tmp_path / "8", {"step": 600, **SETTINGS, "sampling_steps": 10, "digits_fd": 1.0})
    (tmp_path / "multirun.yaml").write_text("not a run\n")
    return tmp_path


def test_runs_that_differ_only_in_their_seed_form_one_group(sweep):
    runs = find_runs([sweep])
    assert [r.name for r in runs] == [str(i) for i in range(9)]
    groups = run_groups(runs)
    assert list(groups) == ["routing none, weighting uniform", "routing dtr, weighting uniform",
                            "routing dtr, weighting ant_uw"]
    assert [[r.name for r in members] for members in groups.values()] == [["0", "1", "2"], ["3", "4", "5"],
                                                                         ["6", "7", "8"]]


def test_mean_and_std_over_seeds_equal_numpys():
    runs = [{300: 900.0, 600: 560.0}, {300: 950.0, 600: 590.0}, {300: 870.0}]
    (s300, m300, sd300, n300), (s600, m600, sd600, n600) = seed_statistics(runs)
    assert (s300, n300, s600, n600) == (300, 3, 600, 2)
    assert m300 == pytest.approx(np.mean([900, 950, 870])) and sd300 == pytest.approx(np.std([900, 950, 870], ddof=1))
    assert m600 == pytest.approx(575.0) and sd600 == pytest.approx(np.std([560, 590], ddof=1))
    assert seed_statistics([{300: 5.0}]) == [(300, 5.0, None, 1)]  # one seed: no spread


def test_the_table_shows_mean_and_std_per_step_for_every_metric(sweep):
    table, plot = compare(find_runs([sweep]), sweep)
    lines = table.splitlines()
    assert lines[0].startswith("digits_fd, mean ± std over seeds (averaging ema, sampler ddpm, sampling_steps 50")
    assert lines[2] == ("| step | routing none, weighting uniform (3 seeds) | routing dtr, weighting uniform (3 seeds) "
                        "| routing dtr, weighting ant_uw (3 seeds) |")
    expected = []
    for step in (0, 1):
        cells = [f"{np.mean([v[step] for v in FDS[c]]):.2f} ± {np.std([v[step] for v in FDS[c]], ddof=1):.2f}"
                 for c in CONFIGS]
        expected.append(f"| {(300, 600)[step]} | " + " | ".join(cells) + " |")
    assert lines[4:6] == expected
    accuracy = f"{np.mean([0.5, 0.6, 0.7]):.3f} ± {np.std([0.5, 0.6, 0.7], ddof=1):.3f}"
    assert f"| 600 | {accuracy} | {accuracy} | {accuracy} |" in lines  # every metric gets its table
    assert (sweep / "comparison.md").read_text() == table + "\n"
    assert plot == sweep / "comparison.png" and plot.read_bytes()[:4] == b"\x89PNG"


def test_differences_are_judged_against_the_spread(sweep):
    table, _ = compare(find_runs([sweep]), sweep)
    # step 600: vanilla 575 ± 15, DTR 518.3 ± 12.6 (gap 56.7 > 27.6), DTR + ANT-UW 313.3 ± 15.3
    assert "digits_fd at step 600, against routing none, weighting uniform:" in table
    assert "  routing dtr, weighting uniform: -56.7, exceeds the spread (27.6)" in table
    assert "  routing dtr, weighting ant_uw: -262, exceeds the spread (30.3)" in table
    # class accuracy is the same for every configuration: no difference beyond the spread
    assert "  routing dtr, weighting ant_uw: +0, within the spread (0.2): not distinguishable" in table


def test_runs_of_one_seed_each_are_named_by_what_differs(tmp_path):
    make_run(tmp_path / "0", "none", "uniform", 0, {300: 900.0})
    make_run(tmp_path / "1", "dtr", "uniform", 0, {300: 800.0})
    table, _ = compare(find_runs([tmp_path]), tmp_path)
    assert "| step | routing none (1 seed) | routing dtr (1 seed) |" in table and "| 300 | 900.00 | 800.00 |" in table
    assert "routing dtr: -100, one seed: the spread is unknown" in table


def test_the_command_writes_beside_the_sweep_and_names_a_missing_one(sweep, tmp_path, capsys):
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "| 600 | 575.00 ± 15.00 |" in out and f"plot: {sweep / 'comparison.png'}" in out
    with pytest.raises(SystemExit, match="no evaluated run under .*nothing"):
        main([str(tmp_path / "nothing")])


def test_quick_results_are_compared_apart_and_drawn_against_gpu_hours(tmp_path):
    # two seeds: the full protocol at the last step (600) only, the quick one at 300 and 600
    for seed, fd in enumerate((500.0, 520.0)):
        run = tmp_path / str(seed)
        make_run(run, "dtr", "ant_uw", seed, {600: fd})
        for step, quick_fd, hours in ((300, 6.0 + 2 * seed, 1.0 + seed), (600, 3.0 + seed, 2.0 + seed)):
            append_result(run, {"step": step, **SETTINGS, "protocol": "quick", "num_samples": 100,
                                "digits_fd": quick_fd, "gpu_hours": hours})
    runs = find_runs([tmp_path])
    text, plot = compare(runs, tmp_path)
    full, quick = text.split("digits_fd (quick protocol), mean ± std over seeds")
    assert "| 600 | 510.00 ± 14.14 |" in full and "| 300 |" not in full and "num_samples 500" in full
    assert "| 300 | 7.00 ± 1.41 |" in quick and "| 600 | 3.50 ± 0.71 |" in quick and "num_samples 100" in quick
    _, panels = protocol_comparison(run_groups(runs), {run: [r for r in read_results(run) if r.get("protocol")]
                                                       for run in runs}, "quick")
    hours = next(p for p in panels if p.title == "digits_fd (quick protocol) against GPU-hours")
    (curve,) = hours.curves  # x: mean GPU-hours over the seeds at each step, y: mean digits-FD
    assert (list(curve.steps), list(curve.values)) == ([1.5, 2.5], [7.0, 3.5]) and hours.xlabel == "GPU-hours of training"
    assert plot.stat().st_size > 1000
