"""The node's bytes: CPU artifacts in daemon-owned shared memory.  [daemon]

This is the shell: it holds the one lock, does the I/O (segments through the shared-memory
transport's daemon half, :mod:`tensorcast_ray._transport.shm`; the epoch table; the
journal; metrics) and carries out the decisions of the pure
:class:`~tensorcast_ray.daemon.leases.LeaseTable` (sessions, leases, staging, unfinished
writes).  Restart recovery is :mod:`tensorcast_ray.daemon.recovery`.

One put, step by step:

1. [SDK] ``BeginWrite(key, tensor specs, policy)``.
2. [daemon] validates the key (versions are immutable), resolves the policy with the one
   policy module; the lease table reserves the version and admits the bytes into the local
   stable tier (the pure :class:`~tensorcast_ray.daemon.local_index.LocalIndex` decides
   evictions); the shell plans the layout and allocates pre-faulted segments from the
   transport, outside the lock; answers segment names + offsets.
3. [SDK] maps the segments and copies each tensor once (no page faults: pre-faulted).
4. [SDK] ``CommitWrite`` → [daemon] stamps a generation in the epoch table, publishes the
   key, journals the artifact. From here every process on the node sees it.

One get: [SDK] ``Lookup(key)`` → [daemon] resolves ``latest``, touches the LRU and answers
the layout; [SDK] maps the segments read-only and wraps tensors over them: no copy.

A register lease is tied to its producer: it ends at ``Delete``, at its TTL, or when the
producer's session ends (the process died). Deleting unlinks the segments; readers that
still map them keep valid bytes, and the kernel frees the memory when the last mapping goes.
Segments are never reused, so mapped bytes never change under a reader.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensorcast_ray.daemon import recovery
from tensorcast_ray.daemon.journal import Journal
from tensorcast_ray.daemon.leases import (
    Actions,
    Artifact,
    BeginOutcome,
    BufferTensor,
    LeaseTable,
    SegmentRef,
)
from tensorcast_ray.daemon.local_index import AdmitRequest
from tensorcast_ray.daemon.metrics import DaemonMetrics
from tensorcast_ray.daemon.persist_runner import PersistRunner
from tensorcast_ray.daemon.weights import WeightSync

from tensorcast_ray._catalog import parse_key
from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._disk import TensorSource
from tensorcast_ray._epochs import EpochTable
from tensorcast_ray._errors import (
    ArtifactError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._gc import OWNER_SUFFIX, pid_alive
from tensorcast_ray._layout import Columns, place
from tensorcast_ray._policy import ResolvedPolicy, resolve_policy
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, daemon_pb2
from tensorcast_ray._shm import close_maps, map_segment, remove_segments, round_up
from tensorcast_ray._transport.shm import ShmTransport

if TYPE_CHECKING:
    from tensorcast_ray.daemon.remote import ClusterTier

logger = logging.getLogger(__name__)

#: read sources (GetArtifactOptions.source) as the daemon hears them
SOURCE_NAMES = {0: "auto", 1: "local_only", 2: "remote", 3: "disk"}


@dataclass
class Landing:
    """A copy of another node's artifact being landed here (see ClusterTier.pull_from)."""

    write_id: str
    artifact_id: str
    segments: list[SegmentRef]
    maps: list[Any] = field(default_factory=list)


class LocalStore:
    """[daemon] All data verbs of one node. Thread-safe (one lock; every call is short).

    The decisions are the pure :class:`~tensorcast_ray.daemon.leases.LeaseTable`'s; this
    shell holds the lock, does the I/O and carries out the actions the table answers.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        prefix: str,
        metrics: DaemonMetrics,
        hostname: str | None = None,
        clock: Any = time.time,
    ) -> None:
        self.config = config
        self.shm_dir = config.shm_dir
        self.prefix = prefix
        self.metrics = metrics
        self.hostname = hostname or socket.gethostname()
        self._clock = clock
        self._lock = threading.RLock()
        self._leases = LeaseTable(
            int(config.stable_dram_capacity_bytes),
            self.hostname,
            write_timeout_ms=int(config.write_timeout_s * 1000),
        )
        self._heartbeat_s = 0.0  # when the owner file was last touched (see tick)
        self.epoch_segment = f"{prefix}epochs"
        self.epoch_slots = config.epoch_slots
        self._journal_path = os.path.join(self.shm_dir, f"{prefix}journal.jsonl")
        self._journal = Journal(self._journal_path) if config.journal else None
        os.makedirs(self.shm_dir, exist_ok=True)
        self._epochs = EpochTable(self.shm_dir, self.epoch_segment, self.epoch_slots, adopt=True)
        journal_name = os.path.basename(self._journal_path)
        self.recovered = recovery.recover(
            self._leases,
            self._epochs,
            self._journal,
            shm_dir=self.shm_dir,
            prefix=prefix,
            keep={self.epoch_segment, self._epochs.reads_name, journal_name, journal_name + ".tmp"},
            now_ms=self._now_ms(),
        )
        # The bytes go through the shared-memory transport's daemon half (its segment pool).
        self._shm = ShmTransport.for_daemon(
            self.shm_dir,
            prefix,
            segment_bytes=int(config.shm_segment_bytes),
            reserve_bytes=int(config.shm_pool_bytes),
        )
        self._update_gauges(leases=True)
        # Set by the daemon actor once it joined a Global Store; None on a lone node.
        self._cluster: ClusterTier | None = None
        # Persistence tasks and reads back from shared disk (daemon/persist_runner.py).
        self.persistence = PersistRunner(self, config, metrics)
        # Weight sync's waits and reader holds (daemon/weights.py).
        self.weights = WeightSync(self)
        with self._lock:
            self._leases.persistence = self.persistence.configured
            for art in self._leases.artifacts.values():
                if art.durable:  # re-adopted: spill may evict it again
                    self._leases.index.mark_durable(art.artifact_id)
                elif art.persist_policy:  # its task resumes: held from before the first RPC
                    self._leases.index.hold(art.artifact_id)

    @property
    def cluster(self) -> ClusterTier | None:
        return self._cluster

    @cluster.setter
    def cluster(self, cluster: ClusterTier | None) -> None:
        with self._lock:
            self._cluster = cluster
            self._leases.clustered = cluster is not None

    @property
    def lock(self) -> threading.RLock:
        """The state lock (for the daemon's other halves: weights, persistence)."""
        return self._lock

    def resolve_local(self, key: str) -> tuple[str, str]:
        """``(concrete key, artifact id)`` in this node's catalog; ``latest`` allowed."""
        with self._lock:
            return self._leases.catalog.resolve(key)

    def committing(self, artifact_id: str) -> bool:
        """A write of ``artifact_id`` on this node that has not committed here yet (the
        cluster's commit comes first)."""
        with self._lock:
            return any(p.artifact.artifact_id == artifact_id for p in self._leases.pending.values())

    @property
    def node_id(self) -> str:
        cluster = self._cluster
        return cluster.node_id if cluster is not None else ""

    def resume_persistence(self) -> None:
        """[at start, once the cluster tier is set] Queue again the tasks a previous instance
        of this daemon did not finish."""
        with self._lock:  # held since __init__
            unfinished = [
                a for a in self._leases.artifacts.values() if a.persist_policy and not a.durable
            ]
        self.persistence.resume(unfinished)

    # ---- helpers --------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _session(self, request_session: str, transport_session: str) -> str:
        """The connection's own session on the local socket (a request may not name another
        one there); over gRPC, the Session stream's id the request names."""
        return transport_session or request_session

    def _lease_owner(self, request_session: str, transport_session: str) -> str:
        """The session a lease belongs to; it must be one this daemon instance knows."""
        with self._lock:
            return self._leases.lease_owner(self._session(request_session, transport_session))

    def _apply(self, actions: Actions) -> None:
        """Carry out what the lease table decided (under the lock)."""
        for freed in actions.freed:
            self._epochs.free(freed.epoch_slot)
        self._unlink(actions.unlink)
        for freed in actions.freed:
            logger.info("freed %s (%s): %s", freed.key, freed.artifact_id, freed.reason)
            if self._journal is not None:
                self._journal.drop_artifact(freed.artifact_id)
        if self._journal is not None:
            for buffer_id in actions.dropped_buffers:
                self._journal.drop_buffer(buffer_id)
        if actions.freed:  # a delete, expiry or eviction: rarer than puts
            self._update_gauges(leases=True)
        for freed in actions.freed:
            self.persistence.on_freed(freed)  # stops its task; never waits
        cluster = self.cluster
        if cluster is not None and (actions.freed or actions.aborted):
            cluster.dropped(actions.freed)  # asynchronous sends, never a wait under the lock
            cluster.abort(actions.aborted)

    def _record_admission(self, kind: str, outcome: BeginOutcome, seconds: float) -> None:
        if outcome.decision is None:
            return
        status = {"ok": "OK", "degraded": "DEGRADED"}.get(outcome.decision.status, "FAILED")
        self.metrics.local_stable_tier.labels(
            op=kind, status=status, requirement=outcome.requirement
        ).inc()
        self.metrics.local_stable_tier_seconds.labels(op=kind, status=status).observe(seconds)

    # ---- writes -----------------------------------------------------------------------
    def rpc_BeginWrite(
        self, request: daemon_pb2.BeginWriteRequest, session_id: str
    ) -> daemon_pb2.BeginWriteResponse:
        parse_key(request.key, for_write=True)
        kind = "register" if request.kind == daemon_pb2.WRITE_KIND_REGISTER else "put"
        if request.ttl_ms < 0:
            raise InvalidArgumentError(f"ttl_ms must be >= 0, got {request.ttl_ms}")
        # Column by column, never a message per tensor: a put of 20,000 tensors costs the
        # daemon a few ms (see tensorcast_ray._layout.Columns).
        cols = Columns.from_table(request.tensors)
        _require_tensors(request.key, len(cols))
        segs, offsets, segment_sizes = place(cols.nbytes, int(self.config.shm_segment_bytes))
        table = common_pb2.TensorTable()
        table.CopyFrom(request.tensors)
        table.segment.extend(segs)
        table.offset.extend(offsets)
        policy = _resolved_policy(request.policy_json)
        sid = self._session(request.session_id, session_id)  # the lease table checks it
        now = self._now_ms()
        artifact = Artifact(
            artifact_id=uuid.uuid4().hex,
            key=request.key,
            kind=kind,
            nbytes=sum(cols.nbytes),
            segments=[],
            tensors=table.SerializeToString(),
            created_ms=now,
            owner_session=sid if kind == "register" else "",
            owner_pid=self._leases.sessions.get(sid, 0) if kind == "register" else 0,
            owner_key=self._leases.session_keys.get(sid, "") if kind == "register" else "",
            owner_host=self.hostname if kind == "register" else "",
            expires_at_ms=now + request.ttl_ms if request.ttl_ms else 0,
            request_id=request.request_id,
            ntensors=len(cols),
        )
        write_id = uuid.uuid4().hex
        classes = [self._shm.staging_size(size) for size in segment_sizes]
        with self._lock:  # one block: a retry's check, the reservation and the claim
            start = time.perf_counter()
            self._count_reads_if_evicting(artifact.nbytes, now)
            outcome = self._leases.begin_write(
                artifact,
                policy,
                write_id=write_id,
                session_id=sid,
                staged=self._fitting_staged(request.staged_segments, classes),
                stageable=sum(1 for c in classes if c),
                now_ms=now,
            )
            self._record_admission(kind, outcome, time.perf_counter() - start)
            self._apply(outcome.actions)
            if outcome.error is not None:
                raise outcome.error
            if outcome.done is not None:
                return daemon_pb2.BeginWriteResponse(
                    artifact_id=outcome.done.artifact_id, committed=_result(outcome.done)
                )
            assert outcome.pending is not None
            claimed = list(outcome.pending.claimed)
        if self.cluster is not None:
            try:  # cluster-wide: ALREADY_EXISTS before a byte moves when another node has it
                self.cluster.reserve(artifact.key, artifact.artifact_id, artifact.request_id)
            except BaseException:
                with self._lock:
                    self._apply(self._leases.abort_write(write_id))
                raise
        staged: dict[int, list[SegmentRef]] = {}
        for seg in claimed:
            staged.setdefault(seg[1], []).append(seg)
        segments: list[SegmentRef] = []
        trims: list[SegmentRef] = []
        # Segment creation may fault pages when the pool runs dry: do it outside the lock.
        try:
            for size, cls in zip(segment_sizes, classes, strict=True):
                fitting = staged.get(cls)
                seg = fitting.pop() if fitting else self._take(size)
                segments.append(_fit(seg, size, trims))
            with self._lock:
                if not self._leases.place_segments(write_id, segments, trims):
                    raise UnavailableError(
                        f"the write of {request.key!r} was aborted while it started (its client "
                        "session ended, or a retry replaced it); retry the put"
                    )
        except BaseException:
            with self._lock:
                # The claimed segments are the table's to give back or free; the fresh ones
                # it never saw are ours.
                self._apply(self._leases.abort_write(write_id))
                names = {name for name, _ in claimed}
                self._unlink([s for s in segments if s[0] not in names])
            raise
        return daemon_pb2.BeginWriteResponse(
            write_id=write_id,
            artifact_id=artifact.artifact_id,
            segments=[common_pb2.SegmentRef(name=n, size=s) for n, s in segments],
            tensor_segments=segs,
            tensor_offsets=offsets,
            shm_dir=self.shm_dir,
            stageable=classes.count(self._shm.pool.segment_bytes),
            stageable_small=classes.count(self._shm.pool.small_bytes or -1),
        )

    def _fitting_staged(self, offered: Sequence[str], classes: Sequence[int]) -> list[str]:
        """The offered staged segments this layout can use, by size class (caller holds the
        lock): a whole segment for a small planned one would waste it, and the claim takes
        offered segments in order. A segment an unheard attempt of this write claimed counts
        too: the retry aborts that attempt, which hands it back, before claiming."""
        wanted = Counter(c for c in classes if c)
        if not wanted or not offered:
            return []
        sizes = {name: size for name, (size, _) in self._leases.staged.items()}
        for pending in self._leases.pending.values():
            sizes.update(pending.claimed)
        fitting: list[str] = []
        for name in offered:
            size = sizes.get(name, 0)
            if wanted[size] > 0:
                wanted[size] -= 1
                fitting.append(name)
        return fitting

    def _take(self, size: int) -> SegmentRef:
        return self._shm.allocate(size)

    def rpc_LeaseSegments(
        self, request: daemon_pb2.LeaseSegmentsRequest, session_id: str
    ) -> daemon_pb2.LeaseSegmentsResponse:
        sid = self._lease_owner(request.session_id, session_id)
        segment_bytes = int(self.config.shm_segment_bytes)
        small_bytes = self._shm.pool.small_bytes
        with self._lock:
            lost, _ = self._leases.release_unheld(sid, request.held)
            self._apply(lost)
            held = sum(size for size, owner in self._leases.staged.values() if owner == sid)
        if lost.unlink:
            logger.info(
                "freed %d staged segments session %s no longer holds", len(lost.unlink), sid
            )
        # Whole segments first, then small ones, all within client_staging_bytes.
        budget = int(self.config.client_staging_bytes) - held
        count = max(0, min(int(request.count), budget // segment_bytes))
        budget -= count * segment_bytes
        small = max(0, min(int(request.small_count), budget // small_bytes)) if small_bytes else 0
        segments: list[SegmentRef] = []
        try:
            for size in [segment_bytes] * count + [small_bytes] * small:
                segments.append(self._shm.allocate(size))
        except BaseException:
            self._shm.free(segments)
            raise
        with self._lock:
            try:
                self._leases.add_staged(sid, segments)
            except UnavailableError:  # the session ended meanwhile
                self._shm.free(segments)
                raise
        return daemon_pb2.LeaseSegmentsResponse(
            segments=[common_pb2.SegmentRef(name=n, size=size) for n, size in segments],
            shm_dir=self.shm_dir,
        )

    def rpc_CommitWrite(
        self, request: daemon_pb2.CommitWriteRequest, session_id: str
    ) -> daemon_pb2.WriteResult:
        cluster = self.cluster
        if cluster is None:
            return self._commit_local(request.write_id, 0, None, "")
        # The cluster's commit first: once this returns every node resolves the key. Both
        # under the node's report order, so a full report never sees one without the other.
        with cluster.sync_lock:
            with self._lock:
                pending = self._leases.pending_write(request.write_id).artifact
            seq = cluster.commit(pending)
            return self._commit_local(request.write_id, seq, cluster, pending.artifact_id)

    def _commit_local(
        self, write_id: str, seq: int, cluster: ClusterTier | None, artifact_id: str
    ) -> daemon_pb2.WriteResult:
        with self._lock:
            try:
                self._leases.pending_write(write_id)  # unknown: refused before a slot
                slot, generation = self._epochs.alloc()
            except ArtifactError:
                if cluster is not None:  # aborted meanwhile: the cluster must forget it too
                    cluster.forget(artifact_id)
                raise
            artifact = self._leases.commit_write(write_id, slot, generation, self._now_ms())
            artifact.cluster_seq = seq
            if cluster is not None:
                artifact.writer = cluster.node_id
            if self._journal is not None:
                self._journal.add_artifact(artifact.to_record())
            self._update_gauges(leases=artifact.kind == "register")
        self.weights.committed(artifact.key)
        if artifact.persist_policy:
            self._start_persistence(artifact)
        return _result(artifact)

    def _start_persistence(self, artifact: Artifact) -> None:
        """Queue the task that places the tiers beyond this node (the put has returned
        nothing yet: a failure to queue it is this put's failure, nothing half-done)."""
        try:
            self.persistence.submit(artifact)
        except ArtifactError as exc:
            with self._lock:
                self._leases.index.unhold(artifact.artifact_id)
            artifact.degraded_reasons.append(f"persistence not started: {exc.message}")

    def rpc_AbortWrite(
        self, request: daemon_pb2.AbortWriteRequest, session_id: str
    ) -> daemon_pb2.AbortWriteResponse:
        with self._lock:
            self._apply(self._leases.abort_write(request.write_id))
        return daemon_pb2.AbortWriteResponse()

    def rpc_AllocateBuffer(
        self, request: daemon_pb2.AllocateBufferRequest, session_id: str
    ) -> daemon_pb2.AllocateBufferResponse:
        if request.nbytes <= 0:
            raise InvalidArgumentError(f"buffer size must be positive, got {request.nbytes}")
        sid = self._lease_owner(request.session_id, session_id)
        buffer_id = "buf-" + uuid.uuid4().hex
        with self._lock:
            self._leases.admit_buffer(buffer_id, int(request.nbytes), self._now_ms())
        try:
            trims: list[SegmentRef] = []
            seg = _fit(self._take(int(request.nbytes)), int(request.nbytes), trims)
        except BaseException:
            with self._lock:
                self._leases.cancel_buffer(buffer_id)
            raise
        with self._lock:
            try:
                buf = self._leases.add_buffer(buffer_id, seg, sid, trims)
            except UnavailableError:  # the session ended meanwhile
                self._unlink([seg])
                raise
            if self._journal is not None:
                self._journal.add_buffer(buf.to_record())
            self._update_gauges(leases=True)
        return daemon_pb2.AllocateBufferResponse(
            buffer_id=buffer_id,
            segment=common_pb2.SegmentRef(name=seg[0], size=seg[1]),
            shm_dir=self.shm_dir,
        )

    def rpc_RegisterBuffers(
        self, request: daemon_pb2.RegisterBuffersRequest, session_id: str
    ) -> daemon_pb2.WriteResult:
        parse_key(request.key, for_write=True)
        # One compact table, as in BeginWrite: no message per tensor to decode.
        cols = Columns.from_table(request.tensors)
        _require_tensors(request.key, len(cols))
        policy = _resolved_policy(request.policy_json)
        sid = self._lease_owner(request.session_id, session_id)
        ids, index, offsets = request.buffer_ids, request.buffer_index, request.buffer_offsets
        if len(index) != len(cols) or len(offsets) != len(cols):
            raise InvalidArgumentError(
                f"malformed register of {request.key!r}: {len(cols)} tensors, "
                f"{len(index)} buffer indices and {len(offsets)} offsets"
            )
        if index and not 0 <= min(index) <= max(index) < len(ids):
            raise InvalidArgumentError(
                f"malformed register of {request.key!r}: a buffer index outside the "
                f"{len(ids)} buffer ids"
            )
        tensors = [
            BufferTensor(name, dtype, shape, ids[i], off, nb)
            for name, dtype, shape, i, off, nb in zip(
                cols.names, cols.dtypes, cols.shapes, index, offsets, cols.nbytes, strict=True
            )
        ]
        artifact_id = uuid.uuid4().hex
        cluster = self.cluster
        if cluster is None:
            artifact = self._register(request, artifact_id, sid, policy, tensors, len(cols))
            if artifact.artifact_id == artifact_id:
                self.weights.committed(artifact.key)
                if artifact.persist_policy:
                    self._start_persistence(artifact)
            return _result(artifact)
        cluster.reserve(request.key, artifact_id, request.request_id)
        with cluster.sync_lock:  # the local publish and the cluster's commit, in one report
            try:
                artifact = self._register(request, artifact_id, sid, policy, tensors, len(cols))
            except BaseException:
                cluster.abort([(request.key, artifact_id)])
                raise
            if artifact.artifact_id == artifact_id:  # not a retry answered from before
                try:
                    artifact.cluster_seq = cluster.commit(artifact)
                except BaseException:
                    self.drop_artifacts([artifact_id], reason="deleted")
                    cluster.abort([(request.key, artifact_id)])
                    raise
                artifact.writer = cluster.node_id
                with self._lock:
                    if self._journal is not None and artifact_id in self._leases.artifacts:
                        self._journal.add_artifact(artifact.to_record())
            else:  # the first attempt's artifact answers: this attempt's reservation goes
                cluster.abort([(request.key, artifact_id)])
                return _result(artifact)
        self.weights.committed(artifact.key)
        if artifact.persist_policy:
            self._start_persistence(artifact)
        return _result(artifact)

    def _register(
        self,
        request: daemon_pb2.RegisterBuffersRequest,
        artifact_id: str,
        sid: str,
        policy: ResolvedPolicy,
        tensors: list[BufferTensor],
        ntensors: int,
    ) -> Artifact:
        with self._lock:
            now = self._now_ms()
            artifact = Artifact(
                artifact_id=artifact_id,
                ntensors=ntensors,
                key=request.key,
                kind="register",
                nbytes=0,
                segments=[],
                tensors=b"",
                created_ms=now,
                owner_session=sid,
                owner_pid=self._leases.sessions.get(sid, 0),
                owner_key=self._leases.session_keys.get(sid, ""),
                request_id=request.request_id,
                owner_host=self.hostname,
                expires_at_ms=now + request.ttl_ms if request.ttl_ms > 0 else 0,
            )
            outcome = self._leases.register_buffers(artifact, tensors, policy)
            self._apply(outcome.actions)
            if outcome.error is not None:
                raise outcome.error
            if outcome.done is not None:
                return outcome.done
            slot, generation = self._epochs.alloc()
            self._leases.commit_registered(artifact, slot, generation)
            if self._journal is not None:
                self._journal.add_artifact(artifact.to_record())
            self._update_gauges(leases=True)
        return artifact

    def rpc_ReleaseBuffers(
        self, request: daemon_pb2.ReleaseBuffersRequest, session_id: str
    ) -> daemon_pb2.ReleaseBuffersResponse:
        sid = self._session(request.session_id, session_id)
        with self._lock:
            actions, held = self._leases.release_buffers(list(request.buffer_ids), sid)
            self._apply(actions)
            if self._journal is not None:
                for buf in held:  # a restart must still free it with its last version
                    self._journal.add_buffer(buf.to_record())
            self._update_gauges(leases=True)
        return daemon_pb2.ReleaseBuffersResponse()

    # ---- reads ------------------------------------------------------------------------
    def rpc_Lookup(
        self, request: daemon_pb2.LookupRequest, session_id: str
    ) -> daemon_pb2.ArtifactInfo:
        source = SOURCE_NAMES.get(request.source, "auto")
        cluster = self.cluster
        key, artifact_id = request.key, request.artifact_id
        latest = bool(key) and key.rpartition(":")[2] == "latest"
        if source == "disk" and not self.persistence.configured:
            try:  # this node's copy answers a disk read as any read (the same bytes)
                return self._info(self._local_lookup(key, artifact_id), "local")
            except NotFoundError:
                raise FailedPreconditionError(
                    f"GetArtifactOptions(source='disk'): {key or artifact_id} is not on this "
                    "node and persistence is not configured, so shared disk cannot be read "
                    "(set persist_url in the daemon config, or TENSORCAST_RAY_PERSIST_URL "
                    "where tc.init runs); use source='auto'"
                ) from None
        if cluster is None:
            if source == "remote":
                raise FailedPreconditionError(
                    "GetArtifactOptions(source='remote'): this daemon is not part of a cluster "
                    "(it runs without a Global Store); use source='auto' or 'local_only'"
                )
            try:
                return self._info(self._local_lookup(key, artifact_id), "local")
            except NotFoundError as missing:
                # A lone node: what it evicted, or what a previous daemon wrote, may be on disk.
                if source == "local_only" or not self.persistence.configured or not key:
                    raise
                try:
                    if request.metadata_only:
                        return self._disk_info(self.persistence.manifest(key))
                    landed = self.persistence.rehydrate(key, artifact_id=artifact_id)
                    return self._info(landed, "disk")
                except NotFoundError:
                    raise missing from None  # not on disk either: the daemon's own answer
        if source not in ("remote",) and not latest:
            try:  # a copy here answers without asking anyone
                return self._info(self._local_lookup(key, artifact_id), "local")
            except NotFoundError:
                pass
        try:
            entry = cluster.resolve(key, artifact_id)
        except UnavailableError:
            if not latest or source == "remote":
                raise
            # The Global Store is away (restarting): this node's newest version answers.
            logger.warning("Global Store unreachable; resolving %s on this node", key)
            return self._info(self._local_lookup(key, ""), "local")
        holders = [r["node_id"] for r in entry["replicas"]]
        local = self.local_artifact(str(entry["artifact_id"]))
        if source == "remote" and not cluster.sources(entry):
            raise NotFoundError(
                f"{entry['key']} has no copy on another node (only this node holds it); "
                "read it with source='auto'"
            )
        if local is not None:
            with self._lock:
                self._leases.index.touch(local.artifact_id, self._now_ms())
            return self._info(local, "local")
        if source == "local_only":
            where = f"node(s) {', '.join(holders)}" if holders else "shared disk only"
            raise NotFoundError(
                f"{entry['key']} is not on this node (source='local_only'); it is held by "
                f"{where}: read it with source='auto' to pull a copy"
            )
        if source == "disk" and not entry.get("durable"):
            raise NotFoundError(
                f"{entry['key']} has no complete copy on shared disk (written without a "
                "durable policy, or its persistence task has not finished: see "
                "tc.persistence_status); read it with source='auto'"
            )
        from_disk = source == "disk" or (not cluster.sources(entry) and entry.get("durable"))
        if request.metadata_only:
            if from_disk:
                return self._disk_info(self.persistence.manifest(entry["key"]), entry)
            info = self._remote_info(cluster.describe(entry))
            info.durable = bool(entry.get("durable"))
            info.persistence_task_id = str(entry.get("persist_task_id", ""))
            return info
        artifact = cluster.fetch(entry, from_disk=from_disk)
        return self._info(artifact, artifact.served_by if artifact.served_by else "local")

    def _local_lookup(self, key: str, artifact_id: str) -> Artifact:
        with self._lock:
            return self._leases.lookup(key, artifact_id, self._now_ms())

    def _info(self, artifact: Artifact, served_by: str) -> daemon_pb2.ArtifactInfo:
        info = daemon_pb2.ArtifactInfo(
            key=artifact.key,
            artifact_id=artifact.artifact_id,
            nbytes=artifact.nbytes,
            segments=[common_pb2.SegmentRef(name=n, size=s) for n, s in artifact.segments],
            shm_dir=self.shm_dir,
            epoch_slot=artifact.epoch_slot,
            generation=artifact.generation,
            kind=artifact.kind,
            created_unix_ms=artifact.created_ms,
            served_by=served_by,
            durable=artifact.durable,
        )
        if artifact.persist_policy:
            info.persistence_task_id = artifact.persist_task_id
            brief = self.persistence.brief(artifact.persist_task_id)
            if brief is not None:
                info.persistence_state, info.persistence_error = brief
        info.tensors.MergeFromString(artifact.tensors)  # the stored table, as it is
        return info

    def _disk_info(
        self, manifest: Any, entry: dict[str, Any] | None = None
    ) -> daemon_pb2.ArtifactInfo:
        """Metadata of an artifact only shared disk holds, from its manifest (no bytes read)."""
        names = [t.name for t in manifest.tensors]
        cols = Columns.of(
            names, [t.dtype for t in manifest.tensors], [tuple(t.shape) for t in manifest.tensors]
        )
        segs, offsets, sizes = place(cols.nbytes, int(self.config.shm_segment_bytes))
        info = daemon_pb2.ArtifactInfo(
            key=manifest.key,
            artifact_id=manifest.artifact_id,
            nbytes=sum(cols.nbytes),
            kind=str((entry or {}).get("kind", "put")),
            created_unix_ms=int(manifest.created_at * 1000),
            remote=True,
            epoch_slot=-1,
            segments=[common_pb2.SegmentRef(name="", size=size) for size in sizes],
            durable=True,
            persistence_task_id=str((entry or {}).get("persist_task_id", "")),
            served_by="disk",
        )
        info.tensors.CopyFrom(cols.placed(segs, offsets, sizes).to_table())
        return info

    def _remote_info(self, meta: dict[str, Any]) -> daemon_pb2.ArtifactInfo:
        info = daemon_pb2.ArtifactInfo(
            key=meta["key"],
            artifact_id=meta["artifact_id"],
            nbytes=meta["nbytes"],
            kind=meta["kind"],
            created_unix_ms=meta["created_ms"],
            remote=True,
            epoch_slot=-1,
            # The serving node's segments: their sizes place the tensors; nothing maps them.
            segments=[common_pb2.SegmentRef(name=n, size=sz) for n, sz in meta["segments"]],
        )
        info.tensors.MergeFromString(meta["tensors"])
        return info

    def rpc_Exists(
        self, request: daemon_pb2.ExistsRequest, session_id: str
    ) -> daemon_pb2.ExistsResponse:
        with self._lock:
            here = self._leases.catalog.exists(request.key)
        if here and not request.key.endswith(":latest"):
            return daemon_pb2.ExistsResponse(exists=True)
        if self.cluster is None:
            if not here and self.persistence.configured:
                here = self._on_disk(request.key)
            return daemon_pb2.ExistsResponse(exists=here)
        return daemon_pb2.ExistsResponse(exists=self.cluster.exists(request.key))

    def _on_disk(self, key: str) -> bool:
        """[a lone node] Whether shared disk holds a committed copy of ``key``."""
        try:
            self.persistence.manifest(key)
        except NotFoundError:
            return False
        return True

    def rpc_Delete(
        self, request: daemon_pb2.DeleteRequest, session_id: str
    ) -> daemon_pb2.DeleteResponse:
        """Delete one version everywhere: every node's copy (its persistence task stopped
        first), then its files on shared disk (persist_on_delete: remove)."""
        parse_key(request.key)
        cluster = self.cluster
        if request.unless_held:  # before its task stops: a held version stays as it is
            if cluster is None:
                with self._lock:
                    self._refuse_held_locally(request.key)
            else:
                cluster.check_unheld(request.key)
        local = self._local_id(request.key)
        if local:  # its task first: it must not write files after they are removed
            self.persistence.stop_task(local, "deleted")
        try:
            return self._delete(request.key, cluster, request.unless_held)
        except ArtifactError:
            art = self.local_artifact(local) if local else None
            if art is not None and art.persist_policy and not art.durable:
                self.persistence.resubmit(art)  # it stays: so does its persistence
            raise

    def _delete(
        self, key: str, cluster: ClusterTier | None, unless_held: bool = False
    ) -> daemon_pb2.DeleteResponse:
        request = daemon_pb2.DeleteRequest(key=key)
        if cluster is None and unless_held:
            # Checked and marked at once: no reader may take a hold while it goes.
            with self._lock:
                doomed = self._refuse_held_locally(key)
                if doomed:
                    self.weights.deleting.add(doomed)
            try:
                return self._delete(key, None)
            finally:
                with self._lock:
                    self.weights.deleting.discard(doomed)
        if cluster is None:
            # Files first: when the storage is unreachable nothing is deleted (retry).
            removed = self.persistence.remove_files(request.key)
            try:
                with self._lock:
                    self._apply(self._leases.delete(request.key))
            except NotFoundError:
                if not removed:  # only shared disk held it (evicted, or an earlier daemon's)
                    raise
            # A read landing it from disk meanwhile must not bring it back.
            self.persistence.settle(request.key)
            with self._lock:
                if self._leases.catalog.exists(request.key):
                    self._apply(self._leases.delete(request.key))
            return daemon_pb2.DeleteResponse(deleted=True, versions=1)
        anywhere = True
        with cluster.sync_lock:  # no full report between the cluster's delete and ours
            try:
                # every other node drops its copy (and task) first
                cluster.delete(request.key, unless_held)
            except NotFoundError:
                with self._lock:
                    anywhere = self._leases.catalog.exists(request.key)
            with self._lock:
                try:
                    self._apply(self._leases.delete(request.key))
                except NotFoundError:
                    pass  # this node held no copy
        # Files last: no node's task writes them any more. A retry of a delete whose files
        # could not be removed finds the version gone and removes them then.
        removed = self.persistence.remove_files(request.key)
        if not anywhere and not removed:
            raise NotFoundError(f"{request.key} does not exist (never written, or deleted)")
        return daemon_pb2.DeleteResponse(deleted=True, versions=1)

    def _refuse_held_locally(self, key: str) -> str:
        """[lone node, under the lock] FAILED_PRECONDITION while a reader holds ``key``'s
        version; returns its artifact id ("" when only shared disk may hold it)."""
        try:
            artifact_id = self._leases.catalog.resolve(key)[1]
        except NotFoundError:
            return ""
        self.weights.held(artifact_id)
        return artifact_id

    def _local_id(self, key: str) -> str:
        with self._lock:
            try:
                return self._leases.catalog.resolve(key)[1]
            except NotFoundError:
                return ""

    def rpc_ListKeys(
        self, request: daemon_pb2.ListKeysRequest, session_id: str
    ) -> daemon_pb2.ListKeysResponse:
        if self.cluster is not None:
            keys = [e["key"] for e in self.cluster.list_artifacts(request.prefix)]
            return daemon_pb2.ListKeysResponse(keys=keys)
        with self._lock:
            return daemon_pb2.ListKeysResponse(keys=self._leases.catalog.list_keys(request.prefix))

    def rpc_Inspect(
        self, request: daemon_pb2.InspectRequest, session_id: str
    ) -> daemon_pb2.InspectResponse:
        """Where an artifact lives: every node holding it, and this node's copy."""
        if self.cluster is not None:
            entry = self.cluster.resolve(request.key, request.artifact_id)
        else:
            try:
                art = self._local_lookup(request.key, request.artifact_id)
            except NotFoundError:
                if not (self.persistence.configured and request.key):
                    raise
                return self._inspect_disk(request.key)
            entry = {
                "key": art.key,
                "artifact_id": art.artifact_id,
                "nbytes": art.nbytes,
                "tensors": art.ntensors,
                "node_id": art.writer,
                "kind": art.kind,
                "created_unix_ms": art.created_ms,
                "replicas": [],
                "durable": art.durable,
                "persist_task_id": art.persist_task_id if art.persist_policy else "",
            }
        local = self.local_artifact(str(entry["artifact_id"]))
        state, error = self._persistence_brief(entry)
        return daemon_pb2.InspectResponse(
            persistence_state=state,
            persistence_error=error,
            key=entry["key"],
            artifact_id=entry["artifact_id"],
            nbytes=entry["nbytes"],
            tensors=entry["tensors"],
            writer=entry["node_id"],
            kind=entry["kind"],
            created_unix_ms=entry["created_unix_ms"],
            replicas=[
                daemon_pb2.ReplicaInfo(node_id=r["node_id"], kind=r["kind"], tier=r["tier"])
                for r in entry["replicas"]
            ],
            local=local is not None,
            local_kind=local.replica_kind if local is not None else "",
            served_by=local.served_by if local is not None else "",
            durable=bool(entry.get("durable")) or (local is not None and local.durable),
            persistence_task_id=str(entry.get("persist_task_id", "")),
        )

    def _persistence_brief(self, entry: dict[str, Any]) -> tuple[str, str]:
        """(state, error) of ``entry``'s persistence task, asked of the daemon running it;
        ("", "") when there is none or nobody can say."""
        task_id = str(entry.get("persist_task_id", ""))
        if not task_id:
            return "", ""
        brief = self.persistence.brief(task_id)
        if brief is not None:
            return brief
        if self.cluster is None:
            return "", ""
        try:
            status = self.cluster.persistence_status(entry, 0.0)
        except ArtifactError:
            return "", ""
        return status["state"], status["last_error"] or status["degraded_reason"]

    def _inspect_disk(self, key: str) -> daemon_pb2.InspectResponse:
        """[a lone node] An artifact only shared disk holds."""
        m = self.persistence.manifest(key)
        return daemon_pb2.InspectResponse(
            key=m.key,
            artifact_id=m.artifact_id,
            nbytes=m.total_bytes,
            tensors=len(m.tensors),
            kind="put",
            created_unix_ms=int(m.created_at * 1000),
            local=False,
            durable=True,
            persistence_task_id="pt-" + m.artifact_id if m.artifact_id else "",
        )

    def rpc_ReadRanges(
        self, request: daemon_pb2.ReadRangesRequest, session_id: str
    ) -> daemon_pb2.ReadRangesResponse:
        """Some bytes of an artifact with no copy here, into a buffer leased to the session."""
        cluster = self.cluster
        if cluster is None:
            raise FailedPreconditionError("ReadRanges reads another node's copy: no cluster here")
        if not (len(request.segment) == len(request.offset) == len(request.length)):
            raise InvalidArgumentError("ReadRanges: segment, offset and length must pair up")
        ranges = list(zip(request.segment, request.offset, request.length, strict=True))
        if any(seg < 0 or off < 0 or length <= 0 for seg, off, length in ranges):
            raise InvalidArgumentError("ReadRanges: ranges must have positive lengths")
        total = sum(length for _, _, length in ranges)
        entry = cluster.resolve("", request.artifact_id)
        buffer = self.rpc_AllocateBuffer(
            daemon_pb2.AllocateBufferRequest(nbytes=total, session_id=request.session_id),
            session_id,
        )
        seg = (buffer.segment.name, buffer.segment.size)
        try:
            dest = self._shm.map_for_write(seg)
            try:
                cluster.read_ranges(entry, ranges, dest)
            finally:
                dest.close()
        except BaseException:
            with self._lock:
                actions, _ = self._leases.release_buffers(
                    [buffer.buffer_id], self._session(request.session_id, session_id)
                )
                self._apply(actions)
            raise
        return daemon_pb2.ReadRangesResponse(
            buffer_id=buffer.buffer_id, segment=buffer.segment, shm_dir=self.shm_dir, nbytes=total
        )

    def rpc_Replicate(
        self, request: daemon_pb2.ReplicateRequest, session_id: str
    ) -> daemon_pb2.ReplicateResponse:
        cluster = self.cluster
        if cluster is None:
            raise FailedPreconditionError(
                "replicate needs a cluster: this daemon runs without a Global Store"
            )
        parse_key(request.key)
        nodes: Sequence[str] | str = "all" if request.all_nodes else list(request.nodes)
        if request.subscribers:
            nodes = self.weights.subscriber_nodes(parse_key(request.key)[0])
            if not nodes:  # no subscriber on another node: nothing to send
                return daemon_pb2.ReplicateResponse(key=request.key)
        results = cluster.replicate(request.key, nodes, request.transport or "auto")
        return daemon_pb2.ReplicateResponse(
            key=request.key,
            results=[daemon_pb2.ReplicaResult(**r) for r in results.values()],
        )

    # ---- weight sync (daemon/weights.py) ---------------------------------------------------
    def rpc_WaitLatest(
        self, request: daemon_pb2.WaitLatestRequest, session_id: str
    ) -> daemon_pb2.WaitLatestResponse:
        return self.weights.wait_latest(request, session_id)

    def rpc_HoldVersion(
        self, request: daemon_pb2.HoldVersionRequest, session_id: str
    ) -> daemon_pb2.HoldVersionResponse:
        return self.weights.hold(request, self._lease_owner(request.session_id, session_id))

    def rpc_ReleaseHold(
        self, request: daemon_pb2.ReleaseHoldRequest, session_id: str
    ) -> daemon_pb2.ReleaseHoldResponse:
        return self.weights.release(request, self._lease_owner(request.session_id, session_id))

    # ---- persistence's hooks (daemon/persist_runner.py) ---------------------------------
    def persist_sources(self, artifact: Artifact) -> tuple[list[TensorSource], list[Any]]:
        """The artifact's tensors as read-only views of its segments, for the disk writer,
        and the mappings under them (the caller closes them). The mappings keep the bytes
        valid even if the artifact is deleted meanwhile (its task is then stopped)."""
        sizes = [size for _, size in artifact.segments]
        table = common_pb2.TensorTable()
        table.MergeFromString(artifact.tensors)
        cols = Columns.from_table(table, sizes)
        maps: list[Any] = []
        try:
            views = []
            for seg in artifact.segments:
                if seg[1]:
                    # Page tables filled at map time: the writer streams every byte, and
                    # faulting them one page at a time costs more (measured: 0.65 vs 0.8 s
                    # for a 1 GiB write).
                    region = map_segment(self.shm_dir, seg[0], seg[1], writable=False)
                    maps.append(region)
                    views.append(memoryview(region))
                else:
                    maps.append(b"")
                    views.append(memoryview(b""))
        except BaseException:
            close_maps(maps)
            raise
        sources = []
        for i, name in enumerate(cols.names):
            nb = cols.nbytes[i]
            seg, off = cols.segments[i], cols.offsets[i]
            data = views[seg][off : off + nb] if nb else memoryview(b"")
            sources.append(TensorSource(name, cols.dtypes[i], cols.shapes[i], data))
        return sources, maps

    def copy_ranges(
        self, artifact: Artifact, ranges: Sequence[tuple[int, int, int]], dest: Any
    ) -> int:
        """Copy (segment, offset, length) ranges of a local artifact into ``dest``, packed."""
        out = memoryview(dest)
        at = 0
        for seg, off, length in ranges:
            if not 0 <= seg < len(artifact.segments) or off + length > artifact.segments[seg][1]:
                raise InvalidArgumentError(
                    f"ReadRanges: range ({seg}, {off}, {length}) lies outside {artifact.key}"
                )
            region = self._shm.map_for_read(artifact.segments[seg])
            try:
                out[at : at + length] = memoryview(region)[off : off + length]
            finally:
                region.close()
            at += length
        return at

    def release_hold(self, artifact_id: str) -> None:
        with self._lock:
            self._leases.index.unhold(artifact_id)

    def hold_for_task(self, artifact_id: str) -> bool:
        """Hold ``artifact_id`` for a persistence task; False when it is not here."""
        with self._lock:
            return self._leases.index.hold(artifact_id)

    def mark_durable(self, artifact_id: str) -> bool:
        """A complete copy of ``artifact_id`` is on shared disk: spill may evict it, and a
        restart remembers it. False when this node no longer holds it."""
        with self._lock:
            art = self._leases.artifacts.get(artifact_id)
            if art is None:
                return False
            self._leases.index.mark_durable(artifact_id)
            if not art.durable:
                art.durable = True
                if self._journal is not None:
                    self._journal.add_artifact(art.to_record())
        return True

    def rpc_PersistenceStatus(
        self, request: daemon_pb2.PersistenceStatusRequest, session_id: str
    ) -> daemon_pb2.PersistenceStatusResponse:
        if not request.task_id and not request.key:
            raise InvalidArgumentError("persistence_status needs a task_id or a key")
        wait_s = max(0.0, float(request.wait_s))
        if request.task_id:
            found = self.persistence.status(task_id=request.task_id, wait_s=wait_s)
            if found is not None:
                return _status_pb(found)
            artifact_id = request.task_id.removeprefix("pt-")
            key = ""
        else:
            parse_key(request.key)
            artifact_id, key = "", request.key
        return _status_pb(self._persistence_elsewhere(key, artifact_id, wait_s))

    def _persistence_elsewhere(self, key: str, artifact_id: str, wait_s: float) -> dict[str, Any]:
        """The status of a task this daemon may not run: by the artifact's local copy, else
        the node that wrote it (through the Global Store), else what shared disk holds."""
        local = None
        with self._lock:
            if key and not key.endswith(":latest"):
                try:
                    local = self._leases.lookup(key, "", self._now_ms())
                except NotFoundError:
                    local = None
            elif artifact_id:
                local = self._leases.artifacts.get(artifact_id)
        cluster = self.cluster
        if local is not None:
            found = self.persistence.status(artifact_id=local.artifact_id, wait_s=wait_s)
            if found is not None:
                return found
            if cluster is None:  # a lone node's copy: read back from disk, or memory only
                if not local.durable:
                    raise NotFoundError(_no_task(local.key))
                return self.persistence.status_from_manifest(self.persistence.manifest(local.key))
            artifact_id, key = local.artifact_id, local.key
        if cluster is not None:
            entry = cluster.resolve(key, artifact_id)
            return cluster.persistence_status(entry, wait_s)
        if key and not artifact_id:
            # A lone node after a restart, or another process's write: the disk may hold it.
            try:
                manifest = self.persistence.manifest(key)
            except NotFoundError:
                raise NotFoundError(
                    f"no persistence task for {key} on this node and no copy of it on shared "
                    "disk (written without a durable policy, deleted, or never written)"
                ) from None
            return self.persistence.status_from_manifest(manifest)
        raise NotFoundError(
            f"no persistence task {'pt-' + artifact_id} on this node (it finished long ago, "
            "or ran on a daemon that has restarted); ask by key instead"
        )

    # ---- the cluster tier's hooks (daemon/remote.py) ------------------------------------
    def local_artifact(self, artifact_id: str) -> Artifact | None:
        with self._lock:
            return self._leases.artifacts.get(artifact_id)

    def transfer_meta(self, artifact_id: str) -> dict[str, Any] | None:
        """What another node needs to land a copy of ``artifact_id``; None if not here."""
        with self._lock:
            art = self._leases.artifacts.get(artifact_id)
            if art is None:
                return None
            # A register of tc.empty buffers moves like any version: its segments are the
            # buffers (sized to them), its table places the tensors in them, and a landed copy
            # is a put of its own on that node (its lifetime still follows this lease).
            return {
                "key": art.key,
                "artifact_id": art.artifact_id,
                "nbytes": art.nbytes,
                "kind": art.kind,
                "tensors": art.tensors,
                "ntensors": art.ntensors,
                "segments": list(art.segments),
                "created_ms": art.created_ms,
                "requirement": art.requirement,
                "retention": art.retention,
                "retention_ttl_ms": art.retention_ttl_ms,
                "writer": art.writer,
                "cluster_seq": art.cluster_seq,
            }

    def begin_landing(self, meta: dict[str, Any], *, kind: str, served_by: str) -> Landing:
        """Reserve and allocate a copy of another node's artifact, mapped for writing."""
        nbytes = int(meta["nbytes"])
        if kind == "cache":
            request = AdmitRequest(
                meta["artifact_id"], nbytes, "should", "best_effort", None, "evict"
            )
        else:  # a replica is kept like the original
            retention = meta["retention"] if meta["retention"] != "best_effort" else "pinned"
            request = AdmitRequest(
                meta["artifact_id"],
                nbytes,
                "must",
                retention,
                meta["retention_ttl_ms"] if retention == "ttl" else None,
                "evict",
            )
        artifact = Artifact(
            artifact_id=meta["artifact_id"],
            key=meta["key"],
            kind="put",
            nbytes=nbytes,
            segments=[],
            tensors=meta["tensors"],
            created_ms=int(meta["created_ms"]),
            ntensors=int(meta.get("ntensors", 0)),
            replica_kind=kind,
            writer=str(meta.get("writer", "")),
            cluster_seq=int(meta.get("cluster_seq", 0)),
            served_by=served_by,
        )
        write_id = uuid.uuid4().hex
        with self._lock:
            self._count_reads_if_evicting(nbytes, self._now_ms())
            outcome = self._leases.begin_replica(
                artifact, request, write_id=write_id, now_ms=self._now_ms()
            )
            self._apply(outcome.actions)
            if outcome.error is not None:
                raise outcome.error
        landing = Landing(write_id, artifact.artifact_id, [])
        trims: list[SegmentRef] = []
        sizes = [int(size) for _, size in meta["segments"]]
        placed = False
        try:
            taken = self._take_all(sizes)
            landing.segments = [
                _fit(seg, size, trims) if size else ("", 0)
                for seg, size in zip(taken, sizes, strict=True)
            ]
            with self._lock:
                placed = self._leases.place_segments(write_id, landing.segments, trims)
            if not placed:
                raise UnavailableError(f"the landing of {artifact.key} was aborted")
            for seg in landing.segments:
                landing.maps.append(self._shm.map_for_write(seg) if seg[1] else b"")
        except BaseException:
            if not placed:  # the table never saw them: they are ours to free
                self._unlink([seg for seg in landing.segments if seg[1]])
            self.abort_landing(landing)
            raise
        return landing

    def _take_all(self, sizes: Sequence[int]) -> list[SegmentRef]:
        """Segments for ``sizes`` (0: none), in order. Beyond the pool's ready reserve each
        is created with its pages allocated, mostly the kernel clearing them: two at a time,
        that takes about half as long on this kind of host."""
        if sum(1 for size in sizes if size) < 2:
            return [self._take(size) if size else ("", 0) for size in sizes]
        out: list[SegmentRef] = [("", 0)] * len(sizes)

        def one(i: int) -> None:
            out[i] = self._take(sizes[i])

        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tc-land") as pool:
            futures = [pool.submit(one, i) for i, size in enumerate(sizes) if size]
            concurrent.futures.wait(futures)
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is not None:
            self._unlink([seg for seg in out if seg[1]])
            raise failed
        return out

    def publish_landing(self, landing: Landing) -> Artifact:
        close_maps(landing.maps)
        with self._lock:
            slot, generation = self._epochs.alloc()
            artifact = self._leases.commit_write(landing.write_id, slot, generation, self._now_ms())
            if self._journal is not None:
                self._journal.add_artifact(artifact.to_record())
            self._update_gauges()
        return artifact

    def abort_landing(self, landing: Landing) -> None:
        close_maps(landing.maps)
        with self._lock:
            actions = self._leases.abort_write(landing.write_id)
            actions.aborted.clear()  # a copy's reservation is this node's alone
            self._apply(actions)

    def keep(self, artifact_id: str) -> bool:
        """A cache copy asked for by replicate: kept like the original from now on. False
        when this node no longer holds it."""
        with self._lock:
            art = self._leases.artifacts.get(artifact_id)
            if art is None:
                return False
            if art.replica_kind != "cache":
                return True
            art.replica_kind = "replica"
            art.requirement = "must"
            art.retention = "pinned" if art.retention == "best_effort" else art.retention
            self._leases.index.admit(
                AdmitRequest(
                    artifact_id, art.nbytes, "must", art.retention, art.retention_ttl_ms, "evict"
                ),
                self._now_ms(),
            )
            if self._journal is not None:
                self._journal.add_artifact(art.to_record())
        if self.cluster is not None:
            self.cluster.report_kept(artifact_id)
        return True

    def drop_artifacts(self, artifact_ids: Sequence[str], *, reason: str) -> int:
        """Free this node's copies of ``artifact_ids`` (the cluster deleted them), their
        persistence tasks stopped first."""
        for artifact_id in artifact_ids:
            self.persistence.stop_task(artifact_id, "deleted", timeout_s=5.0)
        actions = Actions()
        with self._lock:
            for artifact_id in artifact_ids:
                self._leases.free_artifact(artifact_id, reason, actions)
            self._apply(actions)
        return len(actions.freed)

    def report(self) -> list[dict[str, Any]]:
        """Everything this node holds, for the Global Store's full sync."""
        with self._lock:
            return [
                {
                    "artifact_id": a.artifact_id,
                    "key": a.key,
                    "nbytes": a.nbytes,
                    "tensors": a.ntensors,
                    "kind": a.kind,
                    "created_ms": a.created_ms,
                    "seq": a.cluster_seq,
                    "writer": a.writer,
                    "replica_kind": a.replica_kind,
                    "durable": a.durable,
                    "persist_task_id": a.persist_task_id if a.persist_policy else "",
                }
                for a in self._leases.artifacts.values()
            ]

    # ---- lifecycle ----------------------------------------------------------------------
    def _unlink(self, segments: list[SegmentRef]) -> None:
        self._shm.free(segments)

    def bind_session_pid(
        self, session_id: str, pid: int, hostname: str, *, pid_verified: bool, lease_key: str = ""
    ) -> None:
        """A session's process; a kernel-verified pid, or the lease key of a gRPC session,
        re-adopts what a previous daemon instance recorded for it (LeaseTable.open_session)."""
        with self._lock:
            self._leases.open_session(
                session_id, pid, hostname, pid_verified=pid_verified, lease_key=lease_key
            )

    def end_session(self, session_id: str) -> None:
        """The producer went away: end its leases, abort its unfinished writes, release its
        reader holds."""
        with self._lock:
            self._apply(self._leases.end_session(session_id))
            self._update_gauges(leases=True)
        self.weights.end_session(session_id)

    def tick(self) -> None:
        """Periodic: trim segments, expire TTLs, end leases whose producer process is gone, and
        touch the owner file once a minute, so the files of a daemon that just died (and that
        Ray is restarting) look recent to ``tensorcast-ray gc`` and other daemons' sweeps."""
        if self._clock() - self._heartbeat_s >= 60.0:
            self._heartbeat_s = self._clock()
            try:
                os.utime(os.path.join(self.shm_dir, self.prefix + OWNER_SUFFIX))
            except OSError:
                pass  # not written yet (the actor writes it after the server starts)
        with self._lock:
            trim = self._leases.take_trims()
        for name, used in trim:
            self._shm.shrink(name, used)
        self._compact_journal()
        now = self._now_ms()
        with self._lock:
            self._count_cached_reads(now)
            dead = {pid for pid in self._leases.watched_pids() if not pid_alive(pid)}
            self._apply(self._leases.expire(now, dead))
            self._update_gauges(leases=True)

    def _count_cached_reads(self, now_ms: int) -> None:
        """Touch (sliding TTL, LRU order) the artifacts SDK processes read from their caches
        since the last call, as stamped in the epoch table's reads file (under the lock)."""
        by_slot = self._leases.by_slot
        for slot in self._epochs.read_slots():
            artifact_id = by_slot.get(slot)
            if artifact_id is not None:
                self._leases.index.touch(artifact_id, now_ms)

    def _count_reads_if_evicting(self, nbytes: int, now_ms: int) -> None:
        """Before an admission: eviction must see reads served from caches, but comparing the
        reads file costs every put; only an admission that may evict pays it (tick does the
        rest)."""
        index = self._leases.index
        if index.used + nbytes > index.capacity:
            self._count_cached_reads(now_ms)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            index = self._leases.index.stats()
            return {
                "artifacts": len(self._leases.artifacts),
                "bytes": sum(a.nbytes for a in self._leases.artifacts.values()),
                "leases": self._leases.lease_count(),
                "shm_pool_bytes": self._shm.ready_bytes(),
                "tiers": [
                    {
                        "tier": "stable_dram",
                        "used_bytes": index.used,
                        "capacity_bytes": index.capacity,
                        "entries": index.entries,
                    }
                ],
            }

    def _update_gauges(self, *, leases: bool = False) -> None:
        """Runs on every commit and delete, so it reads only counters: no walk over what the
        node holds (``stats()`` walks it). The lease count walks the artifacts: it is
        refreshed when leases change (``leases``) and on every tick."""
        table, m = self._leases, self.metrics
        m.artifacts.set(len(table.artifacts))
        m.shm_pool_bytes.set(self._shm.ready_bytes())
        m.tier_bytes_used.labels(tier="stable_dram").set(table.index.used)
        m.tier_bytes_capacity.labels(tier="stable_dram").set(table.index.capacity)
        if leases:
            m.leases.set(table.lease_count())

    def close(self, *, unlink: bool = True) -> None:
        """Stop the pool; with ``unlink`` free every segment (a clean stop, not a crash)."""
        self.weights.close()
        self.persistence.close(0.0)
        self._shm.close()
        with self._lock:
            if unlink:
                self._unlink(self._leases.live_segments())
                self._leases.clear()
                remove_segments(self.shm_dir, self.prefix, keep=set())
                if self._journal is not None:
                    self._journal.remove()
            elif self._journal is not None:
                self._journal.close()
            self._epochs.close(unlink=unlink)

    # ---- journal --------------------------------------------------------------------------
    def _compact_journal(self) -> None:
        with self._lock:
            leases = self._leases
            live = len(leases.artifacts) + len(leases.buffers)
            if self._journal is not None and self._journal.needs_compaction(live):
                self._journal.compact(
                    [a.to_record() for a in leases.artifacts.values()],
                    [b.to_record() for b in leases.buffers.values()],
                )


def _no_task(key: str) -> str:
    return (
        f"{key} has no persistence task: it was written with a policy that places it on this "
        "node only (e.g. profile 'cache'); write it with StorePolicy(profile='durable') to "
        "persist it"
    )


def _status_pb(status: dict[str, Any]) -> daemon_pb2.PersistenceStatusResponse:
    return daemon_pb2.PersistenceStatusResponse(
        task_id=status["task_id"],
        key=status["key"],
        artifact_id=status["artifact_id"],
        state=status["state"],
        progress=float(status["progress"]),
        degraded_reason=status["degraded_reason"],
        last_error=status["last_error"],
        last_error_code=status["last_error_code"],
        durable=bool(status["durable"]),
        nbytes=int(status["nbytes"]),
        node_id=status.get("node_id", ""),
        created_unix_ms=int(status["created_unix_ms"]),
        started_unix_ms=int(status["started_unix_ms"]),
        finished_unix_ms=int(status["finished_unix_ms"]),
        shards=[
            daemon_pb2.PersistenceShard(
                index=int(sh["index"]),
                tier=sh["tier"],
                target=sh["target"],
                state=sh["state"],
                progress=float(sh["progress"]),
                done_bytes=int(sh["done_bytes"]),
                total_bytes=int(sh["total_bytes"]),
                attempts=int(sh["attempts"]),
                error=sh["error"],
            )
            for sh in status["shards"]
        ],
    )


def _require_tensors(key: str, count: int) -> None:
    """An artifact holds at least one tensor: an empty write is the caller's mistake."""
    if not count:
        raise InvalidArgumentError(
            f"a write of {key!r} names no tensors: an artifact holds at least one (a "
            "zero-size tensor counts)"
        )


@functools.lru_cache(maxsize=128)
def _resolved_policy(policy_json: str) -> ResolvedPolicy:
    """The policy a write sent, validated once per distinct JSON (writers send the same few
    policies again and again; ResolvedPolicy is frozen, so sharing it is safe)."""
    if not policy_json:
        return resolve_policy(None)
    try:
        data = json.loads(policy_json)
    except ValueError as exc:
        raise InvalidArgumentError(f"policy_json is not valid JSON: {exc}") from exc
    return ResolvedPolicy.from_dict(data)


def _fit(segment: SegmentRef, size: int, trims: list[SegmentRef]) -> SegmentRef:
    """Use ``size`` bytes of ``segment``; a pooled or staged segment larger than that goes on
    ``trims``, shrunk by a later tick (off the hot path) so memory and accounting match."""
    name, actual = segment
    used = round_up(size)
    if actual > used:
        trims.append((name, used))
    return name, used


def _result(artifact: Artifact) -> daemon_pb2.WriteResult:
    return daemon_pb2.WriteResult(
        key=artifact.key,
        artifact_id=artifact.artifact_id,
        nbytes=artifact.nbytes,
        status="degraded" if artifact.degraded_reasons else "ready",
        degraded_reasons=artifact.degraded_reasons,
        persistence_task_id=artifact.persist_task_id if artifact.persist_policy else "",
    )
