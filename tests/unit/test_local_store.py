"""The daemon's LocalStore without Ray: staging, trimming, failure paths, crash recovery."""

from __future__ import annotations

import itertools
import mmap
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tensorcast_ray.daemon.journal import Journal
from tensorcast_ray.daemon.local_store import LocalStore
from tensorcast_ray.daemon.metrics import DaemonMetrics

from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorcast_ray._layout import Columns
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, daemon_pb2


def table(specs: list[tuple[str, str, tuple[int, ...]]]) -> common_pb2.TensorTable:
    """The compact tensor table a BeginWrite carries."""
    names, dtypes, shapes = (list(x) for x in zip(*specs, strict=True))
    return Columns.of(names, dtypes, shapes).to_table()


MiB = 1 << 20
PREFIX = "tcr-unittest-000000000000-"


def make_store(shm_dir: Path, **overrides: object) -> LocalStore:
    config = DaemonConfig(
        shm_dir=str(shm_dir),
        shm_segment_bytes=4 * MiB,
        shm_pool_bytes=0,
        client_staging_bytes=8 * MiB,
        **overrides,
    )
    return LocalStore(config, prefix=PREFIX, metrics=DaemonMetrics())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = make_store(tmp_path)
    s.bind_session_pid("s1", os.getpid(), s.hostname, pid_verified=True)
    yield s
    s.close(unlink=True)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(PREFIX)], "segments leaked"


def begin(
    store: LocalStore, key: str, nbytes: int, staged: list[str] = ()
) -> daemon_pb2.BeginWriteResponse:  # type: ignore[assignment]
    request = daemon_pb2.BeginWriteRequest(
        key=key,
        kind=daemon_pb2.WRITE_KIND_PUT,
        session_id="s1",
        tensors=table([("w", "uint8", (nbytes,))]),
        staged_segments=list(staged),
    )
    return store.rpc_BeginWrite(request, "")


def write(store: LocalStore, started: daemon_pb2.BeginWriteResponse, fill: int) -> None:
    for seg in started.segments:
        with open(os.path.join(started.shm_dir, seg.name), "r+b") as f:
            m = mmap.mmap(f.fileno(), seg.size)
            m[: seg.size] = bytes([fill]) * seg.size
            m.close()
    store.rpc_CommitWrite(daemon_pb2.CommitWriteRequest(write_id=started.write_id), "")


def lease(store: LocalStore, count: int, held: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    response = store.rpc_LeaseSegments(
        daemon_pb2.LeaseSegmentsRequest(session_id="s1", count=count, held=list(held)), ""
    )
    return [s.name for s in response.segments]


def segment_files(shm_dir: Path) -> set[str]:
    """Data segments in ``shm_dir`` (not the validity table or the journal)."""
    return {
        n
        for n in os.listdir(shm_dir)
        if n.startswith(PREFIX) and not n.endswith(("epochs", ".reads", ".jsonl", ".tmp"))
    }


def test_staged_segment_is_used_then_trimmed_to_the_artifact(
    store: LocalStore, tmp_path: Path
) -> None:
    (name,) = lease(store, 1)
    started = begin(store, "a:v1", 2 * MiB, [name])
    assert [s.name for s in started.segments] == [name]
    assert started.segments[0].size == 2 * MiB
    assert os.path.getsize(tmp_path / name) == 4 * MiB
    write(store, started, 7)
    store.tick()
    assert os.path.getsize(tmp_path / name) == 2 * MiB, "the tick trims the unused half"


def test_small_writes_do_not_consume_staged_segments(store: LocalStore) -> None:
    (name,) = lease(store, 1)
    started = begin(store, "small:v1", 4096, [name])
    assert name not in {s.name for s in started.segments}
    assert store._leases.staged[name][1] == "s1", "the staged segment stays with its session"


def test_staging_is_limited_per_session(store: LocalStore) -> None:
    first = lease(store, 10)
    assert len(first) == 2  # client_staging_bytes / shm_segment_bytes
    assert lease(store, 1, held=first) == []


def test_lease_frees_staged_segments_the_client_no_longer_holds(
    store: LocalStore, tmp_path: Path
) -> None:
    """A lost lease reply (or a failed map) must not pin memory and disable staging for the
    rest of the session: the next lease says what the client holds; the daemon frees the rest."""
    kept, lost = lease(store, 2)
    again = lease(store, 1, held=[kept])
    assert len(again) == 1
    assert set(store._leases.staged) == {kept, *again}
    assert not (tmp_path / lost).exists()


def test_lease_failing_midway_leaves_no_segment(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_take = store._shm.pool.take
    calls = iter(range(10))

    def take_then_fail(size: int) -> object:
        if next(calls) == 1:
            raise ResourceExhaustedError("tmpfs is full (simulated)")
        return real_take(size)

    monkeypatch.setattr(store._shm.pool, "take", take_then_fail)
    with pytest.raises(ResourceExhaustedError):
        lease(store, 2)
    assert store._leases.staged == {} and segment_files(tmp_path) == set()


def test_lease_for_a_session_that_ends_meanwhile_leaves_no_segment(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_take = store._shm.pool.take

    def take_while_session_ends(size: int) -> object:
        store.end_session("s1")
        return real_take(size)

    monkeypatch.setattr(store._shm.pool, "take", take_while_session_ends)
    with pytest.raises(UnavailableError):
        lease(store, 1)
    assert store._leases.staged == {} and segment_files(tmp_path) == set()


def two_segment_request(staged: str) -> daemon_pb2.BeginWriteRequest:
    """ "two:v1": 3 MiB placed in the staged 4 MiB segment (trimmed after commit), then 4 MiB
    in a fresh segment."""
    return daemon_pb2.BeginWriteRequest(
        key="two:v1",
        kind=daemon_pb2.WRITE_KIND_PUT,
        session_id="s1",
        tensors=table([("a", "uint8", (3 * MiB,)), ("b", "uint8", (4 * MiB,))]),
        staged_segments=[staged],
    )


def test_failed_begin_hands_staged_segments_back_untrimmed(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick between placing a write in a staged segment and the write failing must not
    shrink the segment: the client still maps it whole and will write all of it later."""
    (name,) = lease(store, 1)

    def tick_then_fail(size: int) -> object:
        store.tick()
        raise ResourceExhaustedError("tmpfs is full (simulated)")

    monkeypatch.setattr(store, "_take", tick_then_fail)
    with pytest.raises(ResourceExhaustedError):
        store.rpc_BeginWrite(two_segment_request(name), "")
    assert store._leases.staged[name] == (4 * MiB, "s1")
    assert os.path.getsize(tmp_path / name) == 4 * MiB
    store.tick()
    assert os.path.getsize(tmp_path / name) == 4 * MiB


def test_session_ending_during_begin_write_leaves_no_segment(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (name,) = lease(store, 1)
    real_take = store._take

    def take_while_session_ends(size: int) -> tuple[str, int]:
        store.end_session("s1")
        return real_take(size)

    monkeypatch.setattr(store, "_take", take_while_session_ends)
    with pytest.raises(UnavailableError):
        store.rpc_BeginWrite(two_segment_request(name), "")
    assert segment_files(tmp_path) == set()
    assert store._leases.staged == {} and store._leases.pending == {}
    assert not store._leases.catalog.exists("two:v1")
    assert store.stats()["tiers"][0]["used_bytes"] == 0


def test_failed_begin_returns_staged_segments_and_frees_fresh_ones(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (name,) = lease(store, 1)

    def full(size: int) -> object:
        raise ResourceExhaustedError("tmpfs is full (simulated)")

    monkeypatch.setattr(store._shm.pool, "take", full)
    with pytest.raises(ResourceExhaustedError):
        # Two 4 MiB segments: the first from staging, the second from the (full) pool.
        begin(store, "big:v1", 7 * MiB, [name])
    assert store._leases.staged[name] == (4 * MiB, "s1")
    assert os.path.exists(tmp_path / name)
    assert not store._leases.catalog.exists("big:v1")
    assert store.stats()["tiers"][0]["used_bytes"] == 0


def test_register_needs_a_known_session(store: LocalStore) -> None:
    request = daemon_pb2.BeginWriteRequest(
        key="r:v1",
        kind=daemon_pb2.WRITE_KIND_REGISTER,
        session_id="gone",
        tensors=table([("w", "uint8", (16,))]),
    )
    with pytest.raises(UnavailableError) as err:
        store.rpc_BeginWrite(request, "")
    assert err.value.retryable
    with pytest.raises(UnavailableError):
        store.rpc_AllocateBuffer(daemon_pb2.AllocateBufferRequest(session_id="gone", nbytes=16), "")


def test_crash_recovery_readopts_artifacts_and_drops_orphans(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    started = begin(first, "keep:v1", MiB)
    write(first, started, 9)
    orphan = begin(first, "half:v1", MiB)  # never committed: a crash mid-put
    first.close(unlink=False)  # a crash: segments and journal stay
    replayed = Journal(str(tmp_path / f"{PREFIX}journal.jsonl")).replay()
    assert replayed is not None
    assert [a["key"] for a in replayed.artifacts.values()] == ["keep:v1"]

    second = make_store(tmp_path)
    try:
        assert second.recovered == 1
        info = second.rpc_Lookup(daemon_pb2.LookupRequest(key="keep:latest"), "")
        seg = info.segments[0]
        assert (tmp_path / seg.name).read_bytes()[:4] == bytes([9]) * 4
        assert not os.path.exists(tmp_path / orphan.segments[0].name), "orphans are swept"
        assert not second._leases.catalog.exists("half:v1")
    finally:
        second.close(unlink=True)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(PREFIX)]


def test_commit_cost_does_not_grow_with_the_store(store: LocalStore, tmp_path: Path) -> None:
    """Each commit appends one journal line; it never rewrites the whole index."""
    journal = tmp_path / f"{PREFIX}journal.jsonl"
    sizes = []
    for i in range(6):
        write(store, begin(store, f"many:v{i}", 4096), 1)
        sizes.append(journal.stat().st_size)
    growth = [b - a for a, b in itertools.pairwise(sizes)]
    assert max(growth) - min(growth) < 64, f"each commit should add one similar line: {growth}"


def test_journal_replays_deletes_and_survives_a_torn_line(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    for i in range(3):
        write(first, begin(first, f"k:v{i}", 4096), i)
    first.rpc_Delete(daemon_pb2.DeleteRequest(key="k:v1"), "")
    first.close(unlink=False)
    with open(tmp_path / f"{PREFIX}journal.jsonl", "a") as f:
        f.write('{"op": "artifact", "data": {"artif')  # a crash mid-append
    second = make_store(tmp_path)
    try:
        assert second.recovered == 2
        assert second._leases.catalog.list_keys("k") == ["k:v0", "k:v2"]
        # Puts come back evictable on their original terms, not pinned.
        entry = second._leases.index.get(second._leases.catalog.resolve("k:v0")[1])
        assert entry is not None and not entry.protected
    finally:
        second.close(unlink=True)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(PREFIX)]


def allocate(store: LocalStore, session: str, nbytes: int = MiB) -> str:
    response = store.rpc_AllocateBuffer(
        daemon_pb2.AllocateBufferRequest(session_id=session, nbytes=nbytes), ""
    )
    return response.segment.name


def test_readopted_buffer_rebinds_to_its_process_and_ends_with_it(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    name = allocate(first, "s1")
    first.close(unlink=False)  # a crash: the tc.empty buffer's process lives on
    second = make_store(tmp_path)
    try:
        (buf,) = second._leases.buffers.values()
        assert buf.session_id == "" and buf.pid == os.getpid()
        second.tick()
        assert (tmp_path / name).exists(), "its process is alive: the buffer stays"
        # The process reconnects on the local socket: the kernel vouches for its pid.
        second.bind_session_pid("s2", os.getpid(), second.hostname, pid_verified=True)
        assert buf.session_id == "s2"
        second.end_session("s2")
        assert not (tmp_path / name).exists() and second._leases.buffers == {}
        assert second.stats()["tiers"][0]["used_bytes"] == 0
    finally:
        second.close(unlink=True)


def test_readopted_buffer_of_a_dead_process_is_freed(tmp_path: Path) -> None:
    child = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    dead_pid = int(child.stdout)
    first = make_store(tmp_path)
    first.bind_session_pid("s1", dead_pid, first.hostname, pid_verified=True)
    name = allocate(first, "s1")
    first.close(unlink=False)
    second = make_store(tmp_path)
    try:
        assert len(second._leases.buffers) == 1
        second.tick()
        assert second._leases.buffers == {} and not (tmp_path / name).exists()
        assert second.stats()["tiers"][0]["used_bytes"] == 0
    finally:
        second.close(unlink=True)


def begin_request(key: str, nbytes: int, request_id: str) -> daemon_pb2.BeginWriteRequest:
    return daemon_pb2.BeginWriteRequest(
        key=key,
        kind=daemon_pb2.WRITE_KIND_PUT,
        session_id="s1",
        tensors=table([("w", "uint8", (nbytes,))]),
        request_id=request_id,
    )


def test_small_writes_use_staged_small_segments_by_size_class(tmp_path: Path) -> None:
    """Staging has the pool's two size classes: a small put takes a staged small segment and
    leaves an offered whole one staged; leases stay within client_staging_bytes."""
    config = DaemonConfig(
        shm_dir=str(tmp_path),
        shm_segment_bytes=16 * MiB,
        shm_pool_bytes=16 * MiB,
        client_staging_bytes=17 * MiB,
    )
    store = LocalStore(config, prefix=PREFIX, metrics=DaemonMetrics())
    try:
        store.bind_session_pid("s1", os.getpid(), store.hostname, pid_verified=True)
        small_bytes = store._shm.pool.small_bytes
        assert small_bytes == MiB
        leased = store.rpc_LeaseSegments(
            daemon_pb2.LeaseSegmentsRequest(session_id="s1", count=1, small_count=5), ""
        )
        sizes = [s.size for s in leased.segments]
        assert sizes == [16 * MiB, MiB], "one small one fits the budget left after the whole"
        whole, small = (s.name for s in leased.segments)
        request = begin_request("small:v1", 512 * 1024, "req-s")
        request.staged_segments[:] = [whole, small]
        started = store.rpc_BeginWrite(request, "")
        assert [s.name for s in started.segments] == [small]
        assert (started.stageable, started.stageable_small) == (0, 1)
        assert list(store._leases.staged) == [whole], "the whole segment stays staged"
        write(store, started, 3)
        request = begin_request("big:v1", 8 * MiB, "req-b")
        request.staged_segments[:] = [whole]
        started = store.rpc_BeginWrite(request, "")
        assert [s.name for s in started.segments] == [whole]
        assert (started.stageable, started.stageable_small) == (1, 0)
        write(store, started, 4)
        assert store._leases.staged == {}
    finally:
        store.close(unlink=True)


def test_retry_after_a_lost_begin_reply_replaces_the_unheard_write(
    store: LocalStore, tmp_path: Path
) -> None:
    lost = store.rpc_BeginWrite(begin_request("r:v1", MiB, "req-1"), "")  # reply never arrives
    retry = store.rpc_BeginWrite(begin_request("r:v1", MiB, "req-1"), "")
    assert retry.write_id != lost.write_id and not retry.HasField("committed")
    assert set(store._leases.pending) == {retry.write_id}, "the unheard attempt is aborted"
    assert not (tmp_path / lost.segments[0].name).exists()
    write(store, retry, 5)
    assert store._leases.catalog.exists("r:v1")
    assert store.stats()["tiers"][0]["used_bytes"] == MiB


def test_retry_after_a_lost_commit_reply_gets_the_committed_write(store: LocalStore) -> None:
    started = store.rpc_BeginWrite(begin_request("c:v1", MiB, "req-2"), "")
    write(store, started, 6)  # committed; say the reply was lost
    retry = store.rpc_BeginWrite(begin_request("c:v1", MiB, "req-2"), "")
    assert retry.HasField("committed") and not retry.write_id and not retry.segments
    assert retry.committed.key == "c:v1" and retry.committed.artifact_id == started.artifact_id
    assert store._leases.pending == {}
    # Another put of the same version is still refused: versions are immutable.
    with pytest.raises(AlreadyExistsError):
        store.rpc_BeginWrite(begin_request("c:v1", MiB, "req-3"), "")
    with pytest.raises(AlreadyExistsError):
        store.rpc_BeginWrite(begin_request("c:v1", MiB, ""), "")


def test_the_committed_answer_survives_a_daemon_restart(tmp_path: Path) -> None:
    first = make_store(tmp_path)
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    started = first.rpc_BeginWrite(begin_request("k:v1", MiB, "req-4"), "")
    write(first, started, 7)
    first.close(unlink=False)  # the daemon dies before the commit reply is sent
    second = make_store(tmp_path)
    try:
        second.bind_session_pid("s1", os.getpid(), second.hostname, pid_verified=True)
        retry = second.rpc_BeginWrite(begin_request("k:v1", MiB, "req-4"), "")
        assert retry.HasField("committed")
        assert retry.committed.artifact_id == started.artifact_id
    finally:
        second.close(unlink=True)


def register_request(
    key: str, buffer_id: str, nbytes: int, request_id: str = ""
) -> daemon_pb2.RegisterBuffersRequest:
    """A register of one uint8 tensor ``w`` filling ``nbytes`` of a tc.empty buffer."""
    return daemon_pb2.RegisterBuffersRequest(
        key=key,
        session_id="s1",
        request_id=request_id,
        tensors=Columns.of(["w"], ["uint8"], [(nbytes,)]).to_table(),
        buffer_ids=[buffer_id],
        buffer_index=[0],
        buffer_offsets=[0],
    )


def test_a_malformed_register_is_refused(store: LocalStore) -> None:
    buffer = store.rpc_AllocateBuffer(
        daemon_pb2.AllocateBufferRequest(session_id="s1", nbytes=4096), ""
    )
    no_offsets = register_request("bad:v1", buffer.buffer_id, 4096)
    del no_offsets.buffer_offsets[:]
    bad_index = register_request("bad:v1", buffer.buffer_id, 4096)
    bad_index.buffer_index[0] = 1
    for request, what in ((no_offsets, "1 tensors"), (bad_index, "buffer index")):
        with pytest.raises(InvalidArgumentError, match=what):
            store.rpc_RegisterBuffers(request, "")
    assert not store._leases.catalog.exists("bad:v1")
    store.rpc_RegisterBuffers(register_request("bad:v1", buffer.buffer_id, 4096), "")
    assert store._leases.catalog.exists("bad:v1")


def test_retry_of_a_committed_register_returns_it(store: LocalStore) -> None:
    buffer = store.rpc_AllocateBuffer(
        daemon_pb2.AllocateBufferRequest(session_id="s1", nbytes=4096), ""
    )
    request = register_request("reg:v1", buffer.buffer_id, 4096, request_id="req-5")
    first = store.rpc_RegisterBuffers(request, "")
    again = store.rpc_RegisterBuffers(request, "")
    assert again.artifact_id == first.artifact_id
    request.request_id = "req-6"
    with pytest.raises(AlreadyExistsError):
        store.rpc_RegisterBuffers(request, "")


def test_tick_keeps_the_owner_file_fresh_for_gc(store: LocalStore, tmp_path: Path) -> None:
    """gc spares a prefix whose newest file is recent: a daemon that died a moment ago (and
    that Ray is restarting) must not look stale because it was idle for an hour."""
    from tensorcast_ray._gc import OWNER_SUFFIX

    owner = tmp_path / f"{PREFIX}{OWNER_SUFFIX}"
    owner.write_text('{"pid": 1}')
    hour_ago = os.path.getmtime(owner) - 3600
    os.utime(owner, (hour_ago, hour_ago))
    store.tick()
    assert os.path.getmtime(owner) > hour_ago + 3000, "the first tick touches it"
    os.utime(owner, (hour_ago, hour_ago))
    store.tick()
    assert os.path.getmtime(owner) == hour_ago, "then at most once a minute"


def test_a_retry_gives_the_unheard_writes_staged_segment_back(
    store: LocalStore, tmp_path: Path
) -> None:
    """The client put the staged segment back in its ready list when the reply was lost; the
    retry offers it again. Aborting the unheard attempt must not destroy it."""
    (name,) = lease(store, 1)
    request = begin_request("s:v1", 4 * MiB, "req-7")
    request.staged_segments[:] = [name]
    lost = store.rpc_BeginWrite(request, "")
    assert [s.name for s in lost.segments] == [name]
    retry = store.rpc_BeginWrite(request, "")
    assert [s.name for s in retry.segments] == [name], "the retry uses it again"
    assert os.path.getsize(tmp_path / name) == 4 * MiB
    write(store, retry, 1)
    assert store._leases.pending == {} and store._leases.staged == {}


def _policy_json(policy: object) -> str:
    import json

    from tensorcast_ray._policy import resolve_policy

    return json.dumps(resolve_policy(policy).to_dict())  # type: ignore[arg-type]


def test_an_unfinished_write_is_never_evicted_or_expired(tmp_path: Path) -> None:
    """Its bytes are being copied: evicting it would leave them resident and uncounted."""
    from tensorcast_ray._policy import StorePolicy, TierSpec

    now = [1_000.0]
    store = LocalStore(
        DaemonConfig(
            shm_dir=str(tmp_path),
            shm_segment_bytes=4 * MiB,
            shm_pool_bytes=0,
            stable_dram_capacity_bytes=10 * MiB,
        ),
        prefix=PREFIX,
        metrics=DaemonMetrics(),
        clock=lambda: now[0],
    )
    store.bind_session_pid("s1", os.getpid(), store.hostname, pid_verified=True)
    try:
        cache = _policy_json(StorePolicy(profile="cache"))  # evictable, LRU
        first = begin_request("a:v1", 6 * MiB, "ra")
        first.policy_json = cache
        a = store.rpc_BeginWrite(first, "")
        second = begin_request("b:v1", 6 * MiB, "rb")
        second.policy_json = cache
        with pytest.raises(ResourceExhaustedError):  # a:v1 cannot make room: it is in flight
            store.rpc_BeginWrite(second, "")
        ttl = TierSpec("stable_dram", "local", retention_policy="ttl", retention_ttl_ms=1000)
        third = begin_request("t:v1", 2 * MiB, "rt")
        third.policy_json = _policy_json(StorePolicy(should=[ttl]))
        t = store.rpc_BeginWrite(third, "")
        now[0] += 5.0  # the TTL passes while t:v1 is still being copied
        store.tick()
        write(store, a, 1)
        write(store, t, 2)
        assert store._leases.catalog.exists("a:v1") and store._leases.catalog.exists("t:v1")
        assert store.stats()["tiers"][0]["used_bytes"] == 8 * MiB, "both still counted"
        now[0] += 5.0  # committed now: the TTL applies again
        store.tick()
        assert not store._leases.catalog.exists("t:v1") and store._leases.catalog.exists("a:v1")
        assert store.stats()["tiers"][0]["used_bytes"] == 6 * MiB
    finally:
        store.close(unlink=True)


def test_a_restart_does_not_count_a_buffer_lease_twice(tmp_path: Path) -> None:
    first = make_store(tmp_path, stable_dram_capacity_bytes=3 * MiB)
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    buffer = first.rpc_AllocateBuffer(
        daemon_pb2.AllocateBufferRequest(session_id="s1", nbytes=2 * MiB), ""
    )
    first.rpc_RegisterBuffers(register_request("buf:v1", buffer.buffer_id, 2 * MiB), "")
    assert first.stats()["tiers"][0]["used_bytes"] == 2 * MiB
    first.close(unlink=False)
    second = make_store(tmp_path, stable_dram_capacity_bytes=3 * MiB)
    try:
        assert second.recovered == 1, "the committed lease is re-adopted"
        assert second._leases.catalog.exists("buf:v1")
        assert second.stats()["tiers"][0]["used_bytes"] == 2 * MiB
    finally:
        second.close(unlink=True)


def release(store: LocalStore, session: str, *buffer_ids: str) -> None:
    store.rpc_ReleaseBuffers(
        daemon_pb2.ReleaseBuffersRequest(session_id=session, buffer_ids=list(buffer_ids)), ""
    )


def test_the_publish_loop_frees_each_released_buffer_with_its_version(
    store: LocalStore, tmp_path: Path
) -> None:
    """A fresh tc.empty buffer per step, registered, its tensor dropped, the version deleted:
    nothing is left behind (the old code kept every buffer, and its bytes booked)."""
    names = []
    for step in range(3):
        buffer = store.rpc_AllocateBuffer(
            daemon_pb2.AllocateBufferRequest(session_id="s1", nbytes=MiB), ""
        )
        names.append(buffer.segment.name)
        store.rpc_RegisterBuffers(register_request(f"w:v{step}", buffer.buffer_id, 64), "")
        release(store, "s1", buffer.buffer_id)  # the SDK dropped its last tensor over it
        assert (tmp_path / buffer.segment.name).exists(), "its version still reads it"
        store.rpc_Delete(daemon_pb2.DeleteRequest(key=f"w:v{step}"), "")
    assert store._leases.buffers == {} and store._leases.artifacts == {}
    assert store.stats()["tiers"][0]["used_bytes"] == 0
    assert not any((tmp_path / name).exists() for name in names)


def test_a_buffer_released_under_a_live_version_is_freed_after_a_restart(
    tmp_path: Path,
) -> None:
    first = make_store(tmp_path)
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    buffer = first.rpc_AllocateBuffer(
        daemon_pb2.AllocateBufferRequest(session_id="s1", nbytes=MiB), ""
    )
    first.rpc_RegisterBuffers(register_request("w:v1", buffer.buffer_id, 64), "")
    release(first, "s1", buffer.buffer_id)
    first.close(unlink=False)  # a crash: the journal says the buffer was released
    second = make_store(tmp_path)
    try:
        second.rpc_Delete(daemon_pb2.DeleteRequest(key="w:v1"), "")
        assert second._leases.buffers == {}
        assert not (tmp_path / buffer.segment.name).exists()
    finally:
        second.close(unlink=True)


def test_another_sessions_buffer_cannot_be_registered_or_released(
    store: LocalStore, tmp_path: Path
) -> None:
    store.bind_session_pid("s2", os.getpid(), store.hostname, pid_verified=True)
    buffer = store.rpc_AllocateBuffer(
        daemon_pb2.AllocateBufferRequest(session_id="s2", nbytes=MiB), ""
    )
    with pytest.raises(FailedPreconditionError, match=buffer.buffer_id):
        store.rpc_RegisterBuffers(register_request("theirs:v1", buffer.buffer_id, 64), "")
    with pytest.raises(FailedPreconditionError, match=buffer.buffer_id):
        release(store, "s1", buffer.buffer_id)
    assert not store._leases.catalog.exists("theirs:v1")
    store.end_session("s2")
    assert store._leases.artifacts == {} and not (tmp_path / buffer.segment.name).exists()
