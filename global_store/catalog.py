"""The cluster's catalog: keys → versions → artifacts → replicas, a pure state machine.  [GS]

The Global Store's truth, holding metadata only (never bytes). Daemons report writes,
replicas, drops and liveness; the Global Store shell serializes calls into this object and
carries out what it answers (tell the nodes holding a deleted artifact to drop it). No I/O, no
clock: every event carries its ``now_ms``.

- A write **reserves** ``name:version`` cluster-wide (ALREADY_EXISTS when any node holds or is
  writing it), then **commits** it once its bytes are in place on the writing node: only then
  does any node resolve it. Commits are numbered in one sequence, so ``name:latest`` is the
  newest commit, the same answer on every node.
- Each committed artifact lists its **replicas**: the node that wrote it (``original``),
  copies made by :func:`tensorcast_ray.replicate` (``replica``, kept like the original) and
  copies a read pulled (``cache``, evictable on their node).
- A node that leaves takes its replicas with it; a version with no replica left is *lost*:
  a read of it is NOT_FOUND naming the node it lived on — unless it is **durable**
  (:meth:`ClusterCatalog.mark_durable`: a complete copy is on shared disk). A durable entry
  outlives its copies: with no replica left it stays, its ``replicas`` empty, and a reader
  rehydrates it from disk. Only its life ending (delete, a final drop) removes it, and the
  shell learns which durable entries went from :meth:`ClusterCatalog.take_dropped_durable`
  (to forget their journal records).
- After a restart the catalog is rebuilt from the Global Store's journal of durable
  entries (:meth:`restore`) and from the daemons' reports (:meth:`sync_node`), commit
  numbers included, so ``latest`` keeps its answer.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorcast_ray._catalog import LATEST, parse_explicit, parse_key
from tensorcast_ray._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

__all__ = ["REPLICA_KINDS", "ClusterCatalog", "Entry", "Replica"]

REPLICA_KINDS = ("original", "replica", "cache")
_MAX_LOST = 10_000  # lost versions remembered for their error message
_MAX_LOG = 4096  # commits kept for watchers (WaitLatest)


@dataclass
class Replica:
    node_id: str
    kind: str = "original"  # see REPLICA_KINDS
    tier: str = "stable_dram"

    def to_dict(self) -> dict[str, str]:
        return {"node_id": self.node_id, "kind": self.kind, "tier": self.tier}


@dataclass
class Entry:
    key: str
    artifact_id: str
    node_id: str  # the writer
    request_id: str = ""
    committed: bool = False
    seq: int = 0  # commit order (0 while reserved)
    deadline_ms: int = 0  # a reservation not committed by then is dropped
    nbytes: int = 0
    tensors: int = 0
    kind: str = "put"
    created_ms: int = 0
    replicas: dict[str, Replica] = field(default_factory=dict)
    durable: bool = False  # a complete copy is on shared disk: it outlives its replicas
    persist_task_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "artifact_id": self.artifact_id,
            "node_id": self.node_id,
            "seq": self.seq,
            "nbytes": self.nbytes,
            "tensors": self.tensors,
            "kind": self.kind,
            "created_unix_ms": self.created_ms,
            "replicas": [r.to_dict() for r in self.replicas.values()],
            "durable": self.durable,
            "persist_task_id": self.persist_task_id,
        }

    def to_record(self) -> dict[str, Any]:
        """What the journal keeps of a durable entry (what :meth:`ClusterCatalog.restore`
        reads back)."""
        return {
            "key": self.key,
            "artifact_id": self.artifact_id,
            "node_id": self.node_id,
            "seq": self.seq,
            "nbytes": self.nbytes,
            "tensors": self.tensors,
            "kind": self.kind,
            "created_ms": self.created_ms,
            "persist_task_id": self.persist_task_id,
        }


class ClusterCatalog:
    """Not thread-safe: the Global Store holds one lock around every call."""

    def __init__(self) -> None:
        self._names: dict[str, dict[str, Entry]] = {}
        self._by_artifact: dict[str, Entry] = {}
        self._seq = 0
        self._lost: OrderedDict[str, str] = OrderedDict()  # key -> the node it was lost with
        self._durable = 0  # durable committed entries held
        self._dropped_durable: list[str] = []  # artifact ids; drained by take_dropped_durable
        # The last commits, (seq, name), for watchers (WaitLatest): a watcher that asks for
        # the names committed after a seq older than the log's floor must look again itself.
        self._log: deque[tuple[int, str]] = deque()
        self._log_floor = 0

    # ---- writes ------------------------------------------------------------------------
    def reserve(
        self,
        key: str,
        artifact_id: str,
        node_id: str,
        *,
        request_id: str = "",
        deadline_ms: int,
        now_ms: int,
    ) -> Entry | None:
        """Reserve ``key`` for a write on ``node_id``. Returns the committed entry when this is
        a retry (same ``request_id``) of a write that already committed, else None."""
        name, version = parse_key(key, for_write=True)
        _check_id("artifact_id", artifact_id)
        _check_id("node_id", node_id)
        existing = self._names.get(name, {}).get(version)
        if existing is not None and not existing.committed and existing.deadline_ms <= now_ms:
            self._drop(existing)  # an abandoned reservation (its writer died or hung)
            existing = None
        if existing is not None:
            if request_id and existing.request_id == request_id and existing.node_id == node_id:
                if existing.committed:
                    return existing
                self._drop(existing)  # a retry of a write whose first attempt never committed
            else:
                state = "is being written" if not existing.committed else "already exists"
                where = _node_short(existing.node_id)
                raise AlreadyExistsError(
                    f"{key} {state} (on node {where}); versions are immutable cluster-wide — "
                    f"write a new version (e.g. '{name}:<next>') or delete {key} first"
                )
        entry = Entry(
            key=f"{name}:{version}",
            artifact_id=artifact_id,
            node_id=node_id,
            request_id=request_id,
            deadline_ms=deadline_ms,
        )
        self._names.setdefault(name, {})[version] = entry
        self._by_artifact[artifact_id] = entry
        self._lost.pop(entry.key, None)
        return None

    def commit(
        self,
        key: str,
        artifact_id: str,
        node_id: str,
        *,
        nbytes: int,
        tensors: int,
        kind: str,
        created_ms: int,
        persist_task_id: str = "",
    ) -> Entry:
        """Publish a reserved version cluster-wide; its bytes are on ``node_id``.
        ``persist_task_id``: the persistence task writing its disk copy, if any."""
        entry = self._by_artifact.get(artifact_id)
        if entry is None or entry.key != key or entry.node_id != node_id:
            raise FailedPreconditionError(
                f"{key} was not reserved by node {_node_short(node_id)} (the reservation "
                "expired, was deleted, or the Global Store restarted); write it again"
            )
        if not entry.committed:
            self._seq += 1
            entry.committed, entry.seq = True, self._seq
            self._log_commit(self._seq, key)
            entry.nbytes, entry.tensors, entry.kind, entry.created_ms = (
                nbytes,
                tensors,
                kind,
                created_ms,
            )
            entry.replicas[node_id] = Replica(node_id, "original")
        if persist_task_id and not entry.persist_task_id:
            entry.persist_task_id = persist_task_id
        return entry

    def _log_commit(self, seq: int, key: str) -> None:
        if len(self._log) >= _MAX_LOG:
            self._log_floor = self._log.popleft()[0]
        self._log.append((seq, parse_key(key)[0]))

    @property
    def seq(self) -> int:
        """The number of the last commit (0: none yet)."""
        return self._seq

    def committed_since(self, after_seq: int) -> set[str] | None:
        """The names with a version committed after ``after_seq``; None when the log no
        longer reaches back that far (the caller then resolves what it watches itself)."""
        if after_seq < self._log_floor:
            return None
        names: set[str] = set()
        for seq, name in reversed(self._log):  # newest first: stop at the first one seen
            if seq <= after_seq:
                break
            names.add(name)
        return names

    def mark_durable(self, artifact_id: str) -> Entry:
        """A complete copy of ``artifact_id`` is on shared disk: it stays in the catalog
        when its last replica goes. NOT_FOUND when it is unknown or not committed (deleted
        meanwhile: the caller then removes its files)."""
        entry = self.by_artifact(artifact_id)
        if not entry.durable:
            entry.durable = True
            self._durable += 1
        return entry

    def restore(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Replay the journal at start: each record (see :meth:`Entry.to_record`) becomes a
        committed durable entry with no replica (its daemons' reports add those). A record
        whose key another artifact holds, or that is malformed, is skipped; the same artifact
        already known is marked durable. Returns the artifact ids skipped."""
        skipped: list[str] = []
        for raw in records:
            try:
                artifact_id = raw["artifact_id"]
                name, version = parse_key(raw["key"], for_write=True)
                _check_id("artifact_id", artifact_id)
                seq = int(raw.get("seq", 0))
                entry = Entry(
                    key=f"{name}:{version}",
                    artifact_id=artifact_id,
                    node_id=str(raw.get("node_id", "")),
                    committed=True,
                    seq=seq,
                    nbytes=int(raw.get("nbytes", 0)),
                    tensors=int(raw.get("tensors", 0)),
                    kind=str(raw.get("kind", "put")),
                    created_ms=int(raw.get("created_ms", 0)),
                    durable=True,
                    persist_task_id=str(raw.get("persist_task_id", "")),
                )
            except (KeyError, TypeError, ValueError, AttributeError, InvalidArgumentError):
                skipped.append(str(raw.get("artifact_id", "")) if isinstance(raw, Mapping) else "")
                continue
            known = self._by_artifact.get(artifact_id)
            if known is not None:
                if known.committed and known.key == entry.key:
                    self.mark_durable(artifact_id)
                    if not known.persist_task_id:
                        known.persist_task_id = entry.persist_task_id
                else:
                    skipped.append(artifact_id)
                continue
            versions = self._names.setdefault(name, {})
            if version in versions:  # another artifact holds the key
                skipped.append(artifact_id)
                continue
            versions[version] = entry
            self._by_artifact[artifact_id] = entry
            self._durable += 1
            self._seq = max(self._seq, seq)
            self._lost.pop(entry.key, None)
        return skipped

    def take_dropped_durable(self) -> list[str]:
        """The durable artifacts that left the catalog since the last call (deleted, or
        their life ended): the shell forgets their journal records."""
        out, self._dropped_durable = self._dropped_durable, []
        return out

    def durable_count(self) -> int:
        return self._durable

    def abort(self, key: str, artifact_id: str) -> None:
        """Drop a reservation that will never commit (no-op for anything else)."""
        entry = self._by_artifact.get(artifact_id)
        if entry is not None and entry.key == key and not entry.committed:
            self._drop(entry)

    # ---- reads -------------------------------------------------------------------------
    def resolve(self, key: str) -> Entry:
        """The committed entry of ``key`` (``latest`` allowed)."""
        name, version = parse_key(key)
        versions = self._names.get(name, {})
        if version == LATEST:
            committed = [e for e in versions.values() if e.committed]
            if not committed:
                lost = [k for k in self._lost if parse_key(k)[0] == name]
                hint = f" ({len(lost)} version(s) were lost with their node)" if lost else ""
                raise NotFoundError(
                    f"no version of {name!r} exists in the cluster{hint}; write one with "
                    "put/register"
                )
            return max(committed, key=lambda e: e.seq)
        entry = versions.get(version)
        if entry is None or not entry.committed:
            lost_on = self._lost.get(f"{name}:{version}")
            if lost_on is not None:
                raise NotFoundError(
                    f"{name}:{version} was lost: it lived only on node {lost_on}, which left "
                    "the cluster or whose daemon stopped; write it again, with a durable "
                    "policy (e.g. StorePolicy(profile='durable')) to keep a disk copy"
                )
            raise NotFoundError(f"{name}:{version} does not exist (never written, or deleted)")
        return entry

    def by_artifact(self, artifact_id: str) -> Entry:
        entry = self._by_artifact.get(artifact_id)
        if entry is None or not entry.committed:
            raise NotFoundError(f"artifact {artifact_id} does not exist in the cluster")
        return entry

    def exists(self, key: str) -> bool:
        try:
            self.resolve(key)
        except NotFoundError:
            return False
        return True

    def entries(self, prefix: str = "") -> list[Entry]:
        return sorted(
            (
                e
                for versions in self._names.values()
                for e in versions.values()
                if e.committed and e.key.startswith(prefix)
            ),
            key=lambda e: e.key,
        )

    def list_keys(self, prefix: str = "") -> list[str]:
        return [e.key for e in self.entries(prefix)]

    # ---- replicas ----------------------------------------------------------------------
    def add_replica(self, artifact_id: str, node_id: str, kind: str) -> Entry:
        if kind not in REPLICA_KINDS:
            raise InvalidArgumentError(f"replica kind {kind!r}; expected one of {REPLICA_KINDS}")
        entry = self.by_artifact(artifact_id)
        current = entry.replicas.get(node_id)
        # A cache copy asked to be kept becomes a replica; a replica never drops to cache.
        if current is None or REPLICA_KINDS.index(kind) < REPLICA_KINDS.index(current.kind):
            entry.replicas[node_id] = Replica(node_id, kind)
        return entry

    def drop_replica(self, artifact_id: str, node_id: str, *, final: bool) -> list[str]:
        """``node_id`` no longer holds ``artifact_id``. ``final``: the artifact's life ended
        there (a register lease ended, its TTL passed), so the key goes cluster-wide. Returns
        the other nodes that must drop their copies (empty unless ``final``). A durable
        entry outlives its last copy unless ``final``."""
        entry = self._by_artifact.get(artifact_id)
        if entry is None:
            return []
        if final:
            self._drop(entry)
            return [n for n in entry.replicas if n != node_id]
        entry.replicas.pop(node_id, None)
        if entry.committed and not entry.replicas and not entry.durable:
            self._drop(entry)  # its last copy was evicted: the version is gone
        return []

    def delete(self, key: str) -> Entry:
        """Delete one committed version; returns it (its replicas name the nodes to tell)."""
        parse_explicit(key, "delete")
        entry = self.resolve(key)
        self._drop(entry)
        return entry

    # ---- nodes -------------------------------------------------------------------------
    def drop_node(self, node_id: str) -> list[str]:
        """``node_id`` left the cluster: forget its replicas and reservations. Returns the keys
        that are lost (no copy anywhere else, and none on disk)."""
        lost = []
        for entry in list(self._by_artifact.values()):
            if not entry.committed:
                if entry.node_id == node_id:
                    self._drop(entry)
                continue
            gone = entry.replicas.pop(node_id, None) is not None
            if gone and not entry.replicas and not entry.durable:
                self._drop(entry)
                lost.append(entry.key)
                self._lost[entry.key] = node_id
                while len(self._lost) > _MAX_LOST:
                    self._lost.popitem(last=False)
        return lost

    def sync_node(self, node_id: str, reports: Iterable[Mapping[str, Any]]) -> list[str]:
        """A daemon's full report of what it holds (after it or the Global Store restarted):
        its replicas become exactly the reported set. A reported original the catalog does
        not know is re-created with its commit number, so ``latest`` keeps its answer.
        Returns the artifact ids it reported that the catalog refused (a different artifact
        holds that key): the daemon should drop them."""
        reported: set[str] = set()
        refused: list[str] = []
        for raw in reports:
            artifact_id, key = str(raw["artifact_id"]), str(raw["key"])
            kind = str(raw.get("replica_kind", "original"))
            entry = self._by_artifact.get(artifact_id)
            if entry is None:
                name, version = parse_key(key)
                other = self._names.get(name, {}).get(version)
                if other is not None and _stale_record(other, int(raw.get("seq", 0))):
                    self._drop(other)  # a journal record of a version deleted since
                    other = None
                if other is not None:
                    refused.append(artifact_id)
                    continue
                seq = int(raw.get("seq", 0)) or self._seq + 1
                entry = Entry(
                    key=key,
                    artifact_id=artifact_id,
                    node_id=str(raw.get("writer", node_id)) or node_id,
                    committed=True,
                    seq=seq,
                    nbytes=int(raw.get("nbytes", 0)),
                    tensors=int(raw.get("tensors", 0)),
                    kind=str(raw.get("kind", "put")),
                    created_ms=int(raw.get("created_ms", 0)),
                )
                self._seq = max(self._seq, seq)
                self._names.setdefault(name, {})[version] = entry
                self._by_artifact[artifact_id] = entry
                self._lost.pop(key, None)
            if not entry.committed:
                continue  # being written again under this id: its commit will say so
            reported.add(artifact_id)
            entry.replicas[node_id] = Replica(node_id, kind)  # the node's own word wins
            if raw.get("durable") and not entry.durable:  # it outlives every copy now
                entry.persist_task_id = entry.persist_task_id or str(raw.get("persist_task_id", ""))
                self.mark_durable(artifact_id)
        for entry in list(self._by_artifact.values()):
            if entry.artifact_id not in reported and node_id in entry.replicas:
                entry.replicas.pop(node_id)
                if not entry.replicas and not entry.durable:
                    self._drop(entry)
        return refused

    def nodes(self) -> set[str]:
        return {n for e in self._by_artifact.values() for n in e.replicas}

    # ---- internals ----------------------------------------------------------------------
    def _drop(self, entry: Entry) -> None:
        name, version = parse_key(entry.key)
        versions = self._names.get(name, {})
        if versions.get(version) is entry:
            del versions[version]
        if not versions:
            self._names.pop(name, None)
        if self._by_artifact.get(entry.artifact_id) is entry:
            del self._by_artifact[entry.artifact_id]
            if entry.durable:
                self._durable -= 1
                self._dropped_durable.append(entry.artifact_id)

    def __len__(self) -> int:
        return sum(1 for e in self._by_artifact.values() if e.committed)

    def names(self) -> int:
        return len(self._names)


def _stale_record(entry: Entry, reported_seq: int) -> bool:
    """A journal-restored entry (durable, no copy anywhere) that a daemon's newer artifact
    of the same key contradicts: its forget was lost (the Global Store died first), so the
    later commit wins."""
    return entry.durable and not entry.replicas and reported_seq > entry.seq


def _check_id(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{what} must be a non-empty str, got {value!r}")


def _node_short(node_id: str) -> str:
    return node_id[:12]
