"""The Global Store's cluster catalog as a pure state machine: no Ray, no clock, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
from tensorcast_ray.global_store.catalog import ClusterCatalog, Entry, Replica

from tensorcast_ray._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

A, B, C = "node-a" * 4, "node-b" * 4, "node-c" * 4  # longer than the 12 chars errors show
DEADLINE = 10_000


@pytest.fixture
def cat() -> ClusterCatalog:
    return ClusterCatalog()


def reserve(
    cat: ClusterCatalog,
    key: str,
    node: str = A,
    *,
    aid: str = "",
    request_id: str = "",
    deadline_ms: int = DEADLINE,
    now_ms: int = 0,
) -> Entry | None:
    return cat.reserve(
        key,
        aid or "id-" + key,
        node,
        request_id=request_id,
        deadline_ms=deadline_ms,
        now_ms=now_ms,
    )


def commit(cat: ClusterCatalog, key: str, node: str = A, *, aid: str = "") -> Entry:
    return cat.commit(
        key, aid or "id-" + key, node, nbytes=64, tensors=2, kind="put", created_ms=123
    )


def put(cat: ClusterCatalog, key: str, node: str = A, *, aid: str = "") -> Entry:
    assert reserve(cat, key, node, aid=aid) is None
    return commit(cat, key, node, aid=aid)


def replicas(entry: Entry) -> dict[str, str]:
    return {n: r.kind for n, r in entry.replicas.items()}


# ---- reserve / commit / abort --------------------------------------------------------------


def test_a_reservation_is_invisible_until_commit(cat: ClusterCatalog) -> None:
    assert reserve(cat, "m:v1") is None
    assert not cat.exists("m:v1") and len(cat) == 0 and cat.list_keys() == []
    with pytest.raises(NotFoundError, match="does not exist"):
        cat.resolve("m:v1")
    with pytest.raises(NotFoundError):
        cat.by_artifact("id-m:v1")
    with pytest.raises(NotFoundError):
        cat.resolve("m:latest")
    entry = commit(cat, "m:v1")
    assert entry.committed and entry.seq == 1
    assert (entry.nbytes, entry.tensors, entry.kind, entry.created_ms) == (64, 2, "put", 123)
    assert replicas(entry) == {A: "original"}
    assert cat.resolve("m:v1") is entry and cat.by_artifact("id-m:v1") is entry
    assert cat.exists("m:v1") and cat.exists("m:latest") and len(cat) == 1


def test_a_key_reserved_or_committed_anywhere_is_already_exists(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A)
    with pytest.raises(AlreadyExistsError, match="is being written") as exc:
        reserve(cat, "m:v1", B, aid="other")
    assert A[:12] in str(exc.value), "the error names the node holding the key"
    with pytest.raises(AlreadyExistsError):
        reserve(cat, "m:v1", A, aid="other")  # the same node without a retry id is refused too
    commit(cat, "m:v1", A)
    with pytest.raises(AlreadyExistsError, match="already exists"):
        reserve(cat, "m:v1", B, aid="other")
    assert cat.resolve("m:v1").artifact_id == "id-m:v1", "the refused writes changed nothing"


def test_an_abandoned_reservation_expires_at_its_deadline(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A, deadline_ms=100)
    with pytest.raises(AlreadyExistsError):
        reserve(cat, "m:v1", B, aid="second", now_ms=99)
    assert reserve(cat, "m:v1", B, aid="second", now_ms=100) is None
    with pytest.raises(FailedPreconditionError, match="not reserved"):
        commit(cat, "m:v1", A)  # the expired writer can no longer publish
    assert commit(cat, "m:v1", B, aid="second").node_id == B


def test_a_committed_version_never_expires(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A, deadline_ms=100)
    commit(cat, "m:v1", A)
    with pytest.raises(AlreadyExistsError):
        reserve(cat, "m:v1", B, aid="second", now_ms=1_000_000)


def test_a_retry_replaces_its_uncommitted_reservation(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A, aid="first", request_id="r1")
    assert reserve(cat, "m:v1", A, aid="second", request_id="r1") is None
    with pytest.raises(FailedPreconditionError):
        commit(cat, "m:v1", A, aid="first")  # the attempt its client never heard of is gone
    assert commit(cat, "m:v1", A, aid="second").artifact_id == "second"
    assert len(cat) == 1


def test_a_retry_of_a_committed_write_returns_it(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A, aid="first", request_id="r1")
    done = commit(cat, "m:v1", A, aid="first")
    again = reserve(cat, "m:v1", A, aid="second", request_id="r1")
    assert again is done and cat.resolve("m:v1").artifact_id == "first"
    with pytest.raises(FailedPreconditionError):
        commit(cat, "m:v1", A, aid="second")  # nothing was reserved for the retry


@pytest.mark.parametrize(
    ("node", "request_id"), [(B, "r1"), (A, "r2"), (A, "")], ids=["other-node", "other-id", "none"]
)
def test_only_the_same_request_on_the_same_node_is_a_retry(
    cat: ClusterCatalog, node: str, request_id: str
) -> None:
    reserve(cat, "m:v1", A, aid="first", request_id="r1")
    with pytest.raises(AlreadyExistsError):
        reserve(cat, "m:v1", node, aid="second", request_id=request_id)
    assert commit(cat, "m:v1", A, aid="first").artifact_id == "first"


def test_commit_without_a_matching_reservation_is_failed_precondition(
    cat: ClusterCatalog,
) -> None:
    with pytest.raises(FailedPreconditionError, match="write it again"):
        commit(cat, "m:v1")
    reserve(cat, "m:v1", A)
    with pytest.raises(FailedPreconditionError):
        commit(cat, "m:v1", B)  # another node cannot publish A's write
    with pytest.raises(FailedPreconditionError):
        cat.commit("m:v2", "id-m:v1", A, nbytes=1, tensors=1, kind="put", created_ms=0)
    assert not cat.exists("m:v1")


def test_commit_twice_keeps_the_first_commit(cat: ClusterCatalog) -> None:
    first = put(cat, "m:v1")
    put(cat, "m:v2")
    again = cat.commit("m:v1", "id-m:v1", A, nbytes=999, tensors=9, kind="register", created_ms=9)
    assert again is first and first.seq == 1 and first.nbytes == 64
    assert cat.resolve("m:latest").key == "m:v2", "a repeated commit does not renumber"


def test_abort_frees_the_key_and_ignores_everything_else(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A)
    cat.abort("m:v1", "id-m:v1")
    assert reserve(cat, "m:v1", B, aid="second") is None
    cat.abort("m:v1", "id-m:v1")  # no longer reserved: a no-op
    cat.abort("m:v1", "unknown")
    cat.abort("m:v2", "second")  # wrong key: a no-op
    commit(cat, "m:v1", B, aid="second")
    cat.abort("m:v1", "second")  # committed: a no-op
    assert cat.resolve("m:v1").node_id == B


@pytest.mark.parametrize(
    "kw",
    [
        {"key": "m:latest"},
        {"key": "m:LATEST"},
        {"key": "no-version"},
        {"key": 7},
        {"artifact_id": ""},
        {"node_id": ""},
        {"node_id": None},
    ],
)
def test_reserve_validates_its_arguments(cat: ClusterCatalog, kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"key": "m:v1", "artifact_id": "id", "node_id": A, **kw}
    with pytest.raises(InvalidArgumentError):
        cat.reserve(
            args["key"], args["artifact_id"], args["node_id"], deadline_ms=DEADLINE, now_ms=0
        )
    assert cat.names() == 0


# ---- reads ---------------------------------------------------------------------------------


def test_latest_is_the_newest_commit_not_the_newest_reservation(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1")
    reserve(cat, "m:v2")
    commit(cat, "m:v2")
    assert cat.resolve("m:latest").key == "m:v2"
    commit(cat, "m:v1")
    assert cat.resolve("m:latest").key == "m:v1", "v1 committed last"


def test_latest_is_commit_order_not_lexical(cat: ClusterCatalog) -> None:
    put(cat, "m:v9")
    put(cat, "m:v10")
    put(cat, "m:a")
    assert cat.resolve("m:latest").key == "m:a"
    cat.delete("m:a")
    assert cat.resolve("m:latest").key == "m:v10"


def test_latest_of_an_unknown_name_is_not_found(cat: ClusterCatalog) -> None:
    put(cat, "other:v1")
    with pytest.raises(NotFoundError, match="no version of 'm'"):
        cat.resolve("m:latest")
    assert not cat.exists("m:latest") and not cat.exists("m:v1")


def test_resolve_validates_the_key(cat: ClusterCatalog) -> None:
    with pytest.raises(InvalidArgumentError):
        cat.resolve("no-version")


def test_entries_and_list_keys_are_committed_sorted_and_filtered(cat: ClusterCatalog) -> None:
    put(cat, "b:v1")
    put(cat, "a:v2")
    put(cat, "a:v1")
    put(cat, "ab:v1")
    reserve(cat, "a:v3")  # not committed: never listed
    assert cat.list_keys() == ["a:v1", "a:v2", "ab:v1", "b:v1"]
    assert cat.list_keys("a:") == ["a:v1", "a:v2"]
    assert cat.list_keys("a") == ["a:v1", "a:v2", "ab:v1"]
    assert cat.list_keys("zzz") == []
    assert [e.artifact_id for e in cat.entries("b")] == ["id-b:v1"]
    assert len(cat) == 4 and cat.names() == 3


def test_to_dict_lists_the_replicas(cat: ClusterCatalog) -> None:
    entry = put(cat, "m:v1")
    cat.add_replica("id-m:v1", B, "cache")
    raw = entry.to_dict()
    assert raw["key"] == "m:v1" and raw["seq"] == 1 and raw["created_unix_ms"] == 123
    assert raw["replicas"] == [
        {"node_id": A, "kind": "original", "tier": "stable_dram"},
        {"node_id": B, "kind": "cache", "tier": "stable_dram"},
    ]


# ---- replicas ------------------------------------------------------------------------------


def test_a_replica_kind_only_ever_upgrades(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    entry = cat.add_replica("id-m:v1", B, "cache")
    assert replicas(entry) == {A: "original", B: "cache"}
    cat.add_replica("id-m:v1", B, "replica")
    assert replicas(entry)[B] == "replica", "a cache copy asked to be kept becomes a replica"
    cat.add_replica("id-m:v1", B, "cache")
    assert replicas(entry)[B] == "replica", "a replica never drops to cache"
    cat.add_replica("id-m:v1", A, "cache")
    cat.add_replica("id-m:v1", A, "replica")
    assert replicas(entry)[A] == "original"
    cat.add_replica("id-m:v1", C, "original")
    assert replicas(entry) == {A: "original", B: "replica", C: "original"}
    cat.add_replica("id-m:v1", C, "cache")
    assert replicas(entry)[C] == "original"


def test_add_replica_refuses_bad_kinds_and_unknown_artifacts(cat: ClusterCatalog) -> None:
    put(cat, "m:v1")
    with pytest.raises(InvalidArgumentError, match="replica kind"):
        cat.add_replica("id-m:v1", B, "mirror")
    with pytest.raises(NotFoundError):
        cat.add_replica("unknown", B, "cache")
    reserve(cat, "m:v2")
    with pytest.raises(NotFoundError):
        cat.add_replica("id-m:v2", B, "cache")  # a version still being written has no copies
    assert replicas(cat.resolve("m:v1")) == {A: "original"}


def test_dropping_a_copy_keeps_the_version_until_the_last_one(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    cat.add_replica("id-m:v1", B, "cache")
    assert cat.drop_replica("id-m:v1", A, final=False) == []
    assert replicas(cat.resolve("m:v1")) == {B: "cache"}, "the original may go, a copy stays"
    assert cat.drop_replica("id-m:v1", C, final=False) == [], "a node that never held it"
    assert cat.exists("m:v1")
    assert cat.drop_replica("id-m:v1", B, final=False) == []
    assert not cat.exists("m:v1"), "its last copy was evicted: the version is gone"
    with pytest.raises(NotFoundError):
        cat.by_artifact("id-m:v1")
    assert len(cat) == 0 and cat.names() == 0
    assert reserve(cat, "m:v1", B, aid="again") is None, "the key can be written again"


def test_a_final_drop_ends_the_version_and_names_the_other_holders(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    cat.add_replica("id-m:v1", B, "replica")
    cat.add_replica("id-m:v1", C, "cache")
    others = cat.drop_replica("id-m:v1", A, final=True)
    assert sorted(others) == sorted([B, C])
    assert not cat.exists("m:v1") and len(cat) == 0
    assert cat.drop_replica("id-m:v1", B, final=True) == [], "already gone: nothing to tell"


def test_drop_replica_of_an_unknown_artifact_does_nothing(cat: ClusterCatalog) -> None:
    put(cat, "m:v1")
    assert cat.drop_replica("unknown", A, final=True) == []
    assert cat.drop_replica("unknown", A, final=False) == []
    assert cat.exists("m:v1")


def test_a_non_final_drop_keeps_a_reservation(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A)
    assert cat.drop_replica("id-m:v1", A, final=False) == []
    assert commit(cat, "m:v1", A).committed, "a write in progress holds no copy to lose"


# ---- delete --------------------------------------------------------------------------------


def test_delete_returns_the_entry_with_every_holder(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    put(cat, "m:v2", A)
    cat.add_replica("id-m:v2", B, "cache")
    gone = cat.delete("m:v2")
    assert gone.artifact_id == "id-m:v2" and replicas(gone) == {A: "original", B: "cache"}
    assert not cat.exists("m:v2") and cat.resolve("m:latest").key == "m:v1"
    with pytest.raises(NotFoundError):
        cat.by_artifact("id-m:v2")
    with pytest.raises(NotFoundError):
        cat.delete("m:v2")  # deleting twice


def test_delete_refuses_latest_and_unknown_keys(cat: ClusterCatalog) -> None:
    put(cat, "m:v1")
    with pytest.raises(InvalidArgumentError, match="explicit version"):
        cat.delete("m:latest")
    with pytest.raises(NotFoundError):
        cat.delete("m:v9")
    reserve(cat, "m:v2")
    with pytest.raises(NotFoundError):
        cat.delete("m:v2")  # a write in progress is not deleted
    assert cat.list_keys() == ["m:v1"] and commit(cat, "m:v2").committed


# ---- nodes ---------------------------------------------------------------------------------


def test_a_node_that_leaves_loses_what_only_it_held(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    put(cat, "m:v2", A)
    cat.add_replica("id-m:v1", B, "replica")
    put(cat, "n:v1", B)
    assert cat.drop_node(A) == ["m:v2"]
    with pytest.raises(NotFoundError, match="was lost") as exc:
        cat.resolve("m:v2")
    assert A in str(exc.value), "the message names the node it lived on"
    assert cat.resolve("m:latest").key == "m:v1", "latest skips a lost version"
    assert replicas(cat.resolve("m:v1")) == {B: "replica"}
    assert cat.exists("n:v1") and cat.nodes() == {B}
    assert cat.drop_node(A) == [], "leaving twice loses nothing more"


def test_latest_of_a_name_whose_every_version_was_lost_says_so(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    put(cat, "m:v2", A)
    assert sorted(cat.drop_node(A)) == ["m:v1", "m:v2"]
    with pytest.raises(NotFoundError, match=r"2 version\(s\) were lost"):
        cat.resolve("m:latest")
    assert len(cat) == 0 and cat.names() == 0


def test_the_lost_hint_counts_only_versions_of_that_name(cat: ClusterCatalog) -> None:
    put(cat, "m:x:v1", A)
    assert cat.drop_node(A) == ["m:x:v1"]
    with pytest.raises(NotFoundError) as exc:
        cat.resolve("m:latest")
    assert "lost" not in str(exc.value), "no version of 'm' was ever lost"


def test_a_leaving_node_drops_its_reservations_only(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A)
    reserve(cat, "m:v2", B)
    assert cat.drop_node(A) == [], "a write in progress is not a lost version"
    with pytest.raises(FailedPreconditionError):
        commit(cat, "m:v1", A)
    assert reserve(cat, "m:v1", C, aid="again") is None
    with pytest.raises(NotFoundError, match="does not exist"):
        cat.resolve("m:v1")
    assert commit(cat, "m:v2", B).committed


def test_a_lost_key_can_be_written_again(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    cat.drop_node(A)
    put(cat, "m:v1", B, aid="rewritten")
    assert cat.resolve("m:v1").artifact_id == "rewritten"
    cat.delete("m:v1")
    with pytest.raises(NotFoundError) as exc:
        cat.resolve("m:v1")
    assert "lost" not in str(exc.value), "it was deleted since: no longer reported as lost"


def test_a_lost_key_reserved_again_but_aborted_is_no_longer_lost(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    cat.drop_node(A)
    reserve(cat, "m:v1", B, aid="again")
    cat.abort("m:v1", "again")
    with pytest.raises(NotFoundError, match="does not exist"):
        cat.resolve("m:v1")


# ---- sync_node (rebuild after a restart) ---------------------------------------------------


def report(key: str, seq: int = 0, **kw: Any) -> dict[str, Any]:
    return {"artifact_id": "id-" + key, "key": key, "seq": seq, "nbytes": 64, **kw}


def test_a_restarted_catalog_is_rebuilt_with_its_commit_order(cat: ClusterCatalog) -> None:
    # v1 committed after v2 before the restart: latest must still answer v1.
    assert cat.sync_node(A, [report("m:v1", 5), report("m:v2", 3)]) == []
    assert cat.resolve("m:latest").key == "m:v1"
    v1 = cat.resolve("m:v1")
    assert v1.committed and v1.seq == 5 and v1.node_id == A and v1.nbytes == 64
    assert replicas(v1) == {A: "original"}
    put(cat, "m:v3", B)
    assert cat.resolve("m:v3").seq == 6, "new commits number after the restored ones"
    assert cat.resolve("m:latest").key == "m:v3"


def test_sync_keeps_the_writer_and_the_reported_kind(cat: ClusterCatalog) -> None:
    cat.sync_node(B, [report("m:v1", 2, writer=A, replica_kind="cache", tensors=3)])
    entry = cat.resolve("m:v1")
    assert entry.node_id == A and entry.tensors == 3 and replicas(entry) == {B: "cache"}
    cat.sync_node(A, [report("m:v1", 2)])
    assert replicas(entry) == {A: "original", B: "cache"}
    assert len(cat) == 1


def test_a_report_without_seq_gets_the_next_number(cat: ClusterCatalog) -> None:
    put(cat, "m:v1")
    cat.sync_node(B, [report("m:v2")])
    assert cat.resolve("m:v2").seq == 2 and cat.resolve("m:latest").key == "m:v2"


def test_sync_makes_the_nodes_replicas_exactly_the_reported_set(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    put(cat, "m:v2", A)
    put(cat, "m:v3", B)
    cat.add_replica("id-m:v1", B, "cache")
    cat.add_replica("id-m:v3", A, "replica")
    # A restarted and holds only m:v1 and (newly) a cache copy of m:v3.
    refused = cat.sync_node(
        A, [{"artifact_id": "id-m:v1", "key": "m:v1"}, report("m:v3", replica_kind="cache")]
    )
    assert refused == []
    assert replicas(cat.resolve("m:v1")) == {A: "original", B: "cache"}
    assert not cat.exists("m:v2"), "its only copy was on A, which no longer has it"
    assert set(replicas(cat.resolve("m:v3"))) == {A, B}
    assert cat.list_keys() == ["m:v1", "m:v3"]
    cat.sync_node(A, [])
    assert cat.list_keys() == ["m:v1", "m:v3"] and cat.nodes() == {B}


def test_sync_refuses_an_artifact_whose_key_another_holds(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", B, aid="winner")
    reserve(cat, "m:v2", B, aid="writing")
    refused = cat.sync_node(
        A,
        [
            {"artifact_id": "stale", "key": "m:v1"},
            {"artifact_id": "stale2", "key": "m:v2"},
            report("m:v3", 7),
        ],
    )
    assert refused == ["stale", "stale2"], "the daemon should drop these"
    assert cat.resolve("m:v1").artifact_id == "winner" and replicas(cat.resolve("m:v1")) == {
        B: "original"
    }
    with pytest.raises(NotFoundError):
        cat.by_artifact("stale")
    assert commit(cat, "m:v2", B, aid="writing").committed
    assert cat.exists("m:v3")


def test_a_sync_brings_a_lost_key_back(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    cat.drop_node(A)
    assert not cat.exists("m:v1")
    cat.sync_node(A, [report("m:v1", 1)])
    assert cat.resolve("m:v1").replicas == {A: Replica(A, "original")}
    cat.delete("m:v1")
    with pytest.raises(NotFoundError, match="does not exist"):
        cat.resolve("m:v1")


def test_sync_skips_an_artifact_being_written_again(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1", A)
    assert cat.sync_node(A, [report("m:v1", 4)]) == []
    assert not cat.exists("m:v1"), "its commit will publish it"
    assert commit(cat, "m:v1", A).seq == 1


def test_len_and_names_count_committed_versions_and_names(cat: ClusterCatalog) -> None:
    assert len(cat) == 0 and cat.names() == 0
    put(cat, "a:v1")
    put(cat, "a:v2")
    reserve(cat, "b:v1")
    assert len(cat) == 2
    assert cat.names() == 2, "a name with only a write in progress counts as a name"
    cat.abort("b:v1", "id-b:v1")
    cat.delete("a:v1")
    assert len(cat) == 1 and cat.names() == 1


# ---- durable entries (a complete copy on shared disk) and the journal replay --------------


def record(key: str, seq: int, aid: str = "", **kw: Any) -> dict[str, Any]:
    """A journal record (what :meth:`Entry.to_record` writes)."""
    return {
        "key": key,
        "artifact_id": aid or "id-" + key,
        "node_id": A,
        "seq": seq,
        "nbytes": 64,
        "tensors": 2,
        "kind": "put",
        "created_ms": 123,
        "persist_task_id": "task-" + key,
        **kw,
    }


def test_commit_records_the_persist_task_and_to_dict_says_durable(cat: ClusterCatalog) -> None:
    reserve(cat, "m:v1")
    entry = cat.commit(
        "m:v1", "id-m:v1", A, nbytes=1, tensors=1, kind="put", created_ms=1, persist_task_id="t1"
    )
    assert entry.persist_task_id == "t1" and not entry.durable
    d = entry.to_dict()
    assert d["durable"] is False and d["persist_task_id"] == "t1"
    assert cat.mark_durable("id-m:v1") is entry and entry.durable
    assert entry.to_dict()["durable"] is True
    assert cat.mark_durable("id-m:v1") is entry and cat.durable_count() == 1, "idempotent"
    assert put(cat, "m:v2").to_dict()["persist_task_id"] == "", "no task: empty"


def test_mark_durable_of_an_unknown_or_uncommitted_artifact_is_not_found(
    cat: ClusterCatalog,
) -> None:
    with pytest.raises(NotFoundError):
        cat.mark_durable("nope")
    reserve(cat, "m:v1")
    with pytest.raises(NotFoundError):
        cat.mark_durable("id-m:v1")
    commit(cat, "m:v1")
    cat.delete("m:v1")
    with pytest.raises(NotFoundError):  # deleted meanwhile: the daemon removes its files
        cat.mark_durable("id-m:v1")
    assert cat.take_dropped_durable() == [], "it was never durable"


def test_a_durable_entry_outlives_its_last_copy(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    cat.add_replica("id-m:v1", B, "cache")
    cat.mark_durable("id-m:v1")
    assert cat.drop_replica("id-m:v1", B, final=False) == []
    assert cat.drop_replica("id-m:v1", A, final=False) == []
    entry = cat.resolve("m:v1")
    assert entry.replicas == {} and entry.to_dict()["replicas"] == []
    assert cat.list_keys() == ["m:v1"] and len(cat) == 1 and cat.nodes() == set()
    assert cat.take_dropped_durable() == []
    assert replicas(cat.add_replica("id-m:v1", C, "cache")) == {C: "cache"}, "rehydrated"


def test_a_node_leaving_does_not_lose_a_durable_version(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    put(cat, "m:v2", A)
    cat.mark_durable("id-m:v1")
    assert cat.drop_node(A) == ["m:v2"], "only the version without a disk copy is lost"
    assert cat.resolve("m:v1").replicas == {}
    assert cat.resolve("m:latest").key == "m:v1"
    with pytest.raises(NotFoundError, match=r"StorePolicy\(profile='durable'\)"):
        cat.resolve("m:v2")
    with pytest.raises(AlreadyExistsError):  # still immutable
        reserve(cat, "m:v1", B, aid="other")


def test_a_full_report_without_a_durable_copy_keeps_the_entry(cat: ClusterCatalog) -> None:
    put(cat, "m:v1", A)
    put(cat, "m:v2", A)
    cat.mark_durable("id-m:v1")
    assert cat.sync_node(A, []) == []
    assert cat.exists("m:v1") and cat.resolve("m:v1").replicas == {}
    assert not cat.exists("m:v2")
    cat.sync_node(B, [report("m:v1", 1, replica_kind="cache")])
    assert replicas(cat.resolve("m:v1")) == {B: "cache"}


def test_delete_and_a_final_drop_end_a_durable_entry_and_say_so(cat: ClusterCatalog) -> None:
    for key in ("m:v1", "m:v2", "m:v3"):
        put(cat, key, A)
        cat.mark_durable("id-" + key)
    assert cat.durable_count() == 3
    cat.delete("m:v1")
    assert cat.drop_replica("id-m:v2", A, final=True) == []
    assert not cat.exists("m:v1") and not cat.exists("m:v2")
    assert cat.take_dropped_durable() == ["id-m:v1", "id-m:v2"]
    assert cat.take_dropped_durable() == [], "drained"
    assert cat.durable_count() == 1
    cat.drop_replica("id-m:v3", A, final=False)  # its copy went; the entry stays
    assert cat.take_dropped_durable() == [] and cat.durable_count() == 1
    cat.delete("m:v3")
    assert cat.take_dropped_durable() == ["id-m:v3"] and cat.durable_count() == 0


def test_restore_recreates_durable_entries_with_their_commit_order(cat: ClusterCatalog) -> None:
    skipped = cat.restore([record("m:v1", 7), record("m:v2", 3), record("n:v1", 5)])
    assert skipped == []
    assert len(cat) == 3 and cat.durable_count() == 3
    v1 = cat.resolve("m:v1")
    assert v1.committed and v1.durable and v1.replicas == {} and v1.seq == 7
    assert (v1.node_id, v1.nbytes, v1.tensors, v1.kind, v1.created_ms) == (A, 64, 2, "put", 123)
    assert v1.persist_task_id == "task-m:v1"
    assert cat.resolve("m:latest").key == "m:v1"
    assert put(cat, "m:v3", B).seq == 8, "new commits number after the journal's"
    # the daemons' reports add their copies
    assert cat.sync_node(B, [report("m:v2", 3, writer=A)]) == []
    assert replicas(cat.resolve("m:v2")) == {B: "original"}
    assert cat.resolve("m:v2").durable


def test_restore_skips_what_another_artifact_holds_and_marks_the_same_one(
    cat: ClusterCatalog,
) -> None:
    put(cat, "m:v1", A)  # reported by its daemon before the journal was read
    reserve(cat, "m:v2", A)
    commit(cat, "m:v2", A, aid="")
    got = cat.restore(
        [
            record("m:v1", 1),  # the same artifact: now durable
            record("m:v2", 9, aid="old-v2"),  # the key is another artifact's
            record("m:v3", 4),
            record("m:v3", 4, aid="dup-v3"),  # two records, one key: the first wins
        ]
    )
    assert got == ["old-v2", "dup-v3"]
    assert cat.resolve("m:v1").durable and replicas(cat.resolve("m:v1")) == {A: "original"}
    assert not cat.resolve("m:v2").durable and cat.resolve("m:v2").artifact_id == "id-m:v2"
    assert cat.resolve("m:v3").artifact_id == "id-m:v3"
    assert cat.sync_node(A, [report("m:v3", 4, artifact_id="dup-v3")]) == ["dup-v3"]


def test_restore_skips_malformed_records(cat: ClusterCatalog) -> None:
    bad: list[Any] = [
        {"artifact_id": "x1"},  # no key
        record("m:latest", 1, aid="x2"),  # not writable
        record("nocolon", 1, aid="x3"),
        {**record("m:v4", 1), "artifact_id": ""},
        {**record("m:v5", 1, aid="x5"), "seq": "three"},
        "not a mapping",
    ]
    assert cat.restore(bad) == ["x1", "x2", "x3", "", "x5", ""]
    assert len(cat) == 0 and cat.durable_count() == 0


def test_a_restored_entry_is_deleted_like_any_other(cat: ClusterCatalog) -> None:
    cat.restore([record("m:v1", 1)])
    cat.delete("m:v1")
    assert cat.take_dropped_durable() == ["id-m:v1"]
    cat.restore([record("m:v2", 2)])
    cat.drop_node(A)
    assert cat.exists("m:v2")


def test_restore_of_ten_thousand_records_is_quick(cat: ClusterCatalog) -> None:
    import time

    records = [record(f"model-{i % 100}:v{i}", i + 1) for i in range(10_000)]
    start = time.perf_counter()
    assert cat.restore(records) == []
    elapsed = time.perf_counter() - start
    assert len(cat) == 10_000 and cat.names() == 100
    assert cat.resolve("model-99:latest").key == "model-99:v9999"
    assert elapsed < 2.0, f"restore took {elapsed:.2f}s"


def test_a_reported_durable_copy_makes_its_entry_outlive_every_copy() -> None:
    """After a restart without a journal, a daemon's full report carries durability: once
    its copies go, the version stays (read back from disk) instead of being lost."""
    cat = ClusterCatalog()
    cat.sync_node(A, [report("d:v1", 4, durable=True, persist_task_id="pt-x"), report("m:v1", 5)])
    entry = cat.resolve("d:v1")
    assert entry.durable and entry.persist_task_id == "pt-x"
    assert not cat.resolve("m:v1").durable
    lost = cat.drop_node(A)
    assert lost == ["m:v1"]
    assert cat.resolve("d:v1").replicas == {}


def test_a_newer_reported_artifact_wins_over_a_stale_journal_record() -> None:
    """A deleted version whose journal record was not forgotten (the Global Store died
    first) comes back at restart; a daemon reporting a newer artifact under that key wins."""
    cat = ClusterCatalog()
    cat.restore(
        [
            {
                "key": "k:v1",
                "artifact_id": "old",
                "node_id": A,
                "seq": 3,
                "nbytes": 1,
                "tensors": 1,
                "kind": "put",
                "created_ms": 0,
                "persist_task_id": "",
            }
        ]
    )
    assert cat.resolve("k:v1").artifact_id == "old"
    assert cat.sync_node(B, [{"artifact_id": "new", "key": "k:v1", "seq": 7, "nbytes": 2}]) == []
    assert cat.resolve("k:v1").artifact_id == "new"
    assert cat.take_dropped_durable() == ["old"] and cat.durable_count() == 0
    # An older report loses to the record.
    cat.restore([{"key": "j:v1", "artifact_id": "rec", "node_id": A, "seq": 9}])
    assert cat.sync_node(B, [{"artifact_id": "x", "key": "j:v1", "seq": 2}]) == ["x"]
