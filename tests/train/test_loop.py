"""The single-process loop: checkpoints, exact resume, and that it learns."""

import json

import pytest
import torch

from dtr_scale.data.synthetic import SyntheticLatents
from dtr_scale.eval.sample import sample_from_checkpoint
from dtr_scale.train.checkpoint import latest_checkpoint, read_manifest, read_meta
from dtr_scale.train.loop import NonFiniteLossError, train
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save


def load_checkpoint(path, tmp_path):
    """Everything a checkpoint holds, as one nested dict (DCP -> torch.save -> load)."""
    out = tmp_path / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def stop_at(step):
    calls = {"n": 0}

    def stop_requested():
        calls["n"] += 1
        return calls["n"] == step + 1  # polled before every step, starting before step 0

    return stop_requested


def test_resume_gives_the_same_trajectory_bitwise(tiny_config, tmp_path):
    straight = tiny_config(run_dir=str(tmp_path / "straight"))
    assert train(straight).status == "finished"

    split = tiny_config(run_dir=str(tmp_path / "split"), **{"checkpoint.every": 1000})
    first = train(split, stop_requested=stop_at(7))
    assert (first.status, first.step) == ("stopped", 7)
    second = train(split)
    assert (second.status, second.step) == ("finished", 20)

    a = load_checkpoint(latest_checkpoint(straight.run_dir), tmp_path)
    b = load_checkpoint(latest_checkpoint(split.run_dir), tmp_path)
    for key in ("module", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for name, value in a["phema"]["emas"][1].items():
        assert torch.equal(value, b["phema"]["emas"][1][name]), name
    log_a = [json.loads(l) for l in open(tmp_path / "straight" / "metrics.jsonl")]
    log_b = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


def test_checkpoint_carries_the_uw_log_variances_and_its_own_param_group(tiny_config, tmp_path):
    cfg = tiny_config()
    train(cfg)
    state = load_checkpoint(latest_checkpoint(cfg.run_dir), tmp_path)
    log_vars = state["module"]["objective.uw.log_vars"]
    assert log_vars.shape == (4,) and not torch.all(log_vars == 0)  # learned
    groups = state["optim"]["param_groups"]
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("model", 1e-3, 0.0), ("uw", 0.025, 0.0)]
    assert groups[1]["params"] == ["objective.uw.log_vars"]
    assert [e["step"] for e in read_manifest(cfg.run_dir)] == [10, 20]
    assert read_meta(latest_checkpoint(cfg.run_dir))["data"] == {"position": 20 * 16}


def test_retention_keeps_the_last_k_and_every_mth(tiny_config):
    cfg = tiny_config(steps=30, **{"checkpoint.every": 5, "checkpoint.keep_last": 2, "checkpoint.keep_every": 10})
    train(cfg)
    assert [e["step"] for e in read_manifest(cfg.run_dir)] == [10, 20, 25, 30]
    on_disk = sorted(p.name for p in (latest_checkpoint(cfg.run_dir).parent).glob("step_*"))
    assert on_disk == ["step_00000010", "step_00000020", "step_00000025", "step_00000030"]


def test_latest_ignores_a_truncated_checkpoint(tiny_config):
    cfg = tiny_config()
    train(cfg)
    latest = latest_checkpoint(cfg.run_dir)
    assert latest.name == "step_00000020"
    shard = max(latest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])
    assert latest_checkpoint(cfg.run_dir).name == "step_00000010"
    resumed = train(tiny_config(steps=25))  # resumes from step 10, not from the damaged 20
    assert resumed.step == 25 and latest_checkpoint(cfg.run_dir).name == "step_00000025"


def test_nan_loss_stops_with_step_and_interval_losses(tiny_config):
    train(tiny_config(steps=10))
    diverging = tiny_config(**{"optimizer.lr": 1e30}, steps=50)
    with pytest.raises(NonFiniteLossError, match=r"step \d+, rank 0: .*interval losses \[.*\]"):
        train(diverging)
    # what was already written stays the latest, complete checkpoint
    assert latest_checkpoint(diverging.run_dir).name == "step_00000010"
    assert read_meta(latest_checkpoint(diverging.run_dir))["step"] == 10


def test_skip_policy_counts_and_continues(tiny_config, monkeypatch):
    from dtr_scale.train.backends.torch_dist import TorchBackend

    real_clip = TorchBackend.clip_grad_norm
    calls = {"n": 0}

    def flaky_clip(self, max_norm):  # steps 3 and 4 see an Inf gradient
        calls["n"] += 1
        norm = real_clip(self, max_norm)
        return torch.tensor(float("inf")) if calls["n"] in (4, 5) else norm

    monkeypatch.setattr(TorchBackend, "clip_grad_norm", flaky_clip)
    result = train(tiny_config(**{"health.nan_policy": "skip"}))
    assert (result.status, result.step, result.skipped_steps) == ("finished", 20, 2)


def test_training_lowers_the_loss_and_samples_approach_the_data(tiny_config):
    cfg = tiny_config(steps=300, global_batch_size=32, ema_decay=0.98,
                      **{"logging.every": 10, "checkpoint.every": 300, "optimizer.lr": 3e-3, "data.num_samples": 512, "model.depth": 3, "model.hidden_size": 96})
    train(cfg)
    mse = [json.loads(l)["mse"] for l in open(f"{cfg.run_dir}/metrics.jsonl")]
    assert sum(mse[-5:]) / 5 < 0.5 * sum(mse[:2]) / 2

    data = SyntheticLatents(512, 4, (4, 8, 8), 0.3, cfg.seed)
    labels = torch.arange(32) % 4
    ckpt = latest_checkpoint(cfg.run_dir)
    for ddim in (False, True):
        x = sample_from_checkpoint(ckpt, labels, sampler="ddim" if ddim else "ddpm", seed=1)
        to_own_class = (x - data.class_means[labels]).pow(2).mean()
        to_other_class = (x - data.class_means[(labels + 1) % 4]).pow(2).mean()
        noise_level = (torch.randn_like(x) - data.class_means[labels]).pow(2).mean()
        # samples sit near their own class pattern, far from the others and from noise
        assert to_own_class < 0.5 * to_other_class
        assert to_own_class < 0.5 * noise_level


def test_ema_export_loads_into_a_vanilla_model_without_the_trainer(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from dtr_scale.eval.sample import export_ema, load_model
    from dtr_scale.models import create_model

    cfg = tiny_config()
    train(cfg)
    out = export_ema(latest_checkpoint(cfg.run_dir), tmp_path / "ema.safetensors")
    vanilla = create_model("DiT-S/2", input_size=8, num_classes=4, depth=2, hidden_size=64, num_heads=4)
    vanilla.load_state_dict(load_file(str(out)), strict=True)
    ema, _ = load_model(latest_checkpoint(cfg.run_dir), use_ema=True)
    for name, value in ema.state_dict().items():
        assert torch.equal(vanilla.state_dict()[name], value), name
    trained, _ = load_model(latest_checkpoint(cfg.run_dir), use_ema=False)
    assert not torch.equal(trained.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)


def optimizer_steps_taken(backend_cls, monkeypatch):
    """Record AdamW's step count of the first parameter after every backend.step call."""
    real_step, counts = backend_cls.step, []

    def counting_step(self, apply=None):
        real_step(self, apply)
        state = self.optimizer.state[self.optimizer.param_groups[0]["params"][0]]
        counts.append(int(state["step"]) if state else 0)

    monkeypatch.setattr(backend_cls, "step", counting_step)
    return counts


def inf_grad_norm_at(backend_cls, monkeypatch, steps):
    real_clip, calls = backend_cls.clip_grad_norm, {"n": 0}

    def clip(self, max_norm):
        norm = real_clip(self, max_norm)
        calls["n"] += 1
        return torch.full_like(norm, float("inf")) if calls["n"] - 1 in steps else norm

    monkeypatch.setattr(backend_cls, "clip_grad_norm", clip)


@pytest.mark.parametrize("fused", [False, True])  # masked on the host / on the device (fused AdamW's found_inf)
def test_stop_policy_acts_at_the_next_log_step_and_nothing_updates_after_the_bad_step(tiny_config, monkeypatch, fused):
    from dtr_scale.train.backends.torch_dist import TorchBackend

    counts = optimizer_steps_taken(TorchBackend, monkeypatch)
    inf_grad_norm_at(TorchBackend, monkeypatch, {2})
    cfg = tiny_config(steps=20, **{"logging.every": 5, "backend.fused_adamw": fused, "health.nan_policy": "stop"})
    with pytest.raises(NonFiniteLossError, match=r"^step 2, rank 0: loss [\d.]+, grad norm inf"):
        train(cfg)
    assert counts == [1, 2, 2, 2, 2]  # steps 3 and 4 ran before the log step read step 2's values: no update
    assert latest_checkpoint(cfg.run_dir) is None  # nothing was saved from the steps after it


def test_skipped_steps_leave_adam_untouched_on_the_device_and_records_carry_throughput(tiny_config, monkeypatch):
    from dtr_scale.train.backends.torch_dist import TorchBackend

    counts = optimizer_steps_taken(TorchBackend, monkeypatch)
    inf_grad_norm_at(TorchBackend, monkeypatch, {3, 4})
    cfg = tiny_config(steps=10, **{"backend.fused_adamw": True, "health.nan_policy": "skip"})
    result = train(cfg)
    assert (result.status, result.step, result.skipped_steps) == ("finished", 10, 2)
    assert counts == [1, 2, 3, 3, 3, 4, 5, 6, 7, 8]
    records = [json.loads(line) for line in open(f"{cfg.run_dir}/metrics.jsonl")]
    assert [r["skipped_steps"] for r in records] == [2, 2]
    for r in records:  # one process on a CPU: per device = all, and no GPU peak for MFU
        assert r["images_per_s_per_device"] == r["images_per_s"] > 0 and r["mfu"] is None


def test_init_from_starts_a_fresh_run_and_a_resume_never_reads_it(tiny_config, tmp_path):
    import dataclasses

    from dtr_scale.train.components import build_model
    from dtr_scale.train.loop import assemble
    from dtr_scale.world import World

    released = tmp_path / "released.pt"
    torch.manual_seed(123)  # weights other than the ones the run's seed gives
    torch.save(build_model(tiny_config()).state_dict(), released)
    cfg = tiny_config(steps=4, **{"model.init_from": str(released), "checkpoint.every": 2})
    fresh = assemble(cfg, World())
    for name, value in torch.load(released, weights_only=True).items():
        assert torch.equal(fresh.model.state_dict()[name], value), name
        assert torch.equal(fresh.ema.state_dict()[name], value), name
    assert train(cfg).step == 4
    released.unlink()  # a resume loads its checkpoint's weights: the file is not even read
    assert train(dataclasses.replace(cfg, steps=6)).step == 6
