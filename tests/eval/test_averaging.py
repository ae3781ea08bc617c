"""Which weights each averaging spec scores: window means, post-hoc EMA, clear errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from dtr_scale.eval.averaging import AveragingError, averaged_model
from dtr_scale.eval.sample import load_model
from dtr_scale.train.checkpoint import complete_checkpoints
from dtr_scale.train.phema import snapshot_name


def parameters(model):
    return {name: p.detach() for name, p in model.named_parameters()}


def raw_parameters(checkpoint):
    return parameters(load_model(checkpoint, use_ema=False)[0])


def test_ema_and_raw_are_the_checkpoints_own_weights(trained_run, checkpoint_at):
    ckpt = checkpoint_at(trained_run, 250)
    for spec, use_ema in (("ema", True), ("raw", False)):
        got, expected = parameters(averaged_model(ckpt, spec)[0]), parameters(load_model(ckpt, use_ema=use_ema)[0])
        assert all(torch.equal(got[k], expected[k]) for k in expected), spec
    ema, raw = parameters(averaged_model(ckpt, "ema")[0]), parameters(averaged_model(ckpt, "raw")[0])
    assert not torch.equal(ema["final_layer.linear.weight"], raw["final_layer.linear.weight"])


def test_window_2_is_the_mean_of_the_last_two_checkpoints(trained_run, checkpoint_at):
    model, cfg = averaged_model(checkpoint_at(trained_run, 250), "window:2")
    a, b = raw_parameters(checkpoint_at(trained_run, 200)), raw_parameters(checkpoint_at(trained_run, 250))
    got = parameters(model)
    for name in a:
        torch.testing.assert_close(got[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(got["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    assert cfg.steps == 250


def test_window_passes_over_a_truncated_checkpoint(run_copy, checkpoint_at):
    shard = max(checkpoint_at(run_copy, 200).glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])  # torn write: the manifest's size no longer matches
    assert [step for step, _ in complete_checkpoints(run_copy)] == [100, 250]
    got = parameters(averaged_model(checkpoint_at(run_copy, 250), "window:2")[0])
    a, b = raw_parameters(checkpoint_at(run_copy, 100)), raw_parameters(checkpoint_at(run_copy, 250))
    torch.testing.assert_close(got["x_embedder.proj.weight"], (a["x_embedder.proj.weight"] + b["x_embedder.proj.weight"]) / 2,
                               rtol=0, atol=1e-7)


def test_window_larger_than_the_kept_checkpoints_says_what_to_change(trained_run, checkpoint_at):
    with pytest.raises(AveragingError, match="needs 4 complete checkpoints.*has 3.*keep_last"):
        averaged_model(checkpoint_at(trained_run, 250), "window:4")


@pytest.mark.parametrize("std", [0.05, 0.10])
def test_phema_at_a_tracked_sigma_rel_reproduces_that_snapshot(trained_run, checkpoint_at, std):
    snapshot = load_file(str(trained_run / "phema" / snapshot_name(250, std)))
    got = parameters(averaged_model(checkpoint_at(trained_run, 250), f"phema:{std}")[0])
    for name, value in got.items():
        torch.testing.assert_close(value, snapshot[name], rtol=1e-4, atol=1e-5)


def test_phema_between_tracked_profiles_is_a_new_average(trained_run, checkpoint_at):
    got = parameters(averaged_model(checkpoint_at(trained_run, 250), "phema:0.07")[0])
    name = "blocks.0.mlp.fc1.weight"
    for std in (0.05, 0.10):
        snapshot = load_file(str(trained_run / "phema" / snapshot_name(250, std)))
        assert (got[name] - snapshot[name]).abs().max() > 1e-4
    assert torch.isfinite(got[name]).all()


def test_phema_keeps_the_fixed_position_table(trained_run, checkpoint_at):
    model, _ = averaged_model(checkpoint_at(trained_run, 200), "phema:0.07")
    assert torch.equal(model.pos_embed, load_model(checkpoint_at(trained_run, 200))[0].pos_embed)


def test_phema_without_snapshots_says_how_to_get_them(run_copy, checkpoint_at):
    shutil.rmtree(run_copy / "phema")
    with pytest.raises(AveragingError, match="no post-hoc EMA snapshots.*phema_stds"):
        averaged_model(checkpoint_at(run_copy, 250), "phema:0.1")


def test_phema_with_a_snapshot_missing_from_the_grid_is_refused_unless_allowed(run_copy, checkpoint_at):
    missing = run_copy / "phema" / snapshot_name(200, 0.05)
    missing.unlink()
    with pytest.raises(AveragingError, match=f"{missing.name}.*allow_missing_snapshots"):
        averaged_model(checkpoint_at(run_copy, 250), "phema:0.1")
    model, _ = averaged_model(checkpoint_at(run_copy, 250), "phema:0.1", allow_missing_snapshots=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
