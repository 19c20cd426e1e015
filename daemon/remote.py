"""The daemon's cluster half: the Global Store's catalog, pulls, replicate.  [daemon]

One :class:`ClusterTier` per daemon that joined a Global Store. The SDK never talks to
other nodes: it asks its own daemon, and this object does the cross-node work.

- **Catalog.** A write reserves its key with the Global Store before any byte moves
  (ALREADY_EXISTS when another node holds or writes it) and commits it there before its
  local commit, so once a put returns every node resolves it. ``latest``, ``exists`` and
  ``list_keys`` ask the Global Store; a delete goes through it to every node holding a copy.
  Copies this node drops (evicted, expired, lease ended) are reported, asynchronously.
- **Reads.** A key with no copy here is resolved by the Global Store and pulled from a node
  that holds it, shard by shard, in parallel, through Ray's object store
  (:mod:`tensorcast_ray._transport.object_store`), into this node's shared memory as a
  ``cache`` replica; the Global Store records it and every later reader on this node maps it
  with no copy and no transfer. Concurrent reads of one artifact share one pull. A pull that
  fails (its source died) is tried from the next node holding the artifact; nothing is
  published until every byte is in.
- **Partial reads** (``view(slices)``, ``get_into`` of some tensors) pull only the byte
  ranges asked for, into a buffer leased to the reading session: no replica.
- **Replicate.** :meth:`ClusterTier.replicate` puts a kept copy on each target node along a
  chain (source → t1 → t2 …): each target pulls shard k from the node before it as soon as
  that node has landed it, so the source sends the bytes about once whatever the number of
  targets. ``transport="collective"`` moves the same chain over gloo
  (:mod:`tensorcast_ray._transport.collective`); ``"auto"`` falls back to the object store
  when the collective cannot run, and says why.
- **Liveness.** A heartbeat every ``heartbeat_s``; a Global Store instance that has not had
  this daemon's full report (it restarted) asks for one, and gets it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tensorcast_ray._actors import daemon_name, get_actor
from tensorcast_ray._error_mapping import map_exception
from tensorcast_ray._errors import (
    ArtifactError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._transport.object_store import (
    Piece,
    ShardSource,
    full_pieces,
    plan_shards,
    receive,
)

if TYPE_CHECKING:
    from tensorcast_ray.daemon.leases import Artifact, Freed
    from tensorcast_ray.daemon.local_store import LocalStore
    from tensorcast_ray.daemon.metrics import DaemonMetrics

    from tensorcast_ray._config import DaemonConfig

logger = logging.getLogger("tensorcast_ray.daemon.remote")

#: why a copy left this node, as the Global Store must hear it: the artifact's life ended
#: (the version goes everywhere) or only this copy went (evicted, a retention TTL).
FINAL_REASONS = frozenset(
    {
        "ttl expired",
        "producer process exited",
        "producer session ended",
        "its tc.empty buffer was freed",
    }
)
_SILENT_REASONS = frozenset({"deleted", "dropped by the cluster"})
TRANSPORTS = ("auto", "object_store", "collective")
#: failures another source would answer the same way: not worth trying the next holder
_REQUEST_FAULTS = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"})
_CHAIN_WAIT_S = 30.0  # how long a chain's target waits for the node before it to start landing


class ClusterTier:
    """[daemon] This node's view of the cluster. Thread-safe."""

    def __init__(
        self,
        store: LocalStore,
        *,
        namespace: str,
        node_id: str,
        gs_handle: Any,
        token: str,
        config: DaemonConfig,
        metrics: DaemonMetrics,
        record: Callable[[], dict[str, Any]],
    ) -> None:
        from tensorcast_ray._transport.shm import ShmTransport

        self.store = store
        self.namespace = namespace
        self.node_id = node_id
        self.gs = gs_handle
        self.token = token
        self.config = config
        self.metrics = metrics
        self._record = record
        self.gs_instance = ""
        self.gs_address = ""
        self.gs_version = ""
        self._shm = ShmTransport(store.shm_dir)
        out = metrics.transfer_bytes.labels(direction="out", transport="object_store")
        self.source = ShardSource(self._shm.map_for_read, on_bytes=out.inc)
        self._lock = threading.Lock()
        # Copies landing here that a chain serves onward: artifact id -> transfer meta.
        self._cond = threading.Condition()
        self._landing: dict[str, dict[str, Any]] = {}
        self._inflight: dict[str, concurrent.futures.Future[Artifact]] = {}
        self._handles: dict[str, Any] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, config.transfer_parallel), thread_name_prefix="tc-pull"
        )
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="tc-daemon-heartbeat", daemon=True
        )
        # The order of this node's reports. A full report replaces this node's replica set
        # at the Global Store, so it must not interleave with a commit or delete (taken
        # across the Global Store call and the local one) or overtake a drop sent before
        # it: the drops go through one sender thread, in order, under this lock.
        # Lock order: sync_lock, then LocalStore's lock (never the other way).
        self.sync_lock = threading.RLock()
        self._outbox: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send_loop, name="tc-daemon-gs-send", daemon=True
        )
        self._acked: list[str] = []  # drops the Global Store asked for, done since the last beat

    # ---- the Global Store --------------------------------------------------------------
    def _gs_call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        import ray

        try:
            return ray.get(
                getattr(self.gs, method).remote(self.token, *args),
                timeout=timeout or self.config.global_store_timeout_s,
            )
        except Exception as exc:  # Ray's wrapper of our error too: map_exception unwraps it
            raise map_exception(exc, context=f"Global Store {method}") from exc

    def _gs_send(self, method: str, *args: Any) -> None:
        """Queue a report for the sender thread (never waits: callers may hold the store's
        lock). Reports whose loss the next full sync repairs."""
        self._outbox.put((method, args))

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            with self.sync_lock:
                self._send(*item)

    def _send(self, method: str, args: tuple[Any, ...]) -> None:
        try:
            self._gs_call(method, *args)
        except ArtifactError as exc:
            logger.warning("could not send %s to the Global Store: %s", method, exc.message)

    def _flush(self) -> None:
        """Send what is queued now, in order (the caller holds ``sync_lock``)."""
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._outbox.put(None)  # stopping: leave the sentinel for the sender
                return
            self._send(*item)

    def start(self) -> None:
        self._sender.start()
        self.sync()
        self._heartbeat.start()

    def start_heartbeat(self) -> None:
        if not self._sender.is_alive():
            self._sender.start()
        if not self._heartbeat.is_alive():
            self._heartbeat.start()

    def sync(self) -> None:
        """Send this node's full report (what it holds) to the Global Store."""
        import ray

        info = ray.get(self.gs.info.remote(), timeout=self.config.global_store_timeout_s)
        self.gs_address, self.gs_version = info["address"], info["version"]
        with self.sync_lock:
            if self._stop.is_set():
                return  # stopping (or left): a report now would put its copies back
            self._flush()  # drops queued before the snapshot reach it first
            answer = self._gs_call("sync_node", self._record(), self.store.report())
        for artifact_id in answer["refused"]:
            logger.warning(
                "the Global Store refused artifact %s (another artifact holds its key); "
                "dropping this node's copy",
                artifact_id,
            )
            self.store.drop_artifacts([artifact_id], reason="dropped by the cluster")
        self.gs_instance = answer["instance_id"]

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                acked, self._acked = self._acked, []
                record = {**self._record(), "synced_with": self.gs_instance, "acked": acked}
                try:
                    answer = self._gs_call("heartbeat", record)
                except ArtifactError:
                    self._acked = acked + self._acked  # said again with the next beat
                    raise
                if answer.get("drop"):  # deletes this node missed (it was unreachable)
                    self.store.drop_artifacts(answer["drop"], reason="dropped by the cluster")
                    self._acked.extend(answer["drop"])  # the Global Store forgets them then
                if answer["resync"]:
                    logger.info("Global Store %s asks for a full report", answer["instance_id"])
                    self.sync()
            except Exception as exc:  # restarting: the next beat tries again
                logger.debug("heartbeat to the Global Store failed: %s", exc)
            try:
                self.source.expire()
            except Exception:
                logger.exception("closing idle transfers failed")

    def leave(self) -> None:
        """A clean stop: the Global Store forgets this node's copies now (the ones only it
        held are lost, as if the node had gone)."""
        self._stop.set()  # no heartbeat may re-report this node after it left
        try:
            with self.sync_lock:
                self._flush()
                self._gs_call("leave", self.node_id, timeout=5.0)
        except ArtifactError as exc:
            logger.warning("could not tell the Global Store this daemon stops: %s", exc.message)

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.source.close_all()
        if "tensorcast_ray._transport.collective" in sys.modules:
            from tensorcast_ray._transport import collective

            collective.close_all()

    def reserve(self, key: str, artifact_id: str, request_id: str) -> None:
        """Reserve ``key`` cluster-wide for a write here (a retry of a write whose first
        attempt reserved or committed it, by ``request_id``, passes)."""
        self._gs_call(
            "reserve",
            {
                "key": key,
                "artifact_id": artifact_id,
                "node_id": self.node_id,
                "request_id": request_id,
                "timeout_ms": int(self.config.write_timeout_s * 1000),
            },
        )

    def forget(self, artifact_id: str) -> None:
        """A version committed cluster-wide whose local commit failed: it is gone."""
        self._gs_send("drop_replica", artifact_id, self.node_id, True)

    def report_kept(self, artifact_id: str) -> None:
        self._gs_send("add_replica", artifact_id, self.node_id, "replica")

    def describe(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The layout of ``entry`` from a node holding it, without moving its bytes."""
        import ray

        errors = []
        for node in self.sources(entry):
            try:
                handle = self.daemon(node)
                meta = ray.get(
                    handle.describe_artifact.remote(self.token, str(entry["artifact_id"])),
                    timeout=self.config.global_store_timeout_s,
                )
            except Exception as exc:
                err = map_exception(exc)
                if err.status_code.name == "FAILED_PRECONDITION":
                    raise err from exc  # the node refuses to describe it: no other will do better
                errors.append(f"{node[:12]}: {err.message}")
                continue
            if meta is not None:
                return meta
        raise UnavailableError(
            f"no node holding {entry['key']} answered ({'; '.join(errors) or 'none listed'})"
        )

    def commit(self, artifact: Artifact) -> int:
        entry = self._gs_call(
            "commit",
            {
                "key": artifact.key,
                "artifact_id": artifact.artifact_id,
                "node_id": self.node_id,
                "nbytes": artifact.nbytes,
                "tensors": artifact.ntensors,
                "kind": artifact.kind,
                "created_ms": artifact.created_ms,
                "persist_task_id": artifact.persist_task_id if artifact.persist_policy else "",
            },
        )
        return int(entry["seq"])

    def mark_durable(self, artifact: Artifact) -> dict[str, Any]:
        """A complete copy of ``artifact`` is on shared disk: the Global Store marks it (and
        journals it), so any node can rehydrate it once every copy in memory is gone.
        NOT_FOUND when it was deleted meanwhile (the caller removes the files)."""
        return self._gs_call(
            "mark_durable",
            artifact.artifact_id,
            self.node_id,
            {
                "key": artifact.key,
                "artifact_id": artifact.artifact_id,
                "node_id": artifact.writer or self.node_id,
                "seq": artifact.cluster_seq,
                "nbytes": artifact.nbytes,
                "tensors": artifact.ntensors,
                "kind": artifact.kind,
                "created_ms": artifact.created_ms,
                "persist_task_id": artifact.persist_task_id,
            },
        )

    def remote_targets(self, artifact_id: str, count: int) -> list[str]:
        """Up to ``count`` alive nodes, other than this one, to hold kept copies of
        ``artifact_id`` (a remote stable tier): nodes already holding one first, so a retry
        adds none twice, then the others in a stable order."""
        entry = self.resolve("", artifact_id)
        holders = [
            r["node_id"]
            for r in entry["replicas"]
            if r["node_id"] != self.node_id and r["kind"] != "cache"
        ]
        alive = _alive_nodes() - {self.node_id}
        chosen = [n for n in holders if n in alive]
        chosen += sorted(n for n in alive if n not in chosen)
        return chosen[:count]

    def persistence_status(self, entry: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """The persistence task of ``entry`` as the daemon running it reports it; from shared
        disk when that daemon is gone and the version is durable."""
        import ray

        task_id = str(entry.get("persist_task_id", ""))
        if not task_id:
            raise NotFoundError(
                f"{entry['key']} has no persistence task: it was written with a policy that "
                "keeps it in memory only (e.g. profile 'cache'); write it with "
                "StorePolicy(profile='durable') to persist it"
            )
        writer = str(entry.get("node_id", ""))
        why = f"the daemon of node {writer[:12]} that ran it is gone"
        if writer and writer in _alive_nodes():
            try:
                handle = self.daemon(writer)
                found = ray.get(
                    handle.persistence_status.remote(self.token, task_id, wait_s),
                    timeout=self.config.global_store_timeout_s + wait_s,
                )
            except Exception as exc:
                why = f"the daemon of node {writer[:12]} did not answer ({_why(exc)})"
            else:
                if found is not None:
                    return found
                why = f"the daemon of node {writer[:12]} no longer remembers it (restarted)"
        if entry.get("durable") and self.store.persistence.configured:
            manifest = self.store.persistence.manifest(str(entry["key"]))
            if manifest.artifact_id == entry["artifact_id"]:
                return self.store.persistence.status_from_manifest(manifest, writer)
            why += f"; the files of {entry['key']} on shared disk hold another artifact"
        from tensorcast_ray._errors import UnavailableError as _Unavailable

        raise _Unavailable(
            f"the persistence task {task_id} of {entry['key']} cannot be asked: {why}, and no "
            "complete copy is on shared disk"
        )

    def abort(self, aborted: Sequence[tuple[str, str]]) -> None:
        for key, artifact_id in aborted:
            self._gs_send("abort", key, artifact_id)

    def dropped(self, freed: Sequence[Freed]) -> None:
        """Copies this node no longer holds (not the ones the cluster told it to drop)."""
        for f in freed:
            if f.reason in _SILENT_REASONS:
                continue
            self._gs_send("drop_replica", f.artifact_id, self.node_id, f.reason in FINAL_REASONS)

    def resolve(self, key: str = "", artifact_id: str = "") -> dict[str, Any]:
        return self._gs_call("resolve", key, artifact_id)

    def exists(self, key: str) -> bool:
        return bool(self._gs_call("exists", key))

    def list_artifacts(self, prefix: str = "") -> list[dict[str, Any]]:
        return self._gs_call("list_artifacts", prefix)

    def delete(self, key: str, unless_held: bool = False) -> dict[str, Any]:
        return self._gs_call("delete", key, self.node_id, unless_held)

    # ---- weight sync (daemon/weights.py) ---------------------------------------------------
    def wait_commits(
        self, names: list[str], after_seq: int, instance_id: str, wait_s: float
    ) -> dict[str, Any]:
        """Held on the Global Store until a version commits after ``after_seq`` (a number of
        its instance ``instance_id``)."""
        return self._gs_call(
            "wait_commits",
            self.node_id,
            names,
            after_seq,
            wait_s,
            instance_id,
            timeout=wait_s + self.config.global_store_timeout_s,
        )

    def check_unheld(self, key: str) -> None:
        """FAILED_PRECONDITION while a reader holds ``key``'s version (before a delete)."""
        self._gs_call("check_unheld", key)

    def subscriber_nodes(self, name: str) -> list[str]:
        return list(self._gs_call("subscriber_nodes", name))

    def subscribe(self, name: str) -> None:
        """This node watches ``name`` from now on (its watcher's calls keep saying so)."""
        self._gs_call("subscribe", self.node_id, name)

    def hold(self, key: str, owner: str, ttl_s: float) -> dict[str, Any]:
        return self._gs_call("hold", key, owner, ttl_s)

    def release_hold(self, hold_id: str) -> bool:
        return bool(self._gs_call("release_hold", hold_id))

    def release_holds(self, owner: str) -> None:
        self._gs_send("release_holds", owner)

    # ---- other daemons ------------------------------------------------------------------
    def daemon(self, node_id: str, *, start: bool = False) -> Any:
        """The daemon of ``node_id``; with ``start``, started there if it has none (a
        replicate target), with this daemon's config, like ``tc.init`` would."""
        with self._lock:
            handle = self._handles.get(node_id)
        if handle is None:
            handle = get_actor(daemon_name(node_id), self.namespace)
            if handle is None and start:
                handle = self._start_daemon(node_id)
            if handle is None:
                raise UnavailableError(
                    f"node {node_id[:12]} has no tensorcast daemon in namespace "
                    f"{self.namespace!r} (it stopped, or the node is gone)"
                )
            with self._lock:
                self._handles[node_id] = handle
        return handle

    def _start_daemon(self, node_id: str) -> Any:
        import ray

        from tensorcast_ray._actors import create_daemon

        logger.info("starting the daemon of node %s for a replica", node_id[:12])
        handle = create_daemon(
            node_id,
            self.namespace,
            self.config.model_dump(mode="json"),
            detached=True,
            get_if_exists=True,
            global_store_mode="connect",
            global_store_address=None,
        )
        try:
            ray.get(handle.info.remote(), timeout=self.config.global_store_timeout_s * 4)
        except Exception as exc:
            raise map_exception(exc, context=f"start the daemon of node {node_id[:12]}") from exc
        return handle

    def _forget(self, node_id: str) -> None:
        with self._lock:
            self._handles.pop(node_id, None)

    # ---- reads -----------------------------------------------------------------------------
    def fetch(
        self, entry: dict[str, Any], *, kind: str = "cache", from_disk: bool = False
    ) -> Artifact:
        """This node's copy of ``entry`` (a Global Store answer), pulled if it has none (from
        shared disk with ``from_disk``, or when no node can serve a durable version); one
        landing however many readers ask at once."""
        artifact_id = str(entry["artifact_id"])
        leader, future = self._landing_of(artifact_id)
        if not leader:
            return future.result()
        with self._leading(artifact_id, future):
            artifact = self.store.local_artifact(artifact_id)
            if artifact is None:
                artifact = self._rehydrate(entry, kind) if from_disk else self._pull(entry, kind)
            future.set_result(artifact)
            return artifact

    def _rehydrate(self, entry: dict[str, Any], kind: str) -> Artifact:
        copy = self.store.persistence.rehydrate(
            str(entry["key"]), artifact_id=str(entry["artifact_id"]), kind=kind, extra=entry
        )
        self.record_replica(copy.artifact_id, kind)
        return copy

    @contextlib.contextmanager
    def _leading(
        self, artifact_id: str, future: concurrent.futures.Future[Artifact]
    ) -> Iterator[None]:
        """[the landing's leader] A failure settles the waiters' future with it; either way
        the landing leaves the in-flight table (the body sets the result)."""
        try:
            yield
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(artifact_id, None)

    def _landing_of(self, artifact_id: str) -> tuple[bool, concurrent.futures.Future[Artifact]]:
        """``(True, new future)`` for the caller that lands ``artifact_id`` here (it runs
        the landing under ``_leading``), or ``(False, the landing in flight)`` to wait on."""
        with self._lock:
            future = self._inflight.get(artifact_id)
            if future is not None:
                return False, future
            future = concurrent.futures.Future()
            self._inflight[artifact_id] = future
            return True, future

    def sources(self, entry: dict[str, Any]) -> list[str]:
        """Nodes to pull ``entry`` from, best first: kept copies before cache copies."""
        order = {"original": 0, "replica": 1, "cache": 2}
        replicas = [r for r in entry.get("replicas", []) if r["node_id"] != self.node_id]
        replicas.sort(key=lambda r: order.get(r["kind"], 3))
        return [r["node_id"] for r in replicas]

    def _pull(self, entry: dict[str, Any], kind: str) -> Artifact:
        nodes = self.sources(entry)
        if not nodes and entry.get("durable") and self.store.persistence.configured:
            return self._rehydrate(entry, kind)
        if not nodes:
            raise NotFoundError(
                f"{entry['key']} has no copy on another node (the Global Store lists "
                f"{[r['node_id'][:12] for r in entry.get('replicas', [])]})"
            )
        errors = []
        for node in nodes:
            try:
                copy = None
                if self.config.read_transport == "collective":
                    copy = self._pull_collective(node, entry, kind)
                if copy is None:
                    copy = self.pull_from(node, entry, kind)
            except ArtifactError as exc:
                # The request's own fault, or this node's: another source would say the same.
                if exc.status_code.name in _REQUEST_FAULTS:
                    raise
                logger.warning("pull of %s from %s failed: %s", entry["key"], node[:12], exc)
                errors.append(f"{node[:12]}: {exc.message}")
                self._forget(node)
                continue
            self.record_replica(copy.artifact_id, kind)
            if entry.get("durable"):
                self.store.mark_durable(copy.artifact_id)
            return copy
        if entry.get("durable") and self.store.persistence.configured:
            logger.warning(
                "no node could serve %s (%s); reading it from shared disk",
                entry["key"],
                "; ".join(errors),
            )
            return self._rehydrate(entry, kind)
        raise UnavailableError(
            f"could not pull {entry['key']} from any node holding it ({'; '.join(errors)}); "
            "retry, or check that those nodes are alive"
        )

    def _pull_collective(self, node: str, entry: dict[str, Any], kind: str) -> Artifact | None:
        """A read over the pair group with ``node`` (``read_transport: collective``); None
        when the collective cannot run or fails, so the object store takes over (counted
        in tc_transfer_fallbacks_total and logged)."""
        from tensorcast_ray._transport import collective

        reason = collective.unavailable_reason()
        if reason:
            self.metrics.transfer_fallbacks.labels(reason="collective_unavailable").inc()
            logger.warning("read of %s: collective unavailable (%s)", entry["key"], reason)
            return None
        try:
            return collective.pull_chain(
                self, entry, node, onward=False, kind=kind, upstream_wait_s=0.0
            )
        except ArtifactError as exc:
            if exc.status_code.name in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
                raise
            self.metrics.transfer_fallbacks.labels(reason="collective_failed").inc()
            logger.warning(
                "collective read of %s from %s failed (%s); object store",
                entry["key"],
                node[:12],
                exc.message,
            )
            return None

    def pull_from(
        self,
        node: str,
        entry: dict[str, Any],
        kind: str,
        *,
        onward: bool = False,
        upstream_wait_s: float = 0.0,
    ) -> Artifact:
        """Land a whole copy of ``entry`` from ``node`` and publish it here. ``onward``: serve
        it to the next node of a chain while it lands (shard by shard)."""
        import ray

        start = time.perf_counter()
        handle = self.daemon(node)
        timeout = self.config.transfer_timeout_s
        try:
            meta = ray.get(
                handle.transfer_open.remote(self.token, str(entry["artifact_id"]), upstream_wait_s),
                timeout=timeout,
            )
        except Exception as exc:
            raise map_exception(exc, context=f"open a transfer on node {node[:12]}") from exc
        opened = time.perf_counter()
        shards = plan_shards(full_pieces(meta["segments"]), self.shard_bytes(meta))
        # The first shards are asked for now: the source copies them into its object store
        # while this node allocates the landing segments.
        early = {
            k: handle.transfer_shard.remote(self.token, meta["transfer_id"], k, shards[k], timeout)
            for k in range(min(self.config.transfer_parallel, len(shards)))
        }
        onward_id = ""
        artifact_id = str(entry["artifact_id"])
        landing = None
        try:
            landing = self.store.begin_landing(meta, kind=kind, served_by="object_store")
            allocated = time.perf_counter()
            if onward:
                onward_id = self.open_onward(artifact_id, meta, landing, len(shards))
            self._receive_all(
                handle, meta["transfer_id"], shards, landing.maps, timeout, onward_id, early
            )
            received = time.perf_counter()
            artifact = self.store.publish_landing(landing)
        except BaseException as exc:
            early.clear()
            if landing is not None:
                self.store.abort_landing(landing)
            if onward_id:
                self.source.landed(onward_id, -1, error=_why(exc))
            self.metrics.transfers.labels(transport="object_store", result="failed").inc()
            if isinstance(exc, ArtifactError):
                raise
            if isinstance(exc, Exception):
                raise map_exception(exc, context=f"pull from node {node[:12]}") from exc
            raise
        finally:
            handle.transfer_close.remote(self.token, meta["transfer_id"])
            if onward:
                self.close_onward(artifact_id)
        self.metrics.transfers.labels(transport="object_store", result="ok").inc()
        self.metrics.transfer_seconds.labels(transport="object_store").observe(
            time.perf_counter() - start
        )
        done = time.perf_counter()
        logger.info(
            "pulled %s (%d bytes, %d shards) from %s in %.3f s (open %.3f, allocate %.3f, "
            "receive %.3f, publish %.3f)",
            artifact.key,
            artifact.nbytes,
            len(shards),
            node[:12],
            done - start,
            opened - start,
            allocated - opened,
            received - allocated,
            done - received,
        )
        return artifact

    def open_onward(self, artifact_id: str, meta: dict[str, Any], landing: Any, shards: int) -> str:
        """Serve a copy still landing here to the next node of a chain, shard by shard."""
        onward_id = self.source.open(landing.segments, landing=shards)
        with self._cond:
            self._landing[artifact_id] = {
                **meta,
                "segments": landing.segments,
                "transfer_id": onward_id,
                # The next node must plan the same shards: shard k is what landed as k here.
                "shard_bytes": self.shard_bytes(meta),
            }
            self._cond.notify_all()
        return onward_id

    def shard_bytes(self, meta: dict[str, Any]) -> int:
        """The shard size of a transfer: a chain's landing copy dictates its own."""
        return int(meta.get("shard_bytes") or self.config.transfer_shard_bytes)

    def close_onward(self, artifact_id: str) -> None:
        """The copy landed (or failed): a chain's next node that took the onward transfer
        closes it when it is done; one nobody took is closed now (it maps the whole copy)."""
        with self._cond:
            landing = self._landing.pop(artifact_id, None)
            self._cond.notify_all()
        if landing is not None and not landing.get("taken"):
            self.source.close(landing["transfer_id"])

    def record_replica(self, artifact_id: str, kind: str) -> None:
        """Tell the Global Store this node now holds a copy. A version deleted while its copy
        was landing is dropped here at once (the delete could not reach a copy it did not
        know of) and the read fails NOT_FOUND, as it would have a moment later."""
        with self._cond:  # a chain's next node waiting in open_transfer may take it now
            self._cond.notify_all()
        try:
            self._gs_call("add_replica", artifact_id, self.node_id, kind)
        except NotFoundError as exc:
            self.store.drop_artifacts([artifact_id], reason="dropped by the cluster")
            raise NotFoundError(
                f"artifact {artifact_id} was deleted while this node pulled it ({exc.message})"
            ) from exc
        except ArtifactError as exc:  # unreachable: the next full sync reports the copy
            logger.warning("could not record the replica of %s: %s", artifact_id, exc)

    def _receive_all(
        self,
        handle: Any,
        transfer_id: str,
        shards: list[list[Piece]],
        dest: Sequence[Any],
        timeout: float,
        onward: str = "",
        early: dict[int, Any] | None = None,
    ) -> None:
        """Every shard, ``transfer_parallel`` at a time (``early``: shards already asked for)."""
        import ray

        inbound = self.metrics.transfer_bytes.labels(direction="in", transport="object_store")
        asked = early if early is not None else {}

        def one(k: int) -> None:
            outer = asked.pop(k, None)
            if outer is None:
                outer = handle.transfer_shard.remote(self.token, transfer_id, k, shards[k], timeout)
            (ref,) = ray.get(outer, timeout=timeout)
            inbound.inc(receive(ref, shards[k], dest, timeout))
            del ref
            if onward:
                self.source.landed(onward, k)

        futures = [self._pool.submit(one, k) for k in range(len(shards))]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise

    def read_ranges(
        self, entry: dict[str, Any], ranges: Sequence[tuple[int, int, int]], dest: Any
    ) -> int:
        """Pull only ``ranges`` (source segment index, offset, length) of ``entry`` into the
        writable mapping ``dest``, packed in order. Returns the bytes moved."""
        import ray

        nodes = self.sources(entry)
        if not nodes and entry.get("durable") and self.store.persistence.configured:
            # Only shared disk holds it: land it here whole (the layout the SDK was told is
            # the one a rehydration places), then copy the ranges from that copy.
            return self.store.copy_ranges(self.fetch(entry, from_disk=True), ranges, dest)
        if not nodes:
            raise NotFoundError(f"{entry['key']} has no copy on another node")
        pieces: list[Piece] = []
        at = 0
        for seg, off, length in ranges:
            pieces.append((seg, off, length, 0, at))
            at += length
        shards = plan_shards(pieces, int(self.config.transfer_shard_bytes)) if pieces else []
        timeout = self.config.transfer_timeout_s
        errors = []
        for node in nodes:
            try:
                handle = self.daemon(node)
                meta = ray.get(
                    handle.transfer_open.remote(self.token, str(entry["artifact_id"]), 0.0),
                    timeout=timeout,
                )
            except Exception as exc:
                errors.append(f"{node[:12]}: {map_exception(exc).message}")
                self._forget(node)
                continue
            try:
                self._receive_all(handle, meta["transfer_id"], shards, [dest], timeout)
                self.metrics.transfers.labels(transport="object_store", result="ok").inc()
                return at
            except Exception as exc:
                self.metrics.transfers.labels(transport="object_store", result="failed").inc()
                err = map_exception(exc)
                if err.status_code.name in _REQUEST_FAULTS:
                    raise err from exc  # every node would refuse it the same way
                errors.append(f"{node[:12]}: {err.message}")
            finally:
                handle.transfer_close.remote(self.token, meta["transfer_id"])
        raise UnavailableError(
            f"could not read {entry['key']} from any node holding it ({'; '.join(errors)})"
        )

    # ---- serving (called by other daemons through the actor) ----------------------------------
    def open_transfer(self, artifact_id: str, wait_s: float) -> dict[str, Any]:
        """Map a copy this node holds (or is landing, for a chain) for one transfer."""
        found: dict[str, Any] = {}

        def ready() -> bool:
            meta = self.store.transfer_meta(artifact_id)
            if meta is not None:
                meta["transfer_id"] = ""
                found.update(meta)
                return True
            landing = self._landing.get(artifact_id)
            if landing is not None:
                landing["taken"] = True  # the taker closes it (close_onward leaves it open)
                found.update(landing)
                return True
            return False

        with self._cond:
            # A chain's upstream may still be starting its own pull: wait for it to land.
            if not self._cond.wait_for(ready, timeout=wait_s):
                raise NotFoundError(f"artifact {artifact_id} is not on node {self.node_id[:12]}")
        if not found["transfer_id"]:
            found["transfer_id"] = self.source.open(found["segments"])
        return found

    # ---- replicate -------------------------------------------------------------------------
    def replicate(
        self, key: str, nodes: Sequence[str] | str, transport: str
    ) -> dict[str, dict[str, Any]]:
        """Put a kept copy of ``key`` on each target node along a chain; one result per node."""
        import ray

        if transport not in TRANSPORTS:
            raise InvalidArgumentError(
                f"transport={transport!r}; expected one of {', '.join(TRANSPORTS)}"
            )
        entry = self.resolve(key)
        holders = [r["node_id"] for r in entry["replicas"]]
        alive = _alive_nodes()
        if nodes == "all":
            targets = sorted(alive)
        elif isinstance(nodes, str):
            raise InvalidArgumentError(f"nodes={nodes!r}; pass 'all' or a list of node ids")
        else:
            targets = list(dict.fromkeys(nodes))
        results: dict[str, dict[str, Any]] = {}
        chain: list[str] = []
        for node in targets:
            if node not in alive:
                results[node] = _result(node, "failed", "", f"node {node[:12]} is not alive")
            elif node in holders:
                try:
                    held = ray.get(
                        self.daemon(node).keep.remote(self.token, entry["artifact_id"]),
                        timeout=self.config.global_store_timeout_s,
                    )
                except Exception as exc:
                    results[node] = _result(node, "failed", "", map_exception(exc).message)
                    continue
                if held:
                    results[node] = _result(node, "ready", "", "already held there")
                else:  # its copy went meanwhile (evicted): land a new one
                    chain.append(node)
            else:
                chain.append(node)
        if not chain:
            return results
        alive_holders = [n for n in self.sources(entry) if n in alive]
        if self.node_id in holders:
            source = self.node_id
        elif alive_holders:
            source = alive_holders[0]
        else:
            for node in chain:
                results[node] = _result(node, "failed", "", "no alive node holds a copy")
            return results
        used, reason = "object_store", ""
        if transport in ("auto", "collective"):
            from tensorcast_ray._transport import collective

            reason = collective.unavailable_reason()
            if not reason:
                used = "collective"
            elif transport == "collective":
                for node in chain:
                    results[node] = _result(node, "failed", "collective", reason)
                return results
            else:
                self.metrics.transfer_fallbacks.labels(reason="collective_unavailable").inc()
                logger.warning(
                    "replicate %s: collective unavailable (%s); object store", key, reason
                )
        timeout = self.config.transfer_timeout_s
        started = []
        for node in chain:
            try:
                self.daemon(node, start=True)
                started.append(node)
            except ArtifactError as exc:
                results[node] = _result(node, "failed", "", exc.message)
        refs = []
        upstream = source
        for i, node in enumerate(started):
            onward = i + 1 < len(started)  # the last node serves nobody
            refs.append(
                (
                    node,
                    self.daemon(node).pull_replica.remote(
                        self.token, entry, upstream, used, source, transport == "auto", onward
                    ),
                )
            )
            upstream = node
        for node, ref in refs:
            try:
                answer = ray.get(ref, timeout=timeout)
                results[node] = _result(
                    node, "ready", answer["transport"], answer.get("reason") or reason
                )
            except Exception as exc:
                err = map_exception(exc)
                results[node] = _result(node, "failed", used, err.message)
        return results

    def pull_replica(
        self,
        entry: dict[str, Any],
        upstream: str,
        transport: str,
        source: str,
        fallback: bool = False,
        onward: bool = True,
    ) -> dict[str, Any]:
        """[target of a replicate] Land a kept copy from ``upstream`` (the node before this
        one in the chain), serving it ``onward`` to the next node as it lands; if upstream
        fails, from ``source``. ``fallback`` (transport "auto"): a collective hop that fails
        is pulled again through the object store, and the answer says why."""
        artifact_id = str(entry["artifact_id"])
        existing = self.store.local_artifact(artifact_id)
        if existing is not None and self.store.keep(artifact_id):
            return {"transport": "", "reason": "already held there"}
        # One landing per artifact per node: a read pulling it now lands the copy we keep.
        leader, future = self._landing_of(artifact_id)
        if not leader:
            landed = future.result()
            self.store.keep(artifact_id)
            return {"transport": landed.served_by, "reason": "landed by a read on this node"}
        with self._leading(artifact_id, future):
            answer = self._pull_replica(entry, upstream, transport, source, fallback, onward)
            copy = self.store.local_artifact(artifact_id)
            if copy is None:
                raise NotFoundError(f"{entry['key']} was dropped on this node as it landed")
            future.set_result(copy)
            return answer

    def _pull_replica(
        self,
        entry: dict[str, Any],
        upstream: str,
        transport: str,
        source: str,
        fallback: bool,
        onward: bool,
    ) -> dict[str, Any]:
        if transport == "collective":
            from tensorcast_ray._transport import collective

            try:
                collective.pull_chain(self, entry, upstream, onward=onward)
            except ArtifactError as exc:
                if not fallback:
                    raise
                self.metrics.transfer_fallbacks.labels(reason="collective_failed").inc()
                logger.warning(
                    "collective pull of %s failed (%s); pulling through the object store",
                    entry["key"],
                    exc.message,
                )
                self.pull_from(source, entry, "replica", onward=onward)
                self.record_replica(str(entry["artifact_id"]), "replica")
                return {
                    "transport": "object_store",
                    "reason": f"collective failed ({exc.message}); used the object store",
                }
            self.record_replica(str(entry["artifact_id"]), "replica")
            return {"transport": "collective"}
        try:
            wait = 0.0 if upstream == source else _CHAIN_WAIT_S
            self.pull_from(upstream, entry, "replica", onward=onward, upstream_wait_s=wait)
        except ArtifactError as exc:
            if upstream == source:
                raise
            logger.warning(
                "chain pull of %s from %s failed (%s); pulling from %s",
                entry["key"],
                upstream[:12],
                exc.message,
                source[:12],
            )
            self.pull_from(source, entry, "replica", onward=onward)
        self.record_replica(str(entry["artifact_id"]), "replica")
        return {"transport": "object_store"}


def _why(exc: BaseException) -> str:
    """A failure's message, without the remote traceback Ray wraps around it."""
    if isinstance(exc, Exception):
        return map_exception(exc).message
    return type(exc).__name__


def _result(node: str, status: str, transport: str, reason: str) -> dict[str, Any]:
    return {"node_id": node, "status": status, "transport": transport, "reason": reason}


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def new_write_id() -> str:
    return uuid.uuid4().hex
