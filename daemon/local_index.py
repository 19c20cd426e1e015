"""Admission and eviction for the node's local stable DRAM tier, as a pure state machine.  [daemon]

The daemon's shell owns the shared-memory segments; this index owns the decisions.  Every
event carries its own ``now_ms`` (no clock is read here) and nothing here does I/O, so the
rules are tested without Ray.  One put, step by step:

1. the shell resolves the policy and calls ``admit(AdmitRequest.from_policy(...), now_ms)``;
2. the index books the new entry, drops the entries it chose to evict, and answers an
   :class:`AdmitDecision`;
3. the shell frees the segments named in ``decision.evict``, then copies the bytes in (or
   calls ``decision.raise_if_rejected()`` for a ``must`` that did not fit); if the copy
   fails it calls ``remove(artifact_id)`` to give the booking back.

Readers ``acquire`` / ``release`` an entry; an entry with readers is never evicted, expired
or removed.  Pinned entries and ``must`` entries are never evicted.  Entries with retention
``ttl`` expire ``retention_ttl_ms`` after their last access (a sliding window): ``expire``
drops them, and eviction takes them before any live entry.  The shell should call
``expire`` before ``admit``: ``reject`` never evicts, not even expired entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from tensorcast_ray._errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tensorcast_ray._policy import (
    OVERFLOW_POLICIES,
    REQUIREMENTS,
    RETENTION_POLICIES,
    ResolvedPolicy,
)

__all__ = ["AdmitDecision", "AdmitRequest", "IndexEntry", "IndexStats", "LocalIndex"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_nbytes(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgumentError(f"{field}: must be a non-negative integer (got {value!r})")


@dataclass(frozen=True)
class AdmitRequest:
    """Ask to place one artifact's bytes in local stable DRAM."""

    artifact_id: str
    nbytes: int
    requirement: str
    retention_policy: str
    retention_ttl_ms: int | None
    overflow_policy: str
    durable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.artifact_id, str) or not self.artifact_id:
            raise InvalidArgumentError(
                f"AdmitRequest.artifact_id: must be a non-empty string (got {self.artifact_id!r})"
            )
        _check_nbytes("AdmitRequest.nbytes", self.nbytes)
        for field, choices in (
            ("requirement", REQUIREMENTS),
            ("retention_policy", RETENTION_POLICIES),
            ("overflow_policy", OVERFLOW_POLICIES),
        ):
            value = getattr(self, field)
            if value not in choices:
                raise InvalidArgumentError(
                    f"AdmitRequest.{field}: must be one of {choices} (got {value!r})"
                )
        ttl = self.retention_ttl_ms
        if (self.retention_policy == "ttl") != (ttl is not None) or (
            ttl is not None and (not _is_int(ttl) or ttl <= 0)
        ):
            raise InvalidArgumentError(
                "AdmitRequest.retention_ttl_ms: a positive integer is required with retention "
                f"'ttl' and forbidden otherwise (got {ttl!r} with {self.retention_policy!r})"
            )

    @classmethod
    def from_policy(
        cls, artifact_id: str, nbytes: int, policy: ResolvedPolicy, durable: bool = False
    ) -> AdmitRequest | None:
        """The request a resolved policy implies, or None when it wants no local copy."""
        tier = policy.local_stable()
        if tier is None:
            return None
        return cls(
            artifact_id,
            nbytes,
            tier.requirement,
            tier.retention_policy or "best_effort",
            tier.retention_ttl_ms,
            policy.overflow_policy,
            durable,
        )


@dataclass(frozen=True)
class AdmitDecision:
    """What the shell must do after ``admit``.

    ``status``: ``ok`` (admitted), ``rejected`` (a ``must`` did not fit: fail the verb),
    ``degraded`` (a ``should`` did not fit: report ``reason``), ``skipped`` (a ``may`` did
    not fit: say nothing).  ``evict`` is non-empty only when ``admitted``.
    """

    admitted: bool
    evict: tuple[str, ...]
    status: str
    reason: str
    artifact_id: str = ""
    capacity_bytes: int = 0
    used_bytes: int = 0
    requested_bytes: int = 0

    def raise_if_rejected(self, what: str = "") -> None:
        """Raise ResourceExhaustedError for a rejected ``must``; do nothing otherwise.

        ``what`` names the artifact for the caller (its key); the internal id otherwise."""
        if self.status == "rejected":
            raise ResourceExhaustedError(
                f"local stable DRAM cannot hold {what or repr(self.artifact_id)}: capacity "
                f"{self.capacity_bytes} bytes, used {self.used_bytes}, requested "
                f"{self.requested_bytes} ({self.reason}). Free space (delete or unpin "
                "artifacts), raise the daemon's DRAM capacity, or relax the policy "
                "(requirement 'should', or overflow_policy 'evict')."
            )


@dataclass(frozen=True)
class IndexEntry:
    """One resident artifact as the index sees it."""

    artifact_id: str
    nbytes: int
    requirement: str
    retention_policy: str
    retention_ttl_ms: int | None
    expires_at_ms: int | None
    last_access_ms: int
    readers: int = 0
    durable: bool = False
    access_seq: int = 0  # breaks ties between accesses in the same millisecond
    # A persistence task reads the bytes: never evicted or expired meanwhile, but a delete
    # may still remove it (the task is stopped; its own mappings keep its bytes valid).
    holds: int = 0
    # Admitted with overflow_policy "spill": evicted (by anyone's pressure) only once durable.
    spill: bool = False

    @property
    def protected(self) -> bool:
        return self.retention_policy == "pinned" or self.requirement == "must"

    def expired(self, now_ms: int | None) -> bool:
        return (
            now_ms is not None and self.expires_at_ms is not None and self.expires_at_ms <= now_ms
        )


@dataclass(frozen=True)
class IndexStats:
    """``entries`` and ``pinned`` count entries; ``used`` and ``by_retention`` are bytes."""

    capacity: int
    used: int
    entries: int
    pinned: int
    by_retention: Mapping[str, int]


class LocalIndex:
    """Bookkeeping of the local stable DRAM tier; see the module docstring."""

    def __init__(self, capacity_bytes: int) -> None:
        _check_nbytes("capacity_bytes", capacity_bytes)
        self._capacity = capacity_bytes
        self._used = 0
        self._entries: dict[str, IndexEntry] = {}
        self._seq = 0
        # No entry expires before this (None: none has a TTL), so ``expire`` runs on every
        # put without walking every resident artifact.
        self._next_expiry: int | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._used

    def get(self, artifact_id: str) -> IndexEntry | None:
        return self._entries.get(artifact_id)

    def entries(self) -> tuple[IndexEntry, ...]:
        return tuple(self._entries.values())

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _accessed(self, entry: IndexEntry, now_ms: int) -> IndexEntry:
        ttl = entry.retention_ttl_ms
        expires = None if ttl is None else now_ms + ttl
        if expires is not None and (self._next_expiry is None or expires < self._next_expiry):
            self._next_expiry = expires
        return replace(
            entry, last_access_ms=now_ms, access_seq=self._next_seq(), expires_at_ms=expires
        )

    def _pick_victims(self, need: int, now_ms: int | None, durable_only: bool) -> list[str] | None:
        """Victims freeing at least ``need`` bytes, expired first then LRU; None if impossible."""
        candidates = [
            e
            for e in self._entries.values()
            if not e.protected
            and e.readers == 0
            and e.holds == 0
            and (e.durable or not (durable_only or e.spill))
        ]
        candidates.sort(key=lambda e: (not e.expired(now_ms), e.last_access_ms, e.access_seq))
        victims: list[str] = []
        freed = 0
        for entry in candidates:
            if freed >= need:
                break
            victims.append(entry.artifact_id)
            freed += entry.nbytes
        return victims if freed >= need else None

    def _drop(self, artifact_ids: list[str]) -> None:
        for artifact_id in artifact_ids:
            self._used -= self._entries.pop(artifact_id).nbytes

    def admit(self, request: AdmitRequest, now_ms: int) -> AdmitDecision:
        """Book ``request`` if it fits, evicting per its overflow policy; see AdmitDecision."""
        aid, nbytes = request.artifact_id, request.nbytes
        used_before = self._used

        def decide(admitted: bool, evict: tuple[str, ...], status: str, why: str) -> AdmitDecision:
            return AdmitDecision(
                admitted, evict, status, why, aid, self._capacity, used_before, nbytes
            )

        existing = self._entries.get(aid)
        if existing is not None:
            if existing.nbytes != nbytes:
                raise FailedPreconditionError(
                    f"artifact {aid!r} is resident with {existing.nbytes} bytes but was "
                    f"re-admitted with {nbytes}; artifacts are immutable, use a new version"
                )
            # The newer request's retention wins: re-putting with "pinned" pins it.
            self._entries[aid] = self._accessed(
                replace(
                    existing,
                    requirement=request.requirement,
                    retention_policy=request.retention_policy,
                    retention_ttl_ms=request.retention_ttl_ms,
                    durable=existing.durable or request.durable,
                ),
                now_ms,
            )
            return decide(True, (), "ok", "already resident")

        victims: list[str] | None = []
        if nbytes > self._capacity:
            victims, why = None, "larger than the whole tier"
        elif self._used + nbytes > self._capacity:
            need = self._used + nbytes - self._capacity
            if request.overflow_policy == "reject":
                victims, why = None, "tier full and overflow_policy 'reject' evicts nothing"
            else:
                spill = request.overflow_policy == "spill"
                victims = self._pick_victims(need, now_ms, durable_only=spill)
                why = (
                    "tier full and too few durable, unread, unpinned entries to spill"
                    if spill
                    else "tier full and too few unread, unpinned entries to evict"
                )
        if victims is None:
            status = {"must": "rejected", "should": "degraded", "may": "skipped"}
            return decide(False, (), status[request.requirement], why)

        self._drop(victims)
        self._entries[aid] = self._accessed(
            IndexEntry(
                aid,
                nbytes,
                request.requirement,
                request.retention_policy,
                request.retention_ttl_ms,
                None,
                now_ms,
                durable=request.durable,
                spill=request.overflow_policy == "spill",
            ),
            now_ms,
        )
        self._used += nbytes
        reason = f"evicted {len(victims)} entries" if victims else "fits"
        return decide(True, tuple(victims), "ok", reason)

    def touch(self, artifact_id: str, now_ms: int) -> bool:
        """Record an access (LRU order, sliding TTL); False if the entry is gone."""
        entry = self._entries.get(artifact_id)
        if entry is None:
            return False
        self._entries[artifact_id] = self._accessed(entry, now_ms)
        return True

    def acquire(self, artifact_id: str, now_ms: int | None = None) -> None:
        """A reader maps the bytes: hold the entry until ``release``."""
        entry = self._entries.get(artifact_id)
        if entry is None:
            raise NotFoundError(
                f"artifact {artifact_id!r} is not in local stable DRAM; fetch it again"
            )
        if now_ms is not None:
            entry = self._accessed(entry, now_ms)
        self._entries[artifact_id] = replace(entry, readers=entry.readers + 1)

    def release(self, artifact_id: str) -> None:
        entry = self._entries.get(artifact_id)
        if entry is None or entry.readers == 0:
            raise InternalError(
                f"release of {artifact_id!r} without a matching acquire; please report this bug"
            )
        self._entries[artifact_id] = replace(entry, readers=entry.readers - 1)

    def hold(self, artifact_id: str) -> bool:
        """A persistence task reads the entry's bytes: keep it until ``unhold`` (eviction and
        TTLs pass it by; ``remove`` still works). False if it is gone."""
        entry = self._entries.get(artifact_id)
        if entry is None:
            return False
        self._entries[artifact_id] = replace(entry, holds=entry.holds + 1)
        return True

    def unhold(self, artifact_id: str) -> None:
        entry = self._entries.get(artifact_id)
        if entry is not None and entry.holds:
            self._entries[artifact_id] = replace(entry, holds=entry.holds - 1)

    def mark_durable(self, artifact_id: str) -> bool:
        """Its bytes are safe on shared disk, so ``spill`` may evict it; False if gone."""
        entry = self._entries.get(artifact_id)
        if entry is None:
            return False
        self._entries[artifact_id] = replace(entry, durable=True)
        return True

    def remove(self, artifact_id: str) -> int:
        """Forget an entry and return the bytes freed (0 if absent)."""
        entry = self._entries.get(artifact_id)
        if entry is None:
            return 0
        if entry.readers:
            raise FailedPreconditionError(
                f"artifact {artifact_id!r} has {entry.readers} active readers; release them "
                "(drop the tensors / close the artifact) before deleting it"
            )
        self._drop([artifact_id])
        return entry.nbytes

    def expire(self, now_ms: int) -> tuple[str, ...]:
        """Drop TTL entries past expiry with no readers; the shell frees their bytes."""
        if self._next_expiry is None or now_ms < self._next_expiry:
            return ()
        gone = [
            e.artifact_id
            for e in self._entries.values()
            if e.expired(now_ms) and not e.readers and not e.holds
        ]
        self._drop(gone)
        self._next_expiry = min(
            (e.expires_at_ms for e in self._entries.values() if e.expires_at_ms is not None),
            default=None,
        )
        return tuple(gone)

    def set_capacity(self, capacity_bytes: int, now_ms: int | None = None) -> tuple[str, ...]:
        """Resize; shrinking evicts unprotected, unread entries (expired, then LRU) to fit.

        Raises FailedPreconditionError, changing nothing, when they cannot free enough.
        """
        _check_nbytes("capacity_bytes", capacity_bytes)
        need = self._used - capacity_bytes
        victims = self._pick_victims(need, now_ms, durable_only=False) if need > 0 else []
        if victims is None:
            raise FailedPreconditionError(
                f"cannot shrink local stable DRAM to {capacity_bytes} bytes: {self._used} are "
                "used and pinned, 'must' or read entries hold too much; release or delete "
                "them first"
            )
        self._drop(victims)
        self._capacity = capacity_bytes
        return tuple(victims)

    def stats(self) -> IndexStats:
        by_retention = dict.fromkeys(RETENTION_POLICIES, 0)
        for entry in self._entries.values():
            by_retention[entry.retention_policy] += entry.nbytes
        pinned = sum(e.retention_policy == "pinned" for e in self._entries.values())
        return IndexStats(self._capacity, self._used, len(self._entries), pinned, by_retention)
