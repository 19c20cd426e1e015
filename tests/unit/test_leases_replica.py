"""The lease table landing a copy of another node's artifact (``begin_replica``): reserved
under the same id and key, published at commit, evictable only when it is a cache copy."""

from __future__ import annotations

from typing import Any

import pytest
from tensorcast_ray.daemon.leases import Artifact, BeginOutcome, Freed, LeaseTable
from tensorcast_ray.daemon.local_index import AdmitRequest

from tensorcast_ray._errors import AlreadyExistsError, ResourceExhaustedError
from tensorcast_ray._policy import StorePolicy, resolve_policy

MiB = 1 << 20
HOST = "node-a"
WRITE_TIMEOUT_MS = 60_000
CACHE = resolve_policy(StorePolicy(profile="cache"))


@pytest.fixture
def table() -> LeaseTable:
    t = LeaseTable(16 * MiB, HOST, write_timeout_ms=WRITE_TIMEOUT_MS)
    t.open_session("s1", 100, HOST, pid_verified=True)
    return t


def remote(key: str, nbytes: int = MiB, **kw: Any) -> Artifact:
    """An artifact as another node wrote it (its id, key and size travel with the copy)."""
    fields: dict[str, Any] = {
        "artifact_id": "remote-" + key,
        "key": key,
        "kind": "put",
        "nbytes": nbytes,
        "segments": [],
        "tensors": b"tensor-table",
        "created_ms": 5,
        "writer": "node-b",
        "cluster_seq": 9,
    }
    fields.update(kw)
    return Artifact(**fields)


def cache_request(aid: str, nbytes: int) -> AdmitRequest:
    return AdmitRequest(aid, nbytes, "should", "best_effort", None, "evict")


def keep_request(aid: str, nbytes: int) -> AdmitRequest:
    return AdmitRequest(aid, nbytes, "must", "pinned", None, "evict")


def begin_copy(
    table: LeaseTable, key: str, nbytes: int = MiB, *, kind: str = "cache", now_ms: int = 0
) -> BeginOutcome:
    art = remote(key, nbytes, replica_kind=kind)
    make = cache_request if kind == "cache" else keep_request
    return table.begin_replica(
        art, make(art.artifact_id, nbytes), write_id="land-" + key, now_ms=now_ms
    )


def land(table: LeaseTable, key: str, nbytes: int = MiB, *, kind: str = "cache") -> Artifact:
    out = begin_copy(table, key, nbytes, kind=kind)
    assert out.error is None and out.pending is not None
    assert table.place_segments(out.pending.write_id, [(f"seg-{key}", nbytes)], [])
    return table.commit_write(out.pending.write_id, 4, 2, 0)


def put(table: LeaseTable, key: str, nbytes: int = MiB) -> BeginOutcome:
    art = Artifact("id-" + key, key, "put", nbytes, [], b"", 0)
    return table.begin_write(
        art, CACHE, write_id="w-" + key, session_id="s1", staged=(), stageable=0, now_ms=0
    )


def test_a_replica_lands_under_the_same_id_and_key_and_publishes_at_commit(
    table: LeaseTable,
) -> None:
    out = begin_copy(table, "m:v1", kind="cache")
    assert out.error is None and out.done is None and not out.actions
    assert out.pending is not None and out.pending.session_id == "", "a landing has no session"
    assert out.decision is not None and out.decision.admitted and out.requirement == "should"
    assert not table.catalog.exists("m:v1"), "nothing reads a copy still landing"
    assert "remote-m:v1" not in table.artifacts
    assert table.place_segments("land-m:v1", [("seg", MiB)], [])
    done = table.commit_write("land-m:v1", 4, 2, 0)
    assert (done.artifact_id, done.key) == ("remote-m:v1", "m:v1")
    assert (done.requirement, done.retention, done.retention_ttl_ms) == (
        "should",
        "best_effort",
        None,
    )
    assert (done.writer, done.cluster_seq, done.replica_kind) == ("node-b", 9, "cache")
    assert (done.epoch_slot, done.generation) == (4, 2)
    assert table.pending == {} and table.by_slot[4] == "remote-m:v1"
    assert table.lookup("m:latest", "", 1) is done
    assert table.lookup("", "remote-m:v1", 1) is done
    assert table.index.stats().used == MiB


def test_a_key_being_landed_is_reserved_on_this_node(table: LeaseTable) -> None:
    begin_copy(table, "m:v1")
    out = put(table, "m:v1")
    assert isinstance(out.error, AlreadyExistsError) and out.pending is None


def test_an_aborted_landing_frees_its_segments_and_its_key(table: LeaseTable) -> None:
    begin_copy(table, "m:v1", 2 * MiB)
    assert table.place_segments("land-m:v1", [("s0", MiB), ("s1", MiB)], [("s0", MiB)])
    actions = table.abort_write("land-m:v1")
    assert actions.unlink == [("s0", MiB), ("s1", MiB)]
    assert actions.aborted == [("m:v1", "remote-m:v1")], "the table reports it like any write"
    assert actions.freed == [] and actions.dropped_buffers == []
    assert table.pending == {} and table.index.stats().used == 0
    assert not table.catalog.exists("m:v1") and table.take_trims() == []
    again = begin_copy(table, "m:v1", 2 * MiB)
    assert again.error is None, "the key and the id are free for another try"
    assert not table.abort_write("land-m:v1x"), "an unknown write: nothing to do"


def test_a_copy_already_here_is_already_exists(table: LeaseTable) -> None:
    first = land(table, "m:v1")
    out = begin_copy(table, "m:v1", kind="replica")
    assert isinstance(out.error, AlreadyExistsError) and "already on this node" in str(out.error)
    assert out.pending is None and not out.actions and out.decision is None
    assert table.artifacts == {first.artifact_id: first} and table.pending == {}
    assert table.index.stats().used == MiB


def test_a_second_landing_of_the_same_copy_is_refused(table: LeaseTable) -> None:
    assert begin_copy(table, "m:v1").pending is not None
    out = begin_copy(table, "m:v1")
    assert isinstance(out.error, AlreadyExistsError) and out.pending is None
    assert list(table.pending) == ["land-m:v1"] and table.index.stats().used == MiB


def test_a_cache_copy_is_evicted_to_admit_a_put(table: LeaseTable) -> None:
    land(table, "m:v1", 10 * MiB, kind="cache")
    out = put(table, "new:v1", 10 * MiB)
    assert out.error is None and out.pending is not None
    assert out.actions.freed == [Freed("remote-m:v1", "m:v1", 4, "evicted to admit new:v1")]
    assert out.actions.unlink == [("seg-m:v1", 10 * MiB)]
    assert "remote-m:v1" not in table.artifacts and not table.catalog.exists("m:v1")


def test_a_kept_replica_is_never_evicted(table: LeaseTable) -> None:
    kept = land(table, "m:v1", 10 * MiB, kind="replica")
    assert kept.requirement == "must" and kept.retention == "pinned"
    out = put(table, "new:v1", 10 * MiB)
    assert isinstance(out.error, ResourceExhaustedError) and not out.actions.freed
    assert table.artifacts == {kept.artifact_id: kept} and table.catalog.exists("m:v1")
    assert not table.catalog.exists("new:v1") and table.pending == {}


def test_a_landing_copy_is_not_evicted_before_it_commits(table: LeaseTable) -> None:
    begin_copy(table, "m:v1", 10 * MiB, kind="cache")
    out = put(table, "new:v1", 10 * MiB)
    assert isinstance(out.error, ResourceExhaustedError) and not out.actions
    assert list(table.pending) == ["land-m:v1"]


def test_a_landing_copy_evicts_a_cache_copy_for_room(table: LeaseTable) -> None:
    land(table, "old:v1", 10 * MiB, kind="cache")
    out = begin_copy(table, "m:v1", 10 * MiB, kind="replica")
    assert out.error is None and out.pending is not None
    assert [f.artifact_id for f in out.actions.freed] == ["remote-old:v1"]


@pytest.mark.parametrize("kind", ["cache", "replica"])
def test_a_copy_that_cannot_fit_reserves_nothing(table: LeaseTable, kind: str) -> None:
    land(table, "pinned:v1", 10 * MiB, kind="replica")
    out = begin_copy(table, "m:v1", 10 * MiB, kind=kind)
    assert isinstance(out.error, ResourceExhaustedError) and out.pending is None
    assert out.decision is not None and not out.decision.admitted
    assert table.pending == {} and table.index.stats().used == 10 * MiB
    table.catalog.reserve("m:v1", "x")  # the key is free again


def test_a_landing_outliving_the_write_timeout_is_aborted(table: LeaseTable) -> None:
    begin_copy(table, "m:v1", now_ms=1_000)
    table.place_segments("land-m:v1", [("seg", MiB)], [])
    table.end_session("s1")
    assert list(table.pending) == ["land-m:v1"], "a landing belongs to no client session"
    assert not table.expire(1_000 + WRITE_TIMEOUT_MS - 1, set())
    actions = table.expire(1_000 + WRITE_TIMEOUT_MS, set())
    assert actions.aborted == [("m:v1", "remote-m:v1")] and actions.unlink == [("seg", MiB)]
    assert table.pending == {} and table.index.stats().used == 0
