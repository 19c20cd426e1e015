"""Weight sync across simulated nodes: a Publisher on node 0, Subscribers (Ray actors) on
nodes 1 and 2. Subscribers wake on a commit elsewhere without polling (one held call each,
counted on the daemon and the Global Store), ``on_update`` fires once per version, ``pull``
is bit-exact, the publisher replicates to the subscriber nodes, two subscribers on one node
share one copy, and garbage collection keeps a version held on another node (until the hold
is released, or its holder dies) and deletes the rest."""

from __future__ import annotations

import sys
import time
import urllib.request
from typing import Any

import pytest
import ray
import ray.cloudpickle
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for
from tests.multinode.conftest import DAEMON_CONFIG, node_ids

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _model(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))


@ray.remote(num_cpus=0, max_concurrency=4)
class Peer:
    """One process on a chosen node: publishes, subscribes, holds, pulls."""

    def __init__(self, ns: str, name: str) -> None:
        import tensorcast_ray as tc

        tc.init(namespace=ns, daemon_config_path=DAEMON_CONFIG)
        self.tc = tc
        self.name = name
        self.sub = tc.weights.Subscriber(name)
        self.pub: Any = None
        self.calls: list[tuple[str, float]] = []
        self.handle: Any = None
        self.holding: Any = None
        self.waiting = 0

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def publish(
        self, seed: int, keep_last: int = 2, replicate: bool = True, zero_copy: bool = False
    ) -> tuple[str, float, dict[str, Any]]:
        """Returns the key, when publish started (before the commit) and where it went.
        ``zero_copy``: the tensors are written into fresh ``tc.empty`` buffers first."""
        if self.pub is None:
            self.pub = self.tc.weights.Publisher(self.name, keep_last=keep_last)
        self.pub.replicate = replicate
        sd = {k: v.detach().clone() for k, v in _model(seed).state_dict().items()}
        if zero_copy:
            sd = {k: self.tc.empty_like(v).copy_(v) for k, v in sd.items()}
        started = time.time()
        key = self.pub.publish(sd)
        return key, started, dict(self.pub.last_replication)

    def gc(self) -> list[str]:
        return self.pub.gc()

    def replicate_to_subscribers(self, key: str) -> dict[str, str]:
        return {n: r.status for n, r in self.tc.replicate(key, nodes="subscribers").items()}

    def latest(self) -> str | None:
        return self.sub.latest()

    def wait(self, newer_than: str | None, timeout: float) -> tuple[str, float] | str:
        self.waiting += 1
        try:
            key = self.sub.wait_for(newer_than=newer_than, timeout=timeout)
            return key, time.time()
        except self.tc.ArtifactError as exc:
            return exc.status_code.name
        finally:
            self.waiting -= 1

    def waiters(self) -> int:
        return self.waiting

    def follow(self) -> None:
        self.handle = self.sub.on_update(lambda key: self.calls.append((key, time.time())))

    def updates(self) -> list[str]:
        return [k for k, _ in self.calls]

    def unfollow(self) -> bool:
        self.handle.close()
        return self.handle.running

    def pull(self, key: str | None) -> tuple[str, bool]:
        import torch

        model = _model(999)
        got = self.sub.pull(model, key=key)
        want = _model(int(got.split(":")[1]) + 100).state_dict()  # the seed _publish used
        same = all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
        return got, same

    def hold(self, key: str) -> str:
        self.holding = self.sub.reading(key)
        concrete, _ = self.holding.__enter__()
        return concrete

    def release(self) -> None:
        self.holding.__exit__(None, None, None)
        self.holding = None

    def info(self, key: str) -> dict[str, Any]:
        info = self.tc.artifact(key).info()
        return {"replicas": sorted(info.replicas), "kinds": info.replica_kinds, "kind": info.kind}

    def exists(self, key: str) -> bool:
        return self.tc.exists(key)

    def daemon_usage(self) -> int:
        return int(self.tc.store()._call("Status", _status_request(), 10).tiers[0].used_bytes)

    def metrics(self) -> dict[str, float]:
        """This node's daemon and the Global Store, scraped over HTTP."""
        from tensorcast_ray import _bootstrap

        hello = _bootstrap.current().client.hello
        out = _scrape(hello.metrics_address, "daemon")
        gs = ray.get(
            ray.get_actor(
                "global_store", namespace=_bootstrap.current().ctx.namespace
            ).info.remote()
        )
        out.update(_scrape(gs["metrics_address"], "gs"))
        return out

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.tc.shutdown()


def _status_request() -> Any:
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    return daemon_pb2.StatusRequest()


def _scrape(address: str, prefix: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{prefix}:{s.name}{{{labels}}}"] = float(s.value)
    return out


def _peer(ns: str, name: str, node: int) -> Any:
    return Peer.options(resources={f"tc_node_{node}": 0.01}).remote(ns, name)


def _close(*peers: Any) -> None:
    ray.get([p.close.remote() for p in peers], timeout=60)
    for p in peers:
        ray.kill(p)


def _publish(pub: Any, seed_of_version: int) -> tuple[str, float, dict[str, Any]]:
    """Publish the model whose seed is ``version + 100`` (so a puller can rebuild it)."""
    return ray.get(pub.publish.remote(seed_of_version + 100), timeout=120)


def test_subscribers_on_other_nodes_wake_at_the_commit_without_polling(
    cluster: Any, ns: str
) -> None:
    pub, b, c = _peer(ns, "pol", 0), _peer(ns, "pol", 1), _peer(ns, "pol", 2)
    try:
        nodes = node_ids(cluster)
        assert ray.get([pub.node.remote(), b.node.remote(), c.node.remote()]) == nodes
        key1, _, _ = _publish(pub, 1)
        # Idle: a wait with nothing committed is one held call, not a loop of them.
        before = ray.get(b.metrics.remote())
        assert ray.get(b.wait.remote(key1, 3.0)) == "DEADLINE_EXCEEDED"
        after = ray.get(b.metrics.remote())

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        assert delta("daemon:tc_daemon_rpc_total{code=OK,method=WaitLatest}") == 1
        # The daemon's watcher holds wait_commits for up to 5 s: at most two in 3 s.
        assert 0 < delta("gs:tc_global_store_rpc_latency_seconds_count{method=wait_commits}") <= 2

        refs = [b.wait.remote(key1, 60.0), c.wait.remote(key1, 60.0)]
        wait_for(
            lambda: ray.get(b.waiters.remote()) == 1 and ray.get(c.waiters.remote()) == 1,
            30,
            "both subscribers to be waiting",
        )
        # Without replication publish returns at the commit: the wake is the notification's.
        key2, started, _ = ray.get(pub.publish.remote(102, 2, False), timeout=120)
        woke = ray.get(refs, timeout=60)
        assert [w[0] for w in woke] == [key2, key2]
        for _, at in woke:
            assert at - started < 1.0, woke  # within a second of the commit
        # A wait for a version already newer returns at once with it.
        assert ray.get(c.wait.remote(key1, 5.0))[0] == key2
    finally:
        _close(pub, b, c)


def test_on_update_fires_once_per_version_and_pull_is_bit_exact(cluster: Any, ns: str) -> None:
    pub, b, c = _peer(ns, "pol", 0), _peer(ns, "pol", 1), _peer(ns, "pol", 2)
    try:
        ray.get([b.follow.remote(), c.follow.remote()])
        keys = []
        for v in range(1, 4):
            key, _, _ = _publish(pub, v)
            keys.append(key)
            for peer in (b, c):
                wait_for(
                    lambda p=peer, n=v: len(ray.get(p.updates.remote())) >= n,
                    30,
                    f"on_update for {key}",
                )
        assert ray.get(b.updates.remote()) == keys
        assert ray.get(c.updates.remote()) == keys
        assert ray.get([b.unfollow.remote(), c.unfollow.remote()]) == [False, False]
        # pull (latest) into a module on another node: bit-exact, and the key it pulled.
        assert ray.get(c.pull.remote(None)) == (keys[-1], True)
        assert ray.get(b.pull.remote(keys[-2])) == (keys[-2], True)
    finally:
        _close(pub, b, c)


def test_publish_replicates_to_subscriber_nodes_and_a_node_keeps_one_copy(
    cluster: Any, ns: str
) -> None:
    pub = _peer(ns, "pol", 0)
    b1, b2, c = _peer(ns, "pol", 1), _peer(ns, "pol", 1), _peer(ns, "pol", 2)
    try:
        nodes = node_ids(cluster)
        # No subscriber yet: nothing to send.
        key1, _, rep1 = _publish(pub, 1)
        assert rep1 == {} or rep1.get("nodes") in (None, [])
        # Subscribers on nodes 1 and 2 look: their nodes subscribe.
        assert ray.get([b1.latest.remote(), c.latest.remote()]) == [key1, key1]
        key2, _, rep2 = _publish(pub, 2)
        assert rep2["nodes"] == sorted(nodes[1:]) and rep2["failed"] == {}
        info = ray.get(pub.info.remote(key2))
        assert info["replicas"] == sorted(nodes)
        assert info["kinds"][nodes[1]] == info["kinds"][nodes[2]] == "replica"
        # Two subscribers on node 1 reading a version that is not there yet, at once, land
        # one copy: node 1 grows by what node 2 grows with one reader.
        key3, _, _ = ray.get(pub.publish.remote(103, 2, False), timeout=120)
        before = ray.get([b1.daemon_usage.remote(), c.daemon_usage.remote()])
        pulls = [b1.pull.remote(key3), b2.pull.remote(key3), c.pull.remote(key3)]
        assert ray.get(pulls, timeout=120) == [(key3, True)] * 3
        after = ray.get([b1.daemon_usage.remote(), c.daemon_usage.remote()])
        assert after[0] - before[0] == after[1] - before[1] > 0
        assert ray.get(b1.info.remote(key3))["replicas"] == sorted(nodes)
    finally:
        _close(pub, b1, b2, c)


def test_a_zero_copy_publish_reaches_subscriber_nodes(cluster: Any, ns: str) -> None:
    """A version published from ``tc.empty`` buffers (registered, no copy on its node) is
    replicated to the subscriber nodes like any other, and pulled bit-exact there."""
    pub, b, c = _peer(ns, "zc", 0), _peer(ns, "zc", 1), _peer(ns, "zc", 2)
    try:
        nodes = node_ids(cluster)
        assert ray.get([b.latest.remote(), c.latest.remote()]) == [None, None]  # they subscribe
        key, _, rep = ray.get(pub.publish.remote(101, 2, True, True), timeout=120)
        assert rep["nodes"] == sorted(nodes[1:]) and rep["failed"] == {}, rep
        info = ray.get(pub.info.remote(key))
        assert info["kind"] == "register", info  # the publisher's own buffers, no copy
        assert info["replicas"] == sorted(nodes)
        assert ray.get([b.pull.remote(key), c.pull.remote(key)], timeout=120) == [(key, True)] * 2
    finally:
        _close(pub, b, c)


def test_gc_keeps_a_version_held_on_another_node_until_released(cluster: Any, ns: str) -> None:
    pub, b, c = _peer(ns, "pol", 0), _peer(ns, "pol", 1), _peer(ns, "pol", 2)
    try:
        k1 = ray.get(pub.publish.remote(101, 1))[0]
        assert ray.get(b.hold.remote(k1)) == k1
        k2, _, _ = _publish(pub, 2)
        k3, _, _ = _publish(pub, 3)
        # keep_last=1: k2 went; k1 is held on node 1, so it stays (readable everywhere).
        assert ray.get([c.exists.remote(k) for k in (k1, k2, k3)]) == [True, False, True]
        assert ray.get(c.pull.remote(k1)) == (k1, True)
        ray.get(b.release.remote())
        assert ray.get(pub.gc.remote()) == [k1]
        assert ray.get(c.exists.remote(k1)) is False
        # A holder that dies: its session's holds end with it, and GC goes on.
        assert ray.get(c.hold.remote(k3)) == k3
        k4, _, _ = _publish(pub, 4)
        assert ray.get(b.exists.remote(k3)) is True
        ray.kill(c)
        wait_for(lambda: ray.get(pub.gc.remote()) == [k3], 60, "the dead holder's hold to end")
        assert ray.get(b.exists.remote(k3)) is False and ray.get(b.exists.remote(k4)) is True
    finally:
        _close(pub, b)


def test_a_node_subscribes_at_once_while_its_watcher_already_runs(cluster: Any, ns: str) -> None:
    pub = _peer(ns, "fresh", 0)
    busy, late = _peer(ns, "busy", 1), _peer(ns, "fresh", 1)
    try:
        nodes = node_ids(cluster)
        key, _, _ = ray.get(pub.publish.remote(101, 2, False), timeout=120)  # nobody subscribes
        held = busy.wait.remote(None, 30.0)  # node 1's watcher runs, watching "busy" only
        wait_for(lambda: ray.get(busy.waiters.remote()) == 1, 30, "the busy subscriber to wait")
        assert ray.get(late.latest.remote()) == key  # node 1 now watches "fresh" too
        # No commit since: the watcher's held call (naming "busy" only) has not come round.
        results = ray.get(pub.replicate_to_subscribers.remote(key), timeout=120)
        assert results == {nodes[1]: "ready"}
        assert ray.get(late.info.remote(key))["kinds"][nodes[1]] == "replica"
        del held  # ends with its actor below
    finally:
        _close(pub, busy, late)
