"""Released-format weights: a tiny DiT saved as DiT's repository saves its weights (plain
torch.save of the state dict) is evaluated, loaded strictly, refused when unsafe, and used to
start training (model.init_from)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dtr_scale.config import RoutingConfig, to_train_config
from dtr_scale.configs import CONFIG_DIR
from dtr_scale.eval.released import evaluate_weights, model_from_weights
from dtr_scale.models.weights import UnsafeWeightsError, WeightsFileError
from dtr_scale.train.components import build_model, build_objective, build_optimizer
from dtr_scale.train.ema import make_ema


def tiny_config(tmp_path, **model):
    """configs/model/tiny.yaml with DTR routing; digits-sized samples scored by the digits classifier."""
    tiny = yaml.safe_load((Path(CONFIG_DIR) / "model" / "tiny.yaml").read_text())
    return to_train_config({
        "model": {**tiny, **model}, "routing": {"kind": "dtr"},
        "diffusion": {"sampling_steps": 5, "cfg_scale": 1.5},
        "data": {"kind": "shards", "path": str(tmp_path / "no_shards"), "embedded": True},
        "run_dir": str(tmp_path / "out"), "world_size": 1, "logging": {"wandb": "disabled"},
        "eval": {"num_samples": 20, "batch_size": 10},
    })


@pytest.fixture
def official_pt(tmp_path):
    """A vanilla tiny DiT with random weights, saved the way DiT's released .pt files are."""
    cfg = tiny_config(tmp_path)
    torch.manual_seed(3)
    model = build_model(dataclasses.replace(cfg, routing=RoutingConfig(kind="none")), load_init=False)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_a_plain_state_dict_loads_strictly_into_a_routed_model(tmp_path, official_pt):
    path, state = official_pt
    model, _ = model_from_weights(path, tiny_config(tmp_path))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_weights_of_another_model_say_which_model_to_name(tmp_path, official_pt):
    path, _ = official_pt
    with pytest.raises(WeightsFileError, match="model=dit_xl2"):
        model_from_weights(path, tiny_config(tmp_path, hidden_size=64))


class CreatesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_model_is_refused_with_how_to_convert_and_never_run(tmp_path, official_pt):
    path, state = official_pt
    marker = tmp_path / "payload_ran"
    torch.save({**state, "x_embedder.proj.bias": CreatesMarker(marker)}, tmp_path / "old.pt")
    with pytest.raises(UnsafeWeightsError, match="safetensors") as info:
        model_from_weights(tmp_path / "old.pt", tiny_config(tmp_path))
    assert not marker.exists() and "weights_only=True" in str(info.value)


def test_a_dit_training_checkpoint_gives_its_ema(tmp_path, official_pt):
    import argparse

    path, state = official_pt
    noisy = {k: v + 1 for k, v in state.items()}
    torch.save({"model": noisy, "ema": state, "opt": {}, "args": argparse.Namespace(model="DiT-S/2")},
               tmp_path / "0001000.pt")
    model, _ = model_from_weights(tmp_path / "0001000.pt", tiny_config(tmp_path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_evaluating_a_pt_and_its_safetensors_gives_the_same_record(tmp_path, official_pt):
    from safetensors.torch import save_file

    path, state = official_pt
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "DiT-tiny.safetensors"))
    cfg = tiny_config(tmp_path)
    [from_pt] = evaluate_weights(path, cfg, autoencoder="pixel", rank=0, world_size=1)
    [from_st] = evaluate_weights(tmp_path / "DiT-tiny.safetensors", cfg, autoencoder="pixel", rank=0, world_size=1)
    assert from_pt["averaging"] == "file:DiT-tiny.pt" and from_pt["num_samples"] == 20
    assert from_pt["digits_fd"] == from_st["digits_fd"] and from_pt["class_accuracy"] == from_st["class_accuracy"]
    images_pt = np.load(from_pt["samples"])["arr_0"]
    assert images_pt.shape == (20, 16, 16, 3) and np.array_equal(images_pt, np.load(from_st["samples"])["arr_0"])
    stored = [json.loads(line) for line in (tmp_path / "out" / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["averaging"] for r in stored] == ["file:DiT-tiny.pt", "file:DiT-tiny.safetensors"]
    assert evaluate_weights(path, cfg, autoencoder="pixel", rank=0, world_size=1) == [from_pt]  # once per settings


def test_init_from_starts_model_and_ema_at_the_released_weights_with_a_fresh_optimizer(tmp_path, official_pt):
    path, state = official_pt
    cfg = tiny_config(tmp_path, init_from=str(path))
    model = build_model(cfg)
    assert cfg.routing.kind == "dtr"
    ema = make_ema(model)
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value) and torch.equal(ema.state_dict()[name], value)
    assert build_optimizer(model, build_objective(cfg), cfg).state_dict()["state"] == {}


def test_init_from_with_a_wrong_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        build_model(tiny_config(tmp_path, init_from=str(tmp_path / "gone.pt")))


def test_eval_command_scores_a_weights_file_into_run_dir(tmp_path, official_pt):
    import subprocess
    import sys

    path, _ = official_pt
    out = tmp_path / "released_eval"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("dtr-scale")), "eval", "--weights", str(path), "--autoencoder", "pixel",
         "model=tiny", "routing=none", f"run_dir={out}", "eval.num_samples=20", "eval.batch_size=10",
         "diffusion.sampling_steps=5", "logging.wandb=disabled"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [record] = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert record["averaging"] == "file:DiT-tiny.pt" and record["num_samples"] == 20 and record["digits_fd"] > 0
    assert (out / "eval" / "results.md").is_file()


def test_a_run_or_checkpoint_directory_gives_its_latest_ema_and_own_config(trained_run, tmp_path):
    from dtr_scale.eval.sample import load_model
    from dtr_scale.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(trained_run)
    expected, run_cfg = load_model(latest)
    for weights in (trained_run, latest):
        model, cfg = model_from_weights(weights, tiny_config(tmp_path))  # the checkpoint's config wins
        assert cfg.model == run_cfg.model
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items())


# `dtr-scale eval` with the model builder replaced: building the model before the file is checked fails loudly.
EVAL_WITHOUT_BUILDING = """
import sys
import dtr_scale.eval.released as released

def never(*args, **kwargs):
    raise AssertionError("the model was built before the weights file was checked")

released.build_model = never
sys.argv = ["dtr-scale", "eval", *sys.argv[1:]]
from dtr_scale.cli import main
main()
"""


@pytest.mark.parametrize("kind, named", [("text", "is not a readable torch or safetensors file"),
                                         ("pickle", "is refused: reading it needs an unpickler that can run code")])
def test_a_bad_weights_file_is_named_exit_2_before_the_model_is_built(kind, named, tmp_path, official_pt):
    path, state = tmp_path / "DiT-XL-2-256x256.pt", official_pt[1]
    marker = tmp_path / "payload_ran"
    if kind == "text":
        path.write_text("<html>404 Not Found</html>")  # what a failed download leaves
    else:
        torch.save({**state, "x_embedder.proj.bias": CreatesMarker(marker)}, path)
    done = subprocess.run([sys.executable, "-c", EVAL_WITHOUT_BUILDING, "--weights", str(path), "model=dit_xl2",
                           f"run_dir={tmp_path / 'out'}", "logging.wandb=disabled"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line.startswith(f"dtr-scale eval: config error: DiT weights file {path} {named}")
    assert not marker.exists() and not (tmp_path / "out").exists()
