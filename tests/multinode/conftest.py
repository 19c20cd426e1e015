"""One simulated 3-node Ray cluster (``ray.cluster_utils.Cluster``) for every multinode
module, and a fresh tensorcast namespace per test whose actors, shared memory, sockets and
guardians are checked gone afterwards (on every node: simulated nodes share this host)."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import guardians, leftovers, stop_namespace, wait_for

FAST_HEALTH = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 500,
}
NODES = 3
#: every multinode daemon runs this config (1 MiB transfer shards)
DAEMON_CONFIG = str(Path(__file__).resolve().parents[1] / "config" / "cluster_daemon.yaml")
#: the same, with reads pulled over the gloo pair groups (read_transport: collective)
COLLECTIVE_CONFIG = DAEMON_CONFIG.replace("cluster_daemon", "cluster_daemon_collective")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rtcm-", dir="/tmp")
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"tc_node_0": 1},
            "_system_config": FAST_HEALTH,
            "include_dashboard": False,
            "temp_dir": temp_dir,
        },
    )
    for i in range(1, NODES):
        c.add_node(num_cpus=2, resources={f"tc_node_{i}": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def ns(cluster: Any) -> Iterator[str]:
    name = f"m-{uuid.uuid4().hex[:10]}"
    yield name
    stop_namespace(name)
    wait_for(lambda: not guardians(name), 30, f"guardians of {name} to exit")
    left = leftovers(name)
    assert not left, f"leaked: {left}"


def node_ids(cluster: Any) -> list[str]:
    """The node id of simulated node i (custom resource ``tc_node_i``), in order."""
    import ray

    by_resource = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for res in node.get("Resources", {}):
            if res.startswith("tc_node_"):
                by_resource[res] = node["NodeID"]
    return [by_resource[f"tc_node_{i}"] for i in range(NODES)]


def on_node(
    node: int | str,
    ns: str,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 240,
    config: str = DAEMON_CONFIG,
    gs_config: str | None = None,
) -> Any:
    """Run ``fn(tc, *args)`` in a Ray task on simulated node ``node`` (its index, or a
    custom resource name) after ``tc.init(namespace=ns)`` with the multinode daemon config
    (the first init on a node starts its daemon with it; the first in a namespace starts the
    Global Store, with ``gs_config`` when given); the task shuts tensorcast down before it
    returns."""
    import ray

    resource = node if isinstance(node, str) else f"tc_node_{node}"

    @ray.remote(num_cpus=0, max_retries=0)
    def task(namespace: str) -> Any:
        import tensorcast_ray as tc

        tc.init(namespace=namespace, daemon_config_path=config, global_store_config_path=gs_config)
        try:
            return fn(tc, *args)
        finally:
            tc.shutdown()

    return ray.get(task.options(resources={resource: 0.01}).remote(ns), timeout=timeout)
