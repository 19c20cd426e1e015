"""The cluster tier on simulated nodes: one catalog, cross-node reads, replicate, node loss,
Global Store restart. Simulated nodes share this host, but every other node is remote to a
daemon: each transfer is real, and is asserted through the daemons' transfer metrics."""

from __future__ import annotations

import sys
import urllib.request
from typing import Any

import pytest
import ray.cloudpickle

from tests.helpers import wait_for
from tests.multinode.conftest import COLLECTIVE_CONFIG, DAEMON_CONFIG, node_ids, on_node

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]

MiB = 1 << 20

# Ray workers cannot import this module by pytest's name for it: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---- helpers ------------------------------------------------------------------------------
def _daemon(ns: str, node: str) -> Any:
    import ray

    return ray.get_actor(f"daemon:{node}", namespace=ns)


def _metric(ns: str, node: str, name: str, **labels: str) -> float:
    """One sample of a daemon's /metrics, scraped over HTTP (0 when the series is absent or
    the node runs no daemon yet)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    if not _has_daemon(ns, node):
        return 0.0
    address = ray.get(_daemon(ns, node).info.remote(), timeout=30)["metrics_address"]
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _bytes_in(ns: str, node: str, transport: str = "object_store") -> float:
    return _metric(ns, node, "tc_transfer_bytes_total", direction="in", transport=transport)


def _bytes_out(ns: str, node: str, transport: str = "object_store") -> float:
    return _metric(ns, node, "tc_transfer_bytes_total", direction="out", transport=transport)


def _put(tc: Any, key: str, mib: int, seed: float = 1.0, tensors: int = 8) -> dict[str, Any]:
    """A state dict of ``tensors`` float32 tensors, ``mib`` MiB in all; returns its
    checksums and the put's result fields."""
    import torch

    n = mib * MiB // 4 // tensors
    base = torch.arange(n, dtype=torch.float32) * seed
    sd = {f"layer{i}.weight": base + i for i in range(tensors)}
    result = tc.put(sd, key=key)
    return {
        "key": result.key,
        "nbytes": result.nbytes,
        "sums": {k: float(v.double().sum()) for k, v in sd.items()},
    }


def _sums(tc: Any, key: str) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in tc.get(key).items()}


def _error(fn: Any) -> str:
    """Run ``fn`` and return the tensorcast error's class name and message ("" if none)."""
    try:
        fn()
    except Exception as exc:  # an ArtifactError, pickled back from the task
        return f"{type(exc).__name__}: {exc}"
    return ""


# ---- one catalog --------------------------------------------------------------------------
def test_read_your_writes_from_every_node(cluster: Any, ns: str) -> None:
    nodes = node_ids(cluster)
    written = on_node(0, ns, _put, "rw:1", 4)
    written_b = on_node(1, ns, _put, "rwb:1", 2, 3.0)

    def look(tc: Any, keys: list[str]) -> dict[str, Any]:
        return {
            "exists": [tc.exists(k) for k in keys],
            "keys": tc.list_keys("rw"),
            "sums": {k: _sums(tc, k) for k in keys},
        }

    for i in range(3):
        seen = on_node(i, ns, look, ["rw:1", "rwb:1"])
        assert seen["exists"] == [True, True]
        assert seen["keys"] == ["rw:1", "rwb:1"]
        assert seen["sums"]["rw:1"] == written["sums"]
        assert seen["sums"]["rwb:1"] == written_b["sums"]
    # Node 2 held neither: it pulled both, each once.
    assert _bytes_in(ns, nodes[2]) >= written["nbytes"] + written_b["nbytes"]
    assert _bytes_in(ns, nodes[0]) >= written_b["nbytes"]


def test_versions_are_immutable_cluster_wide(cluster: Any, ns: str) -> None:
    written = on_node(0, ns, _put, "imm:2", 1)

    def overwrite(tc: Any) -> str:
        return _error(lambda: _put(tc, "imm:2", 1, seed=7.0))

    err = on_node(1, ns, overwrite)
    assert err.startswith("AlreadyExistsError") and "imm:2" in err and "immutable" in err
    # Nothing lost: every node reads the first write's bytes.
    for i in range(3):
        assert on_node(i, ns, _sums, "imm:2") == written["sums"]


def test_latest_is_cluster_commit_order(cluster: Any, ns: str) -> None:
    # Written on three nodes, in this order, with versions that do not sort lexically.
    on_node(0, ns, _put, "lat:b", 1, 1.0)
    on_node(1, ns, _put, "lat:c", 1, 2.0)
    third = on_node(2, ns, _put, "lat:a", 1, 3.0)

    def latest(tc: Any) -> tuple[str, dict[str, float]]:
        art = tc.artifact("lat:latest")
        return art.key, {k: float(v.double().sum()) for k, v in art.tensor_dict().items()}

    for i in range(3):
        key, sums = on_node(i, ns, latest)
        assert key == "lat:a"
        assert sums == third["sums"]


# ---- cross-node reads -----------------------------------------------------------------------
def test_remote_get_lands_one_copy_that_local_readers_map(cluster: Any, ns: str) -> None:
    import ray

    nodes = node_ids(cluster)
    written = on_node(0, ns, _put, "rg:1", 8)
    assert _bytes_in(ns, nodes[1]) == 0

    def first_read(tc: Any) -> dict[str, Any]:
        art = tc.artifact("rg:1")
        sums = {k: float(v.double().sum()) for k, v in art.tensor_dict().items()}
        info = art.info()
        return {"sums": sums, "served_by": info.served_by, "replicas": info.replica_kinds}

    seen = on_node(1, ns, first_read)
    assert seen["sums"] == written["sums"]
    assert seen["served_by"] == "object_store"
    assert seen["replicas"] == {nodes[0]: "original", nodes[1]: "cache"}
    pulled = _bytes_in(ns, nodes[1])
    assert written["nbytes"] <= pulled < written["nbytes"] + MiB  # the bytes, once
    assert _bytes_out(ns, nodes[0]) == pulled

    @ray.remote(num_cpus=0)
    def reader(namespace: str) -> dict[str, Any]:
        import tensorcast_ray as tc
        from tensorcast_ray._read_cache import in_read_only_mapping

        tc.init(namespace=namespace, daemon_config_path=DAEMON_CONFIG)
        try:
            art = tc.artifact("rg:1")
            tensors = art.tensor_dict()
            return {
                "sums": {k: float(v.double().sum()) for k, v in tensors.items()},
                "zero_copy": all(in_read_only_mapping(t) for t in tensors.values()),
                "served_by": art.info().served_by,
            }
        finally:
            tc.shutdown()

    refs = [reader.options(resources={"tc_node_1": 0.01}).remote(ns) for _ in range(4)]
    for out in ray.get(refs, timeout=240):
        assert out["sums"] == written["sums"]
        assert out["zero_copy"], "a reader on the node must map the replica, not copy it"
        assert out["served_by"] == "local"
    assert _bytes_in(ns, nodes[1]) == pulled, "later readers on the node move no bytes"
    status = ray.get(_daemon(ns, nodes[1]).status.remote(), timeout=30)
    assert int(status["bytes"]) == written["nbytes"], "one copy on the node, whatever N"


def _has_daemon(ns: str, node: str) -> bool:
    import ray

    try:
        ray.get_actor(f"daemon:{node}", namespace=ns)
    except ValueError:
        return False
    return True


def test_concurrent_gets_cause_one_transfer(cluster: Any, ns: str) -> None:
    import ray

    nodes = node_ids(cluster)
    written = on_node(0, ns, _put, "cc:1", 8)
    on_node(2, ns, lambda tc: tc.exists("cc:1"))  # the node's daemon runs; nothing pulled
    assert _bytes_in(ns, nodes[2]) == 0

    @ray.remote(num_cpus=0)
    def reader(namespace: str) -> dict[str, float]:
        import tensorcast_ray as tc

        tc.init(namespace=namespace, daemon_config_path=DAEMON_CONFIG)
        try:
            return {k: float(v.double().sum()) for k, v in tc.get("cc:1").items()}
        finally:
            tc.shutdown()

    refs = [reader.options(resources={"tc_node_2": 0.01}).remote(ns) for _ in range(4)]
    assert all(out == written["sums"] for out in ray.get(refs, timeout=240))
    assert written["nbytes"] <= _bytes_in(ns, nodes[2]) < written["nbytes"] + MiB
    assert _metric(ns, nodes[2], "tc_transfers_total", transport="object_store", result="ok") == 1


def test_views_and_get_into_move_only_their_bytes(cluster: Any, ns: str) -> None:
    nodes = node_ids(cluster)

    def put_two(tc: Any) -> int:
        import torch

        big = torch.arange(1024 * 1024, dtype=torch.float32).reshape(1024, 1024)  # 4 MiB
        small = torch.full((256,), 5.0)
        return int(tc.put({"big": big, "small": small}, key="sl:1").nbytes)

    on_node(0, ns, put_two)
    on_node(1, ns, lambda tc: tc.exists("sl:1"))
    before = _bytes_in(ns, nodes[1])

    def read_rows(tc: Any) -> dict[str, Any]:
        art = tc.artifact("sl:1")
        rows = art.view({"big": (slice(10, 26),)}).tensor_dict(names=["big"])["big"]
        return {
            "shape": list(rows.shape),
            "first": float(rows[0, 0]),
            "last": float(rows[-1, -1]),
            "local": art.info().local,
        }

    rows = on_node(1, ns, read_rows)
    assert rows["shape"] == [16, 1024]
    assert rows["first"] == 10 * 1024 and rows["last"] == 26 * 1024 - 1
    assert rows["local"] is False, "a partial read makes no replica"
    assert _bytes_in(ns, nodes[1]) - before == 16 * 1024 * 4

    def read_small(tc: Any) -> list[float]:
        import torch

        target = {"small": torch.zeros(256)}
        tc.get_into("sl:1", target)
        return [float(target["small"].min()), float(target["small"].max())]

    assert on_node(1, ns, read_small) == [5.0, 5.0]
    assert _bytes_in(ns, nodes[1]) - before == 16 * 1024 * 4 + 256 * 4


def test_reads_over_the_collective(cluster: Any, ns: str) -> None:
    nodes = node_ids(cluster)
    written = on_node(0, ns, _put, "rc:1", 4, config=COLLECTIVE_CONFIG)

    def read(tc: Any) -> tuple[dict[str, float], str | None]:
        art = tc.artifact("rc:1")
        sums = {k: float(v.double().sum()) for k, v in art.tensor_dict().items()}
        return sums, art.info().served_by

    sums, served = on_node(1, ns, read, config=COLLECTIVE_CONFIG)
    assert sums == written["sums"] and served == "collective"
    assert written["nbytes"] <= _bytes_in(ns, nodes[1], "collective") < written["nbytes"] + MiB
    assert _bytes_in(ns, nodes[1], "object_store") == 0
    assert _bytes_out(ns, nodes[0], "collective") == _bytes_in(ns, nodes[1], "collective")
    # A second reader on the node maps the copy: nothing moves.
    assert on_node(1, ns, read, config=COLLECTIVE_CONFIG) == (written["sums"], "local")
    assert _bytes_in(ns, nodes[1], "collective") < written["nbytes"] + MiB


def test_read_ranges_refuses_bytes_outside_the_artifact(cluster: Any, ns: str) -> None:
    import ray

    nodes = node_ids(cluster)
    on_node(0, ns, _put, "rr:1", 1)

    def hostile(tc: Any) -> list[str]:
        from tensorcast_ray import _bootstrap
        from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

        artifact_id = tc.artifact("rr:1").artifact_id
        client = _bootstrap.current().client

        def ask(segment: int, offset: int, length: int) -> str:
            request = daemon_pb2.ReadRangesRequest(
                artifact_id=artifact_id, segment=[segment], offset=[offset], length=[length]
            )
            return _error(lambda: client.call("ReadRanges", request, timeout=60))

        return [ask(5, 0, 16), ask(0, 1 << 40, 16), ask(0, 0, -1), ask(0, 0, 0)]

    errors = on_node(1, ns, hostile)
    assert all(e.startswith("InvalidArgumentError") for e in errors), errors
    status = ray.get(_daemon(ns, nodes[1]).status.remote(), timeout=30)
    assert int(status["leases"]) == 0, "a refused read leaves no buffer leased"


def test_read_sources(cluster: Any, ns: str) -> None:
    nodes = node_ids(cluster)
    on_node(0, ns, _put, "src:1", 1)

    def read(tc: Any, source: str) -> str:
        store = tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source=source)))
        return _error(lambda: store.get("src:1"))

    err = on_node(1, ns, read, "local_only")
    assert err.startswith("NotFoundError") and nodes[0] in err and "local_only" in err
    assert _bytes_in(ns, nodes[1]) == 0
    err = on_node(0, ns, read, "remote")
    assert err.startswith("NotFoundError") and "only this node" in err
    assert on_node(1, ns, read, "remote") == ""
    assert _bytes_in(ns, nodes[1]) >= MiB
    assert on_node(1, ns, read, "local_only") == ""  # the replica is now local
    assert on_node(1, ns, read, "disk") == ""  # a disk read of a copy here: that copy
    err = on_node(2, ns, read, "disk")  # none here, and these daemons have no persist_url
    assert err.startswith("FailedPreconditionError") and "persistence" in err


# ---- replicate --------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_replicate_to_all_nodes_sends_the_bytes_once(cluster: Any, ns: str, transport: str) -> None:
    nodes = node_ids(cluster)
    written = on_node(0, ns, _put, f"rep-{transport}:1", 8)

    def replicate(tc: Any) -> dict[str, Any]:
        return {n: vars(r) for n, r in tc.replicate(f"rep-{transport}:1", "all", transport).items()}

    results = on_node(0, ns, replicate)
    assert results[nodes[0]]["status"] == "ready" and results[nodes[0]]["transport"] == ""
    for node in nodes[1:]:
        assert results[node]["status"] == "ready", results[node]
        assert results[node]["transport"] == transport
        assert written["nbytes"] <= _bytes_in(ns, node, transport) < written["nbytes"] + MiB
    sent = _bytes_out(ns, nodes[0], transport)
    assert sent <= 1.5 * written["nbytes"], "the source sends about once for 2 targets"

    def check(tc: Any) -> tuple[dict[str, float], str | None, str | None]:
        art = tc.artifact(f"rep-{transport}:1")
        sums = {k: float(v.double().sum()) for k, v in art.tensor_dict().items()}
        info = art.info()
        return sums, info.local_kind, info.served_by

    for i in (1, 2):
        sums, kind, served = on_node(i, ns, check)
        assert sums == written["sums"] and kind == "replica" and served == "local"
    assert _bytes_out(ns, nodes[0], transport) == sent, "reads of replicas move nothing"


def test_replicate_bad_requests(cluster: Any, ns: str) -> None:
    on_node(0, ns, _put, "repbad:1", 1)

    def attempt(tc: Any) -> list[Any]:
        return [
            _error(lambda: tc.replicate("repbad:1", transport="carrier-pigeon")),
            _error(lambda: tc.replicate("repbad:1", nodes="everyone")),
            _error(lambda: tc.replicate("nothere:1")),
            {n: vars(r) for n, r in tc.replicate("repbad:1", ["f" * 56]).items()},
        ]

    bad_transport, bad_nodes, missing, unknown_node = on_node(0, ns, attempt)
    assert bad_transport.startswith("InvalidArgumentError")
    assert bad_nodes.startswith("InvalidArgumentError")
    assert missing.startswith("NotFoundError")
    assert unknown_node["f" * 56]["status"] == "failed"
    assert "not alive" in unknown_node["f" * 56]["reason"]


# ---- a register of tc.empty buffers ---------------------------------------------------------
def test_a_register_of_tc_empty_buffers_moves_like_a_put_and_ends_with_its_producer(
    cluster: Any, ns: str
) -> None:
    """A zero-copy register (its bytes in the producer's ``tc.empty`` buffers, one tensor a
    slice of a larger buffer) is read, viewed and replicated on other nodes from the buffers'
    bytes, moving them once per node; when the producer exits, its buffers and every copy go."""
    import ray

    nodes = node_ids(cluster)

    @ray.remote(num_cpus=0, max_restarts=0)
    class Producer:
        def __init__(self, namespace: str) -> None:
            import tensorcast_ray as tc

            tc.init(namespace=namespace, daemon_config_path=DAEMON_CONFIG)
            self.tc = tc

        def register(self, key: str) -> dict[str, Any]:
            import torch

            sd = {}
            for i in range(6):
                t = self.tc.empty((MiB // 4,), torch.float32)  # 1 MiB each
                t.copy_(torch.arange(t.numel(), dtype=torch.float32) * (i + 1))
                sd[f"layer{i}.weight"] = t
            big = self.tc.empty((2, MiB // 4), torch.float32)
            big[0].fill_(3.0)
            big[1].fill_(-1.0)
            sd["head.weight"] = big[1]  # a slice: only its bytes belong to the version
            result = self.tc.register(sd, key=key)
            self.sd = sd  # the producer keeps its buffers
            return {
                "nbytes": result.nbytes,
                "sums": {k: float(v.double().sum()) for k, v in sd.items()},
            }

    producer = Producer.options(resources={"tc_node_0": 0.01}).remote(ns)
    try:
        written = ray.get(producer.register.remote("emp:1"), timeout=120)
        assert written["nbytes"] == 7 * MiB

        def read(tc: Any) -> dict[str, Any]:
            from tensorcast_ray._read_cache import in_read_only_mapping

            art = tc.artifact("emp:1")
            tensors = art.tensor_dict()
            served_by = art.info().served_by  # by this read (the next one finds a copy here)
            head = tc.get("emp:1", names=["head.weight"])["head.weight"]
            return {
                "sums": {k: float(v.double().sum()) for k, v in tensors.items()},
                "head": float(head.double().sum()),
                "zero_copy": all(in_read_only_mapping(t) for t in tensors.values()),
                "served_by": served_by,
            }

        far = on_node(1, ns, read)
        assert far["sums"] == written["sums"] and far["head"] == -float(MiB // 4)
        assert far["served_by"] == "object_store" and far["zero_copy"]
        # the buffers' bytes, once: the slice's whole buffer (8 MiB in all) and no more
        assert 7 * MiB <= _bytes_in(ns, nodes[1]) <= 8 * MiB + MiB
        again = on_node(1, ns, read)
        assert again["sums"] == written["sums"] and again["served_by"] == "local"

        def replicate(tc: Any) -> dict[str, Any]:
            return {n: vars(r) for n, r in tc.replicate("emp:1", [nodes[2]]).items()}

        result = on_node(0, ns, replicate)[nodes[2]]
        assert result["status"] == "ready", result
        there = on_node(2, ns, read)
        assert there["sums"] == written["sums"] and there["served_by"] == "local"
    finally:
        ray.kill(producer)

    # The producer's lease ends with it: the version and its copy on every node go.
    def gone(tc: Any) -> list[Any]:
        return [tc.exists("emp:1"), _error(lambda: tc.get("emp:1"))]

    def no_artifacts(node: str) -> bool:
        return int(ray.get(_daemon(ns, node).status.remote(), timeout=30)["artifacts"]) == 0

    for node in nodes:
        wait_for(lambda node=node: no_artifacts(node), 60, f"node {node[:12]} to drop emp:1")
    for i in range(3):
        exists, err = on_node(i, ns, gone)
        assert exists is False and err.startswith("NotFoundError"), (i, err)


# ---- delete ---------------------------------------------------------------------------------
def test_delete_removes_every_replica_and_keeps_held_tensors(cluster: Any, ns: str) -> None:
    import ray

    nodes = node_ids(cluster)
    written = on_node(0, ns, _put, "del:1", 2)

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, namespace: str) -> None:
            import tensorcast_ray as tc

            tc.init(namespace=namespace, daemon_config_path=DAEMON_CONFIG)
            self.tc = tc
            self.held = tc.get("del:1")

        def sums(self) -> dict[str, float]:
            return {k: float(v.double().sum()) for k, v in self.held.items()}

        def close(self) -> None:
            self.held = {}
            self.tc.shutdown()

    holder = Holder.options(resources={"tc_node_1": 0.01}).remote(ns)
    assert ray.get(holder.sums.remote(), timeout=120) == written["sums"]
    on_node(2, ns, _sums, "del:1")  # a third copy

    def delete(tc: Any) -> bool:
        return bool(tc.delete("del:1"))

    assert on_node(2, ns, delete)

    def gone(tc: Any) -> list[Any]:
        return [tc.exists("del:1"), tc.list_keys("del"), _error(lambda: tc.get("del:1"))]

    for i in range(3):
        exists, keys, err = on_node(i, ns, gone)
        assert exists is False and keys == [] and err.startswith("NotFoundError")
    for node in nodes:
        assert int(ray.get(_daemon(ns, node).status.remote(), timeout=30)["artifacts"]) == 0
    # A reader's tensors stay valid after the delete.
    assert ray.get(holder.sums.remote(), timeout=60) == written["sums"]
    ray.get(holder.close.remote(), timeout=60)
    ray.kill(holder)


# ---- authentication ---------------------------------------------------------------------------
def test_cluster_calls_need_the_namespace_token(cluster: Any, ns: str) -> None:
    import ray

    nodes = node_ids(cluster)
    on_node(0, ns, _put, "auth:1", 1)
    gs = ray.get_actor("global_store", namespace=ns)
    for call in (
        lambda: gs.resolve.remote("not-the-token", "auth:1"),
        lambda: gs.delete.remote("", "auth:1", nodes[0]),
        lambda: _daemon(ns, nodes[0]).transfer_open.remote("wrong", "x", 0.0),
        lambda: _daemon(ns, nodes[0]).drop_artifacts.remote("wrong", ["x"]),
    ):
        with pytest.raises(Exception) as info:
            ray.get(call(), timeout=30)
        assert "UNAUTHENTICATED" in str(info.value) or "token" in str(info.value)
    assert on_node(1, ns, _sums, "auth:1")  # nothing was dropped


# ---- node loss ------------------------------------------------------------------------------
def test_node_loss(cluster: Any, ns: str) -> None:
    import ray

    node = cluster.add_node(num_cpus=1, resources={"tc_node_x": 1})
    cluster.wait_for_nodes()
    try:
        lost = on_node("tc_node_x", ns, _put, "lost:1", 1)
        kept = on_node("tc_node_x", ns, _put, "kept:1", 2, 2.0)
        assert on_node(0, ns, _sums, "kept:1") == kept["sums"]  # a copy on node 0
        x_node = node.node_id
        gs = ray.get_actor("global_store", namespace=ns)
        gs_before = ray.get(gs.info.remote(), timeout=30)
    finally:
        cluster.remove_node(node)
    from tensorcast_ray._auth import namespace_token

    token = namespace_token(ns)

    def replicas_gone() -> bool:
        entry = ray.get(gs.resolve.remote(token, "kept:1"), timeout=30)
        holders = [r["node_id"] for r in entry["replicas"]]
        assert holders, "the copy on node 0 must survive"
        return x_node not in holders

    # At once, before the Global Store hears of the loss: node 1's pull tries the lost
    # original first, fails, and finishes from node 0's copy (nothing half-written shows).
    assert on_node(1, ns, _sums, "kept:1") == kept["sums"]
    # Ray declares the node dead in ~2 s here; the Global Store drops it within 10 s more.
    wait_for(replicas_gone, 30, "the lost node's replicas to be dropped")
    assert on_node(2, ns, _sums, "kept:1") == kept["sums"]
    gs_after = ray.get(gs.info.remote(), timeout=30)
    assert gs_after["instance_id"] == gs_before["instance_id"], (gs_before, gs_after)
    err = on_node(1, ns, lambda tc: _error(lambda: tc.get("lost:1")))
    assert err.startswith("NotFoundError") and x_node in err and "lost" in err
    assert lost["key"] == "lost:1"


def test_a_daemon_that_stops_takes_its_copies_out_of_the_catalog(cluster: Any, ns: str) -> None:
    import ray

    nodes = node_ids(cluster)
    on_node(2, ns, _put, "solo:1", 1)
    both = on_node(2, ns, _put, "both:1", 1, 2.0)
    assert on_node(0, ns, _sums, "both:1") == both["sums"]
    handle = _daemon(ns, nodes[2])
    ray.get(handle.stop.remote(), timeout=60)  # a clean stop (tensorcast-ray daemon stop)
    ray.kill(handle, no_restart=True)
    err = on_node(1, ns, lambda tc: _error(lambda: tc.get("solo:1")))
    assert err.startswith("NotFoundError") and "lost" in err and nodes[2] in err
    assert on_node(1, ns, _sums, "both:1") == both["sums"]  # from node 0's copy
    assert on_node(1, ns, lambda tc: tc.list_keys("solo")) == []


# ---- Global Store restart -----------------------------------------------------------------------
def test_global_store_restart_rebuilds_the_catalog(cluster: Any, ns: str) -> None:
    import ray

    nodes = node_ids(cluster)
    first = on_node(0, ns, _put, "gsr:1", 1, 1.0)
    second = on_node(1, ns, _put, "gsr:2", 1, 2.0)
    on_node(2, ns, _sums, "gsr:1")  # a cache copy on node 2
    gs = ray.get_actor("global_store", namespace=ns)
    before = ray.get(gs.info.remote(), timeout=30)["instance_id"]
    ray.kill(gs, no_restart=False)
    # Local reads go on while it restarts (explicit versions need no Global Store).
    assert on_node(0, ns, _sums, "gsr:1") == first["sums"]

    def restarted() -> bool:
        try:
            info = ray.get(gs.info.remote(), timeout=5)
        except Exception:
            return False
        return info["instance_id"] != before and info["rebuilt"]

    wait_for(restarted, 60, "the Global Store to restart and rebuild")
    from tensorcast_ray._auth import namespace_token

    token = namespace_token(ns)
    entries = {e["key"]: e for e in ray.get(gs.list_artifacts.remote(token, "gsr"), timeout=30)}
    assert sorted(entries) == ["gsr:1", "gsr:2"]
    assert {r["node_id"] for r in entries["gsr:1"]["replicas"]} == {nodes[0], nodes[2]}
    for i in range(3):
        key, _ = on_node(i, ns, lambda tc: (tc.artifact("gsr:latest").key, None))
        assert key == "gsr:2", "latest keeps its answer across the restart"
        assert on_node(i, ns, _sums, "gsr:2") == second["sums"]
    err = on_node(1, ns, lambda tc: _error(lambda: _put(tc, "gsr:1", 1)))
    assert err.startswith("AlreadyExistsError")
