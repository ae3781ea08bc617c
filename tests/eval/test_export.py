"""`dtr-scale export`: the EMA weights as safetensors and as the .pt that DiT's own find_model
loads, a routed model's mask tables riding along under "routing"."""

import subprocess
import sys

import pytest
import torch

from dtr_scale.eval.sample import dit_checkpoint_path, export_ema, load_model
from dtr_scale.models import create_model
from dtr_scale.models.routing import dtr_mask
from dtr_scale.models.weights import load_dit_weights

TINY_DTR = dict(input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64, num_heads=4)  # conftest's run


def dit_find_model(path):
    """DiT's download.py find_model for a local file: torch.load, then its "ema" entry if any."""
    checkpoint = torch.load(path, map_location=lambda storage, loc: storage)
    if "ema" in checkpoint:  # supports checkpoints from DiT's train.py
        checkpoint = checkpoint["ema"]
    return checkpoint


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ema.safetensors"
    done = subprocess.run([sys.executable, "-m", "dtr_scale.cli", "export", str(trained_run), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out), str(out.with_suffix(".pt"))]
    return trained_run, out.with_suffix(".pt")


def test_dits_find_model_loads_the_ema_weights_into_a_vanilla_dit(exported, checkpoint_at):
    run_dir, pt = exported
    vanilla = create_model("DiT-S/2", **TINY_DTR)
    vanilla.load_state_dict(dit_find_model(pt), strict=True)  # DiT's sample.py: load_state_dict(state_dict)
    ema, _ = load_model(checkpoint_at(run_dir, 250), use_ema=True)
    for name, value in ema.state_dict().items():
        assert torch.equal(vanilla.state_dict()[name], value), name


def test_a_dtr_export_carries_its_routing_which_a_vanilla_dit_ignores(exported, checkpoint_at):
    run_dir, pt = exported
    routing = torch.load(pt)["routing"]
    assert (routing["kind"], routing["beta"], routing["alpha"]) == ("dtr", 0.8, 4.0)
    assert torch.equal(routing["tables"][0], dtr_mask(64, 1000, 0.8, 4.0).bool())  # SPEC 2's table, hidden 64
    ema, _ = load_model(checkpoint_at(run_dir, 250), use_ema=True)
    routed = load_dit_weights(create_model("DiT-S/2", routing="dtr", **TINY_DTR), pt).eval()
    vanilla = load_dit_weights(create_model("DiT-S/2", **TINY_DTR), pt).eval()
    assert torch.equal(routed.routing.tables, routing["tables"])
    x, t, y = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 500, 990]), \
        torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(routed(x, t, y), ema(x, t, y))  # the trained model, in a routed DiT
        assert not torch.allclose(vanilla(x, t, y), ema(x, t, y), atol=1e-3)  # not without its routing


def test_an_export_not_named_safetensors_is_refused_before_anything_is_written(trained_run, checkpoint_at, tmp_path):
    with pytest.raises(ValueError, match=r"name the export NAME\.safetensors"):
        export_ema(checkpoint_at(trained_run, 250), tmp_path / "ema.pt")
    assert list(tmp_path.iterdir()) == []
    assert dit_checkpoint_path(tmp_path / "a.safetensors") == tmp_path / "a.pt"


# torch blocked: the path is checked before anything heavy is imported, so a wrong one is named at once.
EXPORT_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
sys.argv = ["dtr-scale", "export", *sys.argv[1:]]
from dtr_scale.cli import main
main()
"""


def not_a_checkpoint(kind: str, tmp_path):
    """A path a user might pass by mistake: missing, a weights file, a lone step_N folder."""
    if kind == "file":
        (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
        return tmp_path / "weights.pt"
    if kind == "folder":
        (tmp_path / "step_00000010").mkdir()
        return tmp_path / "step_00000010"
    return tmp_path / "absent"


@pytest.mark.parametrize("kind, what", [("missing", "does not exist"), ("file", "is a file, not a checkpoint"),
                                        ("folder", "is neither a checkpoint directory")])
def test_a_path_that_is_no_checkpoint_nor_run_is_named_exit_2_and_nothing_written(kind, what, tmp_path):
    source, out = not_a_checkpoint(kind, tmp_path), tmp_path / "out" / "ema.safetensors"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", EXPORT_WITHOUT_TORCH, str(source), str(out)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"dtr-scale export: {source} {what}") and "RUN/checkpoints/step_N" in line
    assert list(out.parent.iterdir()) == []
