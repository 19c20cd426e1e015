"""Restart recovery: re-adopt what a previous instance of this node's daemon left.  [daemon]

Ray restarts a crashed daemon (``max_restarts=-1``) under the same prefix; its journal and
segments are still in ``shm_dir``.  One restart, step by step:

1. replay the journal (:mod:`tensorcast_ray.daemon.journal`): the artifacts and ``tc.empty``
   buffers the previous instance had published, as records;
2. re-adopt each buffer whose segment still exists, then each artifact whose segments all
   exist and whose validity slot still shows its generation, on the admission terms it was
   admitted with (:meth:`~tensorcast_ray.daemon.leases.LeaseTable.adopt_artifact`: recovery
   never evicts); sessions do not survive, so leases wait for their pid to reconnect;
3. zero the validity slots nobody re-adopted, unlink every segment under the prefix that no
   re-adopted record references (writes that never committed, staged segments, pool
   leftovers), and start the journal afresh from what was re-adopted.
"""

from __future__ import annotations

import logging
import os

from tensorcast_ray.daemon.journal import Journal
from tensorcast_ray.daemon.leases import Artifact, Buffer, LeaseTable

from tensorcast_ray._epochs import EpochTable
from tensorcast_ray._gc import OWNER_SUFFIX
from tensorcast_ray._shm import remove_segments

__all__ = ["recover", "sweep_orphans"]

logger = logging.getLogger(__name__)


def recover(
    leases: LeaseTable,
    epochs: EpochTable,
    journal: Journal | None,
    *,
    shm_dir: str,
    prefix: str,
    keep: set[str],
    now_ms: int,
) -> int:
    """Re-adopt the journal's artifacts into ``leases``; returns how many came back.

    ``keep``: the daemon's own files under ``prefix`` (validity table, journal) to spare."""
    state = journal.replay() if journal is not None else None
    for raw in (state.buffers if state else {}).values():
        buf = Buffer.from_record(raw)
        if os.path.exists(os.path.join(shm_dir, buf.segment[0])):
            leases.adopt_buffer(buf, now_ms)
    for raw in (state.artifacts if state else {}).values():
        artifact = Artifact.from_record(raw)
        present = all(os.path.exists(os.path.join(shm_dir, n)) for n, _ in artifact.segments)
        if not present or not epochs.restore(artifact.epoch_slot, artifact.generation):
            logger.warning("cannot re-adopt %s: its segments are gone", artifact.key)
            continue
        refused = leases.adopt_artifact(artifact, now_ms)
        if refused is not None:
            logger.warning("cannot re-adopt %s: %s", artifact.key, refused.reason)
            epochs.free(artifact.epoch_slot)
    epochs.release_unclaimed()
    sweep_orphans(leases, shm_dir=shm_dir, prefix=prefix, keep=keep)
    if journal is not None:
        journal.compact(
            [a.to_record() for a in leases.artifacts.values()],
            [b.to_record() for b in leases.buffers.values()],
        )
    if journal is not None and leases.artifacts:
        logger.info("re-adopted %d artifacts from %s", len(leases.artifacts), journal.path)
    return len(leases.artifacts)


def sweep_orphans(leases: LeaseTable, *, shm_dir: str, prefix: str, keep: set[str]) -> int:
    """Unlink the files under ``prefix`` that neither ``leases`` nor ``keep`` name, sparing
    the owner file (and its temporary); returns how many went."""
    owner = prefix + OWNER_SUFFIX
    spared = {*keep, owner, owner + ".tmp"}
    spared.update(name for name, _ in leases.live_segments())
    removed = remove_segments(shm_dir, prefix, spared)
    if removed:
        logger.info("removed %d orphaned segments", removed)
    return removed
