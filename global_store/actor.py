"""``GlobalStoreActor``: the cluster's metadata service as a Ray actor.  [Global Store]

One named (``global_store``), detached, restartable actor per namespace. It holds metadata
only — which daemons exist and keys → versions → artifacts → replicas (the pure
:class:`~tensorcast_ray.global_store.catalog.ClusterCatalog`) — and never bytes. It serves
gRPC (Health, Status) for processes outside Ray and the CLI, a Prometheus ``/metrics``
endpoint, and Ray actor methods for daemons and the CLI; every catalog method takes the
namespace token (:mod:`tensorcast_ray._auth`) and refuses a call without it.

Liveness: daemons report every ``heartbeat_s``; a watcher asks Ray which nodes are alive
every second and drops the replicas of a node Ray declared dead. A restarted Global Store
starts empty and rebuilds its catalog from the daemons: it asks every daemon of its
namespace for a full report at start, and a daemon whose heartbeat reaches a Global Store
instance it has not reported to sends one too. Until the first round of reports is in, a
key it does not know is UNAVAILABLE (retryable), never a false NOT_FOUND.

Durable artifacts (a complete copy on shared disk, reported by :meth:`mark_durable`) are
journaled through fsspec when ``journal_url`` is set
(:class:`~tensorcast_ray.global_store.journal.CatalogJournal`, one record per artifact): a
restarted Global Store replays the journal before it asks the daemons for their reports, so
it recovers every durable key even when the daemons that wrote them are gone. A durable entry
outlives its copies (a reader rehydrates it from disk); deleting it, or its life ending,
forgets its record.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import ray
from google.protobuf.message import Message
from tensorcast_ray.global_store.catalog import ClusterCatalog
from tensorcast_ray.global_store.journal import CatalogJournal
from tensorcast_ray.global_store.metrics import GlobalStoreMetrics

from tensorcast_ray._actors import daemon_name, get_actor, message_to_dict
from tensorcast_ray._auth import namespace_token, unauthenticated_error
from tensorcast_ray._config import DEFAULT_GLOBAL_STORE_METRICS_PORT, GlobalStoreConfig
from tensorcast_ray._errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._grpc_server import (
    AioServerThread,
    bind_error,
    bind_preferring,
    unary_handlers,
)
from tensorcast_ray._holds import HoldTable
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, global_store_pb2
from tensorcast_ray._version import PROTOCOL_VERSION, __version__

logger = logging.getLogger("tensorcast_ray.global_store")

SERVICE_NAME = "tensorcast_ray.v1.GlobalStore"
_METHODS: dict[str, tuple[int, type[Message], type[Message]]] = {
    "Health": (0, common_pb2.HealthRequest, common_pb2.HealthResponse),
    "Status": (1, global_store_pb2.GlobalStatusRequest, global_store_pb2.GlobalStatusResponse),
}


#: catalog calls (Ray actor methods) timed and counted like the gRPC ones
_CATALOG_METHODS = (
    "reserve",
    "commit",
    "abort",
    "resolve",
    "exists",
    "delete",
    "list_artifacts",
    "add_replica",
    "drop_replica",
    "mark_durable",
    "heartbeat",
    "sync_node",
    "leave",
    "wait_commits",
    "subscribe",
    "subscriber_nodes",
    "hold",
    "release_hold",
    "release_holds",
    "check_unheld",
)
_NODE_POLL_S = 1.0
_WAIT_COMMITS_MAX_S = 10.0  # one wait_commits call waits at most this long (daemons loop)
_SUBSCRIBER_TTL_S = 60.0  # a node watched or held a name this recently: it subscribes
_REBUILD_TIMEOUT_S = 30.0
_FANOUT_TIMEOUT_S = 10.0
_MAX_TOMBSTONES = 100_000
_JOURNAL_LOAD_TIMEOUT_S = 30.0  # storage down at start: retried this long, then go on
_JOURNAL_WAIT_S = 5.0  # mark_durable waits this long for its record, then answers
_FORGET_RETRY_S = 10.0  # journal records a delete could not remove are retried this often


class GlobalStoreActor:
    def __init__(
        self, config: dict[str, Any], namespace: str, version_override: str | None = None
    ) -> None:
        # TENSORCAST_RAY_JOURNAL_URL was applied where the config was loaded (_config).
        self.config = GlobalStoreConfig.model_validate(config)
        # A URL no file system can open is a configuration error: this start fails with it.
        self.journal = (
            CatalogJournal(self.config.journal_url, self.config.journal_storage_options)
            if self.config.journal_url
            else None
        )
        self._journal_state: dict[str, Any] = {
            "loaded": 0,  # valid records read at start
            "restored": 0,  # of those, entries the catalog took
            "skipped": 0,  # bad records and records whose key another artifact holds
            "load_error": "",
        }
        # Records a delete could not remove (storage down): retried in the background.
        self._pending_forgets: set[str] = set()
        self.namespace = namespace
        self.version = version_override or __version__
        self.instance_id = uuid.uuid4().hex[:12]
        self.catalog = ClusterCatalog()
        self._token = namespace_token(namespace)
        self._daemons: dict[str, global_store_pb2.DaemonRecord] = {}
        self._handles: dict[str, Any] = {}
        # Drops a node did not confirm (unreachable at a delete): sent again with each of
        # its heartbeats until it has them, and refused in its full report meanwhile.
        self._pending_drops: dict[str, set[str]] = {}
        # Artifacts deleted (or whose life ended) lately: a report or replica of one is
        # refused, so a node that missed the delete cannot bring it back.
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        # Woken by every commit: the daemons' watchers (wait_commits) wait on it.
        self._commit_cond = threading.Condition(self._lock)
        # Reader holds (tensorcast_ray.weights): a delete unless_held passes a held version by.
        self.holds = HoldTable()
        # name -> {node id: when its daemon last watched or held it} (subscriber_nodes)
        self._watchers: dict[str, dict[str, float]] = {}
        self._watching = 0  # wait_commits calls held now
        self._started = time.monotonic()
        # Until the daemons alive at start have reported, an unknown key may only be unknown
        # because its report is still on the way.
        self._rebuilt = threading.Event()
        self._stop = threading.Event()
        self.metrics = GlobalStoreMetrics(
            version=self.version, rpc_methods=[*_METHODS, *_CATALOG_METHODS]
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="tc-gs-rpc")
        # Journal writes and removals: never on a control thread for long.
        self._journal_io = concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="tc-gs-journal"
        )
        self._aio = AioServerThread("tc-gs-grpc")
        handler = unary_handlers(SERVICE_NAME, _METHODS, self._dispatch, self._executor)
        self.port = self._aio.start(
            [handler], self.config.listen_host, self.config.listen_port, self._token
        )
        host, port = self.config.metrics_host, self.config.metrics_port
        try:
            if port is None:  # the default: another namespace or Ray cluster may hold it
                self.metrics_port = bind_preferring(
                    lambda p: self.metrics.serve(p, host),
                    DEFAULT_GLOBAL_STORE_METRICS_PORT,
                    "Global Store metrics endpoint",
                )
            else:
                self.metrics_port = self.metrics.serve(port, host)
        except OSError as exc:
            self._aio.stop()
            raise bind_error("Global Store metrics endpoint", host, port or 0, exc) from exc
        advertised = _advertised_host(self.config.listen_host)
        self.address = f"{advertised}:{self.port}"
        self.metrics_address = f"{_advertised_host(self.config.metrics_host)}:{self.metrics_port}"
        threading.Thread(target=self._rebuild, name="tc-gs-rebuild", daemon=True).start()
        threading.Thread(target=self._watch_nodes, name="tc-gs-nodes", daemon=True).start()

    # ---- gRPC -----------------------------------------------------------------------------
    def _dispatch(self, method: str, request: Any) -> Any:
        with self.metrics.observe_rpc(method):
            if method == "Health":
                return common_pb2.HealthResponse(
                    ok=True,
                    version=self.version,
                    protocol=PROTOCOL_VERSION,
                    uptime_s=time.monotonic() - self._started,
                )
            return self._status_pb()

    def _status_pb(self) -> global_store_pb2.GlobalStatusResponse:
        with self._lock:
            daemons = list(self._daemons.values())
            keys, artifacts = self.catalog.names(), len(self.catalog)
        return global_store_pb2.GlobalStatusResponse(
            version=self.version,
            address=self.address,
            metrics_address=self.metrics_address,
            uptime_s=time.monotonic() - self._started,
            keys=keys,
            artifacts=artifacts,
            daemons=daemons,
            namespace=self.namespace,
            pid=os.getpid(),
        )

    # ---- the catalog shell ------------------------------------------------------------------
    def _call(self, method: str, token: str, fn: Callable[[], Any]) -> Any:
        """One catalog call: authenticated, under the lock, timed; the gauges follow."""
        with self.metrics.observe_rpc(method):
            self._check_token(token)
            return self._locked(fn)

    def _check_token(self, token: str) -> None:
        if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
            raise unauthenticated_error()

    def _locked(self, fn: Callable[[], Any]) -> Any:
        """``fn`` under the catalog lock; then the gauges, and the journal records of the
        durable entries it removed are forgotten (outside the lock)."""
        dropped: list[str] = []
        try:
            with self._lock:
                try:
                    return fn()
                finally:
                    dropped = self.catalog.take_dropped_durable()
                    self._set_gauges()
        finally:
            if dropped:
                self._forget(dropped)

    def _set_gauges(self) -> None:
        """Under the lock."""
        self.metrics.catalog_keys.set(self.catalog.names())
        self.metrics.catalog_artifacts.set(len(self.catalog))
        self.metrics.durable_artifacts.set(self.catalog.durable_count())
        self.metrics.reader_holds.set(len(self.holds))

    def _require_rebuilt(self, what: str) -> None:
        """Answers that depend on every daemon's report wait for the rebuild: a write could
        otherwise reuse a version not reported yet, ``latest`` or a listing miss one."""
        if not self._rebuilt.is_set():
            raise UnavailableError(
                f"the Global Store restarted and is rebuilding its catalog from the daemons; "
                f"{what} waits until they have reported — retry in a few seconds"
            )

    def _unknown_while_rebuilding(self, key: str) -> None:
        if not self._rebuilt.is_set():
            raise UnavailableError(
                f"the Global Store restarted and is rebuilding its catalog from the daemons; "
                f"{key} may be among what they have not reported yet — retry in a few seconds"
            )

    @ray.method(concurrency_group="control")
    def reserve(self, token: str, write: dict[str, Any]) -> dict[str, Any] | None:
        """Reserve ``write["key"]`` for a write on ``write["node_id"]``; a retry of a write
        that committed already gets that commit back."""

        def run() -> dict[str, Any] | None:
            self._require_rebuilt(f"writing {write.get('key')}")
            now = _now_ms()
            done = self.catalog.reserve(
                str(write["key"]),
                str(write["artifact_id"]),
                str(write["node_id"]),
                request_id=str(write.get("request_id", "")),
                deadline_ms=now + int(write.get("timeout_ms", 600_000)),
                now_ms=now,
            )
            return None if done is None else done.to_dict()

        return self._call("reserve", token, run)

    @ray.method(concurrency_group="control")
    def commit(self, token: str, write: dict[str, Any]) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            entry = self.catalog.commit(
                str(write["key"]),
                str(write["artifact_id"]),
                str(write["node_id"]),
                nbytes=int(write.get("nbytes", 0)),
                tensors=int(write.get("tensors", 0)),
                kind=str(write.get("kind", "put")),
                created_ms=int(write.get("created_ms", 0)),
                persist_task_id=str(write.get("persist_task_id", "") or ""),
            )
            self._commit_cond.notify_all()
            return entry.to_dict()

        return self._call("commit", token, run)

    @ray.method(concurrency_group="journal")  # its journal write never holds up control calls
    def mark_durable(
        self,
        token: str,
        artifact_id: str,
        node_id: str,
        record: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``node_id`` finished a complete copy of ``artifact_id`` on shared disk: journal it
        (so a restarted Global Store recovers the key) and keep the entry when its copies go.
        ``record``: the daemon's word on it (fields the journal keeps next to the catalog's,
        which win; a ``key`` that is not the artifact's is INVALID_ARGUMENT). NOT_FOUND when
        the artifact was deleted or is unknown: the daemon then removes its files. Returns the
        entry, with ``journaled`` (False when no journal is configured, or its write failed
        or is still under way after a few seconds: the entry is durable in memory all the
        same) and ``journal_configured``."""
        extra = dict(record or {})
        with self.metrics.observe_rpc("mark_durable"):
            self._check_token(token)

            def check() -> dict[str, Any]:
                entry = self._durable_candidate(artifact_id)
                if extra.get("key") not in (None, entry.key):
                    raise InvalidArgumentError(
                        f"mark_durable: artifact {artifact_id} is {entry.key}, not "
                        f"{extra.get('key')!r}"
                    )
                journal = {**extra, **entry.to_record(), "persisted_by": str(node_id)}
                if not entry.persist_task_id:
                    journal["persist_task_id"] = str(extra.get("persist_task_id", "") or "")
                return journal

            journal_record = self._locked(check)
            journaled = self._journal_record(journal_record)

            def mark() -> dict[str, Any]:
                try:
                    entry = self._durable_candidate(artifact_id)
                except NotFoundError:
                    gone.append(True)  # deleted while its record was written
                    raise
                entry = self.catalog.mark_durable(artifact_id)
                if not entry.persist_task_id and journal_record["persist_task_id"]:
                    entry.persist_task_id = journal_record["persist_task_id"]
                return entry.to_dict()

            gone: list[bool] = []
            try:
                out: dict[str, Any] = self._locked(mark)
            except NotFoundError:
                if gone:  # a write still under way forgets it itself once it lands
                    self._forget([artifact_id])
                raise
            logger.debug("%s is durable (copy from node %s)", out["key"], node_id)
            return {**out, "journaled": journaled, "journal_configured": self.journal is not None}

    def _durable_candidate(self, artifact_id: str) -> Any:
        """Under the lock: the committed, not deleted entry of ``artifact_id``."""
        if artifact_id in self._deleted:
            raise NotFoundError(
                f"artifact {artifact_id} was deleted; its disk copy is not needed any more"
            )
        try:
            return self.catalog.by_artifact(artifact_id)
        except NotFoundError:
            self._unknown_while_rebuilding(artifact_id)  # its writer may not have reported
            raise

    # ---- the journal ----------------------------------------------------------------------
    def _journal_record(self, record: dict[str, Any]) -> bool:
        """Write one record (outside the lock, on the journal's own threads, so storage that
        hangs never holds a control thread for long); False when none is configured, the
        write failed, or it did not finish within :data:`_JOURNAL_WAIT_S` (it goes on; the
        entry is durable in memory either way)."""
        if self.journal is None:
            return False
        future = self._journal_io.submit(self._write_record, record)
        try:
            return future.result(timeout=_JOURNAL_WAIT_S)
        except concurrent.futures.TimeoutError:
            logger.warning(
                "journal %s: recording %s takes over %.0f s; it goes on in the background",
                self.journal.url,
                record.get("key"),
                _JOURNAL_WAIT_S,
            )
            return False

    def _write_record(self, record: dict[str, Any]) -> bool:
        journal = self.journal
        assert journal is not None
        artifact_id = str(record.get("artifact_id"))
        try:
            journal.record(record)
        except Exception as exc:
            self.metrics.journal_errors.labels(op="record").inc()
            logger.error(
                "journal %s: cannot record %s (%s); it is durable in memory only, so a Global "
                "Store restart recovers it only from its daemons' reports: %s",
                journal.url,
                record.get("key"),
                artifact_id,
                exc,
            )
            return False
        self.metrics.journal_writes.labels(op="record").inc()
        # Deleted while the record was written (its delete may have forgotten it before the
        # record landed): forget it again, so a restart does not bring it back.
        with self._lock:
            gone = artifact_id in self._deleted or not _committed(self.catalog, artifact_id)
        if gone:
            self._forget_now([artifact_id])
        return True

    def _forget(self, artifact_ids: list[str]) -> None:
        """Remove the records of durable artifacts that left the catalog, in the background
        (the caller never waits on the storage); one that fails is retried every
        :data:`_FORGET_RETRY_S`, so a restart does not bring it back."""
        if self.journal is not None and artifact_ids:
            try:
                self._journal_io.submit(self._forget_now, list(artifact_ids))
            except RuntimeError:  # stopping: the next instance's delete will forget them
                pass

    def _forget_now(self, artifact_ids: list[str]) -> None:
        journal = self.journal
        assert journal is not None
        for artifact_id in artifact_ids:
            try:
                journal.forget(artifact_id)
            except Exception as exc:
                self.metrics.journal_errors.labels(op="forget").inc()
                logger.warning(
                    "journal %s: cannot forget %s (retried every %.0f s): %s",
                    journal.url,
                    artifact_id,
                    _FORGET_RETRY_S,
                    exc,
                )
                with self._lock:
                    self._pending_forgets.add(artifact_id)
                continue
            self.metrics.journal_writes.labels(op="forget").inc()
            with self._lock:
                self._pending_forgets.discard(artifact_id)

    def _retry_forgets(self) -> None:
        with self._lock:
            pending = sorted(self._pending_forgets)
        if pending and self.journal is not None:
            self._forget_now(pending)

    def _restore_journal(self) -> None:
        """At start: the journal's durable entries into the catalog. Storage that cannot be
        read is retried with backoff for :data:`_JOURNAL_LOAD_TIMEOUT_S`, then given up (the
        daemons' reports still rebuild what they hold)."""
        journal = self.journal
        if journal is None:
            return
        deadline = time.monotonic() + _JOURNAL_LOAD_TIMEOUT_S
        delay = 0.25
        while True:
            try:
                records = journal.load()
                break
            except Exception as exc:
                self.metrics.journal_errors.labels(op="load").inc()
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    self._journal_state["load_error"] = str(exc)
                    logger.error(
                        "journal %s cannot be read (%s); going on without it: durable keys "
                        "whose daemons are gone stay unknown until a restart reads it",
                        journal.url,
                        exc,
                    )
                    return
                logger.warning("journal %s cannot be read yet, retrying: %s", journal.url, exc)
                self._stop.wait(min(delay, left))
                delay = min(delay * 2, 4.0)
        skipped = self._locked(lambda: self.catalog.restore(records))
        self._journal_state.update(
            loaded=len(records),
            restored=len(records) - len(skipped),
            skipped=journal.last_skipped + len(skipped),
            load_error="",
        )
        logger.info(
            "journal %s: %d durable artifact(s) restored, %d record(s) skipped",
            journal.url,
            len(records) - len(skipped),
            journal.last_skipped + len(skipped),
        )

    def _journal_info(self) -> dict[str, Any]:
        return {
            "configured": self.journal is not None,
            "url": self.journal.url if self.journal is not None else None,
            **self._journal_state,
            "pending_forgets": len(self._pending_forgets),
        }

    @ray.method(concurrency_group="control")
    def abort(self, token: str, key: str, artifact_id: str) -> None:
        self._call("abort", token, lambda: self.catalog.abort(key, artifact_id))

    @ray.method(concurrency_group="control")
    def resolve(self, token: str, key: str = "", artifact_id: str = "") -> dict[str, Any]:
        """The committed entry of ``key`` (``latest`` resolved by commit order) or of
        ``artifact_id``, with the nodes holding it and which of them are alive."""

        def run() -> dict[str, Any]:
            from tensorcast_ray._errors import NotFoundError

            if key.endswith(":latest"):
                self._require_rebuilt(f"resolving {key}")
            try:
                entry = (
                    self.catalog.by_artifact(artifact_id)
                    if artifact_id
                    else self.catalog.resolve(key)
                )
            except NotFoundError:
                self._unknown_while_rebuilding(key or artifact_id)
                raise
            return entry.to_dict()

        return self._call("resolve", token, run)

    @ray.method(concurrency_group="control")
    def exists(self, token: str, key: str) -> bool:
        def run() -> bool:
            found = self.catalog.exists(key)
            if not found:
                self._unknown_while_rebuilding(key)
            return found

        return self._call("exists", token, run)

    @ray.method(concurrency_group="control")
    def list_artifacts(self, token: str, prefix: str = "") -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            self._require_rebuilt("listing keys")
            return [e.to_dict() for e in self.catalog.entries(prefix)]

        return self._call("list_artifacts", token, run)

    @ray.method(concurrency_group="control")
    def delete(
        self, token: str, key: str, node_id: str, unless_held: bool = False
    ) -> dict[str, Any]:
        """Delete ``key`` cluster-wide: every other node holding it drops its copy before this
        returns (the caller, ``node_id``, drops its own). ``unless_held``: FAILED_PRECONDITION
        while a reader holds the version (weights garbage collection)."""

        def run() -> Any:
            if unless_held:
                self._refuse_held(key)
            entry = self.catalog.delete(key)
            self._tombstone([entry.artifact_id])
            return entry

        entry = self._call("delete", token, run)
        others = [n for n in entry.replicas if n != node_id]
        failed = self._fan_out_drop(others, [entry.artifact_id], wait=True)
        return {**entry.to_dict(), "unreachable": failed}

    @ray.method(concurrency_group="control")
    def add_replica(self, token: str, artifact_id: str, node_id: str, kind: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            from tensorcast_ray._errors import NotFoundError

            if artifact_id in self._deleted:
                raise NotFoundError(f"artifact {artifact_id} was deleted")
            try:
                return self.catalog.add_replica(artifact_id, node_id, kind).to_dict()
            except NotFoundError:
                self._unknown_while_rebuilding(artifact_id)  # its writer may not have reported
                raise

        return self._call("add_replica", token, run)

    @ray.method(concurrency_group="control")
    def drop_replica(self, token: str, artifact_id: str, node_id: str, final: bool) -> None:
        """``node_id`` dropped ``artifact_id``; ``final``: its life ended (the version goes
        everywhere), else it was a copy evicted or expired there."""

        def run() -> list[str]:
            if final:
                self._tombstone([artifact_id])
            return self.catalog.drop_replica(artifact_id, node_id, final=final)

        others = self._call("drop_replica", token, run)
        if others:
            self._fan_out_drop(others, [artifact_id], wait=False)

    @ray.method(concurrency_group="control")
    def heartbeat(self, token: str, record: dict[str, Any]) -> dict[str, Any]:
        """A daemon's liveness report; ``resync`` asks it for a full report (this instance
        has not had one from that daemon instance yet)."""

        def run() -> dict[str, Any]:
            node_id = _node_of(record)
            known = self._daemons.get(node_id)
            self._daemons[node_id] = _daemon_record(record, node_id)
            self.metrics.daemons_known.set(len(self._daemons))
            synced = (
                known is not None
                and known.instance_id == str(record.get("instance_id", ""))
                and record.get("synced_with") == self.instance_id
            )
            # Drops it missed, sent again until it says (in a later beat) it made them.
            pending = self._pending_drops.get(node_id, set())
            pending -= set(record.get("acked", ()))
            if not pending:
                self._pending_drops.pop(node_id, None)
            return {"instance_id": self.instance_id, "resync": not synced, "drop": sorted(pending)}

        return self._call("heartbeat", token, run)

    @ray.method(concurrency_group="control")
    def sync_node(
        self, token: str, record: dict[str, Any], artifacts: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A daemon's full report: what it holds becomes its replica set."""

        def run() -> list[str]:
            node_id = _node_of(record)
            self._daemons[node_id] = _daemon_record(record, node_id)
            self.metrics.daemons_known.set(len(self._daemons))
            missed = self._pending_drops.pop(node_id, set())
            refused = [
                str(a.get("artifact_id"))
                for a in artifacts
                if a.get("artifact_id") in missed or a.get("artifact_id") in self._deleted
            ]
            kept = [a for a in artifacts if str(a.get("artifact_id")) not in set(refused)]
            return self.catalog.sync_node(node_id, kept) + refused

        refused = self._call("sync_node", token, run)
        return {"instance_id": self.instance_id, "refused": refused}

    @ray.method(concurrency_group="control")
    def leave(self, token: str, node_id: str) -> list[str]:
        """A daemon stops cleanly: forget its copies now (returns the keys lost with it)."""

        def run() -> list[str]:
            self.holds.release_prefix(f"{node_id}/")
            lost = self.catalog.drop_node(node_id)
            self._daemons.pop(node_id, None)
            self._handles.pop(node_id, None)
            self._pending_drops.pop(node_id, None)
            self.metrics.daemons_known.set(len(self._daemons))
            return lost

        lost = self._call("leave", token, run)
        if lost:
            logger.warning(
                "daemon of node %s stopped; %d version(s) lived only there", node_id, len(lost)
            )
        return lost

    # ---- weight sync: watchers and reader holds ------------------------------------------
    @ray.method(concurrency_group="watch")
    def wait_commits(
        self,
        token: str,
        node_id: str,
        names: list[str],
        after_seq: int,
        wait_s: float,
        instance_id: str = "",
    ) -> dict[str, Any]:
        """[a daemon's watcher] Wait until a version commits after ``after_seq`` (or
        ``wait_s`` passes, at most 10 s): answers this instance's id, the last commit's
        number and the names committed since (``names: None`` — the log does not reach back
        that far, ``after_seq < 0``, or ``instance_id`` — the instance that numbered
        ``after_seq`` — is not this one: resolve what you watch). ``names`` are the names the
        node watches: they make it a subscriber node (``subscriber_nodes``)."""
        with self.metrics.observe_rpc("wait_commits"):
            self._check_token(token)
            deadline = time.monotonic() + max(0.0, min(float(wait_s), _WAIT_COMMITS_MAX_S))
            with self._commit_cond:
                now = time.monotonic()
                for name in names:
                    self._watchers.setdefault(str(name), {})[node_id] = now
                self._watching += 1
                self.metrics.watchers.set(self._watching)
                if instance_id and instance_id != self.instance_id:
                    after_seq = -1  # numbered by an earlier instance: look again at once
                try:
                    return self._commits_after(after_seq, deadline)
                finally:
                    self._watching -= 1
                    self.metrics.watchers.set(self._watching)

    def _commits_after(self, after_seq: int, deadline: float) -> dict[str, Any]:
        """Under ``_commit_cond``."""
        while True:
            changed = None if after_seq < 0 else self.catalog.committed_since(after_seq)
            remaining = deadline - time.monotonic()
            if changed is None or changed or remaining <= 0 or self._stop.is_set():
                return {
                    "instance_id": self.instance_id,
                    "seq": self.catalog.seq,
                    "names": None if changed is None else sorted(changed),
                }
            self._commit_cond.wait(remaining)

    @ray.method(concurrency_group="control")
    def subscribe(self, token: str, node_id: str, name: str) -> None:
        """``node_id`` has a subscriber of ``name`` from now on (its daemon's first waiter
        says so at once; its watcher's calls then keep it fresh)."""

        def run() -> None:
            self._watchers.setdefault(name, {})[node_id] = time.monotonic()

        self._call("subscribe", token, run)

    @ray.method(concurrency_group="control")
    def subscriber_nodes(self, token: str, name: str) -> list[str]:
        """Alive nodes whose daemon watched or held ``name`` in the last minute."""

        def run() -> list[str]:
            cutoff = time.monotonic() - _SUBSCRIBER_TTL_S
            seen = self._watchers.get(name, {})
            for node in [n for n, t in seen.items() if t < cutoff]:
                del seen[node]
            if not seen:
                self._watchers.pop(name, None)
            return sorted(n for n in seen if n in self._daemons)

        return self._call("subscriber_nodes", token, run)

    @ray.method(concurrency_group="control")
    def hold(self, token: str, key: str, owner: str, ttl_s: float) -> dict[str, Any]:
        """Resolve ``key`` (``latest`` allowed) and hold that version for ``owner``
        (``"<node id>/<session>"``) until released or ``ttl_s`` passes."""

        def run() -> dict[str, Any]:
            if key.endswith(":latest"):
                self._require_rebuilt(f"resolving {key}")
            try:
                entry = self.catalog.resolve(key)
            except NotFoundError:
                self._unknown_while_rebuilding(key)
                raise
            hold_id = self.holds.take(entry.artifact_id, owner, float(ttl_s), time.monotonic())
            node = owner.partition("/")[0]
            self._watchers.setdefault(entry.key.partition(":")[0], {})[node] = time.monotonic()
            return {**entry.to_dict(), "hold_id": hold_id}

        return self._call("hold", token, run)

    @ray.method(concurrency_group="control")
    def check_unheld(self, token: str, key: str) -> None:
        """FAILED_PRECONDITION while a reader holds ``key``'s version (a delete unless_held
        asks first, before it stops the version's persistence task)."""
        self._call("check_unheld", token, lambda: self._refuse_held(key))

    @ray.method(concurrency_group="control")
    def release_hold(self, token: str, hold_id: str) -> bool:
        return bool(self._call("release_hold", token, lambda: self.holds.release(hold_id)))

    @ray.method(concurrency_group="control")
    def release_holds(self, token: str, owner: str) -> int:
        """Every hold of ``owner`` (a session that ended)."""
        return int(self._call("release_holds", token, lambda: self.holds.release_owner(owner)))

    def _refuse_held(self, key: str) -> None:
        """Under the lock."""
        entry = self.catalog.resolve(key)
        held = self.holds.count(entry.artifact_id, time.monotonic())
        if held:
            raise FailedPreconditionError(
                f"{entry.key} is held by {held} reader(s) copying it; it is deleted once they "
                "finish (retry later, or delete it without unless_held)"
            )

    def _tombstone(self, artifact_ids: list[str]) -> None:
        for artifact_id in artifact_ids:
            self._deleted[artifact_id] = None
        while len(self._deleted) > _MAX_TOMBSTONES:
            self._deleted.popitem(last=False)

    # ---- background ---------------------------------------------------------------------------
    def _daemon(self, node_id: str) -> Any | None:
        handle = self._handles.get(node_id)
        if handle is None:
            handle = get_actor(daemon_name(node_id), self.namespace)
            if handle is not None:
                self._handles[node_id] = handle
        return handle

    def _fan_out_drop(self, nodes: list[str], artifact_ids: list[str], *, wait: bool) -> list[str]:
        """Tell ``nodes`` to drop ``artifact_ids``; with ``wait``, returns the nodes that did
        not confirm in time."""
        refs, failed = [], []
        for node in nodes:
            handle = self._daemon(node)
            if handle is None:
                failed.append(node)
                continue
            refs.append((node, handle.drop_artifacts.remote(self._token, artifact_ids)))
        if wait:
            for node, ref in refs:
                try:
                    ray.get(ref, timeout=_FANOUT_TIMEOUT_S)
                except Exception as exc:
                    logger.warning("node %s did not drop %s: %s", node, artifact_ids, exc)
                    self._handles.pop(node, None)
                    failed.append(node)
        with self._lock:
            for node in failed:  # told again with its next heartbeat (or full report)
                self._pending_drops.setdefault(node, set()).update(artifact_ids)
        return failed

    def _rebuild(self) -> None:
        """At start: ask every daemon of this namespace for a full report (a restarted
        Global Store learns the catalog back without waiting for heartbeats). The journal's
        durable entries come first."""
        try:
            self._restore_journal()
        except Exception:
            logger.exception("restoring the catalog from the journal failed")
        try:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            names = [
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == self.namespace
                and a["name"].startswith("daemon:")
                and a["name"].partition(":")[2] in alive  # a dead node's daemon never answers
            ]
            refs = []
            for name in names:
                handle = get_actor(name, self.namespace)
                if handle is not None:
                    refs.append(handle.resync.remote(self._token, self.instance_id))
            deadline = time.monotonic() + _REBUILD_TIMEOUT_S
            for ref in refs:
                try:
                    ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
                except Exception as exc:  # a daemon that died meanwhile, or one still starting
                    logger.warning("a daemon did not report at Global Store start: %s", exc)
        except Exception:
            logger.exception("rebuilding the catalog from the daemons failed")
        finally:
            self._rebuilt.set()

    def _watch_nodes(self) -> None:
        """Drop the replicas of nodes Ray declared dead (checked every second); retry the
        journal records a delete could not remove."""
        next_forget = time.monotonic() + _FORGET_RETRY_S
        while not self._stop.wait(_NODE_POLL_S):
            if time.monotonic() >= next_forget:
                next_forget = time.monotonic() + _FORGET_RETRY_S
                try:
                    self._retry_forgets()
                except Exception:
                    logger.exception("retrying journal removals failed")
            try:
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            except Exception:
                continue  # the GCS is restarting: try again
            with self._lock:
                gone = (self.catalog.nodes() | set(self._daemons)) - alive
                for node in gone:
                    self.holds.release_prefix(f"{node}/")
                    lost = self.catalog.drop_node(node)
                    self._daemons.pop(node, None)
                    self._pending_drops.pop(node, None)
                    self._handles.pop(node, None)
                    logger.warning(
                        "node %s left the cluster; %d version(s) lived only there%s",
                        node,
                        len(lost),
                        f": {', '.join(lost[:5])}" if lost else "",
                    )
                if gone:
                    self.metrics.daemons_known.set(len(self._daemons))
                    self._set_gauges()

    # ---- lifecycle and discovery -----------------------------------------------------------
    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "metrics_address": self.metrics_address,
            "version": self.version,
            "namespace": self.namespace,
            "pid": os.getpid(),
            "instance_id": self.instance_id,
            "rebuilt": self._rebuilt.is_set(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "journal": self._journal_info(),
        }

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        """The gRPC Status answer as a dict, plus ``journal`` (configured, url, records
        loaded / restored / skipped at start, load_error, pending_forgets) and
        ``durable_artifacts``."""
        with self._lock:
            durable = self.catalog.durable_count()
        return {
            **message_to_dict(self._status_pb()),
            "journal": self._journal_info(),
            "durable_artifacts": durable,
        }

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        self._stop.set()
        with self._commit_cond:  # the watchers' calls answer now
            self._commit_cond.notify_all()
        self._aio.stop()
        self.metrics.close()
        self._journal_io.shutdown(wait=False)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _committed(catalog: ClusterCatalog, artifact_id: str) -> bool:
    try:
        catalog.by_artifact(artifact_id)
    except NotFoundError:
        return False
    return True


def _now_ms() -> int:
    return int(time.time() * 1000)


def _node_of(record: dict[str, Any]) -> str:
    node_id = record.get("node_id")
    if not isinstance(node_id, str) or not node_id:
        raise InvalidArgumentError("a daemon record needs a node_id")
    return node_id


def _daemon_record(record: dict[str, Any], node_id: str) -> global_store_pb2.DaemonRecord:
    return global_store_pb2.DaemonRecord(
        node_id=node_id,
        address=str(record.get("address", "")),
        version=str(record.get("version", "")),
        instance_id=str(record.get("instance_id", "")),
        last_seen_unix_s=time.time(),
    )


def _advertised_host(host: str) -> str:
    """The host others should dial: a wildcard bind is advertised as this node's address."""
    if host in ("0.0.0.0", "::", ""):
        return str(ray.util.get_node_ip_address())
    return host
