"""The daemon's lease table as a pure state machine: events in, actions out; no Ray, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
from tensorcast_ray.daemon.leases import (
    Artifact,
    BeginOutcome,
    Buffer,
    BufferTensor,
    Freed,
    LeaseTable,
    tier_outcomes,
)

from tensorcast_ray._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorcast_ray._layout import Columns
from tensorcast_ray._policy import ResolvedPolicy, StorePolicy, TierSpec, resolve_policy
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2

MiB = 1 << 20
HOST = "node-a"
PINNED = resolve_policy(StorePolicy(profile="pinned"))
WRITE_TIMEOUT_MS = 60_000
CACHE = resolve_policy(StorePolicy(profile="cache"))


@pytest.fixture
def table() -> LeaseTable:
    t = LeaseTable(16 * MiB, HOST, write_timeout_ms=WRITE_TIMEOUT_MS)
    t.open_session("s1", 100, HOST, pid_verified=True)
    return t


def artifact(key: str, nbytes: int = MiB, **kw: Any) -> Artifact:
    fields: dict[str, Any] = {
        "artifact_id": "id-" + key,
        "key": key,
        "kind": "put",
        "nbytes": nbytes,
        "segments": [],
        "tensors": b"",
        "created_ms": 0,
    }
    fields.update(kw)
    return Artifact(**fields)


def begin(
    table: LeaseTable,
    key: str,
    nbytes: int = MiB,
    *,
    policy: ResolvedPolicy = PINNED,
    staged: tuple[str, ...] = (),
    stageable: int = 0,
    now_ms: int = 0,
    **kw: Any,
) -> BeginOutcome:
    return table.begin_write(
        artifact(key, nbytes, **kw),
        policy,
        write_id="w-" + key,
        session_id="s1",
        staged=staged,
        stageable=stageable,
        now_ms=now_ms,
    )


def put(table: LeaseTable, key: str, nbytes: int = MiB, *, slot: int = 0, **kw: Any) -> Artifact:
    out = begin(table, key, nbytes, **kw)
    assert out.error is None and out.pending is not None
    assert table.place_segments(out.pending.write_id, [(f"seg-{key}", nbytes)], [])
    return table.commit_write(out.pending.write_id, slot, 1, 0)


def test_a_put_is_reserved_then_published_on_commit(table: LeaseTable) -> None:
    out = begin(table, "a:v1")
    assert out.error is None and not out.actions and out.decision is not None
    assert out.decision.admitted and out.requirement == "must"
    assert not table.catalog.exists("a:v1"), "a reader never resolves a write in progress"
    with pytest.raises(AlreadyExistsError):
        table.catalog.reserve("a:v1", "other")
    assert table.place_segments("w-a:v1", [("seg", MiB)], [("seg", MiB)])
    committed = table.commit_write("w-a:v1", 3, 7, 0)
    assert (committed.epoch_slot, committed.generation) == (3, 7)
    assert table.catalog.exists("a:v1") and table.pending == {}
    assert table.take_trims() == [("seg", MiB)] and table.take_trims() == []
    assert table.lookup("a:latest", "", 1).segments == [("seg", MiB)]


def test_commit_of_an_unknown_write_is_failed_precondition(table: LeaseTable) -> None:
    with pytest.raises(FailedPreconditionError, match="start the put again"):
        table.commit_write("nope", 0, 1, 0)


def test_abort_gives_claimed_staged_segments_back_and_unlinks_the_rest(table: LeaseTable) -> None:
    table.add_staged("s1", [("st1", 4 * MiB), ("st2", 4 * MiB)])
    out = begin(table, "a:v1", staged=("st1", "st2", "foreign"), stageable=1)
    assert out.pending is not None and out.pending.claimed == [("st1", 4 * MiB)]
    assert set(table.staged) == {"st2"}
    table.place_segments("w-a:v1", [("st1", MiB), ("fresh", MiB)], [("st1", MiB)])
    actions = table.abort_write("w-a:v1")
    assert actions.unlink == [("fresh", MiB)], "the staged one goes back whole, not unlinked"
    assert table.staged["st1"] == (4 * MiB, "s1")
    assert table.take_trims() == [], "an aborted write trims nothing"
    assert not table.catalog.exists("a:v1") and table.index.stats().used == 0
    assert not table.abort_write("w-a:v1"), "aborting twice does nothing"


def test_end_session_aborts_writes_and_ends_every_lease(table: LeaseTable) -> None:
    table.add_staged("s1", [("st", 4 * MiB)])
    reg = put(table, "r:v1", kind="register", owner_session="s1")
    table.admit_buffer("buf-1", MiB, 0)
    table.add_buffer("buf-1", ("bufseg", MiB), "s1", [])
    out = begin(table, "half:v1", staged=("st",), stageable=1)
    assert out.pending is not None
    kept = put(table, "keep:v1")
    actions = table.end_session("s1")
    assert actions.freed == [Freed(reg.artifact_id, "r:v1", 0, "producer session ended")]
    assert sorted(actions.unlink) == sorted(
        [("st", 4 * MiB), ("seg-r:v1", MiB), ("bufseg", MiB)]
    ), "the claimed staged segment is freed: nobody holds it any more"
    assert actions.dropped_buffers == ["buf-1"]
    assert table.pending == {} and table.staged == {} and table.buffers == {}
    assert list(table.artifacts) == [kept.artifact_id], "a put outlives its writer"
    assert table.index.stats().used == MiB
    with pytest.raises(UnavailableError):
        table.lease_owner("s1")


def test_segments_for_a_write_aborted_meanwhile_are_refused(table: LeaseTable) -> None:
    begin(table, "a:v1")
    table.end_session("s1")
    assert not table.place_segments("w-a:v1", [("fresh", MiB)], [])
    with pytest.raises(UnavailableError):
        table.add_staged("s1", [("late", MiB)])


def test_a_retry_aborts_the_unheard_attempt(table: LeaseTable) -> None:
    first = begin(table, "a:v1", request_id="r1")
    assert first.pending is not None
    table.place_segments("w-a:v1", [("lost", MiB)], [])
    retry = table.begin_write(
        artifact("a:v1", request_id="r1", artifact_id="id-2"),
        PINNED,
        write_id="w-2",
        session_id="s1",
        staged=(),
        stageable=0,
        now_ms=0,
    )
    assert retry.error is None and retry.pending is not None
    assert retry.actions.unlink == [("lost", MiB)]
    assert list(table.pending) == ["w-2"]


def test_a_retry_of_a_committed_write_answers_it(table: LeaseTable) -> None:
    done = put(table, "a:v1", request_id="r1")
    again = table.begin_write(
        artifact("a:v1", request_id="r1", artifact_id="id-2"),
        PINNED,
        write_id="w-2",
        session_id="s1",
        staged=(),
        stageable=0,
        now_ms=0,
    )
    assert again.done is done and again.pending is None and again.error is None
    other = table.begin_write(
        artifact("a:v1", request_id="r2", artifact_id="id-3"),
        PINNED,
        write_id="w-3",
        session_id="s1",
        staged=(),
        stageable=0,
        now_ms=0,
    )
    assert isinstance(other.error, AlreadyExistsError), "versions are immutable"


def test_a_must_that_does_not_fit_is_an_error_and_reserves_nothing(table: LeaseTable) -> None:
    out = begin(table, "big:v1", 32 * MiB)
    assert isinstance(out.error, ResourceExhaustedError)
    assert out.decision is not None and out.decision.status == "rejected"
    assert not table.catalog.exists("big:v1") and table.pending == {}
    table.catalog.reserve("big:v1", "x")  # the key is free again


def test_eviction_comes_back_as_actions(table: LeaseTable) -> None:
    old = put(table, "old:v1", 10 * MiB, policy=CACHE, slot=5)
    out = begin(table, "new:v1", 10 * MiB, policy=CACHE)
    assert out.error is None
    assert out.actions.freed == [Freed(old.artifact_id, "old:v1", 5, "evicted to admit new:v1")]
    assert out.actions.unlink == [("seg-old:v1", 10 * MiB)]
    assert not table.catalog.exists("old:v1")


def test_an_unfinished_write_is_never_evicted(table: LeaseTable) -> None:
    begin(table, "a:v1", 10 * MiB, policy=CACHE)
    out = begin(table, "b:v1", 10 * MiB, policy=CACHE)
    assert isinstance(out.error, ResourceExhaustedError) and not out.actions


def test_policy_errors_are_returned_with_the_retrys_actions(table: LeaseTable) -> None:
    """An abort decided before the verb fails must still reach the shell."""
    begin(table, "a:v1", request_id="r1")
    table.place_segments("w-a:v1", [("lost", MiB)], [])
    disk = TierSpec("shared_disk", "any")
    out = table.begin_write(
        artifact("a:v1", request_id="r1", artifact_id="id-2"),
        resolve_policy(
            StorePolicy(must=[TierSpec("stable_dram", retention_policy="pinned"), disk])
        ),
        write_id="w-2",
        session_id="s1",
        staged=(),
        stageable=0,
        now_ms=0,
    )
    assert isinstance(out.error, FailedPreconditionError)
    assert out.actions.unlink == [("lost", MiB)]


def test_a_should_tier_elsewhere_is_a_degraded_reason() -> None:
    disk = TierSpec("shared_disk", "any")
    policy = resolve_policy(
        StorePolicy(must=[TierSpec("stable_dram", retention_policy="pinned")], should=[disk])
    )
    assert tier_outcomes(policy) == ["shared_disk (scope any) skipped: persistence not configured"]


def test_ttl_and_dead_producers_expire(table: LeaseTable) -> None:
    put(table, "ttl:v1", expires_at_ms=1_000)
    orphan = put(table, "reg:v1", kind="register", owner_pid=4242, owner_host=HOST)
    elsewhere = put(table, "far:v1", kind="register", owner_pid=4242, owner_host="node-b")
    table.adopt_buffer(Buffer("buf-1", ("bufseg", MiB), "", 4242), 0)
    assert table.watched_pids() == {4242}
    assert not table.expire(500, set()), "nothing is due and every pid is alive"
    actions = table.expire(2_000, {4242})
    assert {f.reason for f in actions.freed} == {"ttl expired", "producer process exited"}
    assert actions.dropped_buffers == ["buf-1"]
    assert orphan.artifact_id not in table.artifacts
    assert elsewhere.artifact_id in table.artifacts, "a pid on another host says nothing"


def test_a_reconnecting_process_rebinds_its_readopted_leases(table: LeaseTable) -> None:
    reg = put(table, "reg:v1", kind="register", owner_pid=77, owner_host=HOST)
    table.adopt_buffer(Buffer("buf-1", ("bufseg", MiB), "", 77), 0)
    table.open_session("s9", 77, "node-b", pid_verified=True)
    assert reg.owner_session == "" and table.buffers["buf-1"].session_id == ""
    table.open_session("s9", 77, HOST, pid_verified=True)
    assert reg.owner_session == "s9" and table.buffers["buf-1"].session_id == "s9"
    assert table.watched_pids() == set()
    actions = table.end_session("s9")
    assert [f.key for f in actions.freed] == ["reg:v1"] and actions.dropped_buffers == ["buf-1"]


def test_a_claimed_pid_never_takes_over_readopted_leases(table: LeaseTable) -> None:
    """After a restart, a session that only claims the producer's pid (over gRPC) must not
    re-bind its leases: hanging up would then end them while the producer lives."""
    reg = put(table, "reg:v1", kind="register", owner_pid=77, owner_host=HOST)
    table.adopt_buffer(Buffer("buf-1", ("bufseg", MiB), "", 77), 0)
    table.open_session("liar", 77, HOST, pid_verified=False)
    assert reg.owner_session == "" and table.buffers["buf-1"].session_id == ""
    actions = table.end_session("liar")
    assert not actions and reg.artifact_id in table.artifacts and "buf-1" in table.buffers
    assert table.watched_pids() == {77}, "still ended when pid 77 exits"


def test_a_grpc_lease_rebinds_only_to_the_session_with_its_key(table: LeaseTable) -> None:
    """A lease made over gRPC carries its session's key; after a restart only a session that
    proves that key re-binds it: neither the pid (claimed) nor a wrong key."""
    reg = put(table, "reg:v1", kind="register", owner_pid=77, owner_host=HOST, owner_key="k1")
    table.adopt_buffer(Buffer("buf-1", ("bufseg", MiB), "", 77, owner_key="k1"), 0)
    table.open_session("same-pid", 77, HOST, pid_verified=True)
    table.open_session("wrong-key", 77, HOST, pid_verified=False, lease_key="k2")
    assert reg.owner_session == "" and table.buffers["buf-1"].session_id == ""
    table.open_session("owner", 5, "elsewhere", pid_verified=False, lease_key="k1")
    assert reg.owner_session == "owner" and table.buffers["buf-1"].session_id == "owner"
    actions = table.end_session("owner")
    assert [f.key for f in actions.freed] == ["reg:v1"] and actions.dropped_buffers == ["buf-1"]


def test_a_buffer_records_its_sessions_key(table: LeaseTable) -> None:
    table.open_session("g1", 9, "elsewhere", pid_verified=False, lease_key="k9")
    table.admit_buffer("buf-9", MiB, 0)
    assert table.add_buffer("buf-9", ("seg9", MiB), "g1", []).owner_key == "k9"
    assert Buffer.from_record(table.buffers["buf-9"].to_record()).owner_key == "k9"


@pytest.mark.parametrize(
    ("session", "error"), [("", FailedPreconditionError), ("gone", UnavailableError)]
)
def test_a_write_needs_a_live_session(
    table: LeaseTable, session: str, error: type[Exception]
) -> None:
    out = table.begin_write(
        artifact("a:v1"),
        PINNED,
        write_id="w",
        session_id=session,
        staged=(),
        stageable=0,
        now_ms=0,
    )
    assert isinstance(out.error, error) and out.pending is None
    assert not table.pending and table.index.stats().used == 0, "nothing reserved"
    table.catalog.reserve("a:v1", "other")  # the key was not taken either


def test_an_uncommitted_write_is_aborted_at_its_deadline(table: LeaseTable) -> None:
    table.add_staged("s1", [("st", 4 * MiB)])
    out = begin(table, "late:v1", staged=("st",), stageable=1, now_ms=1000)
    assert out.pending is not None
    table.place_segments("w-late:v1", [("st", MiB), ("fresh", MiB)], [])
    assert not table.expire(1000 + WRITE_TIMEOUT_MS - 1, set()), "not yet"
    assert table.index.stats().used == MiB
    actions = table.expire(1000 + WRITE_TIMEOUT_MS, set())
    assert actions.unlink == [("fresh", MiB)] and table.staged["st"] == (4 * MiB, "s1")
    assert table.pending == {} and table.index.stats().used == 0, "capacity returned"
    assert not table.catalog.exists("late:v1")
    with pytest.raises(FailedPreconditionError, match="write_timeout_s"):
        table.commit_write("w-late:v1", 0, 1, 0)
    assert put(table, "late:v1").key == "late:v1", "the version is free again"


def test_buffers_book_bytes_and_registers_reference_them(table: LeaseTable) -> None:
    table.admit_buffer("buf-1", 4096, 0)
    buf = table.add_buffer("buf-1", ("bufseg", 4096), "s1", [("bufseg", 4096)])
    assert buf.pid == 100 and table.index.stats().used == 4096
    reg = artifact("r:v1", 0, kind="register", owner_session="s1")
    tensors = [BufferTensor("w", "float32", (2, 8), "buf-1", 128, 64)]
    out = table.register_buffers(reg, tensors, PINNED)
    assert out.error is None and out.done is None
    assert reg.nbytes == 64 and reg.buffers == ["buf-1"] and reg.segments == [("bufseg", 4096)]
    placed = Columns.from_table(common_pb2.TensorTable.FromString(reg.tensors), [4096])
    assert placed.offsets == [128] and placed.segments == [0] and buf.refs == 1
    table.commit_registered(reg, 1, 1)
    actions = table.delete("r:v1")
    assert actions.unlink == [], "the buffer holds the bytes and stays leased"
    assert buf.refs == 0 and "buf-1" in table.buffers


def test_a_register_outside_its_buffer_is_refused(table: LeaseTable) -> None:
    table.admit_buffer("buf-1", 4096, 0)
    table.add_buffer("buf-1", ("bufseg", 4096), "s1", [])
    outside = [BufferTensor("w", "uint8", (64,), "buf-1", 4090, 64)]
    out = table.register_buffers(mine("r:v1"), outside, PINNED)
    assert isinstance(out.error, InvalidArgumentError)
    unknown = [BufferTensor("w", "uint8", (64,), "buf-x", 0, 64)]
    out = table.register_buffers(mine("r:v2"), unknown, PINNED)
    assert isinstance(out.error, NotFoundError)
    assert not table.catalog.exists("r:v1") and table.buffers["buf-1"].refs == 0


def test_a_buffer_that_does_not_fit_or_outlives_its_session_is_not_booked(
    table: LeaseTable,
) -> None:
    with pytest.raises(ResourceExhaustedError):
        table.admit_buffer("buf-big", 32 * MiB, 0)
    table.admit_buffer("buf-1", MiB, 0)
    table.end_session("s1")
    with pytest.raises(UnavailableError):
        table.add_buffer("buf-1", ("bufseg", MiB), "s1", [])
    assert table.index.stats().used == 0 and table.buffers == {}


def test_release_unheld_frees_only_what_the_client_lost(table: LeaseTable) -> None:
    table.add_staged("s1", [("a", MiB), ("b", MiB)])
    actions, held = table.release_unheld("s1", ["a"])
    assert actions.unlink == [("b", MiB)] and held == 1


def test_adoption_readmits_on_the_original_terms_and_never_evicts() -> None:
    table = LeaseTable(2 * MiB, HOST, write_timeout_ms=WRITE_TIMEOUT_MS)
    first = artifact("a:v1", MiB, retention="best_effort", requirement="may", segments=[("s", MiB)])
    assert table.adopt_artifact(first, 0) is None
    entry = table.index.get(first.artifact_id)
    assert entry is not None and not entry.protected
    refused = table.adopt_artifact(artifact("b:v1", 2 * MiB), 0)
    assert refused is not None and not refused.admitted
    assert table.catalog.list_keys("a") == ["a:v1"] and not table.catalog.exists("b:v1")
    assert table.live_segments() == [("s", MiB)]


def test_records_round_trip_and_sessions_do_not_survive() -> None:
    art = artifact("a:v1", segments=[("s", MiB)], owner_session="s1")
    assert Artifact.from_record(art.to_record()) == art
    buf = Buffer("buf-1", ("s", MiB), "s1", 5, refs=2)
    back = Buffer.from_record(buf.to_record())
    assert back == Buffer("buf-1", ("s", MiB), "", 5, refs=0)


def test_a_ttl_put_slower_than_its_ttl_lives_a_ttl_after_its_commit(table: LeaseTable) -> None:
    ttl = resolve_policy(
        StorePolicy(should=[TierSpec("stable_dram", retention_policy="ttl", retention_ttl_ms=100)])
    )
    out = begin(table, "slow:v1", policy=ttl, now_ms=0)
    assert out.pending is not None
    assert table.place_segments("w-slow:v1", [("seg", MiB)], [])
    table.commit_write("w-slow:v1", 0, 1, 500)  # the copy took 5 TTLs
    assert table.expire(550, set()).freed == [], "the TTL runs from the commit"
    assert [f.key for f in table.expire(600, set()).freed] == ["slow:v1"]


def test_the_slot_map_follows_commits_and_frees(table: LeaseTable) -> None:
    a = put(table, "a:v1", slot=4)
    put(table, "b:v1", slot=9)
    assert table.by_slot == {4: a.artifact_id, 9: "id-b:v1"}
    table.delete("a:v1")
    assert table.by_slot == {9: "id-b:v1"}


def mine(key: str, session: str = "s1") -> Artifact:
    return artifact(key, 0, kind="register", owner_session=session)


def register(table: LeaseTable, key: str, buffer_id: str, session: str = "s1") -> BeginOutcome:
    reg = mine(key, session)
    out = table.register_buffers(reg, [BufferTensor("w", "uint8", (64,), buffer_id, 0, 64)], PINNED)
    if out.error is None:
        table.commit_registered(reg, 1, 1)
    return out


def test_a_released_buffer_is_freed_with_its_last_version(table: LeaseTable) -> None:
    for step in range(3):  # the publish loop: a fresh buffer per step, the old version deleted
        table.admit_buffer(f"buf-{step}", MiB, 0)
        table.add_buffer(f"buf-{step}", (f"seg-{step}", MiB), "s1", [])
        assert register(table, f"w:v{step}", f"buf-{step}").error is None
        actions, held = table.release_buffers([f"buf-{step}"], "s1")  # the tensor was dropped
        assert not actions and [b.buffer_id for b in held] == [f"buf-{step}"]
        assert table.buffers[f"buf-{step}"].released, "its version still reads it"
        actions = table.delete(f"w:v{step}")
        assert actions.unlink == [(f"seg-{step}", MiB)]
        assert actions.dropped_buffers == [f"buf-{step}"]
    assert table.buffers == {} and table.artifacts == {} and table.index.stats().used == 0


def test_an_unregistered_released_buffer_is_freed_at_once(table: LeaseTable) -> None:
    table.admit_buffer("buf-1", MiB, 0)
    table.add_buffer("buf-1", ("seg", MiB), "s1", [])
    actions, held = table.release_buffers(["buf-1", "buf-gone"], "s1")
    assert held == [] and actions.unlink == [("seg", MiB)] and actions.dropped_buffers == ["buf-1"]
    assert table.buffers == {} and table.index.stats().used == 0


def test_only_the_owning_session_releases_or_registers_a_buffer(table: LeaseTable) -> None:
    table.open_session("s2", 200, HOST, pid_verified=True)
    table.admit_buffer("buf-1", MiB, 0)
    table.add_buffer("buf-1", ("seg", MiB), "s1", [])
    with pytest.raises(FailedPreconditionError, match="buf-1"):
        table.release_buffers(["buf-1"], "s2")
    out = register(table, "theirs:v1", "buf-1", session="s2")
    assert isinstance(out.error, FailedPreconditionError) and "buf-1" in str(out.error)
    assert not table.catalog.exists("theirs:v1") and table.buffers["buf-1"].refs == 0
    assert not table.buffers["buf-1"].released


def test_a_freed_buffer_frees_the_versions_over_it(table: LeaseTable) -> None:
    table.admit_buffer("buf-1", MiB, 0)
    table.add_buffer("buf-1", ("seg", MiB), "s1", [])
    assert register(table, "w:v1", "buf-1").error is None
    table.artifacts["id-w:v1"].owner_session = ""  # as after a restart, not yet re-bound
    actions = table.end_session("s1")
    assert [f.key for f in actions.freed] == ["w:v1"], "no version over a deleted file"
    assert actions.dropped_buffers == ["buf-1"] and table.artifacts == {}
    assert not table.catalog.exists("w:v1")


def test_a_released_buffer_stays_released_across_a_restart() -> None:
    buf = Buffer("buf-1", ("s", MiB), "s1", 5, refs=1, released=True)
    assert Buffer.from_record(buf.to_record()).released
