"""Sessions, leases, staged segments and unfinished writes: a pure state machine.  [daemon]

The shell (:mod:`tensorcast_ray.daemon.local_store`) owns the lock, the shared-memory
segments, the validity table, the journal and the metrics; this table owns every decision
about who holds which bytes.  Nothing here does I/O, reads a clock, makes an id or starts a
thread: events come in as method calls carrying ``now_ms`` and the ids the shell made, and
what the shell must do comes back as :class:`Actions` (segments to unlink, validity slots to
free, artifacts and buffers dropped, for the journal and the log).  Errors a verb reports
are ``ArtifactError``; a verb that has actions to carry out even when it fails returns the
error in its outcome instead of raising it, so no action is ever lost.

One put, step by step (the shell's part in brackets):

1. ``begin_write(artifact, policy, ...)``: a retry after a lost reply aborts the attempt the
   client never heard of (or answers the committed one); the version is reserved in the
   :class:`~tensorcast_ray._catalog.Catalog`, the bytes admitted by the
   :class:`~tensorcast_ray.daemon.local_index.LocalIndex` (expired and evicted artifacts come
   back as actions) and held like a reader, so an unfinished write is never evicted; the
   session's staged segments the write may use are claimed.  [the shell frees what the
   actions say, records the admission metric, then takes the other segments outside its
   lock]
2. ``place_segments(write_id, segments, trims)``: the write's segments, or False when it was
   aborted meanwhile (its session ended, a retry replaced it).  [the shell unlinks the fresh
   segments it took]
3. [the shell allocates a validity slot] ``commit_write(write_id, slot, generation, now_ms)``
   publishes the key; larger-than-used segments go on the trim list.  [journal the artifact]

Or ``abort_write(write_id)``: the claimed staged segments go back to the session whole (the
client still maps them), or are unlinked when the session is gone.

A write belongs to a live session: ``begin_write`` refuses one that names none (or one this
instance does not know), ``end_session`` aborts it, and so does ``expire`` once it outlives
``write_timeout_ms``, so an abandoned write never holds capacity.

A register lease belongs to its producer's session: it ends at ``delete``, at its TTL, or at
``end_session``.  After a daemon restart, sessions are gone: a re-adopted lease keeps its
producer's pid and key, ``open_session`` with proof re-binds it — the same pid *verified by the
kernel* (the local socket's peer) or the same lease key (a gRPC session that sent back its
lease secret), never a claimed pid — and ``expire`` ends it once the shell reports the pid
dead.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tensorcast_ray.daemon.local_index import AdmitDecision, AdmitRequest, LocalIndex

from tensorcast_ray._catalog import Catalog
from tensorcast_ray._dtypes import itemsize
from tensorcast_ray._errors import (
    AlreadyExistsError,
    ArtifactError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorcast_ray._layout import Columns
from tensorcast_ray._policy import ResolvedPolicy
from tensorcast_ray._transport.base import SegmentRef

__all__ = [
    "Actions",
    "Artifact",
    "BeginOutcome",
    "Buffer",
    "BufferTensor",
    "Freed",
    "LeaseTable",
    "PendingWrite",
    "SegmentRef",
    "tier_outcomes",
]


@dataclass
class Artifact:
    """One published (or being written) artifact. Its fields are its journal record."""

    artifact_id: str
    key: str
    kind: str  # "put" | "register"
    nbytes: int
    segments: list[SegmentRef]
    # The placed tensor table (a serialized common_pb2.TensorTable): one blob per artifact,
    # answered to every Lookup as it is, never a record per tensor.
    tensors: bytes
    created_ms: int
    epoch_slot: int = -1
    generation: int = 0
    owner_session: str = ""
    owner_pid: int = 0
    owner_host: str = ""
    # A hash of the lease secret the owner's gRPC Session was issued: what re-binds the lease
    # after a restart ("" = a local-socket owner, re-bound by its kernel-verified pid).
    owner_key: str = ""
    expires_at_ms: int = 0
    buffers: list[str] = field(default_factory=list)  # register of tc.empty buffers
    degraded_reasons: list[str] = field(default_factory=list)
    # The local stable tier's admission terms, kept so a restart re-admits on the same terms.
    requirement: str = "must"
    retention: str = "pinned"
    retention_ttl_ms: int | None = None
    request_id: str = ""  # the client's id for the put that wrote it (retries after lost replies)
    # The cluster tier: how this node came to hold it ("original": written here; "replica":
    # made by replicate or a remote policy tier, kept like the original; "cache": pulled by a
    # read, evictable), the node that wrote it, and its cluster commit number (what a
    # restarted Global Store rebuilds ``latest`` from).
    ntensors: int = 0
    replica_kind: str = "original"
    writer: str = ""
    cluster_seq: int = 0
    served_by: str = (
        "local"  # how its bytes got here: "local", "object_store", "collective", "disk"
    )
    # Persistence (daemon/persist_runner.py): the resolved policy of a write whose tiers go
    # beyond this node's DRAM (its JSON; "" = no task), that task's id, and whether a
    # complete copy is on shared disk (then eviction loses nothing).
    persist_policy: str = ""
    persist_task_id: str = ""
    durable: bool = False

    def to_record(self) -> dict[str, Any]:
        return {**_record(self), "tensors": base64.b64encode(self.tensors).decode()}

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> Artifact:
        return cls(
            **{
                **raw,
                "segments": [tuple(s) for s in raw["segments"]],
                "tensors": base64.b64decode(raw["tensors"]),
            }
        )


@dataclass
class PendingWrite:
    write_id: str
    artifact: Artifact
    session_id: str
    deadline_ms: int  # aborted by ``expire`` once passed: an abandoned write frees its bytes
    # Pooled/staged segments larger than what the artifact uses: trimmed once it commits
    # (never before: a failed write hands staged segments back to the client whole).
    trims: list[SegmentRef] = field(default_factory=list)
    # The client's staged segments this write took: (name, whole size). An abort hands them
    # back to the session whole (the client still maps them), or frees them if it is gone.
    claimed: list[SegmentRef] = field(default_factory=list)


@dataclass
class Buffer:
    """One ``tc.empty`` buffer leased to a process. Its fields are its journal record."""

    buffer_id: str
    segment: SegmentRef
    session_id: str
    pid: int
    refs: int = 0  # register artifacts over it
    owner_key: str = ""  # as Artifact.owner_key
    # Its process dropped its last tensor over it (ReleaseBuffers): freed once refs is 0.
    released: bool = False

    def to_record(self) -> dict[str, Any]:
        return _record(self)

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> Buffer:
        # Sessions do not survive a restart: the pid or key re-binds the buffer (open_session).
        return cls(**{**raw, "segment": tuple(raw["segment"]), "refs": 0, "session_id": ""})


@dataclass(frozen=True)
class BufferTensor:
    """One tensor of a register over ``tc.empty`` buffers, as the client described it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    buffer_id: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Freed:
    """An artifact the table dropped: the shell frees its validity slot, journals, logs."""

    artifact_id: str
    key: str
    epoch_slot: int
    reason: str
    durable: bool = False  # a complete copy is on shared disk


@dataclass
class Actions:
    """What the shell must carry out, in this order: free slots, unlink, journal, gauges."""

    freed: list[Freed] = field(default_factory=list)
    unlink: list[SegmentRef] = field(default_factory=list)
    dropped_buffers: list[str] = field(default_factory=list)
    aborted: list[tuple[str, str]] = field(default_factory=list)  # (key, artifact id) writes

    def __bool__(self) -> bool:
        return bool(self.freed or self.unlink or self.dropped_buffers or self.aborted)


@dataclass
class BeginOutcome:
    """The answer to ``begin_write``. Carry out ``actions`` first, whatever else it says.

    ``done``: a retry whose write committed already (answer it, nothing else happened).
    ``decision``: the local stable tier's admission (for the metrics), when one was made.
    ``error``: raise it after the actions.  Otherwise ``pending`` is the started write.
    """

    actions: Actions
    done: Artifact | None = None
    pending: PendingWrite | None = None
    decision: AdmitDecision | None = None
    requirement: str = ""
    error: ArtifactError | None = None


def tier_outcomes(
    policy: ResolvedPolicy, *, persistence: bool = False, cluster: bool = False
) -> list[str]:
    """Degraded reasons, known at the put, for the tiers beyond local DRAM a policy asks
    for: shared disk needs ``persistence`` (a persist_url), a remote stable copy needs a
    ``cluster``. A ``must`` tier that cannot be placed is refused; the rest are placed by a
    persistence task after the put returns."""
    degraded = []
    for tier in policy.tiers:
        if tier.is_local_stable:
            continue
        what = f"{tier.tier} (scope {tier.scope})"
        if tier.tier == "shared_disk":
            if persistence:
                continue
            missing = (
                "persistence not configured: set persist_url in the daemon config (or "
                "TENSORCAST_RAY_PERSIST_URL where tc.init runs)"
            )
        else:
            if cluster:
                continue
            missing = "no cluster: this daemon runs without a Global Store"
        if tier.requirement == "must":
            raise FailedPreconditionError(
                f"the policy requires {what}, which cannot be placed — {missing}; or use a "
                "policy without it (e.g. profile 'cache' or 'pinned')"
            )
        if tier.requirement == "should":
            short = missing.split(":")[0]
            degraded.append(f"{what} skipped: {short}")
    return degraded


def _pinned(item_id: str, nbytes: int) -> AdmitRequest:
    # Leases live until delete, TTL or producer death: never evicted; recovery never evicts.
    return AdmitRequest(item_id, nbytes, "must", "pinned", None, "reject")


class LeaseTable:
    """[daemon] Who holds which bytes on this node. Not thread-safe: the shell serializes."""

    def __init__(self, capacity_bytes: int, hostname: str, *, write_timeout_ms: int) -> None:
        self.hostname = hostname
        self.write_timeout_ms = write_timeout_ms
        self.catalog = Catalog()
        self.index = LocalIndex(capacity_bytes)
        self.artifacts: dict[str, Artifact] = {}
        # Validity slot -> its published artifact: cached reads arrive stamped by slot.
        self.by_slot: dict[int, str] = {}
        self.pending: dict[str, PendingWrite] = {}
        self.buffers: dict[str, Buffer] = {}
        self.sessions: dict[str, int] = {}  # session id -> its process id
        self.session_keys: dict[str, str] = {}  # gRPC session id -> its lease key
        # Segments leased to a writer's session ahead of its puts: name -> (size, session).
        self.staged: dict[str, tuple[int, str]] = {}
        self._trims: list[SegmentRef] = []  # (name, used bytes): to shrink off the hot path
        # What the daemon can place beyond its DRAM (set by the shell): shared disk when a
        # persistence root is configured, other nodes when it is part of a cluster.
        self.persistence = False
        self.clustered = False

    def _tier_outcomes(self, artifact: Artifact, policy: ResolvedPolicy) -> list[str]:
        """The put-time verdict on ``policy``'s tiers beyond local DRAM; stamps the policy on
        ``artifact`` when a persistence task will place some of them."""
        degraded = tier_outcomes(policy, persistence=self.persistence, cluster=self.clustered)
        if any(
            not t.is_local_stable
            and (self.persistence if t.tier == "shared_disk" else self.clustered)
            for t in policy.tiers
        ):
            artifact.persist_policy = json.dumps(policy.to_dict(), separators=(",", ":"))
            artifact.persist_task_id = artifact.persist_task_id or "pt-" + artifact.artifact_id
        return degraded

    # ---- sessions -----------------------------------------------------------------------
    def open_session(
        self, session_id: str, pid: int, hostname: str, *, pid_verified: bool, lease_key: str = ""
    ) -> None:
        """A session of process ``pid``; it re-adopts the leases a previous daemon instance
        recorded for it only on proof: the same kernel-verified pid (the local socket's peer,
        ``pid_verified``) for a lease made without a key, or the same ``lease_key`` (a gRPC
        session that sent back its lease secret) for one made with it. A pid a client merely
        claims is never proof, or any client could take over, and by hanging up end, another
        process's leases."""
        self.sessions[session_id] = pid
        if lease_key:
            self.session_keys[session_id] = lease_key
        by_pid = pid_verified and hostname == self.hostname

        def proven(key: str, owner_pid: int) -> bool:
            return bool(lease_key and key == lease_key) or (by_pid and not key and owner_pid == pid)

        for artifact in self.artifacts.values():
            if (
                artifact.kind == "register"
                and not artifact.owner_session
                and proven(artifact.owner_key, artifact.owner_pid)
            ):
                artifact.owner_session = session_id
        for buf in self.buffers.values():
            if not buf.session_id and proven(buf.owner_key, buf.pid):  # re-adopted
                buf.session_id = session_id

    def lease_owner(self, session_id: str) -> str:
        """``session_id``, which a lease may belong to only if this daemon instance knows it."""
        if not session_id:
            raise FailedPreconditionError(
                "this request names no session: writes and leases belong to a live client "
                "session (the local socket connection, or the id the gRPC Session stream "
                "answers); open one first — tensorcast_ray.init() does"
            )
        if session_id not in self.sessions:
            raise UnavailableError(
                f"session {session_id} is unknown to this daemon (it restarted, or the session "
                "ended); reconnect and retry",
            )
        return session_id

    def end_session(self, session_id: str) -> Actions:
        """The producer went away: end its leases, abort its unfinished writes."""
        actions = Actions()
        self.sessions.pop(session_id, None)
        self.session_keys.pop(session_id, None)
        for write_id in [w for w, p in self.pending.items() if p.session_id == session_id]:
            self._abort(write_id, actions)
        for artifact in list(self.artifacts.values()):
            if artifact.kind == "register" and artifact.owner_session == session_id:
                self._free_artifact(artifact.artifact_id, "producer session ended", actions)
        for buffer_id in [b for b, buf in self.buffers.items() if buf.session_id == session_id]:
            self._free_buffer(buffer_id, actions)
        for name in [n for n, (_, owner) in self.staged.items() if owner == session_id]:
            actions.unlink.append((name, self.staged.pop(name)[0]))
        return actions

    # ---- staging --------------------------------------------------------------------------
    def release_unheld(self, session_id: str, held: Iterable[str]) -> tuple[Actions, int]:
        """Free the session's staged segments it no longer holds (a lost lease reply, a failed
        map); returns the actions and how many staged segments it still has."""
        keep = set(held)
        actions = Actions()
        for name in [n for n, (_, o) in self.staged.items() if o == session_id and n not in keep]:
            actions.unlink.append((name, self.staged.pop(name)[0]))
        return actions, sum(1 for _, owner in self.staged.values() if owner == session_id)

    def add_staged(self, session_id: str, segments: Sequence[SegmentRef]) -> None:
        """Lease ``segments`` to the session; UnavailableError if it ended meanwhile (the
        shell then unlinks them)."""
        if session_id not in self.sessions:
            raise UnavailableError(f"session {session_id} ended while leasing segments")
        for name, size in segments:
            self.staged[name] = (size, session_id)

    def _claim_staged(self, names: Iterable[str], session_id: str, fits: int) -> list[SegmentRef]:
        claimed: list[SegmentRef] = []
        for name in names:
            if len(claimed) == fits:
                break
            entry = self.staged.get(name)
            if entry is not None and entry[1] == session_id:
                del self.staged[name]
                claimed.append((name, entry[0]))
        return claimed

    # ---- writes -------------------------------------------------------------------------
    def begin_write(
        self,
        artifact: Artifact,
        policy: ResolvedPolicy,
        *,
        write_id: str,
        session_id: str,
        staged: Iterable[str],
        stageable: int,
        now_ms: int,
    ) -> BeginOutcome:
        """Start writing ``artifact`` (no segments yet); ``stageable``: how many of its
        segments may use a staged one of the session's."""
        out = BeginOutcome(Actions())
        try:
            self.lease_owner(session_id)  # a write lives no longer than its session
            if artifact.request_id:
                out.done = self._retried_write(artifact.key, artifact.request_id, out.actions)
                if out.done is not None:
                    return out
            artifact.degraded_reasons = self._tier_outcomes(artifact, policy)
            self._reserve_and_admit(artifact, policy, now_ms, out, None)
        except ArtifactError as exc:
            out.error = exc
            return out
        out.pending = PendingWrite(write_id, artifact, session_id, now_ms + self.write_timeout_ms)
        out.pending.claimed = self._claim_staged(staged, session_id, stageable)
        self.pending[write_id] = out.pending
        return out

    def begin_replica(
        self, artifact: Artifact, request: AdmitRequest, *, write_id: str, now_ms: int
    ) -> BeginOutcome:
        """Start landing a copy of another node's artifact (same id and key) on the terms of
        ``request``: a read's cache copy is evictable, a replicate's is kept like the
        original. It is published by ``commit_write`` once every byte is in, like a put."""
        out = BeginOutcome(Actions())
        try:
            if artifact.artifact_id in self.artifacts:
                raise AlreadyExistsError(f"{artifact.key} is already on this node")
            self._reserve_and_admit(artifact, None, now_ms, out, request)
        except ArtifactError as exc:
            out.error = exc
            return out
        out.pending = PendingWrite(write_id, artifact, "", now_ms + self.write_timeout_ms)
        self.pending[write_id] = out.pending
        return out

    def _reserve_and_admit(
        self,
        artifact: Artifact,
        policy: ResolvedPolicy | None,
        now_ms: int,
        out: BeginOutcome,
        request: AdmitRequest | None,
    ) -> None:
        """Reserve the key on this node and admit the bytes; a refusal gives the key back."""
        self.catalog.reserve(artifact.key, artifact.artifact_id)
        try:
            self._admit(artifact, policy, now_ms, out, request=request)
        except BaseException:
            self.catalog.abort(artifact.key)
            raise

    def _admit(
        self,
        artifact: Artifact,
        policy: ResolvedPolicy | None,
        now_ms: int,
        out: BeginOutcome,
        *,
        request: AdmitRequest | None = None,
    ) -> None:
        if request is None:
            assert policy is not None
            request = AdmitRequest.from_policy(artifact.artifact_id, artifact.nbytes, policy)
        if artifact.kind == "register":
            request = _pinned(artifact.artifact_id, artifact.nbytes)
        if request is None and artifact.persist_policy and policy is not None:
            # No local tier asked for: the bytes stay here only until a persistence task has
            # placed them (it holds them), evictable from then on.
            request = AdmitRequest(
                artifact.artifact_id, artifact.nbytes, "may", "best_effort", None, "evict"
            )
        if request is None:
            raise FailedPreconditionError(
                f"no tier can hold {artifact.key}: the policy asks for no local copy and "
                "persistence is not configured; add a local stable tier (e.g. profile 'cache')"
            )
        artifact.requirement = request.requirement
        artifact.retention = request.retention_policy
        artifact.retention_ttl_ms = request.retention_ttl_ms
        for expired in self.index.expire(now_ms):
            self._free_artifact(expired, "retention ttl expired", out.actions)
        decision = self.index.admit(request, now_ms)
        out.decision, out.requirement = decision, request.requirement
        decision.raise_if_rejected(artifact.key)
        if not decision.admitted:
            raise ResourceExhaustedError(
                f"{artifact.key} ({artifact.nbytes} bytes) does not fit in local stable DRAM "
                f"({decision.reason}) and no other tier can hold it; free space, raise "
                "stable_dram_capacity_bytes, or use overflow_policy 'evict'"
            )
        for victim in decision.evict:
            self._free_artifact(victim, "evicted to admit " + artifact.key, out.actions)
        # Held like a reader until the write commits or aborts: an unfinished write must not
        # be evicted or expired (its bytes would stay, uncounted).
        self.index.acquire(artifact.artifact_id)

    def _retried_write(self, key: str, request_id: str, actions: Actions) -> Artifact | None:
        """A write whose ``request_id`` was seen before is a retry after a lost reply: abort
        the attempt its client never heard of; if that attempt committed, return it."""
        for write_id, pending in list(self.pending.items()):
            if pending.artifact.request_id == request_id and pending.artifact.key == key:
                self._abort(write_id, actions)
        try:
            _, artifact_id = self.catalog.resolve(key)
        except NotFoundError:
            return None
        done = self.artifacts.get(artifact_id)
        return done if done is not None and done.request_id == request_id else None

    def place_segments(
        self, write_id: str, segments: Sequence[SegmentRef], trims: Sequence[SegmentRef]
    ) -> bool:
        """The segments the shell took for a started write; False if it was aborted meanwhile."""
        pending = self.pending.get(write_id)
        if pending is None:
            return False
        pending.artifact.segments = list(segments)
        pending.trims = list(trims)
        return True

    def pending_write(self, write_id: str) -> PendingWrite:
        pending = self.pending.get(write_id)
        if pending is None:
            raise FailedPreconditionError(
                f"write {write_id!r} is unknown: it was aborted (its session ended, or it "
                "outlived the daemon's write_timeout_s), already committed, or the daemon "
                "restarted; start the put again"
            )
        return pending

    def commit_write(
        self, write_id: str, epoch_slot: int, generation: int, now_ms: int
    ) -> Artifact:
        """Publish a started write under the validity slot the shell allocated for it."""
        pending = self.pending_write(write_id)
        del self.pending[write_id]
        artifact = pending.artifact
        if artifact.persist_policy:  # held for its persistence task, which releases it
            self.index.hold(artifact.artifact_id)
        self.index.release(artifact.artifact_id)
        # Its TTL runs from publication: a copy slower than the TTL must not expire at once.
        self.index.touch(artifact.artifact_id, now_ms)
        self._trims.extend(pending.trims)
        self._publish(artifact, epoch_slot, generation)
        return artifact

    def abort_write(self, write_id: str) -> Actions:
        actions = Actions()
        self._abort(write_id, actions)
        return actions

    def _abort(self, write_id: str, actions: Actions) -> None:
        pending = self.pending.pop(write_id, None)
        if pending is None:
            return
        self.catalog.abort(pending.artifact.key)
        actions.aborted.append((pending.artifact.key, pending.artifact.artifact_id))
        self.index.release(pending.artifact.artifact_id)
        self.index.remove(pending.artifact.artifact_id)
        claimed = {name for name, _ in pending.claimed}
        if pending.session_id in self.sessions:
            for name, size in pending.claimed:  # back to the session, whole (no trim yet)
                self.staged[name] = (size, pending.session_id)
        else:
            actions.unlink.extend(pending.claimed)
        actions.unlink.extend(s for s in pending.artifact.segments if s[0] not in claimed)

    # ---- tc.empty buffers and registers over them --------------------------------------
    def admit_buffer(self, buffer_id: str, nbytes: int, now_ms: int) -> None:
        """Book a buffer's bytes before the shell takes its segment (ResourceExhausted if
        they do not fit); ``cancel_buffer`` gives the booking back if taking fails."""
        decision = self.index.admit(_pinned(buffer_id, nbytes), now_ms)
        decision.raise_if_rejected(f"a tc.empty buffer of {nbytes} bytes")

    def cancel_buffer(self, buffer_id: str) -> None:
        self.index.remove(buffer_id)

    def add_buffer(
        self, buffer_id: str, segment: SegmentRef, session_id: str, trims: Sequence[SegmentRef]
    ) -> Buffer:
        """Lease the booked buffer's segment to the session; UnavailableError (booking given
        back) if it ended meanwhile: the shell then unlinks the segment."""
        if session_id not in self.sessions:
            self.index.remove(buffer_id)
            raise UnavailableError(f"session {session_id} ended while allocating a buffer")
        self._trims.extend(trims)
        buf = Buffer(
            buffer_id,
            segment,
            session_id,
            self.sessions.get(session_id, 0),
            owner_key=self.session_keys.get(session_id, ""),
        )
        self.buffers[buffer_id] = buf
        return buf

    def register_buffers(
        self, artifact: Artifact, tensors: Sequence[BufferTensor], policy: ResolvedPolicy
    ) -> BeginOutcome:
        """Check a register over ``tc.empty`` buffers and reserve its key, filling in the
        artifact's segments, tensors, buffers and size; ``commit_registered`` publishes it.
        ``done`` answers a retry whose register committed already (nothing reserved)."""
        out = BeginOutcome(Actions())
        try:
            if artifact.request_id:
                out.done = self._retried_write(artifact.key, artifact.request_id, out.actions)
                if out.done is not None:
                    return out
            segments: list[SegmentRef] = []
            names: list[str] = []
            dtypes: list[str] = []
            shapes: list[tuple[int, ...]] = []
            placed: list[int] = []
            offsets: list[int] = []
            used: list[str] = []
            frozen: FailedPreconditionError | None = None
            for t in tensors:
                buf = self.buffers.get(t.buffer_id)
                if buf is None:
                    raise NotFoundError(
                        f"tensor {t.name!r}: buffer {t.buffer_id} is unknown (released, or "
                        "owned by a process that exited); allocate with tc.empty() in this "
                        "process"
                    )
                if buf.session_id != artifact.owner_session:
                    # Another process's buffer: its end would free the bytes under this lease.
                    raise FailedPreconditionError(
                        f"tensor {t.name!r}: buffer {t.buffer_id} belongs to another session; "
                        "a register may use only tc.empty buffers of its own process: put a "
                        "copy (tc.put) instead"
                    )
                expected = itemsize(t.dtype) * _numel(t.shape)
                if t.offset < 0 or t.nbytes != expected or t.offset + t.nbytes > buf.segment[1]:
                    raise InvalidArgumentError(
                        f"tensor {t.name!r} lies outside its tc.empty buffer "
                        f"(offset {t.offset}, {t.nbytes} bytes, buffer {buf.segment[1]} bytes)"
                    )
                if buf.refs and frozen is None:
                    frozen = FailedPreconditionError(
                        f"tensor {t.name!r}: its tc.empty buffer already backs "
                        f"{self._registered_over(buf.buffer_id)}; a buffer is frozen by its "
                        "register and backs one version: delete that version first, or put a "
                        "copy (tc.put, or register tensor.clone())"
                    )
                if buf.segment not in segments:
                    segments.append(buf.segment)
                    used.append(buf.buffer_id)
                names.append(t.name)
                dtypes.append(t.dtype)
                shapes.append(tuple(t.shape))
                placed.append(segments.index(buf.segment))
                offsets.append(t.offset)
            _refuse_overlaps(tensors)
            cols = Columns.of(names, dtypes, shapes)
            cols = cols.placed(placed, offsets, [size for _, size in segments])
            artifact.segments, artifact.buffers = segments, used
            artifact.tensors = cols.to_table().SerializeToString()
            artifact.nbytes = sum(cols.nbytes)
            artifact.degraded_reasons = self._tier_outcomes(artifact, policy)
            self.catalog.reserve(artifact.key, artifact.artifact_id)  # a taken key first
            if frozen is not None:
                self.catalog.abort(artifact.key)
                raise frozen
        except ArtifactError as exc:
            out.error = exc
            return out
        for buffer_id in used:
            self.buffers[buffer_id].refs += 1
        return out

    def release_buffers(
        self, buffer_ids: Sequence[str], session_id: str
    ) -> tuple[Actions, list[Buffer]]:
        """The session's process dropped its last tensor over these buffers: free each one
        no live version is registered over; the others (returned, to journal as released)
        are freed with the last version over them. Ids already freed are skipped; a buffer
        of another session is refused, and then nothing is released."""
        bufs = [self.buffers[b] for b in dict.fromkeys(buffer_ids) if b in self.buffers]
        for buf in bufs:
            if buf.session_id != session_id or not session_id:
                raise FailedPreconditionError(
                    f"buffer {buf.buffer_id} belongs to another session; only the process "
                    "that allocated a tc.empty buffer may release it"
                )
        actions, held = Actions(), []
        for buf in bufs:
            buf.released = True
            if buf.refs:
                held.append(buf)
            else:
                self._free_buffer(buf.buffer_id, actions)
        return actions, held

    def _registered_over(self, buffer_id: str) -> str:
        keys = sorted(a.key for a in self.artifacts.values() if buffer_id in a.buffers)
        return ", ".join(keys) or "another version"

    def commit_registered(self, artifact: Artifact, epoch_slot: int, generation: int) -> None:
        # Not in the index (its tc.empty buffers hold the bytes), so no access to stamp.
        self._publish(artifact, epoch_slot, generation)

    def _publish(self, artifact: Artifact, epoch_slot: int, generation: int) -> None:
        artifact.epoch_slot, artifact.generation = epoch_slot, generation
        landed = artifact.replica_kind != "original"  # a copy: never newer than a write here
        self.catalog.commit(artifact.key, landed_ms=artifact.created_ms if landed else None)
        self.artifacts[artifact.artifact_id] = artifact
        self.by_slot[epoch_slot] = artifact.artifact_id

    # ---- reads and deletes ----------------------------------------------------------------
    def lookup(self, key: str, artifact_id: str, now_ms: int) -> Artifact:
        """The artifact by id when one is given, else by key (``latest`` resolved); an LRU hit."""
        if artifact_id:
            artifact = self.artifacts.get(artifact_id)
            if artifact is None:
                raise NotFoundError(f"artifact {artifact_id} does not exist on this node")
        else:
            _, resolved = self.catalog.resolve(key)
            artifact = self.artifacts[resolved]
        self.index.touch(artifact.artifact_id, now_ms)
        return artifact

    def delete(self, key: str) -> Actions:
        actions = Actions()
        artifact_id = self.catalog.remove_key(key)
        self._free_artifact(artifact_id, "deleted", actions)
        return actions

    # ---- time and process deaths ------------------------------------------------------------
    def take_trims(self) -> list[SegmentRef]:
        """Segments to shrink to the bytes their artifact uses (name, used bytes)."""
        trims, self._trims = self._trims, []
        return trims

    def watched_pids(self) -> set[int]:
        """Processes on this host whose leases have no session (re-adopted after a restart):
        the shell says which of them are dead in ``expire``."""
        pids = {
            a.owner_pid
            for a in self.artifacts.values()
            if a.kind == "register" and not a.owner_session and a.owner_host == self.hostname
        }
        pids.update(b.pid for b in self.buffers.values() if not b.session_id)
        return pids

    def expire(self, now_ms: int, dead_pids: set[int]) -> Actions:
        """End TTLs that passed, writes past their deadline and the sessionless leases of
        processes that exited."""
        actions = Actions()
        for write_id in [w for w, p in self.pending.items() if p.deadline_ms <= now_ms]:
            self._abort(write_id, actions)
        for artifact in list(self.artifacts.values()):
            if artifact.expires_at_ms and artifact.expires_at_ms <= now_ms:
                self._free_artifact(artifact.artifact_id, "ttl expired", actions)
            elif (
                artifact.kind == "register"
                and not artifact.owner_session
                and artifact.owner_host == self.hostname
                and artifact.owner_pid in dead_pids
            ):
                self._free_artifact(artifact.artifact_id, "producer process exited", actions)
        for artifact_id in self.index.expire(now_ms):
            self._free_artifact(artifact_id, "retention ttl expired", actions)
        for buffer_id in [
            b for b, buf in self.buffers.items() if not buf.session_id and buf.pid in dead_pids
        ]:
            self._free_buffer(buffer_id, actions)  # re-adopted, and its process is gone
        return actions

    def free_artifact(self, artifact_id: str, reason: str, actions: Actions) -> None:
        """Drop one artifact (the cluster deleted it); nothing if it is not here."""
        self._free_artifact(artifact_id, reason, actions)

    def _free_artifact(self, artifact_id: str, reason: str, actions: Actions) -> None:
        artifact = self.artifacts.pop(artifact_id, None)
        if artifact is None:
            return
        if self.by_slot.get(artifact.epoch_slot) == artifact_id:
            del self.by_slot[artifact.epoch_slot]
        self.catalog.remove_artifact(artifact_id)
        self.index.remove(artifact_id)
        actions.freed.append(
            Freed(artifact_id, artifact.key, artifact.epoch_slot, reason, artifact.durable)
        )
        if artifact.buffers:  # the buffers hold the bytes; they stay leased to their process
            for buffer_id in artifact.buffers:
                buf = self.buffers.get(buffer_id)
                if buf is not None:
                    buf.refs -= 1
                    if buf.released and not buf.refs:  # its process no longer maps it
                        self._free_buffer(buffer_id, actions)
        else:
            actions.unlink.extend(artifact.segments)

    def _free_buffer(self, buffer_id: str, actions: Actions) -> None:
        buf = self.buffers.pop(buffer_id, None)
        if buf is not None:
            self.index.remove(buffer_id)
            actions.unlink.append(buf.segment)
            actions.dropped_buffers.append(buffer_id)
            # No version may outlive the file that holds its bytes.
            for artifact in [a for a in self.artifacts.values() if buffer_id in a.buffers]:
                self._free_artifact(artifact.artifact_id, "its tc.empty buffer was freed", actions)

    # ---- restart recovery -----------------------------------------------------------------
    def adopt_buffer(self, buf: Buffer, now_ms: int) -> None:
        """A buffer a previous daemon instance leased, whose segment still exists."""
        self.buffers[buf.buffer_id] = buf
        self.index.admit(_pinned(buf.buffer_id, buf.segment[1]), now_ms)

    def adopt_artifact(self, artifact: Artifact, now_ms: int) -> AdmitDecision | None:
        """Re-admit a previous instance's artifact on the terms it was admitted with (reject:
        recovery never evicts).  Returns the refusal, or None once adopted.  A register of
        tc.empty buffers holds no bytes of its own (its buffers, adopted first, do), so it is
        not admitted at all, as at runtime."""
        if not artifact.buffers:
            decision = self.index.admit(
                AdmitRequest(
                    artifact.artifact_id,
                    artifact.nbytes,
                    artifact.requirement,
                    artifact.retention,
                    artifact.retention_ttl_ms,
                    "reject",
                ),
                now_ms,
            )
            if not decision.admitted:
                return decision
        artifact.owner_session = ""
        self.catalog.reserve(artifact.key, artifact.artifact_id)
        landed = artifact.replica_kind != "original"
        self.catalog.commit(artifact.key, landed_ms=artifact.created_ms if landed else None)
        self.artifacts[artifact.artifact_id] = artifact
        self.by_slot[artifact.epoch_slot] = artifact.artifact_id
        for buffer_id in artifact.buffers:
            if buffer_id in self.buffers:
                self.buffers[buffer_id].refs += 1
        return None

    # ---- views ------------------------------------------------------------------------------
    def live_segments(self) -> list[SegmentRef]:
        """Every segment the table references: published, being written, buffers, staged."""
        live = [s for a in self.artifacts.values() for s in a.segments]
        live.extend(s for p in self.pending.values() for s in p.artifact.segments)
        live.extend(b.segment for b in self.buffers.values())
        live.extend((name, size) for name, (size, _) in self.staged.items())
        return live

    def clear(self) -> None:
        """Forget everything (a clean stop: the shell unlinked ``live_segments`` first)."""
        self.artifacts.clear()
        self.by_slot.clear()
        self.pending.clear()
        self.buffers.clear()
        self.staged.clear()

    def lease_count(self) -> int:
        return sum(1 for a in self.artifacts.values() if a.kind == "register") + len(self.buffers)


def _record(obj: Any) -> dict[str, Any]:
    """A journal record of a dataclass: shallow (its lists hold plain JSON values)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _refuse_overlaps(tensors: Sequence[BufferTensor]) -> None:
    """Tensors of one register may share a buffer but not bytes: a version whose tensors
    alias each other would change under a reader as one of them is written."""
    spans = sorted(
        (t.buffer_id, t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes
    )
    for (buf_a, _, end_a, name_a), (buf_b, start_b, _, name_b) in itertools.pairwise(spans):
        if buf_a == buf_b and start_b < end_a:
            raise InvalidArgumentError(
                f"tensors {name_a!r} and {name_b!r} overlap in their tc.empty buffer; register "
                "disjoint slices (or put a copy)"
            )
