"""The node's bytes: CPU artifacts in daemon-owned shared memory.  [daemon]

One put, step by step:

1. [SDK] ``BeginWrite(key, tensor specs, policy)``.
2. [daemon] validates the key (versions are immutable), resolves the policy with the one
   policy module, admits the bytes into the local stable tier (the pure
   :class:`~tensorcast_ray.daemon.local_index.LocalIndex` decides evictions), plans the
   layout and takes pre-faulted segments from the pool; answers segment names + offsets.
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

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from tensorcast_ray.daemon.journal import Journal
from tensorcast_ray.daemon.local_index import AdmitRequest, LocalIndex
from tensorcast_ray.daemon.metrics import DaemonMetrics

from tensorcast_ray._catalog import Catalog, parse_key
from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._dtypes import itemsize
from tensorcast_ray._epochs import EpochTable
from tensorcast_ray._errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorcast_ray._gc import OWNER_SUFFIX, pid_alive
from tensorcast_ray._layout import TensorMeta, plan_layout
from tensorcast_ray._policy import ResolvedPolicy, resolve_policy
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, daemon_pb2
from tensorcast_ray._shm import Segment, SegmentPool, remove_segments, round_up

logger = logging.getLogger(__name__)


@dataclass
class _Artifact:
    artifact_id: str
    key: str
    kind: str  # "put" | "register"
    nbytes: int
    segments: list[tuple[str, int]]
    tensors: list[dict[str, Any]]
    created_ms: int
    epoch_slot: int = -1
    generation: int = 0
    owner_session: str = ""
    owner_pid: int = 0
    owner_host: str = ""
    expires_at_ms: int = 0
    buffers: list[str] = field(default_factory=list)  # register of tc.empty buffers
    degraded_reasons: list[str] = field(default_factory=list)
    # The local stable tier's admission terms, kept so a restart re-admits on the same terms.
    requirement: str = "must"
    retention: str = "pinned"
    retention_ttl_ms: int | None = None
    request_id: str = ""  # the client's id for the put that wrote it (retries after lost replies)


@dataclass
class _Pending:
    write_id: str
    artifact: _Artifact
    session_id: str
    # Pooled/staged segments larger than what the artifact uses: trimmed once it commits
    # (never before: a failed write hands staged segments back to the client whole).
    trims: list[tuple[str, int]] = field(default_factory=list)
    # The client's staged segments this write took: (name, whole size). An abort hands them
    # back to the session whole (the client still maps them), or frees them if it is gone.
    claimed: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _Buffer:
    buffer_id: str
    segment: tuple[str, int]
    session_id: str
    pid: int
    refs: int = 0


class LocalStore:
    """[daemon] All data verbs of one node. Thread-safe (one lock; every call is short)."""

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
        self._catalog = Catalog()
        self._index = LocalIndex(int(config.stable_dram_capacity_bytes))
        self._artifacts: dict[str, _Artifact] = {}
        self._pending: dict[str, _Pending] = {}
        self._buffers: dict[str, _Buffer] = {}
        self._session_pids: dict[str, int] = {}
        # Segments leased to a writer's session ahead of its puts: name -> (size, session).
        self._staged: dict[str, tuple[int, str]] = {}
        # Segments to shrink to the bytes their artifact uses: (name, used bytes).
        self._trim: list[tuple[str, int]] = []
        self._heartbeat_s = 0.0  # when the owner file was last touched (see tick)
        self.epoch_segment = f"{prefix}epochs"
        self.epoch_slots = config.epoch_slots
        self._journal_path = os.path.join(self.shm_dir, f"{prefix}journal.jsonl")
        self._journal = Journal(self._journal_path) if config.journal else None
        os.makedirs(self.shm_dir, exist_ok=True)
        self._epochs = EpochTable(self.shm_dir, self.epoch_segment, self.epoch_slots, adopt=True)
        self.recovered = self._recover()
        self._pool = SegmentPool(
            self.shm_dir,
            prefix,
            segment_bytes=int(config.shm_segment_bytes),
            reserve_bytes=int(config.shm_pool_bytes),
        )
        self._pool.start()
        self._update_gauges()

    # ---- helpers --------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _session(self, request_session: str, transport_session: str) -> str:
        return request_session or transport_session

    def _lease_owner(self, request_session: str, transport_session: str) -> str:
        """The session a lease belongs to; it must be one this daemon instance knows."""
        sid = self._session(request_session, transport_session)
        with self._lock:
            known = sid in self._session_pids
        if not known:
            raise UnavailableError(
                f"session {sid or '<none>'} is unknown to this daemon (it restarted, or the "
                "client skipped Hello); reconnect and retry",
            )
        return sid

    @staticmethod
    def _policy(policy_json: str) -> ResolvedPolicy:
        if not policy_json:
            return resolve_policy(None)
        try:
            data = json.loads(policy_json)
        except ValueError as exc:
            raise InvalidArgumentError(f"policy_json is not valid JSON: {exc}") from exc
        return ResolvedPolicy.from_dict(data)

    def _tier_outcomes(self, policy: ResolvedPolicy) -> list[str]:
        """Non-local tiers need persistence, which this daemon does not run yet."""
        degraded = []
        for tier in policy.tiers:
            if tier.is_local_stable:
                continue
            what = f"{tier.tier} (scope {tier.scope})"
            if tier.requirement == "must":
                raise FailedPreconditionError(
                    f"persistence not configured: the policy requires {what}, which needs "
                    "persistence tasks this daemon does not run; use a policy without it "
                    "(e.g. profile 'cache' or 'pinned'), or tc.export() to write to shared disk"
                )
            if tier.requirement == "should":
                degraded.append(f"{what} skipped: persistence not configured")
        return degraded

    def _admit(self, artifact: _Artifact, policy: ResolvedPolicy) -> None:
        request = AdmitRequest.from_policy(artifact.artifact_id, artifact.nbytes, policy)
        if artifact.kind == "register":
            # A lease lives until delete, TTL or producer death: never evicted.
            request = AdmitRequest(
                artifact.artifact_id, artifact.nbytes, "must", "pinned", None, "reject"
            )
        if request is None:
            raise FailedPreconditionError(
                f"no tier can hold {artifact.key}: the policy asks for no local copy and "
                "persistence is not configured; add a local stable tier (e.g. profile 'cache')"
            )
        artifact.requirement = request.requirement
        artifact.retention = request.retention_policy
        artifact.retention_ttl_ms = request.retention_ttl_ms
        start = time.perf_counter()
        for expired in self._index.expire(self._now_ms()):
            self._free_artifact(expired, reason="retention ttl expired")
        decision = self._index.admit(request, self._now_ms())
        status = {"ok": "OK", "degraded": "DEGRADED"}.get(decision.status, "FAILED")
        self.metrics.local_stable_tier.labels(
            op=artifact.kind, status=status, requirement=request.requirement
        ).inc()
        self.metrics.local_stable_tier_seconds.labels(op=artifact.kind, status=status).observe(
            time.perf_counter() - start
        )
        decision.raise_if_rejected(artifact.key)
        if not decision.admitted:
            raise ResourceExhaustedError(
                f"{artifact.key} ({artifact.nbytes} bytes) does not fit in local stable DRAM "
                f"({decision.reason}) and no other tier can hold it; free space, raise "
                "stable_dram_capacity_bytes, or use overflow_policy 'evict'"
            )
        for victim in decision.evict:
            self._free_artifact(victim, reason="evicted to admit " + artifact.key)
        # Held like a reader until the write commits or aborts: an unfinished write must not
        # be evicted or expired (its bytes would stay, uncounted).
        self._index.acquire(artifact.artifact_id)

    # ---- writes -----------------------------------------------------------------------
    def rpc_BeginWrite(
        self, request: daemon_pb2.BeginWriteRequest, session_id: str
    ) -> daemon_pb2.BeginWriteResponse:
        parse_key(request.key, for_write=True)
        kind = "register" if request.kind == daemon_pb2.WRITE_KIND_REGISTER else "put"
        if request.ttl_ms < 0:
            raise InvalidArgumentError(f"ttl_ms must be >= 0, got {request.ttl_ms}")
        specs = []
        for t in request.tensors:
            itemsize(t.dtype)
            specs.append((t.name, t.dtype, tuple(int(d) for d in t.shape)))
        plan = plan_layout(specs, int(self.config.shm_segment_bytes))
        policy = self._policy(request.policy_json)
        sid = (
            self._lease_owner(request.session_id, session_id)
            if kind == "register"
            else self._session(request.session_id, session_id)
        )
        artifact = _Artifact(
            artifact_id=uuid.uuid4().hex,
            key=request.key,
            kind=kind,
            nbytes=sum(t.nbytes for t in plan.tensors),
            segments=[],
            tensors=[t.to_dict() for t in plan.tensors],
            created_ms=self._now_ms(),
            owner_session=sid if kind == "register" else "",
            owner_pid=self._session_pids.get(sid, 0) if kind == "register" else 0,
            owner_host=self.hostname if kind == "register" else "",
            expires_at_ms=self._now_ms() + request.ttl_ms if request.ttl_ms else 0,
            request_id=request.request_id,
        )
        with self._lock:  # one block: a retry's check, the reservation and the claim
            if request.request_id:
                done = self._retried_write(request.key, request.request_id)
                if done is not None:
                    return daemon_pb2.BeginWriteResponse(
                        artifact_id=done.artifact_id, committed=_result(done)
                    )
            artifact.degraded_reasons = self._tier_outcomes(policy)
            self._catalog.reserve(request.key, artifact.artifact_id)
            try:
                self._admit(artifact, policy)
            except BaseException:
                self._catalog.abort(request.key)
                raise
            write_id = uuid.uuid4().hex
            pending = _Pending(write_id, artifact, sid)
            pending.claimed = self._claim_staged(request.staged_segments, sid, plan.segment_sizes)
            self._pending[write_id] = pending
        staged = list(pending.claimed)
        # Segment creation may fault pages when the pool runs dry: do it outside the lock.
        try:
            for size in plan.segment_sizes:
                seg = staged.pop(0) if staged and self._stageable(size) else self._take(size)
                artifact.segments.append(_fit(seg, size, pending.trims))
            with self._lock:
                if write_id not in self._pending:  # the session ended meanwhile
                    raise UnavailableError(
                        f"the write of {request.key!r} was aborted while it started (its client "
                        "session ended, or a retry replaced it); retry the put"
                    )
        except BaseException:
            with self._lock:
                if write_id in self._pending:
                    self._abort(write_id)
                else:  # aborted meanwhile, claimed segments included: free what came after
                    claimed = {name for name, _ in pending.claimed}
                    self._unlink([s for s in artifact.segments if s[0] not in claimed])
            raise
        return daemon_pb2.BeginWriteResponse(
            write_id=write_id,
            artifact_id=artifact.artifact_id,
            segments=[common_pb2.SegmentRef(name=n, size=s) for n, s in artifact.segments],
            tensors=[_layout_pb(t) for t in artifact.tensors],
            shm_dir=self.shm_dir,
            stageable=sum(1 for size in plan.segment_sizes if self._stageable(size)),
        )

    def _retried_write(self, key: str, request_id: str) -> _Artifact | None:
        """A BeginWrite whose ``request_id`` was seen before is a retry after a lost reply:
        abort the attempt its client never heard of; if that attempt committed, return it."""
        with self._lock:
            for write_id, pending in list(self._pending.items()):
                if pending.artifact.request_id == request_id and pending.artifact.key == key:
                    self._abort(write_id)
            try:
                _, artifact_id = self._catalog.resolve(key)
            except NotFoundError:
                return None
            done = self._artifacts.get(artifact_id)
            return done if done is not None and done.request_id == request_id else None

    def _stageable(self, size: int) -> bool:
        """Whether a planned segment of ``size`` may use a staged (whole pooled) segment: the
        pool's own rule, so a small artifact never consumes a whole pooled segment."""
        return self._pool.min_pooled_bytes <= size <= int(self.config.shm_segment_bytes)

    def _take(self, size: int) -> tuple[str, int]:
        seg = self._pool.take(size)
        return seg.name, seg.size

    def _claim_staged(
        self, names: Any, session_id: str, sizes: tuple[int, ...]
    ) -> list[tuple[str, int]]:
        """The caller's staged segments this write may use (ownership moves to the write)."""
        fits = sum(1 for size in sizes if self._stageable(size))
        claimed: list[tuple[str, int]] = []
        with self._lock:
            for name in names:
                if len(claimed) == fits:
                    break
                entry = self._staged.get(name)
                if entry is not None and entry[1] == session_id:
                    del self._staged[name]
                    claimed.append((name, entry[0]))
        return claimed

    def rpc_LeaseSegments(
        self, request: daemon_pb2.LeaseSegmentsRequest, session_id: str
    ) -> daemon_pb2.LeaseSegmentsResponse:
        sid = self._lease_owner(request.session_id, session_id)
        segment_bytes = int(self.config.shm_segment_bytes)
        keep = set(request.held)
        with self._lock:
            lost = [n for n, (_, owner) in self._staged.items() if owner == sid and n not in keep]
            for name in lost:
                self._unlink([(name, self._staged.pop(name)[0])])
            held = sum(1 for _, owner in self._staged.values() if owner == sid)
        if lost:
            logger.info("freed %d staged segments session %s no longer holds", len(lost), sid)
        allowed = int(self.config.client_staging_bytes) // segment_bytes - held
        count = max(0, min(int(request.count), allowed))
        segments: list[Segment] = []
        try:
            for _ in range(count):
                segments.append(self._pool.take(segment_bytes))
        except BaseException:
            for seg in segments:
                seg.unlink()
            raise
        with self._lock:
            if sid not in self._session_pids:  # the session ended meanwhile
                for seg in segments:
                    seg.unlink()
                raise UnavailableError(f"session {sid} ended while leasing segments")
            for seg in segments:
                self._staged[seg.name] = (seg.size, sid)
        return daemon_pb2.LeaseSegmentsResponse(
            segments=[common_pb2.SegmentRef(name=seg.name, size=seg.size) for seg in segments],
            shm_dir=self.shm_dir,
        )

    def rpc_CommitWrite(
        self, request: daemon_pb2.CommitWriteRequest, session_id: str
    ) -> daemon_pb2.WriteResult:
        with self._lock:
            pending = self._pending.pop(request.write_id, None)
            if pending is None:
                raise FailedPreconditionError(
                    f"write {request.write_id!r} is unknown: it was aborted, already committed, "
                    "or the daemon restarted; start the put again"
                )
            artifact = pending.artifact
            self._index.release(artifact.artifact_id)
            self._trim.extend(pending.trims)
            artifact.epoch_slot, artifact.generation = self._epochs.alloc()
            self._catalog.commit(artifact.key)
            self._artifacts[artifact.artifact_id] = artifact
            self._log("artifact", artifact)
            self._update_gauges()
        return _result(artifact)

    def rpc_AbortWrite(
        self, request: daemon_pb2.AbortWriteRequest, session_id: str
    ) -> daemon_pb2.AbortWriteResponse:
        self._abort(request.write_id)
        return daemon_pb2.AbortWriteResponse()

    def _abort(self, write_id: str) -> None:
        with self._lock:
            pending = self._pending.pop(write_id, None)
            if pending is None:
                return
            self._catalog.abort(pending.artifact.key)
            self._index.release(pending.artifact.artifact_id)
            self._index.remove(pending.artifact.artifact_id)
            claimed = {name for name, _ in pending.claimed}
            if pending.session_id in self._session_pids:
                for name, size in pending.claimed:  # back to the session, whole (no trim yet)
                    self._staged[name] = (size, pending.session_id)
            else:
                self._unlink(pending.claimed)
            self._unlink([s for s in pending.artifact.segments if s[0] not in claimed])

    def rpc_AllocateBuffer(
        self, request: daemon_pb2.AllocateBufferRequest, session_id: str
    ) -> daemon_pb2.AllocateBufferResponse:
        if request.nbytes <= 0:
            raise InvalidArgumentError(f"buffer size must be positive, got {request.nbytes}")
        sid = self._lease_owner(request.session_id, session_id)
        buffer_id = "buf-" + uuid.uuid4().hex
        with self._lock:
            decision = self._index.admit(
                AdmitRequest(buffer_id, int(request.nbytes), "must", "pinned", None, "reject"),
                self._now_ms(),
            )
            decision.raise_if_rejected(f"a tc.empty buffer of {request.nbytes} bytes")
        try:
            trims: list[tuple[str, int]] = []
            seg = _fit(self._take(int(request.nbytes)), int(request.nbytes), trims)
        except BaseException:
            with self._lock:
                self._index.remove(buffer_id)
            raise
        with self._lock:
            if sid not in self._session_pids:  # the session ended meanwhile
                self._index.remove(buffer_id)
                self._unlink([seg])
                raise UnavailableError(f"session {sid} ended while allocating a buffer")
            self._trim.extend(trims)
            self._buffers[buffer_id] = _Buffer(buffer_id, seg, sid, self._session_pids.get(sid, 0))
            self._log("buffer", self._buffers[buffer_id])
            self._update_gauges()
        return daemon_pb2.AllocateBufferResponse(
            buffer_id=buffer_id,
            segment=common_pb2.SegmentRef(name=seg[0], size=seg[1]),
            shm_dir=self.shm_dir,
        )

    def rpc_RegisterBuffers(
        self, request: daemon_pb2.RegisterBuffersRequest, session_id: str
    ) -> daemon_pb2.WriteResult:
        parse_key(request.key, for_write=True)
        policy = self._policy(request.policy_json)
        sid = self._lease_owner(request.session_id, session_id)
        with self._lock:
            if request.request_id:
                done = self._retried_write(request.key, request.request_id)
                if done is not None:
                    return _result(done)
            segments: list[tuple[str, int]] = []
            tensors: list[dict[str, Any]] = []
            used: list[str] = []
            for t in request.tensors:
                buf = self._buffers.get(t.buffer_id)
                if buf is None:
                    raise NotFoundError(
                        f"tensor {t.name!r}: buffer {t.buffer_id} is unknown (released, or owned "
                        "by a process that exited); allocate with tc.empty() in this process"
                    )
                expected = itemsize(t.dtype) * _numel(t.shape)
                if t.offset < 0 or t.nbytes != expected or t.offset + t.nbytes > buf.segment[1]:
                    raise InvalidArgumentError(
                        f"tensor {t.name!r} lies outside its tc.empty buffer "
                        f"(offset {t.offset}, {t.nbytes} bytes, buffer {buf.segment[1]} bytes)"
                    )
                if buf.segment not in segments:
                    segments.append(buf.segment)
                    used.append(buf.buffer_id)
                tensors.append(
                    TensorMeta(
                        t.name,
                        t.dtype,
                        tuple(int(d) for d in t.shape),
                        segments.index(buf.segment),
                        int(t.offset),
                        int(t.nbytes),
                    ).to_dict()
                )
            artifact = _Artifact(
                artifact_id=uuid.uuid4().hex,
                key=request.key,
                kind="register",
                nbytes=sum(t["nbytes"] for t in tensors),
                segments=segments,
                tensors=tensors,
                created_ms=self._now_ms(),
                owner_session=sid,
                owner_pid=self._session_pids.get(sid, 0),
                request_id=request.request_id,
                owner_host=self.hostname,
                expires_at_ms=self._now_ms() + request.ttl_ms if request.ttl_ms > 0 else 0,
                buffers=used,
                degraded_reasons=self._tier_outcomes(policy),
            )
            self._catalog.reserve(request.key, artifact.artifact_id)
            for buffer_id in used:
                self._buffers[buffer_id].refs += 1
            artifact.epoch_slot, artifact.generation = self._epochs.alloc()
            self._catalog.commit(request.key)
            self._artifacts[artifact.artifact_id] = artifact
            self._log("artifact", artifact)
            self._update_gauges()
        return _result(artifact)

    # ---- reads ------------------------------------------------------------------------
    def rpc_Lookup(
        self, request: daemon_pb2.LookupRequest, session_id: str
    ) -> daemon_pb2.ArtifactInfo:
        with self._lock:
            if request.artifact_id:
                artifact = self._artifacts.get(request.artifact_id)
                if artifact is None:
                    raise NotFoundError(
                        f"artifact {request.artifact_id} does not exist on this node"
                    )
            else:
                _, artifact_id = self._catalog.resolve(request.key)
                artifact = self._artifacts[artifact_id]
            self._index.touch(artifact.artifact_id, self._now_ms())
            return daemon_pb2.ArtifactInfo(
                key=artifact.key,
                artifact_id=artifact.artifact_id,
                nbytes=artifact.nbytes,
                segments=[common_pb2.SegmentRef(name=n, size=s) for n, s in artifact.segments],
                tensors=[_layout_pb(t) for t in artifact.tensors],
                shm_dir=self.shm_dir,
                epoch_slot=artifact.epoch_slot,
                generation=artifact.generation,
                kind=artifact.kind,
                created_unix_ms=artifact.created_ms,
            )

    def rpc_Exists(
        self, request: daemon_pb2.ExistsRequest, session_id: str
    ) -> daemon_pb2.ExistsResponse:
        with self._lock:
            return daemon_pb2.ExistsResponse(exists=self._catalog.exists(request.key))

    def rpc_Delete(
        self, request: daemon_pb2.DeleteRequest, session_id: str
    ) -> daemon_pb2.DeleteResponse:
        with self._lock:
            artifact_id = self._catalog.remove_key(request.key)
            self._free_artifact(artifact_id, reason="deleted")
            return daemon_pb2.DeleteResponse(deleted=True, versions=1)

    def rpc_ListKeys(
        self, request: daemon_pb2.ListKeysRequest, session_id: str
    ) -> daemon_pb2.ListKeysResponse:
        with self._lock:
            return daemon_pb2.ListKeysResponse(keys=self._catalog.list_keys(request.prefix))

    # ---- lifecycle ----------------------------------------------------------------------
    def _free_artifact(self, artifact_id: str, *, reason: str) -> None:
        artifact = self._artifacts.pop(artifact_id, None)
        if artifact is None:
            return
        self._catalog.remove_artifact(artifact_id)
        self._epochs.free(artifact.epoch_slot)
        self._index.remove(artifact_id)
        if artifact.buffers:
            for buffer_id in artifact.buffers:
                buf = self._buffers.get(buffer_id)
                if buf is not None:
                    buf.refs -= 1
        else:
            self._unlink(artifact.segments)
        logger.info("freed %s (%s): %s", artifact.key, artifact_id, reason)
        self._log("drop", artifact_id)
        self._update_gauges()

    def _free_buffer(self, buffer_id: str) -> None:
        buf = self._buffers.pop(buffer_id, None)
        if buf is not None:
            self._index.remove(buffer_id)
            self._unlink([buf.segment])
            self._log("unbuffer", buffer_id)

    def _unlink(self, segments: list[tuple[str, int]]) -> None:
        for name, size in segments:
            Segment(self.shm_dir, name, size).unlink()

    def bind_session_pid(self, session_id: str, pid: int, hostname: str) -> None:
        """A session told us its process: adopt leases a previous daemon instance recorded."""
        with self._lock:
            self._session_pids[session_id] = pid
            if hostname != self.hostname:
                return
            for artifact in self._artifacts.values():
                if (
                    artifact.kind == "register"
                    and not artifact.owner_session
                    and artifact.owner_pid == pid
                ):
                    artifact.owner_session = session_id
            for buf in self._buffers.values():
                if buf.session_id == session_id and not buf.pid:
                    buf.pid = pid
                elif not buf.session_id and buf.pid == pid:  # re-adopted after a restart
                    buf.session_id = session_id

    def end_session(self, session_id: str) -> None:
        """The producer went away: end its leases, abort its unfinished writes."""
        with self._lock:
            self._session_pids.pop(session_id, None)
            for write_id in [w for w, p in self._pending.items() if p.session_id == session_id]:
                self._abort(write_id)
            for artifact in list(self._artifacts.values()):
                if artifact.kind == "register" and artifact.owner_session == session_id:
                    self._free_artifact(artifact.artifact_id, reason="producer session ended")
            for buffer_id in [
                b for b, buf in self._buffers.items() if buf.session_id == session_id
            ]:
                self._free_buffer(buffer_id)
            for name in [n for n, (_, owner) in self._staged.items() if owner == session_id]:
                self._unlink([(name, self._staged.pop(name)[0])])
            self._update_gauges()

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
            trim, self._trim = self._trim, []
        for name, used in trim:
            try:
                os.truncate(os.path.join(self.shm_dir, name), used)
            except FileNotFoundError:
                pass  # aborted or deleted meanwhile
        self._compact_journal()
        now = self._now_ms()
        with self._lock:
            for artifact in list(self._artifacts.values()):
                if artifact.expires_at_ms and artifact.expires_at_ms <= now:
                    self._free_artifact(artifact.artifact_id, reason="ttl expired")
                elif (
                    artifact.kind == "register"
                    and not artifact.owner_session
                    and artifact.owner_host == self.hostname
                    and not pid_alive(artifact.owner_pid)
                ):
                    self._free_artifact(artifact.artifact_id, reason="producer process exited")
            for artifact_id in self._index.expire(now):
                self._free_artifact(artifact_id, reason="retention ttl expired")
            for buffer_id in [
                b
                for b, buf in self._buffers.items()
                if not buf.session_id and not pid_alive(buf.pid)
            ]:
                self._free_buffer(buffer_id)  # re-adopted, and its process is gone

    def stats(self) -> dict[str, Any]:
        with self._lock:
            index = self._index.stats()
            leases = sum(1 for a in self._artifacts.values() if a.kind == "register") + len(
                self._buffers
            )
            return {
                "artifacts": len(self._artifacts),
                "bytes": sum(a.nbytes for a in self._artifacts.values()),
                "leases": leases,
                "shm_pool_bytes": self._pool.reserve_bytes_ready(),
                "tiers": [
                    {
                        "tier": "stable_dram",
                        "used_bytes": index.used,
                        "capacity_bytes": index.capacity,
                        "entries": index.entries,
                    }
                ],
            }

    def _update_gauges(self) -> None:
        stats = self.stats()
        m = self.metrics
        m.artifacts.set(stats["artifacts"])
        m.leases.set(stats["leases"])
        m.shm_pool_bytes.set(stats["shm_pool_bytes"])
        for tier in stats["tiers"]:
            m.tier_bytes_used.labels(tier=tier["tier"]).set(tier["used_bytes"])
            m.tier_bytes_capacity.labels(tier=tier["tier"]).set(tier["capacity_bytes"])

    def close(self, *, unlink: bool = True) -> None:
        """Stop the pool; with ``unlink`` free every segment (a clean stop, not a crash)."""
        self._pool.close()
        with self._lock:
            if unlink:
                for artifact in list(self._artifacts.values()):
                    self._unlink(artifact.segments)
                for pending in self._pending.values():
                    self._unlink(pending.artifact.segments)
                for buf in self._buffers.values():
                    self._unlink([buf.segment])
                self._unlink([(n, size) for n, (size, _) in self._staged.items()])
                self._staged.clear()
                self._artifacts.clear()
                self._buffers.clear()
                self._pending.clear()
                remove_segments(self.shm_dir, self.prefix, keep=set())
                if self._journal is not None:
                    self._journal.remove()
            elif self._journal is not None:
                self._journal.close()
            self._epochs.close(unlink=unlink)

    # ---- journal --------------------------------------------------------------------------
    def _log(self, op: str, value: Any) -> None:
        if self._journal is None:
            return
        if op == "artifact":
            self._journal.add_artifact(_record(value))
        elif op == "drop":
            self._journal.drop_artifact(value)
        elif op == "buffer":
            self._journal.add_buffer(_record(value))
        else:
            self._journal.drop_buffer(value)

    def _compact_journal(self) -> None:
        with self._lock:
            live = len(self._artifacts) + len(self._buffers)
            if self._journal is not None and self._journal.needs_compaction(live):
                self._journal.compact(
                    [_record(a) for a in self._artifacts.values()],
                    [_record(b) for b in self._buffers.values()],
                )

    def _recover(self) -> int:
        """Re-adopt what a previous instance of this daemon left (a restart, not a stop)."""
        state = self._journal.replay() if self._journal is not None else None
        now = self._now_ms()
        for raw in (state.buffers if state else {}).values():
            buf = _Buffer(**{**raw, "segment": tuple(raw["segment"]), "refs": 0})
            if os.path.exists(os.path.join(self.shm_dir, buf.segment[0])):
                buf.session_id = ""  # sessions do not survive a restart; pid re-binds them
                self._buffers[buf.buffer_id] = buf
                self._index.admit(
                    AdmitRequest(buf.buffer_id, buf.segment[1], "must", "pinned", None, "reject"),
                    now,
                )
        for raw in (state.artifacts if state else {}).values():
            artifact = _Artifact(**{**raw, "segments": [tuple(s) for s in raw["segments"]]})
            present = all(
                os.path.exists(os.path.join(self.shm_dir, n)) for n, _ in artifact.segments
            )
            if not present or not self._epochs.restore(artifact.epoch_slot, artifact.generation):
                logger.warning("cannot re-adopt %s: its segments are gone", artifact.key)
                continue
            # Re-admit on the terms it was admitted with (reject: recovery never evicts). A
            # register of tc.empty buffers holds no bytes of its own (its buffers, re-admitted
            # above, do), so it is not admitted at all, as at runtime.
            decision = (
                self._index.admit(
                    AdmitRequest(
                        artifact.artifact_id,
                        artifact.nbytes,
                        artifact.requirement,
                        artifact.retention,
                        artifact.retention_ttl_ms,
                        "reject",
                    ),
                    now,
                )
                if not artifact.buffers
                else None
            )
            if decision is not None and not decision.admitted:
                logger.warning("cannot re-adopt %s: %s", artifact.key, decision.reason)
                self._epochs.free(artifact.epoch_slot)
                continue
            artifact.owner_session = ""
            self._catalog.reserve(artifact.key, artifact.artifact_id)
            self._catalog.commit(artifact.key)
            self._artifacts[artifact.artifact_id] = artifact
            for buffer_id in artifact.buffers:
                if buffer_id in self._buffers:
                    self._buffers[buffer_id].refs += 1
        # Zero validity slots nobody re-adopted, drop segments nobody references, and start
        # the journal afresh from what was re-adopted.
        self._epochs.release_unclaimed()
        self._sweep_orphans()
        if self._journal is not None:
            self._journal.compact(
                [_record(a) for a in self._artifacts.values()],
                [_record(b) for b in self._buffers.values()],
            )
        if self._artifacts:
            logger.info("re-adopted %d artifacts from %s", len(self._artifacts), self._journal_path)
        return len(self._artifacts)

    def _sweep_orphans(self) -> None:
        journal = os.path.basename(self._journal_path)
        owner = self.prefix + OWNER_SUFFIX
        keep = {self.epoch_segment, journal, journal + ".tmp", owner, owner + ".tmp"}
        keep.update(n for a in self._artifacts.values() for n, _ in a.segments)
        keep.update(b.segment[0] for b in self._buffers.values())
        removed = remove_segments(self.shm_dir, self.prefix, keep)
        if removed:
            logger.info("removed %d orphaned segments", removed)


def _fit(segment: tuple[str, int], size: int, trims: list[tuple[str, int]]) -> tuple[str, int]:
    """Use ``size`` bytes of ``segment``; a pooled or staged segment larger than that goes on
    ``trims``, shrunk by a later tick (off the hot path) so memory and accounting match."""
    name, actual = segment
    used = round_up(size)
    if actual > used:
        trims.append((name, used))
    return name, used


def _record(obj: Any) -> dict[str, Any]:
    """A journal record of a dataclass: shallow (its lists hold plain JSON values)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _layout_pb(t: dict[str, Any]) -> common_pb2.TensorLayout:
    return common_pb2.TensorLayout(
        name=t["name"],
        dtype=t["dtype"],
        shape=t["shape"],
        segment=t["segment"],
        offset=t["offset"],
        nbytes=t["nbytes"],
    )


def _result(artifact: _Artifact) -> daemon_pb2.WriteResult:
    return daemon_pb2.WriteResult(
        key=artifact.key,
        artifact_id=artifact.artifact_id,
        nbytes=artifact.nbytes,
        status="degraded" if artifact.degraded_reasons else "ready",
        degraded_reasons=artifact.degraded_reasons,
    )
