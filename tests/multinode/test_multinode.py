"""Several simulated Ray nodes (ray.cluster_utils.Cluster): one daemon per node, on its node."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import named_actors

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]


def test_one_daemon_per_node_on_its_node(cluster: object, ns: str) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def boot(namespace: str, index: int) -> tuple[str, str, str]:
        import ray

        import tensorcast_ray as tc

        ctx = tc.init(namespace=namespace)
        tc.put(
            {"x": __import__("torch").full((4,), float(len(ctx.node_id)))},
            key=f"task{index}:v1",
        )
        out = (ray.get_runtime_context().get_node_id(), ctx.node_id, ctx.daemon_address)
        tc.shutdown()
        return out

    # Two tasks per node, pinned by the node's custom resource.
    refs = [
        boot.options(resources={f"tc_node_{i}": 0.01}).remote(ns, 2 * i + j)
        for i in range(3)
        for j in range(2)
    ]
    results = ray.get(refs, timeout=240)
    nodes = {r[0] for r in results}
    assert len(nodes) == 3
    for task_node, daemon_node, _ in results:
        assert task_node == daemon_node, "each task must reach its own node's daemon"
    by_node = {}
    for _, node, address in results:
        by_node.setdefault(node, set()).add(address)
    assert all(len(addrs) == 1 for addrs in by_node.values())

    # Each daemon actor really runs on its node.
    for node in nodes:
        handle = ray.get_actor(f"daemon:{node}", namespace=ns)
        info = ray.get(handle.info.remote(), timeout=30)
        assert info["node_id"] == node
    assert sorted(named_actors(ns)) == sorted(["global_store", *(f"daemon:{n}" for n in nodes)])

    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorcast_ray.cli",
            "--address",
            cluster.address,  # type: ignore[attr-defined]
            "--namespace",
            ns,
            "daemon",
            "status",
            "--all",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert not [r for r in rows if "error" in r], rows
    assert sorted(r["node_id"] for r in rows) == sorted(nodes)
    for row in rows:
        assert {
            "node_id",
            "version",
            "address",
            "metrics_address",
            "uptime_s",
            "clients",
            "artifacts",
            "bytes",
        } <= set(row)
        # two tasks per node each put one 16-byte artifact on their own node's daemon
        assert row["artifacts"] == 2 and isinstance(row["bytes"], int) and row["bytes"] == 32

    gs = ray.get_actor("global_store", namespace=ns)
    gs_status = ray.get(gs.status.remote(), timeout=30)
    assert sorted(d["node_id"] for d in gs_status["daemons"]) == sorted(nodes)


def test_cli_starts_and_stops_daemons_on_all_nodes(cluster: object, ns: str) -> None:
    base = [
        sys.executable,
        "-m",
        "tensorcast_ray.cli",
        "--address",
        cluster.address,
        "--namespace",
        ns,
    ]  # type: ignore[attr-defined]
    started = subprocess.run(
        [*base, "daemon", "start", "--all-nodes"], capture_output=True, text=True, timeout=180
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.count("daemon on node") == 3
    assert len(named_actors(ns)) == 3
    stopped = subprocess.run(
        [*base, "daemon", "stop", "--all"], capture_output=True, text=True, timeout=180
    )
    assert stopped.returncode == 0, stopped.stderr
    assert not named_actors(ns)
    again = subprocess.run(
        [*base, "daemon", "stop", "--all"], capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 1 and "no tensorcast daemon" in again.stderr
