"""Write staging: segments mapped in the writer before its next put.  [SDK]

Why: copying into shared memory is only as fast as a warm memcpy when the destination's
pages exist *and* this process's page tables already map them. The daemon's pool takes care
of the first (it writes every page of a pooled segment in the background); this stager takes
care of the second. After each put, once no write of this process is in flight, it leases
from its daemon (``LeaseSegments``) as many pooled segments as that put could have used
(``BeginWriteResponse.stageable``, the daemon's rule; at most ``staging_bytes`` in all) and
maps them with MAP_POPULATE in a background thread. The next put offers them in
``BeginWrite``; the daemon places the artifact in them, so the copy faults no page. Segments
come in two size classes, the daemon's pool's: whole ``shm_segment_bytes`` ones and small ones
(``BeginWriteResponse.stageable_small``, a sixteenth of that), so a put of 16 MiB is as warm
as one of 1 GiB; a process whose puts fit neither class stages nothing. Leased segments
belong to this process's session: if it exits, the daemon frees them.

Walk-through: [SDK] put #1 of 1 GiB → no staged segments, copy faults pages (slow path) →
BeginWrite says 4 segments were stageable → the write ends → stager wakes → [daemon]
LeaseSegments hands 4 pooled segments → [SDK] maps them (≈25 ms per 256 MiB, off the hot
path) → put #2 → BeginWrite(staged=[…]) → copy at memcpy speed.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tensorcast_ray._errors import ArtifactError
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

logger = logging.getLogger(__name__)

#: small segments a writer keeps staged at most (a put places at most one or two of them).
SMALL_STAGED = 2


@dataclass
class Staged:
    name: str
    size: int
    mapping: mmap.mmap


class Stager:
    """[SDK] Keeps leased, mapped segments ready for this process's next put: as many of each
    size class as its last put could use (:meth:`expect`), never more than ``count`` whole
    segments (of ``segment_bytes``; any other size is a small one) and ``small_count`` small."""

    def __init__(
        self,
        call: Callable[[str, Any], Any],
        session_hint: Callable[[], str],
        count: int,
        *,
        segment_bytes: int,
        small_count: int = SMALL_STAGED,
    ) -> None:
        self._call = call
        self._session_hint = session_hint
        self._count = count
        self._small_count = small_count
        self._segment_bytes = segment_bytes
        self._ready: list[Staged] = []
        self._to_close: list[mmap.mmap] = []
        self._cond = threading.Condition()
        self._closed = False
        self._target = 0  # whole segments to keep ready: what the last write could use
        self._target_small = 0  # and small ones
        # Writes between take() and their retire()/give_back(done=True): refilling waits for
        # them, since leasing and MAP_POPULATE would compete with their copy.
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name="tc-staging", daemon=True)
        self._thread.start()

    def take(self, n: int) -> list[Staged]:
        """Up to ``n`` ready whole segments and every ready small one (possibly none) for a
        write starting now: the daemon uses those its layout fits, the rest are given back.
        The write must end with :meth:`retire` or ``give_back(..., done=True)``; refilling
        waits until then."""
        with self._cond:
            self._in_flight += 1
            taken: list[Staged] = []
            kept: list[Staged] = []
            for st in self._ready:
                whole = st.size == self._segment_bytes
                (taken if not whole or n > 0 else kept).append(st)
                n -= whole
            self._ready = kept
        return taken

    @property
    def target(self) -> int:
        """How many segments the stager keeps ready now."""
        with self._cond:
            return self._target

    def expect(self, stageable: int, small: int = 0) -> None:
        """The write in flight could use ``stageable`` whole and ``small`` small staged
        segments: keep that many ready for the next one (capped at ``count`` and
        ``small_count``). Refilling starts when no write is in flight."""
        with self._cond:
            self._target = max(0, min(int(stageable), self._count))
            self._target_small = max(0, min(int(small), self._small_count))

    def give_back(self, staged: list[Staged], *, done: bool = False) -> None:
        """Segments a write offered but did not use (still leased to this session); ``done``
        when the write ends here (it failed before using any)."""
        with self._cond:
            self._ready = staged + self._ready
            if done:
                self._in_flight -= 1
            self._cond.notify_all()

    def retire(self, mappings: list[mmap.mmap]) -> None:
        """The write is over: its mappings are unmapped by the background thread, off the hot
        path, and refilling may start."""
        with self._cond:
            self._to_close.extend(mappings)
            self._in_flight -= 1
            self._cond.notify_all()

    def ready_bytes(self) -> int:
        with self._cond:
            return sum(s.size for s in self._ready)

    def wait_ready(self, count: int | None = None, *, timeout: float) -> bool:
        """Wait until ``count`` segments (default: as many of each class as the targets) are
        ready or the stager closes; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    self._closed
                    or (not any(self._missing()) if count is None else len(self._ready) >= count)
                ),
                timeout,
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._closed
                        or self._to_close
                        or (self._in_flight == 0 and any(self._missing()))
                    )
                )
                if self._closed:
                    return
                to_close, self._to_close = self._to_close, []
                # Never while a write is in flight: leasing and MAP_POPULATE would compete
                # with its copy for the CPU and memory bandwidth (measured: 2-3x slower puts).
                missing = self._missing() if self._in_flight == 0 else (0, 0)
                held = [s.name for s in self._ready]
            for m in to_close:
                _close(m)
            if any(missing) and not self._refill(*missing, held):
                with self._cond:  # the daemon refused or failed: wait for the next put
                    self._target = self._target_small = 0

    def _missing(self) -> tuple[int, int]:
        """(whole, small) segments short of the targets (caller holds the lock)."""
        whole = sum(1 for s in self._ready if s.size == self._segment_bytes)
        small = len(self._ready) - whole
        return max(0, self._target - whole), max(0, self._target_small - small)

    def _refill(self, missing: int, missing_small: int, held: list[str]) -> bool:
        """Lease ``missing`` more whole and ``missing_small`` small segments. ``held`` tells
        the daemon which of this session's staged segments we still have, so it frees any we
        lost (a lost reply, a failed map)."""
        staged: list[Staged] = []
        try:
            request = daemon_pb2.LeaseSegmentsRequest(
                session_id=self._session_hint(),
                count=missing,
                small_count=missing_small,
                held=held,
            )
            response = self._call("LeaseSegments", request)
            for s in response.segments:
                from tensorcast_ray._transport.shm import ShmTransport

                # The whole segment is about to be written: fill its page table now.
                mapping = ShmTransport(response.shm_dir).map_for_write(
                    (s.name, s.size), prefault=True
                )
                staged.append(Staged(s.name, s.size, mapping))
        except ArtifactError as exc:
            logger.info("write staging unavailable: %s", exc)
            for s in staged:
                _close(s.mapping)
            return False
        with self._cond:
            if self._closed:
                for s in staged:
                    _close(s.mapping)
                return False
            self._ready.extend(staged)
            self._cond.notify_all()
        return bool(staged)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            ready, self._ready = self._ready, []
            to_close, self._to_close = self._to_close, []
            self._cond.notify_all()
        self._thread.join(timeout=10)
        for m in [s.mapping for s in ready] + to_close:
            _close(m)


def _close(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:
        logger.debug("a staged mapping is still exported; it unmaps when released")
