"""eval.at_save: the trainer submits an evaluation job for each due checkpoint as soon as it is
complete, and training goes on without waiting for it."""

from __future__ import annotations

import json
import time

from dtr_scale.config import to_train_config
from dtr_scale.eval.results import read_results
from dtr_scale.eval.watcher import at_save_hook
from dtr_scale.eval.work_log import work_path
from dtr_scale.train.loop import train


def test_each_due_checkpoint_is_submitted_once_at_save_time(digits_dir, digits_run_config, tmp_path):
    raw = digits_run_config(str(digits_dir), str(tmp_path / "run"))
    raw |= {"steps": 40, "checkpoint": {"every": 10, "keep_last": 5},
            "eval": {"every": 20, "num_samples": 20, "batch_size": 10, "averaging": ["ema"], "at_save": True},
            "cluster": {"kind": "local", "time_min": 10, "signal_delay_s": 30}}
    cfg = to_train_config(raw)
    assert train(cfg, on_checkpoint=at_save_hook(cfg)).step == 40  # training does not wait for the evaluations

    events = [json.loads(line) for line in work_path(cfg.run_dir).read_text().splitlines()]
    assert [e["event"] for e in events] == ["submitted", "submitted"]  # steps 20 and 40, not 10 or 30
    deadline = time.monotonic() + 240
    while len(read_results(cfg.run_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sorted(r["step"] for r in read_results(cfg.run_dir)) == [20, 40]
    assert all(r["digits_fd"] > 0 and r["num_samples"] == 20 for r in read_results(cfg.run_dir))
