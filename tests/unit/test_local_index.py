"""The daemon's local stable DRAM index: admission, eviction, readers, TTL, invariants."""

from __future__ import annotations

import random

import grpc
import pytest
from tensorcast_ray.daemon.local_index import AdmitRequest, LocalIndex

from tensorcast_ray._errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tensorcast_ray._policy import StorePolicy, TierSpec, resolve_policy


def req(
    aid: str,
    nbytes: int,
    requirement: str = "should",
    overflow: str = "evict",
    retention: str = "best_effort",
    ttl: int | None = None,
    durable: bool = False,
) -> AdmitRequest:
    return AdmitRequest(aid, nbytes, requirement, retention, ttl, overflow, durable)


def full_index() -> LocalIndex:
    """100 bytes, full: a(30, oldest) b(30) c(40, newest)."""
    index = LocalIndex(100)
    for t, (aid, n) in enumerate([("a", 30), ("b", 30), ("c", 40)]):
        assert index.admit(req(aid, n), now_ms=t).admitted
    return index


def test_fits_without_eviction() -> None:
    index = LocalIndex(100)
    decision = index.admit(req("a", 60), now_ms=0)
    assert (decision.admitted, decision.evict, decision.status) == (True, (), "ok")
    assert index.used == 60 and index.get("a") is not None


@pytest.mark.parametrize(
    "requirement,status", [("must", "rejected"), ("should", "degraded"), ("may", "skipped")]
)
@pytest.mark.parametrize("overflow", ["reject", "spill"])
def test_refusing_overflow_policies_by_requirement(
    overflow: str, requirement: str, status: str
) -> None:
    index = full_index()
    retention = "pinned" if requirement == "must" else "best_effort"
    decision = index.admit(req("d", 20, requirement, overflow, retention), now_ms=10)
    assert (decision.admitted, decision.evict, decision.status) == (False, (), status)
    assert index.used == 100 and index.get("d") is None
    if status == "rejected":
        with pytest.raises(ResourceExhaustedError) as info:
            decision.raise_if_rejected()
        assert info.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for word in ("capacity 100", "used 100", "requested 20", "'d'", "Free space"):
            assert word in info.value.message
    else:
        decision.raise_if_rejected()  # degraded / skipped never raise


@pytest.mark.parametrize("requirement", ["must", "should", "may"])
def test_evict_admits_every_requirement_evicting_lru_first(requirement: str) -> None:
    index = full_index()
    retention = "pinned" if requirement == "must" else "best_effort"
    decision = index.admit(req("d", 50, requirement, "evict", retention), now_ms=10)
    assert decision.admitted and decision.status == "ok"
    assert decision.evict == ("a", "b")  # the two oldest free 60 >= 50 needed
    decision.raise_if_rejected()
    assert index.used == 90 and {e.artifact_id for e in index.entries()} == {"c", "d"}


def test_touch_changes_lru_order() -> None:
    index = full_index()
    assert index.touch("a", now_ms=5)
    decision = index.admit(req("d", 30), now_ms=6)
    assert decision.evict == ("b",)
    assert not index.touch("gone", now_ms=7)


def test_same_millisecond_accesses_keep_their_order() -> None:
    index = LocalIndex(3)
    for aid in "xyz":
        index.admit(req(aid, 1), now_ms=0)
    index.touch("x", now_ms=0)
    assert index.admit(req("w", 1), now_ms=0).evict == ("y",)


def test_pinned_and_must_entries_are_never_evicted() -> None:
    index = LocalIndex(100)
    index.admit(req("p", 50, "should", retention="pinned"), now_ms=0)
    index.admit(req("m", 30, "must", retention="best_effort"), now_ms=1)
    index.admit(req("e", 20), now_ms=2)
    decision = index.admit(req("d", 30), now_ms=3)
    assert (decision.admitted, decision.evict, decision.status) == (False, (), "degraded")
    assert index.used == 100
    assert index.admit(req("d", 20), now_ms=4).evict == ("e",)
    assert index.stats().pinned == 1


def test_readers_block_eviction_until_release() -> None:
    index = full_index()
    index.acquire("a")
    index.acquire("a")
    assert index.admit(req("d", 30), now_ms=10).evict == ("b",)
    index.release("a")
    assert index.admit(req("e", 40), now_ms=11).evict == ("c",)
    index.release("a")
    assert index.admit(req("f", 30), now_ms=12).evict == ("a",)


def test_acquire_touches_when_given_a_clock() -> None:
    index = full_index()
    index.acquire("a", now_ms=10)
    index.release("a")
    assert index.admit(req("d", 30), now_ms=11).evict == ("b",)


def test_reader_bookkeeping_errors() -> None:
    index = full_index()
    with pytest.raises(NotFoundError):
        index.acquire("zz")
    with pytest.raises(InternalError):
        index.release("a")
    with pytest.raises(InternalError):
        index.release("zz")
    index.acquire("a")
    with pytest.raises(FailedPreconditionError, match="readers"):
        index.remove("a")
    index.release("a")
    assert index.remove("a") == 30 and index.used == 70
    assert index.remove("a") == 0


def test_ttl_expiry_is_sliding_and_respects_readers() -> None:
    index = LocalIndex(100)
    index.admit(req("t", 10, retention="ttl", ttl=100), now_ms=0)
    index.admit(req("u", 10, retention="ttl", ttl=100), now_ms=0)
    index.admit(req("b", 10), now_ms=0)
    assert index.expire(now_ms=99) == ()
    index.touch("t", now_ms=50)  # t now lives until 150
    index.acquire("u")
    assert index.expire(now_ms=100) == ()  # u expired but read; t still fresh
    index.release("u")
    assert index.expire(now_ms=100) == ("u",)
    assert index.expire(now_ms=150) == ("t",)
    assert index.used == 10 and [e.artifact_id for e in index.entries()] == ["b"]


def test_expire_walks_nothing_until_the_earliest_expiry() -> None:
    """expire runs on every put: with no TTL due it must not walk every resident entry."""
    index = LocalIndex(1000)
    for i in range(20):
        index.admit(req(f"b{i}", 10), now_ms=0)
    index.admit(req("late", 10, retention="ttl", ttl=100), now_ms=0)
    walked: list[int] = []
    real_entries = index._entries

    class Watched(dict):  # type: ignore[type-arg]
        def values(self):  # type: ignore[no-untyped-def]
            walked.append(len(self))
            return super().values()

    index._entries = Watched(real_entries)
    assert index.expire(now_ms=50) == () and walked == []
    index.admit(req("early", 10, retention="ttl", ttl=10), now_ms=50)  # due before "late"
    assert index.expire(now_ms=59) == () and walked == []
    assert index.expire(now_ms=60) == ("early",) and walked
    assert index.expire(now_ms=100) == ("late",)
    walked.clear()
    assert index.expire(now_ms=10_000) == () and walked == [], "no TTL left: nothing to walk"


def test_expired_entries_are_evicted_before_older_live_ones() -> None:
    index = LocalIndex(100)
    index.admit(req("old", 40), now_ms=0)
    index.admit(req("t", 40, retention="ttl", ttl=5), now_ms=1)
    assert index.admit(req("d", 40), now_ms=10).evict == ("t",)


def test_oversize_is_never_admitted_and_evicts_nothing() -> None:
    index = full_index()
    for requirement, status in (("must", "rejected"), ("should", "degraded"), ("may", "skipped")):
        retention = "pinned" if requirement == "must" else "best_effort"
        decision = index.admit(req("huge", 101, requirement, "evict", retention), now_ms=10)
        assert (decision.admitted, decision.evict, decision.status) == (False, (), status)
        assert "larger than the whole tier" in decision.reason
    assert index.used == 100 and len(index.entries()) == 3
    assert LocalIndex(100).admit(req("exact", 100), now_ms=0).admitted


def test_no_partial_eviction_when_admission_fails() -> None:
    index = full_index()
    index.acquire("c")
    decision = index.admit(req("d", 70), now_ms=10)  # a+b free only 60
    assert (decision.admitted, decision.evict) == (False, ())
    assert {e.artifact_id for e in index.entries()} == {"a", "b", "c"} and index.used == 100


def test_spill_evicts_only_durable_entries() -> None:
    index = full_index()
    assert index.admit(req("d", 30, overflow="spill"), now_ms=10).status == "degraded"
    assert index.mark_durable("b")
    decision = index.admit(req("d", 30, overflow="spill"), now_ms=11)
    assert decision.admitted and decision.evict == ("b",)  # a is older but not durable
    assert not index.mark_durable("gone")
    index.admit(req("e", 0, durable=True), now_ms=12)
    entry = index.get("e")
    assert entry is not None and entry.durable


def test_readmission_updates_retention_and_refuses_size_change() -> None:
    index = full_index()
    decision = index.admit(req("a", 30, retention="pinned"), now_ms=10)
    assert decision.admitted and decision.reason == "already resident" and index.used == 100
    assert index.admit(req("d", 30), now_ms=11).evict == ("b",)  # a is pinned now
    with pytest.raises(FailedPreconditionError, match="immutable"):
        index.admit(req("a", 31), now_ms=12)


def test_set_capacity_shrinks_by_eviction_or_refuses_whole() -> None:
    index = full_index()
    assert index.set_capacity(200) == () and index.capacity == 200
    assert index.set_capacity(50) == ("a", "b") and index.used == 40
    index.acquire("c")
    with pytest.raises(FailedPreconditionError, match="cannot shrink"):
        index.set_capacity(10)
    assert index.capacity == 50 and index.used == 40
    with pytest.raises(InvalidArgumentError):
        index.set_capacity(-1)


def test_stats() -> None:
    index = LocalIndex(100)
    index.admit(req("p", 10, "must", retention="pinned"), now_ms=0)
    index.admit(req("t", 20, retention="ttl", ttl=5), now_ms=0)
    index.admit(req("b", 30), now_ms=0)
    stats = index.stats()
    assert (stats.capacity, stats.used, stats.entries, stats.pinned) == (100, 60, 3, 1)
    assert dict(stats.by_retention) == {"best_effort": 30, "ttl": 20, "pinned": 10}


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"aid": ""}, "artifact_id"),
        ({"nbytes": -1}, "nbytes"),
        ({"requirement": "always"}, "requirement"),
        ({"retention": "lru"}, "retention_policy"),
        ({"overflow": "drop"}, "overflow_policy"),
        ({"retention": "ttl"}, "retention_ttl_ms"),
        ({"retention": "ttl", "ttl": 0}, "retention_ttl_ms"),
        ({"ttl": 5}, "retention_ttl_ms"),
    ],
)
def test_bad_requests_are_invalid_arguments(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"aid": "a", "nbytes": 1, **kwargs}
    with pytest.raises(InvalidArgumentError, match=field):
        req(**args)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        LocalIndex(-5)


def test_request_from_resolved_policy() -> None:
    cold = AdmitRequest.from_policy("a", 10, resolve_policy(StorePolicy(profile="cold")))
    assert cold is not None
    assert (cold.requirement, cold.retention_policy, cold.overflow_policy) == (
        "should",
        "ttl",
        "evict",
    )
    assert cold.retention_ttl_ms == 600_000
    pinned = AdmitRequest.from_policy("a", 10, resolve_policy(StorePolicy(profile="pinned")))
    assert pinned is not None and (pinned.requirement, pinned.overflow_policy) == ("must", "reject")
    disk_only = resolve_policy(StorePolicy(must=[TierSpec("shared_disk", "any")]))
    assert AdmitRequest.from_policy("a", 10, disk_only) is None


def test_randomized_invariants() -> None:
    rng = random.Random(20240601)
    index = LocalIndex(1000)
    readers: dict[str, int] = {}
    now = 0
    for step in range(2000):
        now += rng.randint(0, 20)
        ids = [e.artifact_id for e in index.entries()]
        op = rng.random()
        before = {e.artifact_id: e for e in index.entries()}
        capacity_before = index.capacity
        if op < 0.45:
            requirement = rng.choice(["must", "should", "may"])
            retention = rng.choice(["best_effort", "ttl", "pinned"])
            request = req(
                f"x{rng.randint(0, 60)}",
                rng.randint(0, 400),
                requirement,
                rng.choice(["evict", "reject", "spill"]),
                retention,
                rng.randint(1, 300) if retention == "ttl" else None,
                rng.random() < 0.3,
            )
            if (
                request.artifact_id in before
                and before[request.artifact_id].nbytes != request.nbytes
            ):
                with pytest.raises(FailedPreconditionError):
                    index.admit(request, now)
                continue
            decision = index.admit(request, now)
            if not decision.admitted:
                assert decision.evict == () and before.keys() == {
                    e.artifact_id for e in index.entries()
                }
            for victim in decision.evict:
                entry = before[victim]
                assert not entry.protected and entry.readers == 0
                assert entry.durable or request.overflow_policy == "evict"
            assert decision.admitted == (index.get(request.artifact_id) is not None)
        elif op < 0.55 and ids:
            aid = rng.choice(ids)
            index.acquire(aid)
            readers[aid] = readers.get(aid, 0) + 1
        elif op < 0.65 and readers:
            aid = rng.choice(sorted(readers))
            index.release(aid)
            readers[aid] -= 1
            if not readers[aid]:
                del readers[aid]
        elif op < 0.75 and ids:
            aid = rng.choice(ids)
            if aid in readers:
                with pytest.raises(FailedPreconditionError):
                    index.remove(aid)
            else:
                assert index.remove(aid) == before[aid].nbytes
        elif op < 0.82:
            for aid in index.expire(now):
                assert aid not in readers and before[aid].expired(now)
        elif op < 0.9 and ids:
            index.touch(rng.choice(ids), now)
        elif op < 0.95 and ids:
            index.mark_durable(rng.choice(ids))
        else:
            try:
                index.set_capacity(rng.randint(300, 1500), now)
            except FailedPreconditionError:
                assert index.capacity == capacity_before  # refused: nothing changed
                assert before.keys() == {e.artifact_id for e in index.entries()}
        entries = index.entries()
        assert index.used == sum(e.nbytes for e in entries), step
        assert index.used <= index.capacity, step
        assert all(e.readers == readers.get(e.artifact_id, 0) for e in entries), step
        assert all(aid in {e.artifact_id for e in entries} for aid in readers), step
