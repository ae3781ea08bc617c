"""ClusterConfig: presets load, bad values fail naming the key."""

from __future__ import annotations

import pytest

from dtr_scale.config import ConfigError
from dtr_scale.config import ClusterConfig
from launch_helpers import PRESETS, load_preset


def test_presets_load():
    assert {p.stem for p in PRESETS.glob("*.yaml")} == {"local", "slurm_debug", "example_cluster", "none",
                                                        "slurm_two_nodes", "slurm_two_nodes_2x2"}
    local, debug, real = load_preset("local"), load_preset("slurm_debug"), load_preset("example_cluster")
    assert (local.kind, local.world_size) == ("local", 2)
    assert (debug.kind, debug.partition, debug.world_size) == ("slurm", "debug", 2)
    assert (real.nodes, real.gpus_per_node, real.world_size) == (1, 8, 8)
    two, four = load_preset("slurm_two_nodes"), load_preset("slurm_two_nodes_2x2", world_size=4)
    assert (two.nodes, two.tasks_per_node, two.world_size) == (2, 1, 2)
    assert (four.nodes, four.tasks_per_node, four.world_size) == (2, 2, 4)


def test_tasks_per_node_defaults_to_one_per_gpu():
    assert ClusterConfig(kind="slurm", gpus_per_node=4).tasks_per_node == 4
    assert ClusterConfig().tasks_per_node == 1


@pytest.mark.parametrize("fields, key", [
    ({"kind": "pbs"}, "cluster.kind"),
    ({"nodes": 0}, "cluster.nodes"),
    ({"kind": "local", "nodes": 2}, "cluster.nodes"),
    ({"kind": "slurm", "gpus_per_node": 8, "tasks_per_node": 4}, "cluster.tasks_per_node"),
    ({"time_min": 0}, "cluster.time_min"),
    ({"time_min": 1, "signal_delay_s": 60}, "cluster.signal_delay_s"),
    ({"max_requeues": -1}, "cluster.max_requeues"),
    ({"mem_gb": 0}, "cluster.mem_gb"),
    ({"step_seconds": 0}, "cluster.step_seconds"),
])
def test_bad_values_name_the_key(fields, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ClusterConfig(**fields)
