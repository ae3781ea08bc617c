"""world.process_group: the one place a process joins and leaves the default process group."""

import pytest
import torch.distributed as dist

from dtr_scale.world import World, process_group


def test_a_world_of_one_needs_no_group_unless_asked():
    with process_group(World(), "cpu"):
        assert not dist.is_initialized()
    with process_group(World(), "cpu", alone=True):
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert not dist.is_initialized()


def test_the_group_is_left_after_an_error_and_an_existing_one_is_kept():
    with pytest.raises(RuntimeError, match="inside"):
        with process_group(World(), "cpu", alone=True):
            raise RuntimeError("inside")
    assert not dist.is_initialized()
    with process_group(World(), "cpu", alone=True):
        group = dist.group.WORLD
        with process_group(World(), "cpu", alone=True):  # e.g. train() inside a launcher's group
            assert dist.group.WORLD is group
        assert dist.is_initialized()  # the inner block did not destroy what it did not make
    assert not dist.is_initialized()
