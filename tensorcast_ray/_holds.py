"""Reader holds on versions: the pure table behind ``HoldVersion``.  [daemon and Global Store]

A subscriber copying a version holds it, so a publisher's garbage collection
(``Delete(unless_held)``) passes it by until the copy is done. A hold names its owner (the
reading session) and ends at its release, when its owner ends, or at its deadline: a reader
that crashed never pins a version for ever. The daemon keeps one table for a lone node; in a
cluster the Global Store keeps it, so a hold on any node protects the version everywhere.
No I/O, no clock of its own: callers pass ``now`` (seconds, monotonic).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from tensorcast_ray._errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["MAX_HOLD_TTL_S", "HoldTable"]

#: the longest a hold may last (a day): a reader copying longer than this renews it
MAX_HOLD_TTL_S = 86_400.0


@dataclass
class _Hold:
    artifact_id: str
    owner: str
    deadline: float


class HoldTable:
    def __init__(self, max_holds: int = 100_000) -> None:
        self._holds: dict[str, _Hold] = {}
        self._max = max_holds

    def take(self, artifact_id: str, owner: str, ttl_s: float, now: float) -> str:
        """A new hold on ``artifact_id``; returns its id."""
        if not (0 < ttl_s <= MAX_HOLD_TTL_S):
            raise InvalidArgumentError(
                f"a hold's ttl_s must be in (0, {MAX_HOLD_TTL_S:.0f}] seconds, got {ttl_s!r}"
            )
        self.expire(now)
        if len(self._holds) >= self._max:
            raise ResourceExhaustedError(
                f"{len(self._holds)} reader holds are open (the limit); release finished "
                "reads (Subscriber.pull and weights.reading release theirs)"
            )
        hold_id = "hold-" + uuid.uuid4().hex
        self._holds[hold_id] = _Hold(artifact_id, owner, now + ttl_s)
        return hold_id

    def release(self, hold_id: str) -> bool:
        """End one hold; False when it had ended already."""
        return self._holds.pop(hold_id, None) is not None

    def release_owner(self, owner: str) -> int:
        """End every hold of ``owner`` (its session ended); returns how many."""
        gone = [h for h, hold in self._holds.items() if hold.owner == owner]
        for h in gone:
            del self._holds[h]
        return len(gone)

    def release_prefix(self, prefix: str) -> int:
        """End the holds of every owner starting with ``prefix`` (a node that left)."""
        gone = [h for h, hold in self._holds.items() if hold.owner.startswith(prefix)]
        for h in gone:
            del self._holds[h]
        return len(gone)

    def count(self, artifact_id: str, now: float) -> int:
        """Open holds on ``artifact_id`` (ended ones are dropped first)."""
        self.expire(now)
        return sum(1 for hold in self._holds.values() if hold.artifact_id == artifact_id)

    def expire(self, now: float) -> int:
        gone = [h for h, hold in self._holds.items() if hold.deadline <= now]
        for h in gone:
            del self._holds[h]
        return len(gone)

    def __len__(self) -> int:
        return len(self._holds)
