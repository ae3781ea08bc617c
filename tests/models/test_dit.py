"""DiT (SPEC section 1) and where the DTR mask acts inside a block (SPEC section 2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dtr_scale.models import DIT_PRESETS, create_model
from dtr_scale.models.dit import DiTBlock
from dtr_scale.models.routing import dtr_mask

TINY = dict(depth=2, hidden_size=64, num_heads=4, input_size=8, num_classes=10)


def official_dit_keys(depth: int) -> set[str]:
    """The state-dict keys of the public DiT checkpoints (facebookresearch/DiT models.py)."""
    keys = {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    return keys


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (adaLN-Zero would otherwise make every block the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name,expected", [("DiT-S/2", 33e6), ("DiT-B/2", 130e6), ("DiT-L/2", 458e6), ("DiT-XL/2", 675e6)])
def test_parameter_counts_match_spec(name, expected):
    with torch.device("meta"):
        model = create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - expected) / expected < 0.01, params


def test_state_dict_keys_equal_official_dit():
    with torch.device("meta"):
        vanilla = create_model("DiT-XL/2")
        routed = create_model("DiT-XL/2", routing="dtr")
        random_routed = create_model("DiT-XL/2", routing="random")
    assert set(vanilla.state_dict()) == official_dit_keys(28)
    assert set(routed.state_dict()) == official_dit_keys(28)
    assert set(random_routed.state_dict()) == official_dit_keys(28)


def test_official_style_state_dict_loads_strictly_into_routed_model():
    vanilla = randomize(create_model("DiT-S/2", **TINY))
    routed = create_model("DiT-S/2", routing="dtr", **TINY)
    routed.load_state_dict(vanilla.state_dict(), strict=True)
    assert torch.equal(routed.blocks[1].attn.qkv.weight, vanilla.blocks[1].attn.qkv.weight)
    assert routed.routing.tables.shape == (1, 1000, 64)  # rebuilt from config


def test_presets_cover_sizes_and_patches():
    assert {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} == set(DIT_PRESETS)
    assert DIT_PRESETS["DiT-L/4"] == {"depth": 24, "hidden_size": 1024, "num_heads": 16, "patch_size": 4}


def test_adaln_zero_initial_output_is_zero_and_shapes():
    model = create_model("DiT-S/4", **TINY)
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3]))
    assert out.shape == (3, 8, 8, 8)  # learned sigma doubles the channels
    assert torch.all(out == 0)


def _reference_layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def _reference_attention(block, x):
    n, tokens, c = x.shape
    heads = block.attn.num_heads
    q, k, v = (x @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(c, dim=-1)
    q, k, v = (z.reshape(n, tokens, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, tokens, c)
    return out @ block.attn.proj.weight.T + block.attn.proj.bias


def _reference_mlp(block, x):
    h = F.gelu(x @ block.mlp.fc1.weight.T + block.mlp.fc1.bias, approximate="tanh")
    return h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def reference_dtr_block(block, x, c, m):
    """SPEC section 2's lines, written out with hand-made LayerNorm, attention and MLP."""
    mod = F.silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias
    shift1, scale1, gate1, shift2, scale2, gate2 = (z[:, None] for z in mod.chunk(6, dim=1))
    r = x * m
    r = r + gate1 * _reference_attention(block, _reference_layer_norm(r) * (1 + scale1) + shift1)
    r = r + gate2 * _reference_mlp(block, _reference_layer_norm(r) * (1 + scale2) + shift2)
    return r + x * (1 - m)


def test_dtr_block_equals_spec_reference():
    torch.manual_seed(0)
    block = randomize(DiTBlock(64, 4))
    x, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    m = dtr_mask(64, beta=0.5)[torch.tensor([0, 400, 999])][:, None, :]
    torch.testing.assert_close(block(x, c, (m, 1 - m)), reference_dtr_block(block, x, c, m), atol=1e-5, rtol=1e-5)


def test_beta_one_reproduces_vanilla_model_bit_for_bit():
    vanilla = randomize(create_model("DiT-S/2", **TINY))
    routed = create_model("DiT-S/2", routing="dtr", beta=1.0, **TINY)
    routed.load_state_dict(vanilla.state_dict())
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 5, 9])
    vanilla.eval(), routed.eval()
    assert torch.equal(routed(x, t, y), vanilla(x, t, y))


def test_masked_channels_reach_the_output_only_through_the_skip():
    block = randomize(DiTBlock(64, 4))
    x = torch.randn(2, 16, 64, requires_grad=True)
    c = torch.randn(2, 64)
    m = dtr_mask(64, beta=0.5)[torch.tensor([0, 999])][:, None, :]
    probe = torch.randn(2, 16, 64)
    (block(x, c, (m, 1 - m)) * probe).sum().backward()
    masked = (m.expand_as(x) == 0)
    # d out / d x is the identity on masked channels: the gradient there is exactly the probe.
    assert torch.equal(x.grad[masked], probe[masked])
    # active channels also feed the attention and MLP updates
    assert not torch.allclose(x.grad[~masked], probe[~masked])


def test_routed_model_uses_the_mask_of_each_samples_timestep():
    model = randomize(create_model("DiT-S/2", routing="dtr", beta=0.5, **TINY)).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    t = torch.tensor([0, 999])
    both = model(x, t, y)
    for i in range(2):
        torch.testing.assert_close(both[i:i + 1], model(x[i:i + 1], t[i:i + 1], y[i:i + 1]), atol=1e-5, rtol=1e-5)
    # a different task (timestep) routes through different channels, not just a different embedding
    vanilla = create_model("DiT-S/2", **TINY).eval()
    vanilla.load_state_dict(model.state_dict())
    assert not torch.allclose(model(x, t, y), vanilla(x, t, y))


@pytest.mark.parametrize("guided", [None, 3])
def test_forward_with_cfg_matches_two_separate_passes(guided):
    model = randomize(create_model("DiT-S/2", routing="dtr", **TINY)).eval()
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([300, 300]), torch.tensor([4, 7])
    null = torch.full_like(y, 10)
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0, guided_channels=guided)
    cond, uncond = model(x, t, y), model(x, t, null)
    k = 4 if guided is None else guided
    expected = uncond[:, :k] + 4.0 * (cond[:, :k] - uncond[:, :k])
    torch.testing.assert_close(out[:2, :k], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:, :k], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:2, k:], cond[:, k:], atol=1e-5, rtol=1e-5)  # unguided channels pass through


def test_label_dropout_uses_the_null_class():
    model = create_model("DiT-S/2", **TINY)
    y = torch.tensor([1, 2, 3])
    dropped = model.y_embedder.token_drop(y, force_drop_ids=torch.tensor([1, 0, 1]))
    assert dropped.tolist() == [10, 2, 10]
    assert model.y_embedder.embedding_table.num_embeddings == 11


@pytest.mark.parametrize("routing", ["none", "dtr", "random"])
def test_compiles_without_graph_breaks(routing):
    model = randomize(create_model("DiT-S/2", routing=routing, **TINY)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 1])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
