"""GPU memory per process: training state by backend, activations from what autograd saves,
and the planner refusing a batch that cannot fit."""

import pytest
import torch

from plan_helpers import gpu_run

from dtr_scale.config import ConfigError, ModelConfig
from dtr_scale.models import create_model
from dtr_scale.plan import make_plan
from dtr_scale.plan.memory import activation_bytes_per_image, block_activation_bytes_per_token
from dtr_scale.plan.model_cost import count_parameters, dit_shape

GIB = 2**30


def test_dit_xl2_at_64_per_gpu_does_not_fit_40gb_with_ddp_but_does_with_fsdp():
    ddp = gpu_run("DiT-XL/2", "ddp", world_size=8, global_batch_size=512)  # 64 images per GPU
    with pytest.raises(ConfigError, match=r"backend: DiT-XL/2 with backend ddp at per-GPU batch 64 needs about "
                                          r"4\d\.\d GiB per GPU, more than a100_40gb's 40 GiB"):
        make_plan(ddp, gpu="a100_40gb")
    fsdp = make_plan(gpu_run("DiT-XL/2", "fsdp", world_size=8, global_batch_size=512), gpu="a100_40gb")
    assert fsdp.memory.total < 35 * GIB  # state sharded 8 ways: 24 GiB of it is the 64 images' activations


def test_ddp_estimate_by_hand():
    cfg = gpu_run("DiT-XL/2", "ddp", world_size=8, global_batch_size=512)
    params = count_parameters(cfg)
    p, s = params.total, params.state_bytes  # 674.8M parameters; fp32 state dict
    c, tokens, depth = 1152, 256, 28
    # bf16 autocast, per token and block: 4 fp32 tensors C wide, 8 bf16 C wide and 2 bf16 4C wide
    per_image = depth * tokens * (4 * 4 * c + 2 * (8 * c + 2 * 4 * c))
    expected = (4 * p + 4 * p + 8 * p + 4 * p  # weights, gradients, AdamW m and v, DDP buckets
                + s + 2 * s  # EMA, post-hoc EMA at sigma_rel 0.05 and 0.10
                + 64 * per_image + 3 * GIB)  # activations of 64 images, reserve
    plan = make_plan(gpu_run("DiT-XL/2", "ddp", world_size=8, global_batch_size=256), gpu="h100")
    assert make_plan(cfg, gpu="h100").memory.total == pytest.approx(expected, rel=1e-12)
    assert expected / GIB == pytest.approx(46.7, abs=0.1)
    assert plan.memory.total < expected  # 32 per GPU needs less


def saved_bytes(depth: int, batch: int, bf16: bool) -> int:
    """Bytes autograd saves for backward in one forward of a small DiT, parameters excluded."""
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=16, depth=depth, hidden_size=128, num_heads=4, num_classes=10,
                         routing="dtr")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x, t, y = torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x, t, y)
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_activations_match_what_autograd_saves(precision):
    # Two more blocks and four more images: the difference is what one block saves for one image
    # (bf16 weight copies do not grow with the batch; embedder and final-layer activations do not with depth).
    bf16 = precision == "bf16"
    grow = (saved_bytes(3, 8, bf16) - saved_bytes(1, 8, bf16)) - (saved_bytes(3, 4, bf16) - saved_bytes(1, 4, bf16))
    measured_per_token = grow / (2 * 4 * 64)  # 2 blocks x 4 images x 64 tokens
    shape = dit_shape(ModelConfig(name="DiT-S/2", input_size=16, depth=3, hidden_size=128, num_heads=4))
    assert block_activation_bytes_per_token(shape, precision) == pytest.approx(measured_per_token, rel=0.03)


def test_activation_checkpointing_keeps_one_input_per_block():
    shape = dit_shape(ModelConfig(name="DiT-XL/2"))
    full = activation_bytes_per_image(shape, "bf16", checkpointed=False)
    kept = activation_bytes_per_image(shape, "bf16", checkpointed=True)
    assert kept == 28 * 256 * 1152 * 4 + full / 28
    assert full / kept > 6
