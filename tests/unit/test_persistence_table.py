"""The pure persistence task table (daemon/persistence.py) and the local index's holds: task
states, outcomes by requirement, shard progress and retries, cancellation, history bounds."""

from __future__ import annotations

import pytest
from tensorcast_ray.daemon.local_index import AdmitRequest, LocalIndex
from tensorcast_ray.daemon.persistence import PersistenceTable, TaskPlan, plan_task

from tensorcast_ray._policy import StorePolicy, TierSpec, resolve_policy

MiB = 1 << 20


def table_with(plan: TaskPlan, nbytes: int = 100) -> tuple[PersistenceTable, str]:
    table = PersistenceTable()
    table.create("pt-a", "m:v1", "a", nbytes, plan, now_ms=1)
    return table, "pt-a"


def disk_events(table: PersistenceTable, task: str, sizes: list[int]) -> None:
    for i, size in enumerate(sizes):
        table.disk_shard(task, i, "pending", 0, 0, target=f"file:///r/s{i}", total_bytes=size)


def test_a_task_goes_pending_running_success_with_progress() -> None:
    table, task = table_with(TaskPlan(disk="must"))
    t = table.get(task)
    assert t is not None and t.state == "pending" and t.progress == 0.0
    assert table.start(task, now_ms=2) is t and t.state == "running"
    disk_events(table, task, [60, 40])
    table.disk_shard(task, 0, "running", 30, 1, target="file:///r/s0", total_bytes=60)
    assert t.progress == pytest.approx(0.3)
    assert table.running_progress() == pytest.approx(0.3)
    table.disk_shard(task, 0, "success", 60, 1, target="file:///r/s0", total_bytes=60)
    assert t.progress == pytest.approx(0.6)
    table.finish_disk(task, None)
    done = table.finish(task, now_ms=9)
    assert (done.state, done.durable, done.progress, done.finished_ms) == ("success", True, 1, 9)
    assert [s.state for s in done.shards] == ["success", "success"]
    assert table.counts()["success"] == 1 and table.running_progress() == 0.0


def test_progress_reaches_one_only_when_placed_and_a_retry_restarts_its_shard() -> None:
    table, task = table_with(TaskPlan(disk="must"))
    table.start(task, 2)
    disk_events(table, task, [50])
    # Every byte handed over is not every byte stored (an upload publishes at its end).
    table.disk_shard(task, 0, "running", 50, 1, target="file:///r/s0", total_bytes=50)
    t = table.get(task)
    assert t is not None and 0.99 < t.progress < 1.0
    table.disk_shard(task, 0, "retrying", 50, 1, target="x", total_bytes=50, error="reset")
    [shard] = t.shards
    assert (shard.state, shard.done_bytes, shard.attempts, shard.error) == (
        "retrying",
        0,
        1,
        "reset",
    )
    table.disk_shard(task, 0, "running", 10, 2, target="x", total_bytes=50)
    assert shard.attempts == 2 and shard.progress == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("requirement", "state", "code"),
    [
        ("must", "failed", "UNAVAILABLE"),
        ("should", "degraded", "UNAVAILABLE"),
        ("may", "success", ""),
    ],
)
def test_a_disk_failure_ends_by_its_requirement(requirement: str, state: str, code: str) -> None:
    table, task = table_with(TaskPlan(disk=requirement))
    table.start(task, 2)
    table.finish_disk(task, ("UNAVAILABLE", "s3 is down"))
    done = table.finish(task, 3)
    assert done.state == state and not done.durable
    assert done.last_error_code == code
    if requirement == "should":
        assert "s3 is down" in done.degraded_reason


def test_a_remote_tier_short_of_copies_degrades() -> None:
    table, task = table_with(TaskPlan(disk="must", remote="should", remote_replicas=2))
    table.start(task, 2)
    table.finish_disk(task, None)
    table.plan_remote(task, ["n1"])
    table.remote_shard(task, "n1", "running")
    table.remote_shard(task, "n1", "success")
    table.finish_remote(task, 1, ("UNAVAILABLE", "only 1 other node(s) can hold a copy"))
    done = table.finish(task, 3)
    assert done.state == "degraded" and done.durable
    assert "1 of 2 remote stable replica(s)" in done.degraded_reason
    remote = [s for s in done.shards if s.tier == "stable_dram"]
    assert [(s.target, s.state, s.progress) for s in remote] == [("n1", "success", 1.0)]


def test_cancel_fails_the_task_aborted_and_a_queued_one_never_starts() -> None:
    table, task = table_with(TaskPlan(disk="must"))
    stopped = table.cancel("a", "deleted", now_ms=5)
    assert stopped is not None and stopped.state == "failed"
    assert stopped.last_error_code == "ABORTED" and stopped.cancelled
    assert table.start(task, 6) is None  # the runner skips it
    assert table.cancel("a", "again", 7) is None  # already ended
    assert table.finish(task, 8).state == "failed"
    assert table.cancel("unknown", "x", 9) is None


def test_a_crash_fails_the_task_internal() -> None:
    table, task = table_with(TaskPlan(disk="should"))
    table.start(task, 2)
    table.crashed(task, "bug")
    done = table.finish(task, 3)
    assert (done.state, done.last_error_code) == ("failed", "INTERNAL")


def test_finished_tasks_are_remembered_up_to_the_history() -> None:
    table = PersistenceTable(history=2)
    for i in range(4):
        table.create(f"pt-{i}", f"m:{i}", str(i), 1, TaskPlan(disk="must"), 0)
        table.start(f"pt-{i}", 0)
        table.finish_disk(f"pt-{i}", None)
        table.finish(f"pt-{i}", 1)
    assert [table.get(f"pt-{i}") is not None for i in range(4)] == [False, False, True, True]
    assert table.for_artifact("0") is None and table.for_artifact("3") is not None
    assert table.counts()["success"] == 2


def test_a_task_needs_a_tier_beyond_this_node() -> None:
    with pytest.raises(ValueError, match="disk or a remote"):
        PersistenceTable().create("pt", "k:v", "a", 1, TaskPlan(), 0)
    assert not plan_task(resolve_policy(StorePolicy(profile="pinned")))
    explicit = resolve_policy(
        StorePolicy(may=[TierSpec("shared_disk", "any")], should=[TierSpec("stable_dram")])
    )
    assert plan_task(explicit) == TaskPlan(disk="may")


def test_a_held_entry_is_never_evicted_or_expired_but_can_be_removed() -> None:
    index = LocalIndex(100)
    index.admit(AdmitRequest("held", 60, "should", "ttl", 10, "evict"), now_ms=0)
    assert index.hold("held") and not index.hold("missing")
    # Past its TTL and needed for room: held, it stays.
    assert index.expire(1000) == ()
    decision = index.admit(AdmitRequest("new", 60, "should", "best_effort", None, "evict"), 1000)
    assert not decision.admitted and decision.evict == ()
    index.unhold("held")
    assert index.expire(1001) == ("held",)
    index.admit(AdmitRequest("h2", 10, "should", "best_effort", None, "evict"), 0)
    index.hold("h2")
    assert index.remove("h2") == 10  # a delete still works (its task is stopped)
    index.unhold("h2")  # a late unhold of a removed entry is harmless


def test_spill_evicts_only_durable_entries() -> None:
    index = LocalIndex(100)
    index.admit(AdmitRequest("plain", 40, "should", "best_effort", None, "evict"), 0)
    index.admit(AdmitRequest("disk", 40, "should", "best_effort", None, "evict"), 1)
    spill = AdmitRequest("new", 40, "should", "best_effort", None, "spill")
    assert not index.admit(spill, 2).admitted  # nothing durable yet
    assert index.mark_durable("disk")
    decision = index.admit(spill, 3)
    assert decision.admitted and decision.evict == ("disk",)


def test_a_spill_entry_is_evicted_by_nobody_until_durable() -> None:
    """Spill is the entry's own term: a plain (evict) put's pressure may not take a spill
    artifact whose disk copy is not complete either."""
    index = LocalIndex(100)
    index.admit(AdmitRequest("spilly", 60, "should", "best_effort", None, "spill"), 0)
    plain = AdmitRequest("plain", 60, "should", "best_effort", None, "evict")
    assert not index.admit(plain, 1).admitted
    index.mark_durable("spilly")
    decision = index.admit(plain, 2)
    assert decision.admitted and decision.evict == ("spilly",)
