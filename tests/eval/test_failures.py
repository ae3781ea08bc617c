"""`dtr-scale eval` makes failures visible: a non-zero exit listing them, a retry on request
(--retry-failed), and the files the metrics need checked before anything is sampled."""

import json

import numpy as np
import pytest

from dtr_scale.eval import evaluate
from dtr_scale.eval.cli import main
from dtr_scale.eval.features import INCEPTION_URL
from dtr_scale.eval.results import read_results
from dtr_scale.eval.settings import EvalSettings
from dtr_scale.eval.watcher import Failure, failures_message
from dtr_scale.eval.work_log import work_path

SMALL = ["eval.num_samples=20", "eval.batch_size=10", "diffusion.sampling_steps=5"]


def failed_events(run_dir):
    return [e for e in map(json.loads, work_path(run_dir).read_text().splitlines()) if e["event"] == "failed"]


def test_a_failed_item_makes_the_exit_status_non_zero_and_is_retried_on_request(run_copy, eval_config):
    cfg = eval_config(run_copy, **{"eval.num_samples": 20, "eval.batch_size": 10, "diffusion.sampling_steps": 5})
    blocked = EvalSettings.of(cfg).samples_folder(run_copy, 250, "ema")
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the samples folder goes")  # step 250's sampling fails

    with pytest.raises(SystemExit) as exit_:
        main([f"run_dir={run_copy}", *SMALL])
    message = str(exit_.value.code)
    assert "1 evaluation(s) failed" in message and "step 250 ema: FileExistsError" in message
    assert "--retry-failed" in message
    assert [r["step"] for r in read_results(run_copy)] == [200]

    with pytest.raises(SystemExit, match="step 250 ema"):  # still failed; a plain re-run does not retry it
        main([f"run_dir={run_copy}", *SMALL])
    assert len(failed_events(run_copy)) == 1

    blocked.unlink()  # the cause is fixed
    main([f"run_dir={run_copy}", *SMALL, "--retry-failed"])  # returns: exit status 0
    assert sorted(r["step"] for r in read_results(run_copy)) == [200, 250]


@pytest.fixture
def loads(monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate, "averaged_model", lambda *args: seen.append(args))
    return seen


def test_a_missing_reference_batch_is_found_before_any_sampling(run_copy, tmp_path, loads, capsys):
    missing = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(SystemExit) as exit_:
        main([f"run_dir={run_copy}", *SMALL, f"eval.reference={missing}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("dtr-scale eval: config error: ")  # found before any work
    assert f"eval.reference={missing}: no such file" in err
    assert "github.com/openai/guided-diffusion" in err
    assert loads == [] and not (run_copy / "eval" / "samples").exists()


def test_missing_inception_weights_are_found_before_any_sampling(run_copy, tmp_path, loads, capsys):
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(SystemExit) as exit_:
        main([f"run_dir={run_copy}", *SMALL, f"eval.reference={reference}", f"eval.inception={missing}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"FID Inception weights not found at {missing}" in err and INCEPTION_URL in err
    assert loads == [] and not (run_copy / "eval" / "samples").exists()


def test_a_failed_quick_item_is_listed_with_its_protocol():
    message = failures_message([Failure(100, "ema", "OSError: disk full", "quick"), Failure(250, "raw", "KeyError: x")])
    assert "  step 100 ema (quick protocol): OSError: disk full\n  step 250 raw: KeyError: x\n" in message
