"""Weight sync on one node (a real local Ray and daemon, no Global Store): Publisher versions
and ``latest``, a Subscriber woken by a publish from another process (one held call, counted
on the daemon's metrics endpoint), ``on_update`` once per version, ``pull`` into a module
bit-exact with every check before the first copy, zero-copy publish of ``tc.empty`` tensors,
and garbage collection that keeps a held version until its reader releases it, its hold's
ttl passes, or its process dies. The cluster cases are in
tests/multinode/test_weights_cluster.py."""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from typing import Any

import grpc
import pytest
import ray
import ray.cloudpickle
import torch
from prometheus_client.parser import text_string_to_metric_families

import tensorcast_ray as tc
from tensorcast_ray import _bootstrap
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

IA = grpc.StatusCode.INVALID_ARGUMENT


def _init(namespace: str) -> None:
    tc.init(namespace=namespace, global_store_mode="none")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)
    )


def _sd(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _model(seed).state_dict().items()}


def _daemon_metric(name: str, **labels: str) -> float:
    """One sample of this node's daemon metrics, scraped over HTTP (0 when absent)."""
    address = _bootstrap.current().client.hello.metrics_address
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def _wait_rpcs() -> float:
    return _daemon_metric("tc_daemon_rpc_total", method="WaitLatest", code="OK")


@ray.remote(num_cpus=0, max_concurrency=2)
class Other:
    """Another process on this node."""

    def __init__(self, namespace: str) -> None:
        tc.init(namespace=namespace, global_store_mode="none")
        self.holding: Any = None

    def publish(self, name: str, seed: int) -> tuple[str, float]:
        key = tc.weights.Publisher(name, keep_last=100).publish(_sd(seed))
        return key, time.monotonic()

    def hold(self, key: str) -> str:
        self.holding = tc.weights.Subscriber(key.split(":")[0]).reading(key)
        return self.holding.__enter__()[0]


def test_wait_for_wakes_at_a_publish_in_another_process_with_one_held_call(
    namespace: str,
) -> None:
    _init(namespace)
    other = Other.remote(namespace)
    try:
        sub = tc.weights.Subscriber("pol")
        assert sub.latest() is None
        # Idle: nothing committed for 2 s is one held call on the daemon, not a loop.
        before = _wait_rpcs()
        with pytest.raises(tc.DeadlineExceededError, match="no version of 'pol'"):
            sub.wait_for(timeout=2.0)
        assert _wait_rpcs() - before == 1
        woke: list[tuple[str, float]] = []

        t = threading.Thread(
            target=lambda: woke.append((sub.wait_for(timeout=60), time.monotonic()))
        )
        t.start()
        wait_for(lambda: _daemon_metric("tc_daemon_weight_waiters") == 1, 10, "the wait to be held")
        key, published_at = ray.get(other.publish.remote("pol", 1))
        t.join(60)
        assert woke and woke[0][0] == key == "pol:1"
        assert woke[0][1] - published_at < 1.0
        assert sub.seen == "pol:1" and sub.latest() == "pol:1"
        # A version already newer than the one named: at once.
        key2, _ = ray.get(other.publish.remote("pol", 2))
        assert sub.wait_for(newer_than="pol:1", timeout=5) == key2
        with pytest.raises(tc.DeadlineExceededError):
            sub.wait_for(timeout=0.3)  # seen is pol:2, nothing newer
    finally:
        ray.kill(other)


def test_publisher_numbers_versions_and_moves_latest(namespace: str) -> None:
    _init(namespace)
    pub = tc.weights.Publisher("lm", keep_last=10)
    assert pub.publish(_sd(1)) == "lm:1"
    assert pub.publish(_sd(2)) == "lm:2"
    assert tc.artifact("lm:latest").key == "lm:2"
    assert pub.publish(_sd(3), version=10) == "lm:10"
    with pytest.raises(tc.InvalidArgumentError, match="must increase") as err:
        pub.publish(_sd(3), version=5)
    assert err.value.status_code == IA
    assert pub.publish(_sd(4), version="final") == "lm:final"
    assert tc.artifact("lm:latest").key == "lm:final"  # latest is commit order
    assert pub.publish(_sd(5)) == "lm:11"
    # A new publisher (a restarted trainer) continues after what the store holds.
    assert tc.weights.Publisher("lm", keep_last=10).publish(_sd(6)) == "lm:12"
    assert tc.get("lm:12")["0.weight"].equal(_sd(6)["0.weight"])
    for bad, match in [
        (lambda: tc.weights.Publisher("lm:1"), "without a version"),
        (lambda: tc.weights.Publisher("lm", keep_last=0), "keep_last"),
        (lambda: pub.publish([1, 2]), "mapping"),  # type: ignore[arg-type]
        (lambda: pub.publish(_sd(1), version=1.5), "version must be"),  # type: ignore[arg-type]
        (lambda: tc.weights.Subscriber("lm").wait_for(timeout=-1), "timeout"),
        (lambda: tc.weights.Subscriber("lm").wait_for(newer_than="other:1"), "not a version"),
    ]:
        with pytest.raises(tc.InvalidArgumentError, match=match):
            bad()
    assert tc.list_keys("lm:") == sorted(["lm:1", "lm:2", "lm:10", "lm:final", "lm:11", "lm:12"])


def test_gc_keeps_held_versions_and_deletes_the_rest(namespace: str) -> None:
    _init(namespace)
    pub = tc.weights.Publisher("g", keep_last=2)
    sub = tc.weights.Subscriber("g")
    for i in range(1, 4):
        pub.publish(_sd(i))
    assert tc.list_keys("g:") == ["g:2", "g:3"] and pub.versions == ["g:2", "g:3"]
    with sub.reading() as (held, tensors):
        assert held == "g:3"
        assert tensors["0.weight"].equal(_sd(3)["0.weight"])
        pub.publish(_sd(4))
        pub.publish(_sd(5))
        # g:2 and g:3 are beyond keep_last; g:3 is held, so only g:2 went.
        assert tc.list_keys("g:") == ["g:3", "g:4", "g:5"]
        with pytest.raises(tc.FailedPreconditionError, match="held by 1 reader"):
            tc.delete("g:3", unless_held=True)
    assert pub.gc() == ["g:3"]
    assert tc.list_keys("g:") == ["g:4", "g:5"]
    # A hold whose reader never releases it ends at its ttl.
    short = tc.weights.Subscriber("g", hold_ttl_s=1.0)
    ctx = short.reading("g:4")
    assert ctx.__enter__()[0] == "g:4"
    pub.publish(_sd(6))
    assert tc.exists("g:4")
    wait_for(lambda: pub.gc() == ["g:4"], 30, "the hold's ttl to pass")
    # A reader process that dies: its holds end with its session.
    other = Other.remote(namespace)
    assert ray.get(other.hold.remote("g:5")) == "g:5"
    pub.publish(_sd(7))
    assert tc.exists("g:5") and pub.gc() == []
    ray.kill(other)
    wait_for(lambda: pub.gc() == ["g:5"], 60, "the dead reader's hold to end")
    assert tc.list_keys("g:") == ["g:6", "g:7"]
    ctx.__exit__(None, None, None)  # released after its ttl: nothing to do, no error


def test_pull_checks_everything_before_copying_and_is_bit_exact(namespace: str) -> None:
    _init(namespace)
    pub = tc.weights.Publisher("m")
    sub = tc.weights.Subscriber("m")
    key = pub.publish(_sd(1))
    model = _model(7)
    assert sub.pull(model) == key and sub.seen == key
    for k, v in model.state_dict().items():
        assert v.equal(_sd(1)[k]), k
    # A shape mismatch names the tensor and copies nothing (not even the tensors before it).
    pub.publish({**_sd(2), "2.weight": torch.zeros(5, 32)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tc.InvalidArgumentError, match=r"'2\.weight'") as err:
        sub.pull(model)
    assert err.value.status_code == IA
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
    # A version missing one of the module's tensors is refused unless names= says so.
    pub.publish({k: v for k, v in _sd(3).items() if k != "1.bias"})
    with pytest.raises(tc.InvalidArgumentError, match="does not hold 1 of the target"):
        sub.pull(model)
    names = ["0.weight", "0.bias"]
    assert sub.pull(model, names=names) == "m:3"
    assert model[0].weight.equal(_sd(3)["0.weight"]) and model[1].bias.equal(before["1.bias"])
    # rename: the version's names → the target's; a dict of tensors as the target.
    target = {"w": torch.empty(32, 16), "b": torch.empty(32)}
    sub.pull(target, names=names, rename={"0.weight": "w", "0.bias": "b"})
    assert target["w"].equal(_sd(3)["0.weight"]) and target["b"].equal(_sd(3)["0.bias"])
    with pytest.raises(tc.InvalidArgumentError, match="no tensor named 'nope'"):
        sub.pull(target, names=["nope"])
    with pytest.raises(tc.InvalidArgumentError, match=r"target has no tensor named '0\.weight'"):
        sub.pull(target, names=names)
    with pytest.raises(tc.InvalidArgumentError, match=r"torch\.nn\.Module or a dict"):
        sub.pull([1, 2])
    with pytest.raises(tc.NotFoundError):
        sub.pull(model, key="m:99")
    # Tied weights: one storage under two names is covered through either.
    tied = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    tied[1].weight = tied[0].weight
    tk = tc.weights.Publisher("tied").publish({"0.weight": torch.randn(8, 4)})
    assert tc.weights.Subscriber("tied").pull(tied) == tk
    assert tied[1].weight.equal(tc.get(tk)["0.weight"])


def test_on_update_once_per_version_and_close(namespace: str) -> None:
    _init(namespace)
    pub = tc.weights.Publisher("u", keep_last=10)
    first = pub.publish(_sd(0))
    sub = tc.weights.Subscriber("u")
    seen: list[str] = []
    current: list[str] = []
    handle = sub.on_update(seen.append)
    with sub.on_update(current.append, include_current=True) as h2:
        wait_for(lambda: current == [first], 10, "the current version")
        keys = []
        for i in range(1, 4):
            keys.append(pub.publish(_sd(i)))
            wait_for(lambda n=i: len(seen) >= n, 10, f"on_update {i}")
        assert seen == keys
        wait_for(lambda: current == [first, *keys], 10, "the second handle")
    assert not h2.running
    handle.close()
    assert not handle.running
    pub.publish(_sd(9))
    assert seen == keys  # closed: no more calls
    # A failing callback is logged and the handle goes on.
    calls: list[str] = []

    def flaky(key: str) -> None:
        calls.append(key)
        raise RuntimeError("boom")

    with sub.on_update(flaky) as h3:
        k1 = pub.publish(_sd(10))
        wait_for(lambda: calls == [k1], 10, "the first call")
        k2 = pub.publish(_sd(11))
        wait_for(lambda: calls == [k1, k2], 10, "the call after a failure")
        assert h3.running


def test_publish_of_tc_empty_tensors_registers_them_without_a_copy(namespace: str) -> None:
    _init(namespace)
    sd = {}
    for k, v in _sd(1).items():
        t = tc.empty(v.shape, dtype=v.dtype)
        t.copy_(v)
        sd[k] = t
    key = tc.weights.Publisher("z").publish(sd)
    assert tc.artifact(key).info().kind == "register"
    got = tc.get(key)
    assert all(got[k].equal(sd[k]) for k in sd)
    plain = tc.weights.Publisher("p").publish(_sd(1))
    assert tc.artifact(plain).info().kind == "put"


def test_pull_edge_cases_and_update_handles_keep_their_own_place(namespace: str) -> None:
    _init(namespace)
    pub = tc.weights.Publisher("e", keep_last=10)
    sub = tc.weights.Subscriber("e")
    k1 = pub.publish(_sd(1))

    class WithExtra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _model(0)

        def get_extra_state(self) -> dict[str, int]:
            return {"step": 3}

        def set_extra_state(self, state: Any) -> None:
            pass

    extra = WithExtra()
    assert sub.pull(extra, rename=lambda n: f"inner.{n}") == k1  # extra state is not weights
    assert extra.inner[0].weight.equal(_sd(1)["0.weight"])
    with pytest.raises(tc.InvalidArgumentError, match="maps both"):
        sub.pull({"w": torch.empty(32, 16)}, names=["0.weight", "2.weight"], rename=lambda n: "w")
    with pytest.raises(tc.InvalidArgumentError, match=r"not a torch\.Tensor"):
        sub.pull({"0.weight": [1.0]}, names=["0.weight"])
    # A subscriber that pulled the current version still gets it from include_current, and a
    # handle moving on does not move what wait_for returns next.
    got: list[str] = []
    with sub.on_update(got.append, include_current=True):
        wait_for(lambda: got == [k1], 10, "the current version")
        k2 = pub.publish(_sd(2))
        wait_for(lambda: got == [k1, k2], 10, "the next version")
    assert sub.seen == k1 and sub.wait_for(timeout=5) == k2


def test_republished_tc_empty_buffers_are_copied_not_aliased(namespace: str) -> None:
    _init(namespace)
    pub = tc.weights.Publisher("r", keep_last=2)
    buf = {k: tc.empty(v.shape, dtype=v.dtype) for k, v in _sd(1).items()}
    for k, v in _sd(1).items():
        buf[k].copy_(v)
    k1 = pub.publish(buf)
    assert tc.artifact(k1).info().kind == "register"
    for k, v in _sd(2).items():  # the trainer writes the same buffers for the next step
        buf[k].copy_(v)
    k2 = pub.publish(buf)
    # k1 is still kept, so k2 is a copy: k1 must not change under its readers later.
    assert tc.artifact(k2).info().kind == "put"
    for k, v in _sd(3).items():
        buf[k].copy_(v)
    assert tc.get(k2)["0.weight"].equal(_sd(2)["0.weight"])
