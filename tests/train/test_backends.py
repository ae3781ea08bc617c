"""Every backend implements the one interface the loop and the checkpoint manager call."""

import inspect

import pytest

from dtr_scale.train.backends import Backend
from dtr_scale.train.backends.deepspeed import DeepSpeedBackend
from dtr_scale.train.backends.torch_dist import TorchBackend

MEMBERS = sorted(name for name in vars(Backend) if not name.startswith("_"))


def test_the_interface_is_the_small_one_the_loop_uses():
    assert MEMBERS == ["backward", "clip_grad_norm", "forward", "full_state", "grads_sharded", "load", "micro_step",
                       "param_groups", "read_weights", "save", "set_local_grads", "setup", "skip", "step",
                       "take_local_grads", "update_ema"]


@pytest.mark.parametrize("backend", [TorchBackend, DeepSpeedBackend])
@pytest.mark.parametrize("name", MEMBERS)
def test_backend_has_each_member_with_its_parameters(backend, name):
    want, got = inspect.getattr_static(Backend, name), inspect.getattr_static(backend, name, None)
    assert got is not None, f"{backend.__name__} has no {name}"
    if isinstance(want, property):
        assert isinstance(got, property)
    else:
        assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters)
