"""A collective that fails because another rank went away names that rank and its node."""

from __future__ import annotations

from dataclasses import dataclass, field

from dtr_scale.launch.task import lost_peer

GLOO_ERROR = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:53978: "
              "Connection reset by peer. This is typically caused by a remote worker hanging")


@dataclass
class TwoNodeJob:  # what submitit's JobEnvironment tells of a job: 2 nodes, block placement
    num_tasks: int
    num_nodes: int = 2
    hostnames: list[str] = field(default_factory=lambda: ["node1", "localhost"])


def test_the_lost_peer_is_named_by_rank_and_node():
    # 127.0.0.1 resolves to localhost, here the job's second node.
    assert lost_peer(RuntimeError(GLOO_ERROR), TwoNodeJob(num_tasks=2)) == "rank 1 on localhost"
    assert lost_peer(RuntimeError(GLOO_ERROR), TwoNodeJob(num_tasks=4)) == "one of ranks [2, 3] on localhost"


def test_an_error_that_names_no_peer_names_none():
    assert lost_peer(ValueError("loss is nan at step 3"), TwoNodeJob(num_tasks=2)) == ""
    # A peer on no node of the job (the address resolves, but to another host) is named by address.
    assert lost_peer(RuntimeError(GLOO_ERROR), TwoNodeJob(num_tasks=2, hostnames=["node1", "node2"])) \
        == "the process at 127.0.0.1 (localhost)"
