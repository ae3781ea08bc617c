"""What a DiT costs per image: parameter counts and forward MACs against the DiT paper
(SPEC section 1's table), and the analytic MACs against PyTorch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dtr_scale.config import ModelConfig, RoutingConfig, TrainConfig
from dtr_scale.models import create_model
from dtr_scale.plan.model_cost import count_parameters, dit_shape, forward_macs, forward_macs_breakdown


@pytest.mark.parametrize("name,gmacs,tolerance", [
    ("DiT-XL/2", 118.6, 0.01),  # SPEC 1: "GFLOPs (256px, /2)" of the DiT paper, which are MACs
    ("DiT-L/2", 80.7, 0.03),
    ("DiT-B/2", 23.0, 0.03),
    ("DiT-S/2", 6.1, 0.03),
])
def test_forward_macs_match_the_dit_paper(name, gmacs, tolerance):
    assert forward_macs(dit_shape(ModelConfig(name=name))) / 1e9 == pytest.approx(gmacs, rel=tolerance)


def test_dit_xl2_by_hand():
    # per block: adaLN C*6C + qkv T*C*3C + scores and weighted sum 2*T*T*C + proj T*C*C + MLP 2*T*C*4C
    t, c = 256, 1152
    block = c * 6 * c + t * c * 3 * c + 2 * t * t * c + t * c * c + 2 * t * c * 4 * c
    outside = t * 4 * 2 * 2 * c + (256 * c + c * c) + (c * 2 * c + t * c * 2 * 2 * 8)
    assert forward_macs(dit_shape(ModelConfig(name="DiT-XL/2"))) == 28 * block + outside
    assert forward_macs_breakdown(dit_shape(ModelConfig(name="DiT-XL/2")))["28 blocks"] == 28 * block


@pytest.mark.parametrize("routing", ["none", "dtr"])
def test_analytic_macs_equal_torch_flop_counter_on_a_real_forward(routing):
    # An independent count: FlopCounterMode sees every matmul, conv and attention kernel the forward
    # runs and reports FLOPs = 2 x MACs. Routing masks are elementwise and add none.
    model_cfg = ModelConfig(name="DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=4)
    model = create_model("DiT-S/2", routing=routing, input_size=8, num_classes=10, depth=2, hidden_size=64,
                         num_heads=4).eval()
    n = 3
    x, t, y = torch.randn(n, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 2])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() / (2 * n) == pytest.approx(forward_macs(dit_shape(model_cfg)), rel=1e-6)


@pytest.mark.parametrize("name,millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)])
def test_parameter_counts_match_the_dit_paper(name, millions):
    params = count_parameters(TrainConfig(model=ModelConfig(name=name)))
    assert params.total / 1e6 == pytest.approx(millions, rel=0.01)


def test_parameters_are_counted_without_memory_and_routing_adds_none():
    routed = TrainConfig(model=ModelConfig(name="DiT-XL/2"), routing=RoutingConfig(kind="random"))
    vanilla = TrainConfig(model=ModelConfig(name="DiT-XL/2"))
    assert count_parameters(routed) == count_parameters(vanilla)  # masks are non-persistent buffers
    p = count_parameters(vanilla)
    c = 1152
    # one block: adaLN Linear(C, 6C), qkv Linear(C, 3C), proj Linear(C, C), fc1 Linear(C, 4C), fc2 Linear(4C, C)
    linears = [(c, 6 * c), (c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]
    assert p.per_block == sum(fan_in * fan_out + fan_out for fan_in, fan_out in linears)
    assert p.state_bytes == 4 * (p.total + 256 * c)  # the state dict adds the pos_embed buffer
