"""The Global Store's journal of durable artifacts: one JSON object per artifact through
fsspec, on a local directory, ``memory://`` and S3 (a moto server on loopback). Hostile
and torn records are skipped and counted, never followed. The Global Store shell over a
journal: its methods called in-process, Ray never started."""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorcast_ray.global_store.catalog import ClusterCatalog
from tensorcast_ray.global_store.journal import (
    MAX_RECORD_BYTES,
    CatalogJournal,
    check_artifact_id,
)

from tensorcast_ray._errors import (
    ArtifactError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from tests.helpers import wait_for


def rec(i: int = 0, **kw: Any) -> dict[str, Any]:
    return {
        "key": f"model:v{i}",
        "artifact_id": f"{i:032x}",
        "node_id": "node-a" * 4,
        "seq": i + 1,
        "nbytes": 1 << 20,
        "tensors": 3,
        "kind": "put",
        "created_ms": 1_700_000_000_000 + i,
        "persist_task_id": f"task-{i}",
        **kw,
    }


@pytest.fixture(params=["file", "memory", "s3"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CatalogJournal]:
    if request.param == "file":
        yield CatalogJournal(f"file://{tmp_path}/journal")
    elif request.param == "memory":
        url = f"memory://gs-journal-{uuid.uuid4().hex[:12]}/journal"
        yield CatalogJournal(url)
        _rm_memory(url)
    else:
        options = request.getfixturevalue("s3_options")
        bucket = request.getfixturevalue("bucket")
        yield CatalogJournal(f"s3://{bucket}/tc/journal", options)


def _rm_memory(url: str) -> None:
    """Forget a memory:// tree (``rm`` walks it file by file: slow for 10k)."""
    from fsspec.implementations.memory import MemoryFileSystem

    top = "/" + url.removeprefix("memory://").split("/")[0]
    for path in [p for p in MemoryFileSystem.store if p == top or p.startswith(top + "/")]:
        MemoryFileSystem.store.pop(path, None)
    MemoryFileSystem.pseudo_dirs[:] = [
        d for d in MemoryFileSystem.pseudo_dirs if not (d == top or d.startswith(top + "/"))
    ]


def put_raw(journal: CatalogJournal, name: str, body: bytes) -> None:
    """A file in the journal's directory, written behind its back."""
    fs, path = journal._fs, journal._dir + "/" + name
    if journal._local:
        os.makedirs(journal._dir, exist_ok=True)
        Path(path).write_bytes(body)
    else:
        fs.pipe_file(path, body)


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["artifact_id"]: r for r in records}


# ---- round trip ----------------------------------------------------------------------------


def test_record_load_forget(journal: CatalogJournal) -> None:
    assert journal.load() == [] and journal.last_skipped == 0, "an empty journal"
    for i in range(3):
        journal.record(rec(i))
    journal.record(rec(1, nbytes=5))  # recorded again: replaced
    got = by_id(journal.load())
    assert journal.last_skipped == 0
    assert got == {r["artifact_id"]: r for r in (rec(0), rec(1, nbytes=5), rec(2))}
    journal.forget(rec(0)["artifact_id"])
    journal.forget(rec(0)["artifact_id"])  # forgetting twice is fine
    journal.forget("f" * 32)  # never recorded
    assert sorted(by_id(journal.load())) == [rec(1)["artifact_id"], rec(2)["artifact_id"]]


def test_extra_fields_are_kept_and_a_missing_task_id_reads_empty(journal: CatalogJournal) -> None:
    journal.record({**rec(1), "persisted_by": "node-b", "root": "s3://x/y", "format": 2})
    r = rec(2)
    del r["persist_task_id"]
    journal.record(r)
    got = by_id(journal.load())
    assert got[rec(1)["artifact_id"]]["persisted_by"] == "node-b", "the format is the journal's"
    assert got[rec(2)["artifact_id"]]["persist_task_id"] == ""


def test_a_second_journal_on_the_same_url_sees_the_records(journal: CatalogJournal) -> None:
    journal.record(rec(7))
    other = CatalogJournal(journal.url, getattr(journal._fs, "storage_options", None))
    assert by_id(other.load()) == {rec(7)["artifact_id"]: rec(7)}


def test_records_replay_into_the_catalog(journal: CatalogJournal) -> None:
    for i in range(5):
        journal.record(rec(i))
    cat = ClusterCatalog()
    assert cat.restore(journal.load()) == []
    assert cat.resolve("model:v3").durable and cat.resolve("model:v3").seq == 4
    assert len(cat) == 5 and cat.durable_count() == 5
    cat.delete("model:v3")
    for artifact_id in cat.take_dropped_durable():
        journal.forget(artifact_id)
    assert rec(3)["artifact_id"] not in by_id(journal.load())


# ---- what a record may be ------------------------------------------------------------------


@pytest.mark.parametrize(
    "artifact_id", ["", "../../etc/passwd", "a/b", "a.b", ".hidden", "x" * 65, "é", None, 7]
)
def test_an_unsafe_artifact_id_is_refused(journal: CatalogJournal, artifact_id: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        journal.record(rec(1, artifact_id=artifact_id))
    with pytest.raises(InvalidArgumentError):
        check_artifact_id(artifact_id)
    assert journal.load() == [] and journal.last_skipped == 0, "nothing was written"


@pytest.mark.parametrize(
    "change",
    [
        {"seq": True},
        {"seq": -1},
        {"nbytes": "64"},
        {"key": ""},
        {"key": 7},
        {"node_id": None},
        {"persist_task_id": "x" * (MAX_RECORD_BYTES + 1)},
    ],
    ids=repr,
)
def test_a_malformed_record_is_refused(journal: CatalogJournal, change: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        journal.record(rec(1, **change))
    assert journal.load() == []


def test_a_record_without_a_field_is_refused(journal: CatalogJournal) -> None:
    r = rec(1)
    del r["seq"]
    with pytest.raises(InvalidArgumentError):
        journal.record(r)


# ---- hostile and torn files ----------------------------------------------------------------


def test_hostile_and_torn_records_are_skipped_and_counted(journal: CatalogJournal) -> None:
    journal.record(rec(1))
    good = json.loads(json.dumps({"format": 1, **rec(2)}))
    aid = good["artifact_id"]
    cases = {
        f"{'a' * 32}.json": b"{not json",
        f"{'b' * 32}.json": json.dumps({**good, "artifact_id": "b" * 32})[:40].encode(),  # torn
        f"{'c' * 32}.json": json.dumps({**good, "format": 2, "artifact_id": "c" * 32}).encode(),
        f"{'d' * 32}.json": json.dumps({**good, "format": True, "artifact_id": "d" * 32}).encode(),
        f"{'e' * 32}.json": json.dumps({k: v for k, v in good.items() if k != "format"}).encode(),
        f"{'f' * 32}.json": json.dumps({**good, "artifact_id": "f" * 32, "seq": "1"}).encode(),
        f"{'0' * 32}.json": json.dumps(good).encode(),  # names another artifact
        f"{'1' * 32}.json": b" " * (MAX_RECORD_BYTES + 1) + json.dumps(good).encode(),
        f"{'2' * 32}.json": json.dumps([good]).encode(),
        f"{'3' * 32}.json": b"\xff\xfe\x00",
        f"{'4' * 32}.json": b"[" * 10_000 + b"]" * 10_000,  # deep nesting
        "notes.txt": b"hello",
        "a.b.json": json.dumps(good).encode(),
    }
    for name, body in cases.items():
        put_raw(journal, name, body)
    put_raw(journal, f"{aid}.json", json.dumps(good).encode())  # a valid one written by hand
    put_raw(journal, f".{aid}.json.tmp-123456", b"{")  # a write that never finished: ignored
    got = by_id(journal.load())
    assert got == {rec(1)["artifact_id"]: rec(1), aid: rec(2)}
    assert journal.last_skipped == len(cases)
    journal.load()
    assert journal.last_skipped == len(cases), "counted per load, not summed"


def test_local_links_fifos_and_directories_are_never_followed(tmp_path: Path) -> None:
    journal = CatalogJournal(str(tmp_path / "journal"))
    journal.record(rec(1))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"format": 1, **rec(2)}))
    d = Path(journal._dir)
    (d / f"{rec(2)['artifact_id']}.json").symlink_to(outside)
    inside = d / f"{rec(1)['artifact_id']}.json"
    (d / f"{rec(3)['artifact_id']}.json").symlink_to(inside)  # even one pointing inside
    os.mkfifo(d / f"{rec(4)['artifact_id']}.json")
    (d / f"{rec(5)['artifact_id']}.json").mkdir()
    (d / f"{rec(6)['artifact_id']}.json").symlink_to(tmp_path / "missing")
    start = time.monotonic()
    got = by_id(journal.load())
    assert time.monotonic() - start < 5, "a FIFO is never waited on"
    assert got == {rec(1)["artifact_id"]: rec(1)}
    assert journal.last_skipped == 5
    journal.forget(rec(2)["artifact_id"])  # removes the link, never its target
    assert outside.exists()


def test_local_records_are_private(tmp_path: Path) -> None:
    journal = CatalogJournal(f"file://{tmp_path}/deep/journal")
    journal.record(rec(1))
    d = Path(journal._dir)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert [f.name for f in d.iterdir()] == [f"{rec(1)['artifact_id']}.json"], "no temp left"


# ---- storage failures ----------------------------------------------------------------------


def test_a_journal_that_cannot_be_listed_raises_retryable(
    journal: CatalogJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.record(rec(1))
    if journal._local:
        monkeypatch.setattr(os, "scandir", _refuse)
    else:
        monkeypatch.setattr(journal._fs, "ls", _refuse)
    with pytest.raises(UnavailableError):
        journal.load()


def test_a_failed_write_or_forget_raises_an_artifact_error(
    journal: CatalogJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.record(rec(1))
    if journal._local:
        monkeypatch.setattr(os, "replace", _refuse)
        monkeypatch.setattr(os, "unlink", _refuse)
    else:
        monkeypatch.setattr(journal._fs, "open", _refuse)
        monkeypatch.setattr(journal._fs, "rm_file", _refuse)
    with pytest.raises(ArtifactError) as exc:
        journal.record(rec(2))
    assert exc.value.retryable
    with pytest.raises(ArtifactError):
        journal.forget(rec(1)["artifact_id"])
    monkeypatch.undo()
    assert sorted(by_id(journal.load())) == [rec(1)["artifact_id"]], "the old record stays"


def test_an_s3_endpoint_that_is_down_is_unavailable() -> None:
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    journal = CatalogJournal(
        "s3://no-such-bucket/journal",
        {
            "endpoint_url": "http://127.0.0.1:9",
            "key": "k",
            "secret": "s",
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
        },
    )
    with pytest.raises(UnavailableError):
        journal.load()


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise ConnectionRefusedError(111, "Connection refused")


# ---- scale ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "memory"])
def test_ten_thousand_records_load_quickly(where: str, tmp_path: Path) -> None:
    url = (
        str(tmp_path / "journal")
        if where == "file"
        else f"memory://gs-journal-{uuid.uuid4().hex[:12]}/journal"
    )
    journal = CatalogJournal(url)
    journal.record(rec(0))  # creates the directory
    for i in range(1, 10_000):
        put_raw(journal, f"{i:032x}.json", json.dumps({"format": 1, **rec(i)}).encode())
    start = time.perf_counter()
    records = journal.load()
    cat = ClusterCatalog()
    assert cat.restore(records) == []
    elapsed = time.perf_counter() - start
    assert len(records) == 10_000 and journal.last_skipped == 0 and len(cat) == 10_000
    assert elapsed < 10, f"loading 10k records took {elapsed:.1f}s"
    if where == "memory":
        _rm_memory(url)


def test_records_on_s3_are_read_in_batches(
    s3_options: dict[str, Any], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorcast_ray.global_store import journal as journal_module

    monkeypatch.setattr(journal_module, "_BATCH", 64)
    journal = CatalogJournal(f"s3://{bucket}/journal", s3_options)
    n = 300
    journal._fs.pipe(
        {
            f"{journal._dir}/{i:032x}.json": json.dumps({"format": 1, **rec(i)}).encode()
            for i in range(n)
        }
    )
    put_raw(journal, f"{'a' * 32}.json", b"{torn")
    start = time.perf_counter()
    records = journal.load()
    elapsed = time.perf_counter() - start
    assert sorted(r["seq"] for r in records) == list(range(1, n + 1))
    assert journal.last_skipped == 1
    assert elapsed < 30, f"loading {n} records from S3 took {elapsed:.1f}s"


# ---- the Global Store shell over a journal (its methods called in-process; Ray not started) --

NODE = "node-a" * 4


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A factory of Global Store actor objects (not Ray actors) over ``tmp_path/journal``;
    this module starts no Ray (the token and the node list are stubbed; in a whole-suite run
    the multinode session's cluster may be up, and these objects only ask it for names)."""
    import ray
    from tensorcast_ray.global_store import actor as actor_module

    monkeypatch.setattr(actor_module, "namespace_token", lambda namespace: "tok")
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": NODE, "Alive": True}])
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces=False: [])
    started: list[Any] = []

    def start(**config: Any) -> Any:
        config.setdefault("journal_url", str(tmp_path / "journal"))
        gs = actor_module.GlobalStoreActor({"metrics_port": 0, **config}, "ns")
        started.append(gs)
        assert gs._rebuilt.wait(60)
        return gs

    yield start
    for gs in started:
        gs.stop()


def write(gs: Any, key: str, aid: str, **kw: Any) -> dict[str, Any]:
    w = {"key": key, "artifact_id": aid, "node_id": NODE, "nbytes": 8, "tensors": 1, **kw}
    gs.reserve("tok", w)
    return dict(gs.commit("tok", w))


def files(gs: Any) -> list[str]:
    d = Path(gs.journal._dir)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_a_restarted_global_store_recovers_durable_keys_from_its_journal(shell: Any) -> None:
    gs = shell()
    a, b = "a" * 32, "b" * 32
    assert write(gs, "m:v1", a, persist_task_id="task-1")["persist_task_id"] == "task-1"
    write(gs, "m:v2", b)
    out = gs.mark_durable("tok", a, NODE, {"key": "m:v1", "root": "file:///shared"})
    assert out["durable"] and out["journaled"] and out["journal_configured"]
    assert files(gs) == [f"{a}.json"]
    assert gs.metrics.sample("tc_global_store_journal_writes_total", {"op": "record"}) == 1
    assert gs.metrics.sample("tc_global_store_durable_artifacts") == 1
    gs.leave("tok", NODE)  # its daemon stops: the durable version stays, m:v2 is lost
    assert gs.resolve("tok", "m:v1")["replicas"] == []
    gs.stop()

    again = shell()  # a restart: nothing reported, the daemon is gone
    entry = again.resolve("tok", "m:v1")
    assert entry["durable"] and entry["replicas"] == [] and entry["seq"] == 1
    assert entry["persist_task_id"] == "task-1"
    assert again.resolve("tok", "m:latest")["key"] == "m:v1"
    info = again.status()["journal"]
    assert info["configured"] and info["loaded"] == 1 and info["restored"] == 1
    assert again.status()["durable_artifacts"] == 1
    with pytest.raises(NotFoundError):
        again.resolve("tok", "m:v2")
    again.delete("tok", "m:v1", NODE)
    forgets = {"op": "forget"}
    wait_for(lambda: again.metrics.sample("tc_global_store_journal_writes_total", forgets) == 1)
    assert files(again) == []


def test_mark_durable_of_a_deleted_or_unknown_artifact_is_not_found(shell: Any) -> None:
    gs = shell()
    write(gs, "m:v1", "a" * 32)
    gs.delete("tok", "m:v1", NODE)
    with pytest.raises(NotFoundError, match="deleted"):
        gs.mark_durable("tok", "a" * 32, NODE, {})
    with pytest.raises(NotFoundError):
        gs.mark_durable("tok", "c" * 32, NODE, {})
    with pytest.raises(InvalidArgumentError):
        write(gs, "m:v2", "b" * 32)
        gs.mark_durable("tok", "b" * 32, NODE, {"key": "m:v3"})
    with pytest.raises(PermissionDeniedError):
        gs.mark_durable("wrong", "b" * 32, NODE, {})
    assert files(gs) == []


def test_a_delete_while_the_record_is_written_leaves_no_record(
    shell: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gs = shell()
    write(gs, "m:v1", "a" * 32)
    real = gs.journal.record

    def record_then_delete(rec: dict[str, Any]) -> None:
        real(rec)
        gs.delete("tok", "m:v1", NODE)  # lands between the write and the mark

    monkeypatch.setattr(gs.journal, "record", record_then_delete)
    with pytest.raises(NotFoundError):
        gs.mark_durable("tok", "a" * 32, NODE, {})
    wait_for(lambda: files(gs) == [])
    assert gs.status()["durable_artifacts"] == 0


def test_a_journal_that_fails_leaves_the_entry_durable_in_memory(
    shell: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gs = shell()
    write(gs, "m:v1", "a" * 32)
    monkeypatch.setattr(gs.journal, "record", _refuse)
    out = gs.mark_durable("tok", "a" * 32, NODE, {})
    assert out["durable"] and out["journaled"] is False
    assert gs.metrics.sample("tc_global_store_journal_errors_total", {"op": "record"}) == 1
    gs.leave("tok", NODE)
    assert gs.exists("tok", "m:v1"), "its files are on disk all the same"


def test_a_forget_that_fails_is_retried(shell: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gs = shell()
    write(gs, "m:v1", "a" * 32)
    gs.mark_durable("tok", "a" * 32, NODE, {})
    real = gs.journal.forget
    monkeypatch.setattr(gs.journal, "forget", _refuse)
    gs.delete("tok", "m:v1", NODE)
    wait_for(lambda: gs.status()["journal"]["pending_forgets"] == 1)
    assert files(gs) == [f"{'a' * 32}.json"]
    monkeypatch.setattr(gs.journal, "forget", real)
    gs._retry_forgets()
    assert files(gs) == [] and gs.status()["journal"]["pending_forgets"] == 0


def test_a_journal_that_cannot_be_read_at_start_is_given_up_on(
    shell: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorcast_ray.global_store import actor as actor_module

    monkeypatch.setattr(actor_module, "_JOURNAL_LOAD_TIMEOUT_S", 0.6)
    monkeypatch.setattr(CatalogJournal, "load", _refuse)
    start = time.monotonic()
    gs = shell()
    assert time.monotonic() - start < 30
    info = gs.status()["journal"]
    assert "refused" in info["load_error"] and info["loaded"] == 0
    assert gs.metrics.sample("tc_global_store_journal_errors_total", {"op": "load"}) >= 2


def test_the_environment_names_the_journal(tmp_path: Path) -> None:
    """TENSORCAST_RAY_JOURNAL_URL (read once, in from_env) overrides the config's URL where
    the Global Store's config is loaded (tc.init, the CLI)."""
    from tensorcast_ray._config import from_env, load_global_store_config

    env = from_env({"TENSORCAST_RAY_JOURNAL_URL": f"file://{tmp_path}/from-env"})
    assert load_global_store_config(env=env).journal_url == f"file://{tmp_path}/from-env"
    assert load_global_store_config(env=from_env({})).journal_url is None
    daemon = from_env({"TENSORCAST_RAY_PERSIST_URL": f"file://{tmp_path}/p"})
    from tensorcast_ray._config import load_daemon_config

    assert load_daemon_config(env=daemon).persist_url == f"file://{tmp_path}/p"
