"""The shell of persistence: tasks that place artifacts on shared disk and on other nodes,
and reads back from shared disk.  [daemon]

The decisions live in the pure :class:`~tensorcast_ray.daemon.persistence.PersistenceTable`;
this shell does the I/O on a small pool of its own threads, so a task never blocks an RPC.

One task (a put or register whose policy names ``shared_disk`` or a remote stable tier):

1. [commit] the artifact is published locally and in the cluster; the task is queued
   (``pending``) and its id answered in ``PutResult.persistence_task_id``.
2. [runner] the task holds the artifact on this node (eviction and retention TTLs pass it by
   while it runs), maps its segments read-only and streams them into safetensors shards under
   ``persist_url`` (:func:`tensorcast_ray._disk.write_artifact`: the one shard planner, bounded
   buffers, shards in parallel, a shard that fails transiently retried alone with backoff).
   The manifest goes last; then the artifact is *durable*: the local index may spill it, the
   Global Store marks it durable (and journals it), and a read on any node can rehydrate it.
3. [runner] a remote stable tier (profile ``ha``) is placed with the cluster tier's
   ``replicate`` on ``min_replicas`` other nodes.
4. the table decides the outcome (success / degraded / failed); ``wait_persisted`` callers wake.

A rehydration is the reverse: the manifest's tensors are placed in fresh segments (the same
layout a put would get), read in from disk with checksums verified, and published as a
``cache`` copy of the same artifact (evictable; the disk copy stays the truth). Concurrent
reads of one artifact share one rehydration.

Deleting a durable artifact stops its task first, then removes its files (unless
``persist_on_delete: retain``); other versions' files are never touched.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from tensorcast_ray.daemon.persistence import (
    TERMINAL_STATES,
    PersistenceTable,
    PersistTask,
    plan_task,
)
from tensorcast_ray.daemon.remote import FINAL_REASONS

from tensorcast_ray import _disk
from tensorcast_ray._catalog import LATEST, parse_key
from tensorcast_ray._errors import (
    AbortedError,
    ArtifactError,
    FailedPreconditionError,
    NotFoundError,
)
from tensorcast_ray._layout import Columns, place
from tensorcast_ray._policy import ResolvedPolicy
from tensorcast_ray._shm import close_maps

if TYPE_CHECKING:
    from tensorcast_ray.daemon.leases import Artifact, Freed
    from tensorcast_ray.daemon.local_store import LocalStore
    from tensorcast_ray.daemon.metrics import DaemonMetrics

    from tensorcast_ray._config import DaemonConfig

logger = logging.getLogger("tensorcast_ray.daemon.persist")

#: how long one PersistenceStatus call may wait for its task to end (callers loop)
MAX_STATUS_WAIT_S = 10.0
#: status calls that may wait at once (each holds one of the daemon's RPC threads)
MAX_STATUS_WAITERS = 4


def _code_and_message(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ArtifactError):
        return exc.status_code.name, exc.message
    from tensorcast_ray._error_mapping import map_exception

    err = map_exception(exc) if isinstance(exc, Exception) else AbortedError(repr(exc))
    return err.status_code.name, err.message


class PersistRunner:
    """[daemon] Persistence tasks and disk reads of one daemon. Thread-safe.

    Lock order: the store's lock, then this runner's; the runner never calls the store while
    holding its own lock.
    """

    def __init__(self, store: LocalStore, config: DaemonConfig, metrics: DaemonMetrics) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.root = config.persist_url or None
        self.storage_options = dict(config.persist_storage_options)
        self._cond = threading.Condition()
        self._table = PersistenceTable(history=config.persist_task_history)
        self._cancels: dict[str, threading.Event] = {}
        self._running: dict[str, concurrent.futures.Future[None]] = {}
        self._rehydrating: dict[str, concurrent.futures.Future[Artifact]] = {}
        self._flight_keys: dict[str, str] = {}  # rehydration in flight -> the key it reads
        self._pool = concurrent.futures.ThreadPoolExecutor(
            config.persist_tasks, thread_name_prefix="tc-persist"
        )
        self._closed = False
        # Status calls that wait hold an RPC thread: only a few may wait at once (the rest
        # answer at once, and their callers ask again a little later).
        self._waiters = threading.BoundedSemaphore(MAX_STATUS_WAITERS)

    @property
    def configured(self) -> bool:
        return self.root is not None

    # ---- tasks -----------------------------------------------------------------------------
    def submit(self, artifact: Artifact) -> str:
        """Queue the persistence task of a just-committed artifact; its id. A retried
        commit (same task id) queues nothing new."""
        policy = ResolvedPolicy.from_dict(_loads(artifact.persist_policy))
        plan = plan_task(policy)
        task_id = artifact.persist_task_id
        with self._cond:
            if self._closed:
                raise FailedPreconditionError("the daemon is stopping; persistence is closed")
            if self._table.get(task_id) is not None:
                return task_id
            self._table.create(
                task_id, artifact.key, artifact.artifact_id, artifact.nbytes, plan, _now_ms()
            )
            cancel = self._cancels[task_id] = threading.Event()
            self._running[task_id] = self._pool.submit(self._run, task_id, artifact, policy, cancel)
            self._update_gauges()
        return task_id

    def _run(
        self, task_id: str, artifact: Artifact, policy: ResolvedPolicy, cancel: threading.Event
    ) -> None:
        """[a runner thread] The artifact was held for this task at its commit (eviction and
        TTLs pass it by); the hold is let go here, whatever happens."""
        started = time.perf_counter()
        try:
            with self._cond:
                task = self._table.start(task_id, _now_ms())
                self._update_gauges()
            if task is None:
                return  # stopped while queued
            try:
                if self.store.local_artifact(artifact.artifact_id) is None:
                    raise AbortedError(f"{artifact.key} left this node before its task ran")
                if task.plan.disk is not None:
                    self._persist_disk(task, artifact, policy.layout, cancel)
                if task.plan.remote is not None and not cancel.is_set():
                    self._place_remote(task, artifact)
            except AbortedError as exc:  # it left this node before the task could read it
                with self._cond:
                    self._table.cancel(artifact.artifact_id, exc.message, _now_ms())
            except ArtifactError as exc:
                logger.warning("persistence task %s of %s: %s", task_id, artifact.key, exc)
                with self._cond:
                    self._table.crashed(task_id, exc.message, exc.status_code.name)
            except Exception:
                logger.exception("persistence task %s of %s crashed", task_id, artifact.key)
                with self._cond:
                    self._table.crashed(
                        task_id, "the persistence task crashed (see the daemon log)"
                    )
            with self._cond:
                done = self._table.finish(task_id, _now_ms())
                self._update_gauges()
            self.metrics.persist_task_seconds.labels(state=done.state).observe(
                time.perf_counter() - started
            )
            if done.state != "success":
                logger.warning(
                    "persistence of %s ended %s: %s",
                    artifact.key,
                    done.state,
                    done.last_error or done.degraded_reason,
                )
        finally:
            if not self._keep_held(task_id):
                self.store.release_hold(artifact.artifact_id)
            self._forget(task_id)

    def _keep_held(self, task_id: str) -> bool:
        """A task whose ``must`` disk tier failed leaves the artifact's only copy in memory:
        it stays held (never evicted, never expired) until it is deleted or a restart's
        retry makes it durable."""
        with self._cond:
            task = self._table.get(task_id)
            keep = (
                task is not None
                and task.state == "failed"
                and not task.cancelled
                and task.plan.disk == "must"
                and not task.durable
            )
        if keep and task is not None:
            logger.warning(
                "%s stays in memory until deleted: it is its only copy (%s)",
                task.key,
                task.last_error,
            )
        return keep

    def _forget(self, task_id: str) -> None:
        with self._cond:
            self._cancels.pop(task_id, None)
            self._running.pop(task_id, None)
            self._cond.notify_all()

    def _persist_disk(
        self, task: PersistTask, artifact: Artifact, layout: str, cancel: threading.Event
    ) -> None:
        if self.root is None:  # a `should` disk tier (a `must` one was refused at the put)
            with self._cond:
                self._table.finish_disk(
                    task.task_id,
                    ("FAILED_PRECONDITION", "persistence not configured (no persist_url)"),
                )
            return
        sources, maps = self.store.persist_sources(artifact)
        cfg = self.config
        deadline = time.monotonic() + cfg.persist_timeout_s

        def on_shard(event: Any) -> None:
            error = _code_and_message(event.error)[1] if event.error is not None else ""
            with self._cond:
                self._table.disk_shard(
                    task.task_id,
                    event.index,
                    event.state,
                    event.done_bytes,
                    event.attempt,
                    error=error,
                    target=event.file,
                    total_bytes=event.total_bytes,
                )
            if event.state == "retrying" and event.error is not None:
                self.metrics.record_persist_error("write", event.error)

        try:
            manifest = _disk.write_artifact(
                self.root,
                artifact.key,
                sources,
                artifact_id=artifact.artifact_id,
                storage_options=self.storage_options,
                layout=layout,
                max_buffer_bytes=int(cfg.persist_buffer_bytes),
                parallelism=cfg.persist_parallel,
                on_shard=on_shard,
                cancel=cancel,
                shard_attempts=cfg.persist_attempts,
                retry_wait_s=(cfg.persist_retry_min_s, cfg.persist_retry_max_s),
                deadline=deadline,
            )
        except ArtifactError as exc:
            if not cancel.is_set():
                self.metrics.record_persist_error("write", exc)
            with self._cond:
                self._table.finish_disk(task.task_id, _code_and_message(exc))
            exc.__traceback__ = None  # its frames hold views of the mappings closed below
            return
        finally:
            sources.clear()
            close_maps(maps)
        self.metrics.persist_bytes.labels(direction="write").inc(manifest.total_bytes)
        # Durable once the Global Store knows (retried until it answers): only then may spill
        # evict the copy here, since the catalog must keep the version once every copy went.
        try:
            self._publish_durable(artifact, deadline)
        except NotFoundError:  # deleted while its files were written: they go too
            self._deleted_meanwhile(task, artifact)
            return
        if not self.store.mark_durable(artifact.artifact_id):
            self._deleted_meanwhile(task, artifact)  # a lone node's delete went first
            return
        with self._cond:
            self._table.finish_disk(task.task_id, None)

    def _deleted_meanwhile(self, task: PersistTask, artifact: Artifact) -> None:
        logger.info("%s was deleted while it was persisted; removing its files", artifact.key)
        self._remove_files_quietly(artifact.key, artifact.artifact_id)
        with self._cond:
            self._table.finish_disk(
                task.task_id, ("ABORTED", f"{artifact.key} was deleted while it was persisted")
            )

    def _publish_durable(self, artifact: Artifact, deadline: float) -> None:
        """Tell the Global Store the artifact is durable, retrying while it is unreachable
        (until the task's deadline); NotFoundError when it was deleted meanwhile."""
        cluster = self.store.cluster
        if cluster is None:
            return
        delay = 0.2
        while True:
            try:
                cluster.mark_durable(artifact)
                return
            except NotFoundError:
                raise
            except ArtifactError as exc:
                self.metrics.record_persist_error("commit", exc)
                if not exc.retryable or time.monotonic() + delay > deadline:
                    raise
                logger.warning("Global Store: %s is durable, not told yet: %s", artifact.key, exc)
                time.sleep(delay)  # a background thread, backing off while it is away
                delay = min(delay * 2, 5.0)

    def _place_remote(self, task: PersistTask, artifact: Artifact) -> None:
        cluster = self.store.cluster
        wanted = task.plan.remote_replicas
        if cluster is None:  # a `should` remote tier on a lone node (a `must` was refused)
            with self._cond:
                self._table.finish_remote(
                    task.task_id, 0, ("FAILED_PRECONDITION", "this daemon runs without a cluster")
                )
            return
        try:
            nodes = cluster.remote_targets(artifact.artifact_id, wanted)
        except ArtifactError as exc:
            with self._cond:
                self._table.finish_remote(task.task_id, 0, _code_and_message(exc))
            return
        with self._cond:
            self._table.plan_remote(task.task_id, nodes)
            for node in nodes:
                self._table.remote_shard(task.task_id, node, "running")
        placed, errors = 0, []
        if nodes:
            try:
                results = cluster.replicate(artifact.key, nodes, "auto")
            except ArtifactError as exc:
                results = {n: {"status": "failed", "reason": exc.message} for n in nodes}
            for node in nodes:
                result = results.get(node, {"status": "failed", "reason": "no answer"})
                ok = result["status"] == "ready"
                placed += ok
                if not ok:
                    errors.append(f"{node[:12]}: {result.get('reason', '')}")
                with self._cond:
                    self._table.remote_shard(
                        task.task_id,
                        node,
                        "success" if ok else "failed",
                        "" if ok else str(result.get("reason", "")),
                    )
        if len(nodes) < wanted:
            errors.append(f"only {len(nodes)} other node(s) can hold a copy")
        error = ("UNAVAILABLE", "; ".join(errors)) if errors else None
        if error is not None:
            self.metrics.record_persist_error("replicate", _error_of(error))
        with self._cond:
            self._table.finish_remote(task.task_id, placed, error)

    # ---- cancellation and deletes --------------------------------------------------------------
    def on_freed(self, freed: Freed) -> None:
        """[under the store's lock] An artifact left this node: stop its task if one runs
        (only a delete or the end of its life can take it: the task holds it against
        eviction and TTLs). Its files go when its life ended (a register's lease, its
        ``ttl_ms``); a delete removes them itself. Never waits."""
        self._cancel(freed.artifact_id, f"stopped: the artifact was freed ({freed.reason})")
        if freed.durable and freed.reason in FINAL_REASONS and self.root is not None:
            with self._cond:
                if not self._closed:
                    self._pool.submit(self._remove_files_quietly, freed.key, freed.artifact_id)

    def _cancel(self, artifact_id: str, why: str) -> None:
        unqueued = None
        with self._cond:
            task = self._table.cancel(artifact_id, why, _now_ms())
            if task is not None:
                event = self._cancels.get(task.task_id)
                if event is not None:
                    event.set()
                future = self._running.get(task.task_id)
                if future is not None and future.cancel():  # never started: nothing to wait
                    self._cancels.pop(task.task_id, None)
                    self._running.pop(task.task_id, None)
                    unqueued = task
                self._update_gauges()
                self._cond.notify_all()
        if unqueued is not None:  # (the store's lock may be held here: it is reentrant)
            self.store.release_hold(unqueued.artifact_id)

    def stop_task(self, artifact_id: str, reason: str, timeout_s: float = 10.0) -> None:
        """Stop ``artifact_id``'s task and wait (bounded) until its thread let go."""
        self._cancel(artifact_id, f"stopped: the artifact was {reason} before it was placed")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                task = self._table.for_artifact(artifact_id)
                if task is None or task.task_id not in self._running:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "the task of %s did not stop within %.0f s", artifact_id, timeout_s
                    )
                    return
                self._cond.wait(left)

    def resubmit(self, artifact: Artifact) -> None:
        """A delete that stopped this artifact's task failed afterwards: the artifact stays,
        so its task runs again from the start (held again first)."""
        with self._cond:
            task = self._table.get(artifact.persist_task_id)
            if task is None or not task.cancelled or artifact.persist_task_id in self._running:
                return
            self._table.forget(artifact.persist_task_id)
        if self.store.hold_for_task(artifact.artifact_id):
            try:
                self.submit(artifact)
            except ArtifactError:
                self.store.release_hold(artifact.artifact_id)

    def remove_files(self, key: str, artifact_id: str = "") -> bool:
        """Remove ``key``'s files under the persistence root; True if there were any (False
        too when the config retains them). With ``artifact_id``, files another artifact
        committed under the same key are left alone. A storage failure raises (UNAVAILABLE
        when the storage cannot be reached), saying the delete may be retried."""
        if self.root is None or self.config.persist_on_delete == "retain":
            return False
        try:
            if artifact_id:
                try:
                    committed = _disk.read_manifest(
                        self.root, key, storage_options=self.storage_options
                    )
                except NotFoundError:
                    pass  # no manifest: an unfinished write's leftovers
                else:
                    if committed.artifact_id and committed.artifact_id != artifact_id:
                        logger.info("%s on disk is another artifact now; left alone", key)
                        return False
            return _disk.delete_artifact(self.root, key, storage_options=self.storage_options)
        except ArtifactError as exc:
            self.metrics.record_persist_error("delete", exc)
            raise type(exc)(
                f"the files of {key} under {self.root} could not be removed ({exc.message}); "
                "retry tc.delete once the storage is back",
                exc.status_code,
                exc.retryable,
            ) from exc

    def _remove_files_quietly(self, key: str, artifact_id: str) -> None:
        try:
            self.remove_files(key, artifact_id)
        except ArtifactError as exc:
            logger.warning("%s", exc.message)

    # ---- status --------------------------------------------------------------------------------
    def status(
        self, task_id: str = "", artifact_id: str = "", wait_s: float = 0.0
    ) -> dict[str, Any] | None:
        """A task's state (a dict; see PersistTask.to_dict), waiting up to ``wait_s`` for it to
        end; None when this daemon has no such task."""
        wait_s = min(max(wait_s, 0.0), MAX_STATUS_WAIT_S)
        waiting = wait_s > 0 and self._waiters.acquire(blocking=False)
        deadline = time.monotonic() + (wait_s if waiting else 0.0)
        try:
            with self._cond:
                while True:
                    task = (
                        self._table.get(task_id)
                        if task_id
                        else self._table.for_artifact(artifact_id)
                    )
                    if task is None:
                        return None
                    left = deadline - time.monotonic()
                    if task.state in TERMINAL_STATES or left <= 0:
                        out = task.to_dict()
                        out["node_id"] = self.store.node_id
                        return out
                    self._cond.wait(left)
        finally:
            if waiting:
                self._waiters.release()

    def brief(self, task_id: str) -> tuple[str, str] | None:
        """(state, error or degraded reason) of a task this daemon knows, cheaply (a read's
        ArtifactInfo carries it); None if unknown."""
        with self._cond:
            task = self._table.get(task_id)
            if task is None:
                return None
            return task.state, task.last_error or task.degraded_reason

    def status_from_manifest(self, manifest: _disk.Manifest, node_id: str = "") -> dict[str, Any]:
        """The status of a finished task no daemon remembers, from what shared disk holds: a
        committed manifest means every shard is in."""
        assert self.root is not None
        directory = _disk.artifact_path(self.root, manifest.key)
        per_shard: dict[int, int] = {}
        for t in manifest.tensors:
            per_shard[t.shard] = per_shard.get(t.shard, 0) + t.nbytes
        shards = [
            {
                "index": i,
                "tier": "shared_disk",
                "target": directory.rstrip("/") + "/" + shard.file,
                "state": "success",
                "progress": 1.0,
                "done_bytes": per_shard.get(i, 0),
                "total_bytes": per_shard.get(i, 0),
                "attempts": 0,
                "error": "",
            }
            for i, shard in enumerate(manifest.shards)
        ]
        finished = int(manifest.created_at * 1000)
        return {
            "task_id": "pt-" + manifest.artifact_id if manifest.artifact_id else "",
            "key": manifest.key,
            "artifact_id": manifest.artifact_id,
            "nbytes": manifest.total_bytes,
            "state": "success",
            "progress": 1.0,
            "degraded_reason": "",
            "last_error": "",
            "last_error_code": "",
            "durable": True,
            "created_unix_ms": 0,
            "started_unix_ms": 0,
            "finished_unix_ms": finished,
            "shards": shards,
            "node_id": node_id,
        }

    def _update_gauges(self) -> None:
        """[under self._cond]"""
        for state, count in self._table.counts().items():
            self.metrics.persist_tasks_active.labels(state=state).set(count)
        self.metrics.persist_progress_ratio.set(self._table.running_progress())

    # ---- reads from shared disk ----------------------------------------------------------------
    def manifest(self, key: str) -> _disk.Manifest:
        """The committed manifest of ``key`` (``latest``: the newest version on disk)."""
        if self.root is None:
            raise FailedPreconditionError(
                "reading from shared disk needs persistence: set persist_url in the daemon "
                "config (or TENSORCAST_RAY_PERSIST_URL where tc.init runs)"
            )
        name, version = parse_key(key)
        if version != LATEST:
            return _disk.read_manifest(self.root, key, storage_options=self.storage_options)
        newest: _disk.Manifest | None = None
        for found in _disk.list_artifacts(self.root, storage_options=self.storage_options):
            if parse_key(found)[0] != name:
                continue
            m = _disk.read_manifest(self.root, found, storage_options=self.storage_options)
            if newest is None or m.created_at > newest.created_at:
                newest = m
        if newest is None:
            raise NotFoundError(f"no version of {name!r} is on shared disk under {self.root}")
        return newest

    def rehydrate(
        self,
        key: str,
        *,
        artifact_id: str = "",
        kind: str = "cache",
        extra: dict[str, Any] | None = None,
    ) -> Artifact:
        """This node's copy of ``key`` read back from shared disk (one read however many
        callers ask at once); ``artifact_id``: the version the catalog names (another
        artifact under that key on disk is DATA_LOSS, never served)."""
        flight = artifact_id or key
        with self._cond:
            future = self._rehydrating.get(flight)
            leader = future is None
            if future is None:
                future = self._rehydrating[flight] = concurrent.futures.Future()
                self._flight_keys[flight] = key
        if not leader:
            return future.result()
        try:
            artifact = self._rehydrate(key, artifact_id, kind, extra or {})
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(artifact)
            return artifact
        finally:
            with self._cond:
                self._rehydrating.pop(flight, None)
                self._flight_keys.pop(flight, None)

    def settle(self, key: str, timeout_s: float = 30.0) -> None:
        """Wait (bounded) for the rehydrations of ``key`` in flight (a delete waits, then
        drops what they landed)."""
        with self._cond:
            futures = [
                f for flight, f in self._rehydrating.items() if self._flight_keys.get(flight) == key
            ]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout_s)

    def _rehydrate(self, key: str, artifact_id: str, kind: str, extra: dict[str, Any]) -> Artifact:
        started = time.perf_counter()
        manifest = self.manifest(key)
        assert self.root is not None  # manifest() refused otherwise
        if artifact_id and manifest.artifact_id and manifest.artifact_id != artifact_id:
            raise _disk_mismatch(key, artifact_id, manifest.artifact_id)
        if artifact_id or manifest.artifact_id:
            here = self.store.local_artifact(artifact_id or manifest.artifact_id)
            if here is not None:
                return here
        names = [t.name for t in manifest.tensors]
        cols = Columns.of(
            names, [t.dtype for t in manifest.tensors], [tuple(t.shape) for t in manifest.tensors]
        )
        segs, offsets, sizes = place(cols.nbytes, int(self.config.shm_segment_bytes))
        placed = cols.placed(segs, offsets, sizes)
        meta = {
            "key": manifest.key,
            "artifact_id": manifest.artifact_id or artifact_id,
            "nbytes": sum(cols.nbytes),
            "kind": "put",
            "tensors": placed.to_table().SerializeToString(),
            "ntensors": len(cols),
            "segments": [("", size) for size in sizes],
            "created_ms": int(manifest.created_at * 1000),
            "requirement": "should",
            "retention": "best_effort",
            "retention_ttl_ms": None,
            "writer": str(extra.get("node_id", "")),
            "cluster_seq": int(extra.get("seq", 0)),
        }
        if not meta["artifact_id"]:
            raise FailedPreconditionError(
                f"the manifest of {key} under {self.root} names no artifact id (an export made "
                "outside the store); load it with tc.import_checkpoint instead"
            )
        landing = self.store.begin_landing(meta, kind=kind, served_by="disk")
        try:
            where = {name: (segs[i], offsets[i], cols.nbytes[i]) for i, name in enumerate(names)}

            def dest(t: Any) -> memoryview:
                seg, off, nb = where[t.name]
                if not nb:
                    return memoryview(bytearray(0))
                return memoryview(landing.maps[seg])[off : off + nb]

            _disk.read_into(
                self.root,
                manifest,
                dest,
                storage_options=self.storage_options,
                max_buffer_bytes=int(self.config.persist_buffer_bytes),
                parallelism=self.config.persist_parallel,
                deadline=time.monotonic() + self.config.persist_timeout_s,
            )
        except BaseException:
            self.store.abort_landing(landing)
            self.metrics.rehydrations.labels(result="failed").inc()
            raise
        artifact = self.store.publish_landing(landing)
        self.store.mark_durable(artifact.artifact_id)
        self.metrics.persist_bytes.labels(direction="read").inc(artifact.nbytes)
        self.metrics.rehydrations.labels(result="ok").inc()
        logger.info(
            "rehydrated %s (%d bytes, %d tensors) from %s in %.0f ms",
            artifact.key,
            artifact.nbytes,
            len(cols),
            self.root,
            (time.perf_counter() - started) * 1000,
        )
        return artifact

    # ---- lifecycle -----------------------------------------------------------------------------
    def resume(self, artifacts: list[Artifact]) -> None:
        """After a restart: queue again the tasks of artifacts that were not yet durable (the
        disk writer verifies what an earlier attempt wrote and rewrites only damaged shards)."""
        for artifact in artifacts:
            if artifact.persist_policy and not artifact.durable:
                try:
                    self.submit(artifact)
                except ArtifactError as exc:
                    logger.warning("could not resume the persistence of %s: %s", artifact.key, exc)

    def close(self, drain_s: float) -> None:
        """Stop taking tasks; wait up to ``drain_s`` for the running ones, then stop them."""
        with self._cond:
            self._closed = True
            deadline = time.monotonic() + drain_s
            while self._running and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            for event in self._cancels.values():
                event.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _loads(raw: str) -> dict[str, Any]:
    import json

    data = json.loads(raw)
    if not isinstance(data, dict):
        raise FailedPreconditionError("a stored persistence policy is not a JSON object")
    return data


def _error_of(error: tuple[str, str]) -> ArtifactError:
    import grpc

    from tensorcast_ray._errors import error_for_code

    return error_for_code(grpc.StatusCode[error[0]], error[1])


def _disk_mismatch(key: str, wanted: str, found: str) -> ArtifactError:
    from tensorcast_ray._errors import DataLossError

    return DataLossError(
        f"the files of {key} on shared disk hold artifact {found}, not {wanted} which the "
        "catalog names; they were overwritten outside the store — write the version again"
    )


__all__ = ["MAX_STATUS_WAIT_S", "PersistRunner"]
