"""Two evaluators on one run directory: each item is taken by exactly one of them, each result
is stored once, and neither waits for work the other took."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from dtr_scale.eval.results import read_results
from dtr_scale.eval.settings import record_key
from dtr_scale.eval.work_log import work_path

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")


def test_two_evaluators_share_the_work_and_store_each_result_once(run_copy):
    command = [DTR_SCALE, "eval", f"run_dir={run_copy}", "eval.num_samples=20", "eval.batch_size=10",
               "diffusion.sampling_steps=5", "eval.every=100", "eval.averaging=[ema,raw]"]
    evaluators = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in evaluators]  # neither hangs on the other's items
    assert [p.returncode for p in evaluators] == [0, 0], outputs

    records = read_results(run_copy)
    counts = Counter(record_key(r) for r in records)
    assert sorted((r["step"], r["averaging"]) for r in records) == [
        (100, "ema"), (100, "raw"), (200, "ema"), (200, "raw"), (250, "ema"), (250, "raw")]
    assert set(counts.values()) == {1}
    claims = Counter(e["key"] for e in map(json.loads, work_path(run_copy).read_text().splitlines())
                     if e["event"] == "claimed")
    assert len(claims) == 6 and set(claims.values()) == {1}  # each item taken once, by one of them
