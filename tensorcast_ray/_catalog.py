"""Keys → versions → artifacts: a pure state machine.  [daemon, Global Store]

A key is ``name:version``. A version, once written, is immutable until deleted;
``name:latest`` resolves to the newest version written (commit order, not lexical order).
Writes reserve a version first and commit it once the bytes are in place, so a reader never
resolves a version whose bytes are still arriving and two writers never race on one version.
No I/O and no locks: the shell that owns the catalog serializes calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorcast_ray._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

__all__ = ["LATEST", "MAX_KEY_LENGTH", "Catalog", "parse_explicit", "parse_key"]

LATEST = "latest"
MAX_KEY_LENGTH = 1024


def parse_key(key: object, *, for_write: bool = False) -> tuple[str, str]:
    """Split ``name:version`` (the last ``:`` separates them) and validate both parts."""
    if not isinstance(key, str):
        raise InvalidArgumentError(f"a key is a str 'name:version', not {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgumentError(f"key is {len(key)} characters; the limit is {MAX_KEY_LENGTH}")
    name, sep, version = key.rpartition(":")
    if not sep or not name or not version:
        raise InvalidArgumentError(
            f"key {key!r} must be 'name:version' (e.g. 'llama:v1'; 'llama:latest' reads the newest)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidArgumentError(f"key {key!r} contains control characters")
    if for_write and version.lower() == LATEST:
        raise InvalidArgumentError(
            f"key {key!r}: 'latest' (in any case) names the newest version when reading and "
            "cannot be written; write an explicit version such as 'v2'"
        )
    if for_write and (name != name.strip() or version != version.strip()):
        raise InvalidArgumentError(
            f"key {key!r} has spaces around its name or version; write it without them"
        )
    return name, version


def parse_explicit(key: str, verb: str) -> tuple[str, str]:
    """``parse_key`` for a verb that must name one version (not ``latest``)."""
    name, version = parse_key(key)
    if version == LATEST:
        raise InvalidArgumentError(
            f"{verb} takes an explicit version, not {key!r}: resolve it first "
            "(e.g. tc.artifact(key).key) so you act on what you mean"
        )
    return name, version


#: landed copies rank below every local commit (whose numbers start at 1)
_LANDED_BASE = 1 << 62


@dataclass
class _Version:
    artifact_id: str
    seq: int
    committed: bool


class Catalog:
    def __init__(self) -> None:
        self._names: dict[str, dict[str, _Version]] = {}
        self._by_artifact: dict[str, str] = {}
        self._seq = 0

    def reserve(self, key: str, artifact_id: str) -> None:
        name, version = parse_key(key, for_write=True)
        existing = self._names.get(name, {}).get(version)
        if existing is not None:
            state = "is being written" if not existing.committed else "already exists"
            raise AlreadyExistsError(
                f"{key} {state}; versions are immutable — write a new version (e.g. "
                f"'{name}:<next>') or delete {key} first"
            )
        self._seq += 1
        self._names.setdefault(name, {})[version] = _Version(artifact_id, self._seq, False)
        self._by_artifact[artifact_id] = key

    def commit(self, key: str, *, landed_ms: int | None = None) -> None:
        """Publish a reserved version. ``landed_ms``: it is a copy of a version written
        elsewhere (another node, or read back from shared disk), created then: it ranks for
        ``latest`` below every version written here, and among copies by creation time, so
        landing an old version never makes it the newest."""
        name, version = parse_key(key, for_write=True)
        entry = self._names.get(name, {}).get(version)
        if entry is None:
            raise FailedPreconditionError(f"{key} was not reserved before commit")
        if landed_ms is not None:
            entry.seq, entry.committed = landed_ms - _LANDED_BASE, True
            return
        self._seq += 1
        entry.seq, entry.committed = self._seq, True

    def abort(self, key: str) -> None:
        """Drop a reservation that never committed."""
        name, version = parse_key(key, for_write=True)
        entry = self._names.get(name, {}).get(version)
        if entry is not None and not entry.committed:
            self._drop(name, version)

    def resolve(self, key: str) -> tuple[str, str]:
        """``(concrete key, artifact id)`` of a committed version; ``latest`` allowed."""
        name, version = parse_key(key)
        versions = self._names.get(name, {})
        if version == LATEST:
            committed = [(v.seq, ver) for ver, v in versions.items() if v.committed]
            if not committed:
                raise NotFoundError(f"no version of {name!r} exists; write one with put/register")
            version = max(committed)[1]
        entry = versions.get(version)
        if entry is None or not entry.committed:
            raise NotFoundError(f"{name}:{version} does not exist (never written, or deleted)")
        return f"{name}:{version}", entry.artifact_id

    def exists(self, key: str) -> bool:
        try:
            self.resolve(key)
        except NotFoundError:
            return False
        return True

    def key_of(self, artifact_id: str) -> str | None:
        return self._by_artifact.get(artifact_id)

    def remove_key(self, key: str) -> str:
        """Delete one committed version; returns its artifact id."""
        name, version = parse_explicit(key, "delete")
        _, artifact_id = self.resolve(key)
        self._drop(name, version)
        return artifact_id

    def remove_artifact(self, artifact_id: str) -> str | None:
        """Forget whatever key points at ``artifact_id`` (eviction, lease end)."""
        key = self._by_artifact.get(artifact_id)
        if key is not None:
            name, version = parse_key(key)
            self._drop(name, version)
        return key

    def _drop(self, name: str, version: str) -> None:
        versions = self._names.get(name, {})
        entry = versions.pop(version, None)
        if entry is not None:
            self._by_artifact.pop(entry.artifact_id, None)
        if not versions:
            self._names.pop(name, None)

    def list_keys(self, prefix: str = "") -> list[str]:
        return sorted(
            f"{name}:{ver}"
            for name, versions in self._names.items()
            for ver, v in versions.items()
            if v.committed and f"{name}:{ver}".startswith(prefix)
        )

    def __len__(self) -> int:
        return sum(1 for v in self._by_artifact if self._is_committed(v))

    def _is_committed(self, artifact_id: str) -> bool:
        key = self._by_artifact[artifact_id]
        name, version = parse_key(key)
        return self._names[name][version].committed

    def names(self) -> int:
        return len(self._names)
