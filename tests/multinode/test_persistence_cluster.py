"""Persistence across simulated nodes: a durable version outlives its writer's daemon and its
node (any node rehydrates it from shared disk), ``ha`` keeps a copy on another node, a
restarted Global Store recovers every durable key from its journal when the daemons that
wrote them are gone, and status / delete work from any node. Every node's daemon uses the
same persistence root (a directory on this host: simulated nodes share it)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
import yaml

from tests.helpers import wait_for
from tests.multinode.conftest import DAEMON_CONFIG, node_ids, on_node

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]

MiB = 1 << 20

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _config(tmp_path: Path, source: str, **fields: Any) -> str:
    """``source`` with ``fields`` on top; a daemon config frees a dead daemon's memory at once
    (guardian_grace_s 0: these tests kill daemons for good)."""
    data = yaml.safe_load(Path(source).read_text())
    if "persist_url" in fields:
        data["guardian_grace_s"] = 0
    data.update(fields)
    path = tmp_path / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _put_durable(tc: Any, key: str, mib: int, seed: float, profile: str = "durable") -> dict:
    import torch

    n = mib * MiB // 4 // 8
    sd = {f"layer{i}.weight": torch.arange(n, dtype=torch.float32) * seed + i for i in range(8)}
    put = tc.put(sd, key=key, policy=tc.StorePolicy(profile=profile))
    status = tc.wait_persisted(key, timeout=120)
    return {
        "task_id": put.persistence_task_id,
        "state": status.state,
        "shards": [(s.tier, s.target, s.state) for s in status.shards],
        "sums": {k: float(v.double().sum()) for k, v in sd.items()},
    }


def _put_volatile(tc: Any, key: str) -> str:
    import torch

    return tc.put({"w": torch.ones(4)}, key).key  # the cache profile: memory only


def _read(tc: Any, key: str) -> dict:
    got = tc.get(key)
    info = tc.artifact(key).info()
    return {
        "sums": {k: float(v.double().sum()) for k, v in got.items()},
        "served_by": info.served_by,
        "durable": info.durable,
    }


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _kill_daemon_for_good(ns: str, node: str) -> None:
    """Kill ``node``'s daemon with no restart and wait until its guardian freed its memory."""
    import os

    from tensorcast_ray._shm import segment_prefix

    handle = ray.get_actor(f"daemon:{node}", namespace=ns)
    ray.kill(handle, no_restart=True)
    prefix = segment_prefix(ns, node)

    def freed() -> bool:
        return not any(f.startswith(prefix) for f in os.listdir("/dev/shm"))

    wait_for(freed, 60, f"the guardian of {node[:12]} to free its shared memory")


def test_a_durable_version_outlives_its_writers_daemon(
    cluster: Any, ns: str, tmp_path: Path
) -> None:
    root = f"file://{tmp_path}/persist"
    config = _config(tmp_path, DAEMON_CONFIG, persist_url=root)
    nodes = node_ids(cluster)
    written = on_node(1, ns, _put_durable, "d:1", 4, 1.0, config=config)
    assert written["state"] == "success"
    # Another node asks for the task's status: the writer's daemon answers.
    status = on_node(2, ns, lambda tc: tc.persistence_status(key="d:1").to_dict(), config=config)
    assert status["node_id"] == nodes[1] and status["state"] == "success" and status["durable"]
    assert status["task_id"] == written["task_id"]
    inspect = on_node(0, ns, lambda tc: tc.artifact("d:1").info(), config=config)
    assert inspect.durable and inspect.persistence_state == "success"
    _kill_daemon_for_good(ns, nodes[1])
    # Its node lives, its daemon does not: node 2's pull from it fails and it reads the
    # version back from shared disk instead.
    read = on_node(2, ns, _read, "d:1", config=config)
    assert read["sums"] == written["sums"] and read["served_by"] == "disk" and read["durable"]
    # The task's daemon is gone: its status comes from what shared disk holds.
    status = on_node(0, ns, lambda tc: tc.persistence_status(key="d:1").to_dict(), config=config)
    assert status["state"] == "success" and status["durable"] and status["shards"]
    # Deleting it from any node removes its files.
    assert on_node(0, ns, lambda tc: tc.delete("d:1"), config=config)
    from tensorcast_ray._disk import list_artifacts

    assert list_artifacts(root) == []
    err = on_node(2, ns, lambda tc: _error(lambda: tc.get("d:1")), config=config)
    assert err.startswith("NotFoundError")


def test_a_durable_version_outlives_its_node(cluster: Any, ns: str, tmp_path: Path) -> None:
    root = f"file://{tmp_path}/persist"
    config = _config(tmp_path, DAEMON_CONFIG, persist_url=root)
    node = cluster.add_node(num_cpus=1, resources={"tc_node_x": 1})
    cluster.wait_for_nodes()
    try:
        written = on_node("tc_node_x", ns, _put_durable, "gone:1", 2, 3.0, config=config)
        memory_only = on_node(
            "tc_node_x",
            ns,
            lambda tc: tc.put({"w": __import__("torch").ones(4)}, "mem:1").key,
            config=config,
        )
    finally:
        cluster.remove_node(node)
    assert memory_only == "mem:1"
    x_node = node.node_id

    def node_dropped() -> bool:
        err = on_node(1, ns, lambda tc: _error(lambda: tc.get("mem:1")), config=config)
        return err.startswith("NotFoundError") and "lost" in err

    wait_for(node_dropped, 60, "the Global Store to drop the removed node")
    read = on_node(1, ns, _read, "gone:1", config=config)
    assert read["sums"] == written["sums"] and read["served_by"] == "disk"
    # The copy node 1 read back is a replica others pull from now.
    read = on_node(2, ns, _read, "gone:1", config=config)
    assert read["sums"] == written["sums"] and read["served_by"] == "object_store"
    holders = on_node(2, ns, lambda tc: tc.artifact("gone:1").info().replicas, config=config)
    assert x_node not in holders


def test_ha_keeps_a_stable_copy_on_another_node(cluster: Any, ns: str, tmp_path: Path) -> None:
    root = f"file://{tmp_path}/persist"
    config = _config(tmp_path, DAEMON_CONFIG, persist_url=root)
    nodes = node_ids(cluster)
    written = on_node(0, ns, _put_durable, "ha:1", 2, 2.0, "ha", config=config)
    assert written["state"] == "success", written
    remote = [(tier, target) for tier, target, state in written["shards"] if tier == "stable_dram"]
    assert len(remote) == 1 and remote[0][1] in nodes[1:]
    target = remote[0][1]
    info = on_node(1, ns, lambda tc: tc.artifact("ha:1").info(), config=config)
    assert info.replica_kinds.get(target) == "replica" and info.durable
    # Two remote copies asked for: both other nodes hold one.
    import dataclasses

    def two_copies(tc: Any) -> dict:
        import torch

        policy = dataclasses.replace(
            tc.StorePolicy.from_profile("ha"),
            should=(
                tc.TierSpec("stable_dram", "remote", 2),
                tc.TierSpec("stable_dram", "local"),
            ),
        )
        tc.put({"w": torch.ones(1024)}, "ha2:1", policy=policy)
        status = tc.wait_persisted("ha2:1", timeout=120)
        return {"state": status.state, "targets": [s.target for s in status.shards]}

    got = on_node(0, ns, two_copies, config=config)
    assert got["state"] == "success"
    kinds = on_node(2, ns, lambda tc: tc.artifact("ha2:1").info().replica_kinds, config=config)
    assert kinds == {nodes[0]: "original", nodes[1]: "replica", nodes[2]: "replica"}


def test_global_store_restart_recovers_durable_keys_from_its_journal(
    cluster: Any, ns: str, tmp_path: Path
) -> None:
    from tensorcast_ray._auth import namespace_token
    from tests.multinode.conftest import NODES

    root = f"file://{tmp_path}/persist"
    config = _config(tmp_path, DAEMON_CONFIG, persist_url=root)
    gs_config = _config(
        tmp_path,
        str(Path(DAEMON_CONFIG).parent / "global_store.yaml"),
        journal_url=f"file://{tmp_path}/journal",
    )
    nodes = node_ids(cluster)
    assert NODES == 3
    written = on_node(2, ns, _put_durable, "j:1", 2, 5.0, config=config, gs_config=gs_config)
    on_node(
        2,
        ns,
        lambda tc: tc.put({"w": __import__("torch").ones(2)}, "volatile:1").key,
        config=config,
    )
    _kill_daemon_for_good(ns, nodes[2])
    gs = ray.get_actor("global_store", namespace=ns)
    before = ray.get(gs.info.remote(), timeout=30)
    assert before["journal"]["configured"]
    ray.kill(gs, no_restart=False)

    def restarted() -> bool:
        try:
            info = ray.get(gs.info.remote(), timeout=5)
        except Exception:
            return False
        return info["instance_id"] != before["instance_id"] and info["rebuilt"]

    wait_for(restarted, 60, "the Global Store to restart and replay its journal")
    info = ray.get(gs.info.remote(), timeout=30)
    assert info["journal"]["restored"] >= 1
    entry = ray.get(gs.resolve.remote(namespace_token(ns), "j:1"), timeout=30)
    assert entry["durable"] and entry["replicas"] == []  # nobody holds it in memory
    read = on_node(0, ns, _read, "j:1", config=config)
    assert read["sums"] == written["sums"] and read["served_by"] == "disk"
    assert on_node(1, ns, lambda tc: tc.artifact("j:latest").key, config=config) == "j:1"
    err = on_node(1, ns, lambda tc: _error(lambda: tc.get("volatile:1")), config=config)
    assert err.startswith("NotFoundError")
