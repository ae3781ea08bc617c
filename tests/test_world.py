"""A process's place in the job comes from the launcher's RANK / LOCAL_RANK / WORLD_SIZE."""

import pytest
import torch

from dtr_scale.world import World, full_tensor


def test_place_from_the_launcher_variables():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert World.from_env("cuda", env) == World(5, 1, 8, torch.device("cuda", 1))
    assert World.from_env("cpu", env).device == torch.device("cpu")


def test_no_launcher_is_a_world_of_one():
    assert World.from_env(environ={}) == World(0, 0, 1, torch.device("cpu"))


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world size 2\); check RANK and WORLD_SIZE"):
        World.from_env(environ={"RANK": "2", "WORLD_SIZE": "2"})


def test_a_plain_tensor_is_already_full():
    t = torch.arange(3.0)
    assert full_tensor(t) is t
