"""Weight sync's daemon half: waiting for a new ``latest``, and reader holds.  [daemon]

The SDK's ``tensorcast_ray.weights`` asks its own daemon only, as for every read.

- **WaitLatest** is held open until ``name:latest`` is a version other than the caller's
  ``after_key``. A commit on this node wakes it at once (:meth:`WeightSync.committed`). In a
  cluster, one watcher thread per daemon holds a ``wait_commits`` call open on the Global
  Store, which answers as soon as any version commits anywhere; the watcher then wakes the
  waiters of the names committed, and they resolve ``latest`` again. Waiting costs no call
  while nothing commits: one held call per daemon (not per subscriber) to the Global Store,
  and one held call per subscriber to its daemon, on threads of their own.
- **Holds.** ``HoldVersion`` resolves a key and holds that version in one step, so a
  publisher's garbage collection (``Delete(unless_held)``) passes it by while a subscriber
  copies it. A lone daemon keeps the table (:class:`tensorcast_ray._holds.HoldTable`); in a
  cluster the Global Store does, so a hold on any node protects the version everywhere. A
  hold ends at ``ReleaseHold``, at its ttl, or when its session ends.

Walk-through (cluster): [SDK B] ``Subscriber.wait_for`` → WaitLatest to daemon B →
[daemon B] interest in ``policy``, watcher started → ``wait_commits`` held on the Global
Store; [trainer A] ``publish`` → daemon A commits through the Global Store → [GS] the commit
wakes ``wait_commits`` → [daemon B] the watcher wakes the ``policy`` waiters → they resolve
``policy:latest`` (one Global Store call) → WaitLatest answers ``policy:8``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tensorcast_ray._catalog import parse_key
from tensorcast_ray._errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._holds import HoldTable
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

if TYPE_CHECKING:
    from tensorcast_ray.daemon.local_store import LocalStore

logger = logging.getLogger(__name__)

__all__ = ["MAX_WAIT_S", "LatestWatch", "WeightSync"]

#: one WaitLatest call waits at most this long (the SDK loops until its own deadline)
MAX_WAIT_S = 10.0
#: a name stays watched this long after its last waiter, hold or subscriber call
INTEREST_S = 60.0
#: one wait_commits call on the Global Store waits at most this long
_GS_WAIT_S = 5.0
_GS_RETRY_S = 1.0  # after a failed wait_commits (the Global Store restarting)


class LatestWatch:
    """Per-name change counters and the waiters on them. Thread-safe; no I/O."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._gen: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._seen: dict[str, float] = {}  # name -> last interest (waiter, hold, subscribe)
        self._clock = clock
        self.closed = False

    def enter(self, name: str) -> int:
        """A waiter on ``name`` starts; returns the counter to wait past."""
        with self._cond:
            self._waiting[name] = self._waiting.get(name, 0) + 1
            self._seen[name] = self._clock()
            return self._gen.get(name, 0)

    def leave(self, name: str) -> None:
        with self._cond:
            left = self._waiting.get(name, 0) - 1
            if left > 0:
                self._waiting[name] = left
            else:
                self._waiting.pop(name, None)
            self._seen[name] = self._clock()

    def touch(self, name: str) -> None:
        with self._cond:
            self._seen[name] = self._clock()

    def generation(self, name: str) -> int:
        with self._cond:
            return self._gen.get(name, 0)

    def bump(self, names: Iterable[str]) -> None:
        """Something committed for ``names``: wake their waiters."""
        with self._cond:
            woke = False
            for name in names:
                if name in self._waiting or name in self._seen:
                    self._gen[name] = self._gen.get(name, 0) + 1
                    woke = True
            if woke:
                self._cond.notify_all()

    def bump_all(self) -> None:
        with self._cond:
            for name in set(self._waiting) | set(self._seen):
                self._gen[name] = self._gen.get(name, 0) + 1
            self._cond.notify_all()

    def wait_change(self, name: str, gen: int, timeout: float) -> bool:
        """Block until ``name``'s counter passes ``gen`` (True) or ``timeout`` (False)."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._gen.get(name, 0) == gen and not self.closed:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def interested(self) -> list[str]:
        """Names with a waiter now or interest within ``INTEREST_S``; forgets the rest."""
        with self._cond:
            cutoff = self._clock() - INTEREST_S
            for name in [n for n, t in self._seen.items() if t < cutoff]:
                if name not in self._waiting:
                    del self._seen[name]
                    self._gen.pop(name, None)
            return sorted(set(self._seen) | set(self._waiting))

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class WeightSync:
    """[daemon] The WaitLatest / HoldVersion / ReleaseHold handlers of one daemon."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.watch = LatestWatch()
        self.holds = HoldTable()  # a lone node's (a cluster's live in the Global Store)
        self._owners: set[str] = set()  # sessions holding through the Global Store
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        # name -> (its change counter, when, the key latest named): one Global Store call
        # answers every waiter of the name the same change woke
        self._resolved: dict[str, tuple[int, float, str]] = {}
        # artifact ids a lone daemon is deleting (unless_held): no new hold on them
        self.deleting: set[str] = set()
        # names the Global Store was told this node subscribes to (while the watcher runs)
        self._announced: set[str] = set()

    # ---- commits --------------------------------------------------------------------------
    def committed(self, key: str) -> None:
        """A version of ``key``'s name committed on this node."""
        self.watch.bump([parse_key(key)[0]])

    # ---- WaitLatest ---------------------------------------------------------------------
    def wait_latest(
        self, request: daemon_pb2.WaitLatestRequest, session_id: str
    ) -> daemon_pb2.WaitLatestResponse:
        name = _name(request.name)
        if request.after_key:
            after_name, _ = parse_key(request.after_key)
            if after_name != name:
                raise InvalidArgumentError(
                    f"after_key {request.after_key!r} is not a version of {name!r}"
                )
        wait_s = request.wait_s
        if not wait_s >= 0:  # NaN too
            raise InvalidArgumentError(f"wait_s must be >= 0, got {wait_s!r}")
        deadline = time.monotonic() + min(wait_s, MAX_WAIT_S)
        gen = self.watch.enter(name)
        self.store.metrics.weight_waiters.inc()
        try:
            self._ensure_watcher()
            self._announce(name)
            while True:
                try:
                    key = self._latest(name)
                except UnavailableError:
                    # The Global Store restarting (it rebuilds for up to 30 s): a wait waits
                    # it out, waking each second to look again; a look (wait_s 0) fails.
                    if time.monotonic() >= deadline or self.watch.closed:
                        raise
                    self.watch.wait_change(name, gen, min(1.0, deadline - time.monotonic()))
                    gen = self.watch.generation(name)
                    continue
                if key and key != request.after_key:
                    return daemon_pb2.WaitLatestResponse(key=key, changed=True)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.watch.closed:
                    return daemon_pb2.WaitLatestResponse(key=key, changed=False)
                self.watch.wait_change(name, gen, remaining)
                gen = self.watch.generation(name)
        finally:
            self.store.metrics.weight_waiters.dec()
            self.watch.leave(name)

    def _latest(self, name: str) -> str:
        """The key ``name:latest`` names now ("" when no version exists). In a cluster a
        version written on this node counts once it committed here too (the cluster's commit
        comes first: a reader woken between the two would find no copy yet), and one answer
        serves every waiter of the name woken by the same change (one Global Store call per
        name per commit, not one per waiter)."""
        cluster = self.store.cluster
        try:
            if cluster is None:
                return self.store.resolve_local(f"{name}:latest")[0]
            gen = self.watch.generation(name)
            with self._lock:
                cached = self._resolved.get(name)
            if cached is not None and cached[0] == gen and time.monotonic() - cached[1] < 1.0:
                return cached[2]
            entry = cluster.resolve(key=f"{name}:latest")
            key = str(entry["key"])
            if entry.get("node_id") == cluster.node_id and self.store.committing(
                str(entry["artifact_id"])
            ):
                return ""  # written here, not committed here yet: committed() wakes us
            with self._lock:
                self._resolved[name] = (gen, time.monotonic(), key)
            return key
        except NotFoundError:
            return ""

    def _announce(self, name: str) -> None:
        """A name newly watched here: the Global Store learns at once that this node
        subscribes (a publish right now replicates here), not at the watcher's next call."""
        cluster = self.store.cluster
        if cluster is None:
            return
        with self._lock:
            if name in self._announced:
                return
        try:
            cluster.subscribe(name)
        except UnavailableError:
            return  # the watcher's next call says it
        with self._lock:
            self._announced.add(name)

    def _ensure_watcher(self) -> None:
        if self.store.cluster is None:
            return
        with self._lock:
            if self._watcher is not None or self._stop.is_set():
                return
            self._watcher = threading.Thread(
                target=self._watch_cluster, name="tc-daemon-watch", daemon=True
            )
            self._watcher.start()

    def _watch_cluster(self) -> None:
        """One held ``wait_commits`` call at a time while any name here is watched."""
        try:
            self._watch_loop()
        finally:
            with self._lock:
                if self._watcher is threading.current_thread():
                    self._watcher = None  # whatever ended it, the next waiter starts one
                self._announced.clear()  # its calls no longer keep them fresh

    def _watch_loop(self) -> None:
        after, instance, failing = -1, "", False
        while not self._stop.is_set():
            cluster = self.store.cluster
            with self._lock:  # a waiter enters before it looks for a watcher (under the lock)
                names = self.watch.interested()
                if not names or cluster is None:
                    return
            try:
                answer = cluster.wait_commits(names, after, instance, _GS_WAIT_S)
                seq, new_instance = int(answer["seq"]), str(answer["instance_id"])
                changed = answer["names"]
            except Exception as exc:  # the Global Store away (or a malformed answer)
                if not failing:
                    logger.warning("watching commits on the Global Store: %s", exc)
                failing, after = True, -1  # a fresh look once it answers again
                self._stop.wait(_GS_RETRY_S)
                continue
            if failing or changed is None or new_instance != instance:
                self.watch.bump_all()  # back, restarted, or the log moved past us: look again
            elif changed:
                self.watch.bump(changed)
            failing, after, instance = False, seq, new_instance

    # ---- holds ------------------------------------------------------------------------------
    def hold(
        self, request: daemon_pb2.HoldVersionRequest, sid: str
    ) -> daemon_pb2.HoldVersionResponse:
        parse_key(request.key)
        ttl = request.ttl_s or 600.0
        cluster = self.store.cluster
        self.watch.touch(parse_key(request.key)[0])
        if cluster is None:
            self._on_this_node(request.key)
            with self.store.lock:
                key, artifact_id = self.store.resolve_local(request.key)
                if artifact_id in self.deleting:
                    raise NotFoundError(f"{key} is being deleted")
                hold_id = self.holds.take(artifact_id, sid, ttl, time.monotonic())
                self.store.metrics.reader_holds.set(len(self.holds))
            return daemon_pb2.HoldVersionResponse(hold_id=hold_id, key=key, artifact_id=artifact_id)
        owner = f"{cluster.node_id}/{sid}"
        with self._lock:
            self._owners.add(owner)
        entry = cluster.hold(request.key, owner, ttl)
        return daemon_pb2.HoldVersionResponse(
            hold_id=str(entry["hold_id"]),
            key=str(entry["key"]),
            artifact_id=str(entry["artifact_id"]),
        )

    def _on_this_node(self, key: str) -> None:
        """[lone node] A version evicted to shared disk (or written by an earlier daemon) is
        read back into memory first, as a Lookup would; NOT_FOUND when it is nowhere."""
        try:
            self.store.resolve_local(key)
        except NotFoundError:
            if not self.store.persistence.configured:
                raise
            self.store.persistence.rehydrate(key)

    def release(
        self, request: daemon_pb2.ReleaseHoldRequest, sid: str
    ) -> daemon_pb2.ReleaseHoldResponse:
        cluster = self.store.cluster
        if cluster is None:
            with self.store.lock:
                released = self.holds.release(request.hold_id)
                self.store.metrics.reader_holds.set(len(self.holds))
        else:
            released = cluster.release_hold(request.hold_id)
        return daemon_pb2.ReleaseHoldResponse(released=released)

    def held(self, artifact_id: str) -> None:
        """[lone node, under the store's lock] FAILED_PRECONDITION while a reader holds it."""
        count = self.holds.count(artifact_id, time.monotonic())
        if count:
            raise FailedPreconditionError(
                f"the version is held by {count} reader(s) copying it; it can be deleted once "
                "they finish (retry later, or delete it without unless_held)"
            )

    def end_session(self, sid: str) -> None:
        """The session's holds end with it."""
        cluster = self.store.cluster
        if cluster is None:
            with self.store.lock:
                self.holds.release_owner(sid)
                self.store.metrics.reader_holds.set(len(self.holds))
            return
        owner = f"{cluster.node_id}/{sid}"
        with self._lock:
            if owner not in self._owners:
                return
            self._owners.discard(owner)
        cluster.release_holds(owner)  # queued: never waits on the Global Store

    def subscriber_nodes(self, name: str) -> list[str]:
        cluster = self.store.cluster
        if cluster is None:
            return []
        return [n for n in cluster.subscriber_nodes(name) if n != cluster.node_id]

    def close(self) -> None:
        self._stop.set()
        self.watch.close()


def _name(name: str) -> str:
    if not name or ":" in name:
        raise InvalidArgumentError(
            f"name must be an artifact name without a version (e.g. 'policy'), got {name!r}"
        )
    return parse_key(f"{name}:latest")[0]
