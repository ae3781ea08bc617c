"""Evaluating a checkpoint end to end: samples, metrics, one record per setting, never twice."""

import json

import numpy as np
import pytest
import torch

from dtr_scale.eval import features
from dtr_scale.eval.evaluate import adm_scores, dataset_decoder, evaluate_checkpoint, score_samples
from dtr_scale.eval.features import FeatureNetwork
from dtr_scale.eval.generate import generate_samples, load_samples
from dtr_scale.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from dtr_scale.eval.results import read_results, results_path
from dtr_scale.eval.settings import EvalSettings, EvaluationError
from dtr_scale.train.components import build_diffusion, build_model


def test_a_briefly_trained_model_scores_a_clearly_better_digits_fd_than_an_untrained_one(
        run_copy, checkpoint_at, eval_config, tmp_path):
    cfg = eval_config(run_copy, **{"eval.num_samples": 100, "eval.batch_size": 50, "diffusion.sampling_steps": 25})
    [trained] = evaluate_checkpoint(checkpoint_at(run_copy, 250), cfg)

    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    untrained_model = build_model(cfg)
    npz = generate_samples(untrained_model, build_diffusion(cfg).respaced(25), EvalSettings.of(cfg).sample_spec(cfg.model, 0, "untrained"),
                           tmp_path / "untrained", dataset_decoder(cfg, torch.device("cpu")))
    untrained = score_samples(*load_samples(npz), cfg)

    assert trained["digits_fd"] < 0.75 * untrained["digits_fd"], (trained["digits_fd"], untrained["digits_fd"])
    assert 0.0 <= trained["class_accuracy"] <= 1.0
    assert {k: trained[k] for k in ("step", "averaging", "sampler", "sampling_steps", "cfg_scale", "num_samples",
                                    "reference")} == {"step": 250, "averaging": "ema", "sampler": "ddpm",
                                                      "sampling_steps": 25, "cfg_scale": 1.5, "num_samples": 100,
                                                      "reference": "digits"}
    assert trained["wall_s"] >= trained["sample_s"] > 0
    assert load_samples(trained["samples"])[0].shape == (100, 16, 16, 3)


def test_a_result_already_recorded_is_returned_not_recomputed(run_copy, checkpoint_at, eval_config, monkeypatch):
    cfg = eval_config(run_copy, **{"eval.averaging": ["ema", "raw"]})
    first = evaluate_checkpoint(checkpoint_at(run_copy, 200), cfg)
    assert [r["averaging"] for r in first] == ["ema", "raw"]
    assert first[0]["digits_fd"] != first[1]["digits_fd"]

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr("dtr_scale.eval.evaluate.generate_samples", no_sampling)
    assert evaluate_checkpoint(checkpoint_at(run_copy, 200), cfg) == first
    assert len(results_path(run_copy).read_text().splitlines()) == 2
    other = eval_config(run_copy, **{"eval.averaging": ["ema"], "diffusion.cfg_scale": 2.0})
    with pytest.raises(AssertionError, match="sampled again"):  # other settings are another result
        evaluate_checkpoint(checkpoint_at(run_copy, 200), other)


def test_records_are_json_lines_with_every_metric(run_copy, checkpoint_at, eval_config):
    evaluate_checkpoint(checkpoint_at(run_copy, 250), eval_config(run_copy))
    [line] = results_path(run_copy).read_text().splitlines()
    record = json.loads(line)
    assert {"step", "averaging", "digits_fd", "class_accuracy", "num_samples", "reference", "wall_s",
            "checkpoint", "seed", "labels", "guided_channels", "ddim_eta"} <= set(record)
    assert read_results(run_copy) == [record]


class PixelFeatures(FeatureNetwork):
    """A stand-in for the FID Inception with features anyone can recompute: 'pool' = the mean of
    each of 8 pixel bands, 'spatial' = 4 other bands, 'logits' = 5 more."""

    def __init__(self, weights_path=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # extract() reads the device from it

    def forward(self, images):
        flat = images.float().flatten(1)
        bands = flat[:, :17 * (flat.shape[1] // 17)].reshape(len(flat), 17, -1).mean(2)
        return {"pool": bands[:, :8], "spatial": bands[:, 8:12], "logits": bands[:, 12:] / 50}


def recompute(images):
    return PixelFeatures().extract(images)


def test_adm_suite_against_a_reference_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "InceptionFeatures", PixelFeatures)
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    real = rng.integers(0, 200, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=real)
    f, r = recompute(fake), recompute(real)

    scores = adm_scores(fake, tmp_path / "images.npz", None)
    assert scores["fid"] == pytest.approx(frechet_distance(*feature_statistics(f["pool"]), *feature_statistics(r["pool"])))
    assert scores["sfid"] == pytest.approx(frechet_distance(*feature_statistics(f["spatial"]),
                                                            *feature_statistics(r["spatial"])))
    assert scores["inception_score"] == pytest.approx(inception_score(f["logits"]))
    assert (scores["precision"], scores["recall"]) == pytest.approx(precision_recall(r["pool"], f["pool"]))
    assert scores["num_samples"] == 20 and scores["fid"] > 0

    # ADM's stored statistics win over the images; without images there is no precision/recall
    mu, sigma = np.zeros(8), np.eye(8)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    scores = adm_scores(fake, tmp_path / "stats.npz", None)
    assert scores["fid"] == pytest.approx(frechet_distance(*feature_statistics(f["pool"]), mu, sigma))
    assert scores["sfid"] is None and scores["precision"] is None and scores["recall"] is None


def test_runs_the_evaluator_cannot_score_say_what_to_set(run_copy, eval_config):
    images, labels = np.zeros((4, 16, 16, 3), np.uint8), np.arange(4)
    with pytest.raises(EvaluationError, match="eval.reference is not set"):
        score_samples(images, labels, eval_config(run_copy, **{"data.embedded": False}))
    synthetic = eval_config(run_copy, **{"data.kind": "synthetic"})
    with pytest.raises(EvaluationError, match="data.kind=synthetic has no images"):
        dataset_decoder(synthetic, torch.device("cpu"))


def test_the_quick_protocol_scores_fid_alone_from_the_stored_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "InceptionFeatures", PixelFeatures)
    rng = np.random.default_rng(1)
    fake, real = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), rng.integers(0, 200, (24, 16, 16, 3), dtype=np.uint8)
    mu, sigma = feature_statistics(recompute(real)["pool"])
    np.savez(tmp_path / "both.npz", arr_0=np.zeros((24, 16, 16, 3), np.uint8), mu=mu, sigma=sigma)  # arr_0 unused
    np.savez(tmp_path / "images.npz", arr_0=real)
    quick = adm_scores(fake, tmp_path / "both.npz", None, full=False)
    assert quick == {"fid": pytest.approx(adm_scores(fake, tmp_path / "images.npz", None)["fid"]), "num_samples": 20}
    assert adm_scores(fake, tmp_path / "images.npz", None, full=False)["fid"] == pytest.approx(quick["fid"])
