"""Weight sync's pure parts, without Ray: version numbering, garbage-collection candidates,
what counts as newer, the reader hold table, the Global Store's commit log for watchers,
and the daemon's per-name wake-up counters."""

from __future__ import annotations

import threading

import pytest
from tensorcast_ray.daemon import weights as daemon_weights
from tensorcast_ray.daemon.weights import LatestWatch
from tensorcast_ray.global_store import catalog as catalog_mod
from tensorcast_ray.global_store.catalog import ClusterCatalog

from tensorcast_ray._errors import InvalidArgumentError, ResourceExhaustedError
from tensorcast_ray._holds import MAX_HOLD_TTL_S, HoldTable
from tensorcast_ray._weights import gc_candidates, is_newer, next_version


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---- publish rules ------------------------------------------------------------------------------
def test_next_version_is_one_past_the_largest_integer_version() -> None:
    assert next_version([], None) == 1
    assert next_version(["p:1", "p:7", "p:final", "p:3"], None) == 8
    assert next_version(["p:2"], 10) == 11  # what this publisher wrote counts too
    assert next_version(["p:best", "p:v2"], None) == 1  # non-integer versions never count


def test_gc_candidates_are_all_but_the_newest_keep_last_oldest_first() -> None:
    published = ["p:1", "p:2", "p:3", "p:4"]
    assert gc_candidates(published, 2) == ["p:1", "p:2"]
    assert gc_candidates(published, 4) == []
    assert gc_candidates(published, 10) == []
    assert gc_candidates(published, 1) == ["p:1", "p:2", "p:3"]
    with pytest.raises(InvalidArgumentError):
        gc_candidates(published, 0)


def test_is_newer_compares_integer_versions_and_accepts_any_other_change() -> None:
    assert is_newer("p:1", None) and is_newer("p:1", "")
    assert not is_newer("p:3", "p:3")
    assert is_newer("p:4", "p:3")
    assert not is_newer("p:2", "p:3")  # latest moved back after a delete: not an update
    assert is_newer("p:final", "p:3") and is_newer("p:3", "p:final")


# ---- holds -----------------------------------------------------------------------------------
def test_holds_count_until_released_expired_or_their_owner_ends() -> None:
    table = HoldTable()
    a = table.take("art-1", "s1", 60, now=0)
    b = table.take("art-1", "s2", 10, now=0)
    table.take("art-2", "s1", 60, now=0)
    assert table.count("art-1", now=1) == 2 and len(table) == 3
    assert table.release(a) and not table.release(a)  # a second release is a no-op
    assert table.count("art-1", now=1) == 1
    assert table.count("art-1", now=10) == 0  # b's ttl passed
    assert not table.release(b)
    assert table.release_owner("s1") == 1 and len(table) == 0
    table.take("art-3", "node-a/s9", 60, now=0)
    table.take("art-3", "node-b/s9", 60, now=0)
    assert table.release_prefix("node-a/") == 1
    assert table.count("art-3", now=0) == 1


def test_hold_ttl_and_table_size_are_bounded() -> None:
    table = HoldTable(max_holds=2)
    for bad in (0, -1, MAX_HOLD_TTL_S + 1, float("nan")):
        with pytest.raises(InvalidArgumentError, match="ttl_s"):
            table.take("a", "s", bad, now=0)
    table.take("a", "s", 5, now=0)
    table.take("a", "s", 5, now=0)
    with pytest.raises(ResourceExhaustedError, match="reader holds are open"):
        table.take("a", "s", 5, now=1)
    table.take("a", "s", 5, now=5)  # the first two expired: room again
    assert len(table) == 1


# ---- the Global Store's commit log -------------------------------------------------------------
def _commit(cat: ClusterCatalog, key: str, artifact_id: str) -> int:
    cat.reserve(key, artifact_id, "node-a", deadline_ms=10**12, now_ms=0)
    return cat.commit(key, artifact_id, "node-a", nbytes=4, tensors=1, kind="put", created_ms=0).seq


def test_committed_since_names_what_committed_after_a_seq() -> None:
    cat = ClusterCatalog()
    assert cat.seq == 0 and cat.committed_since(0) == set()
    s1 = _commit(cat, "p:1", "a1")
    _commit(cat, "q:1", "a2")
    s3 = _commit(cat, "p:2", "a3")
    assert cat.seq == s3
    assert cat.committed_since(0) == {"p", "q"}
    assert cat.committed_since(s1) == {"p", "q"}
    assert cat.committed_since(s3 - 1) == {"p"}
    assert cat.committed_since(s3) == set()


def test_committed_since_says_when_the_log_no_longer_reaches_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalog_mod, "_MAX_LOG", 3)
    cat = ClusterCatalog()
    seqs = [_commit(cat, f"p:{i}", f"a{i}") for i in range(1, 6)]
    assert cat.committed_since(seqs[-1] - 1) == {"p"}
    assert cat.committed_since(seqs[1]) == {"p"}  # seqs 3..5 are in the log
    assert cat.committed_since(0) is None  # 1 and 2 fell out: the watcher must look itself


# ---- the daemon's wake-up counters --------------------------------------------------------------
def test_a_bump_wakes_the_waiters_of_that_name_only() -> None:
    watch = LatestWatch()
    gen_p = watch.enter("p")
    gen_q = watch.enter("q")
    woke: dict[str, bool] = {}

    def wait(name: str, gen: int) -> None:
        woke[name] = watch.wait_change(name, gen, 30)

    tp = threading.Thread(target=wait, args=("p", gen_p))
    tq = threading.Thread(target=wait, args=("q", gen_q))
    tp.start()
    tq.start()
    watch.bump(["p", "unknown"])
    tp.join(30)
    assert woke == {"p": True}
    assert not watch.wait_change("q", gen_q, 0.01)  # q was not bumped
    watch.bump_all()
    tq.join(30)
    assert woke["q"] is True
    watch.leave("p")
    watch.leave("q")


def test_interest_outlives_the_waiters_for_a_while_then_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    watch = LatestWatch(clock=clock)
    watch.enter("p")
    watch.touch("q")
    assert watch.interested() == ["p", "q"]
    clock.t += daemon_weights.INTEREST_S + 1
    assert watch.interested() == ["p"]  # p has a waiter; q's interest expired
    watch.leave("p")
    assert watch.interested() == ["p"]  # left just now
    clock.t += daemon_weights.INTEREST_S + 1
    assert watch.interested() == []
    watch.bump(["p"])  # nobody watches p: nothing kept
    assert watch.generation("p") == 0


def test_close_wakes_every_waiter() -> None:
    watch = LatestWatch()
    gen = watch.enter("p")
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(watch.wait_change("p", gen, 60)))
    t.start()
    watch.close()
    t.join(30)
    assert out == [True] and watch.closed


# ---- the daemon's cluster watcher, against a scripted Global Store ---------------------------
class _ScriptedCluster:
    """Answers wait_commits from a queue (an exception is raised); records each call."""

    node_id = "node-a"

    def __init__(self) -> None:
        import queue

        self.answers: queue.Queue[object] = queue.Queue()
        self.calls: list[tuple[list[str], int, str]] = []

    def wait_commits(
        self, names: list[str], after: int, instance: str, wait_s: float
    ) -> dict[str, object]:
        self.calls.append((list(names), after, instance))
        item = self.answers.get(timeout=30)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, dict)
        return item


class _Store:
    def __init__(self, cluster: _ScriptedCluster) -> None:
        self.cluster = cluster


def test_the_watcher_wakes_on_changes_resyncs_on_restarts_and_failures_and_exits_idle() -> None:
    from tests.helpers import wait_for

    clock = Clock()
    cluster = _ScriptedCluster()
    sync = daemon_weights.WeightSync(_Store(cluster))  # type: ignore[arg-type]
    sync.watch = LatestWatch(clock=clock)
    sync.watch.enter("p")
    sync._ensure_watcher()
    first = sync._watcher
    assert first is not None

    def answer(item: object, gen: int, calls: int) -> None:
        cluster.answers.put(item)
        wait_for(lambda: len(cluster.calls) >= calls, 10, f"call {calls}")
        wait_for(lambda: sync.watch.generation("p") == gen, 10, f"generation {gen}")

    answer({"instance_id": "i1", "seq": 5, "names": None}, 1, 2)  # first look: everything
    assert cluster.calls[0] == (["p"], -1, "")
    assert cluster.calls[1] == (["p"], 5, "i1")
    answer({"instance_id": "i1", "seq": 6, "names": ["q"]}, 1, 3)  # another name: not p
    answer({"instance_id": "i1", "seq": 7, "names": ["p"]}, 2, 4)
    assert cluster.calls[3][1:] == (7, "i1")
    answer({"instance_id": "i2", "seq": 1, "names": []}, 3, 5)  # a new Global Store instance
    answer(RuntimeError("malformed answer"), 3, 6)  # the watcher survives, then looks afresh
    assert cluster.calls[5][1] == -1
    answer({"instance_id": "i2", "seq": 2, "names": []}, 4, 7)
    # No interest left: the watcher ends after its call, and the next waiter starts another.
    sync.watch.leave("p")
    clock.t += daemon_weights.INTEREST_S + 1
    cluster.answers.put({"instance_id": "i2", "seq": 2, "names": []})
    wait_for(lambda: sync._watcher is None, 10, "the idle watcher to end")
    first.join(10)
    assert not first.is_alive()
    sync.watch.enter("p")
    sync._ensure_watcher()
    second = sync._watcher
    assert second is not None and second is not first
    sync.close()
    cluster.answers.put({"instance_id": "i2", "seq": 2, "names": []})
    second.join(10)
    assert not second.is_alive() and sync._watcher is None
