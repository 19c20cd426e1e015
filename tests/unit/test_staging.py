"""Write staging (``tensorcast_ray._staging.Stager``) without Ray or a daemon.

The daemon's ``LeaseSegments`` RPC is replaced by a function that creates real segment files
in a private temporary directory (the only stand-in here); mappings are real.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorcast_ray._errors import ResourceExhaustedError
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, daemon_pb2
from tensorcast_ray._shm import Segment, new_segment_name
from tensorcast_ray._staging import Stager
from tests.helpers import wait_for

SEGMENT = 64 * 1024
SMALL = SEGMENT // 16
PREFIX = "tcr-stagetest-"


class LeaseLog:
    """Stands in for the daemon's LeaseSegments: creates segment files and records each call."""

    def __init__(self, shm_dir: Path) -> None:
        self.shm_dir = shm_dir
        self.calls: list[int] = []
        self.small_calls: list[int] = []
        self.refuse = False
        self.lock = threading.Lock()

    def __call__(self, method: str, request: Any) -> daemon_pb2.LeaseSegmentsResponse:
        assert method == "LeaseSegments"
        with self.lock:
            self.calls.append(int(request.count))
            self.small_calls.append(int(request.small_count))
        if self.refuse:
            raise ResourceExhaustedError("pool is empty (test)")
        refs = []
        for size in [SEGMENT] * request.count + [SMALL] * request.small_count:
            seg = Segment.create(str(self.shm_dir), new_segment_name(PREFIX), size)
            refs.append(common_pb2.SegmentRef(name=seg.name, size=seg.size))
        return daemon_pb2.LeaseSegmentsResponse(segments=refs, shm_dir=str(self.shm_dir))

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


@pytest.fixture
def lease(tmp_path: Path) -> LeaseLog:
    return LeaseLog(tmp_path)


@pytest.fixture
def stager(lease: LeaseLog) -> Iterator[Stager]:
    s = Stager(lease, lambda: "session-1", count=3, segment_bytes=SEGMENT)
    try:
        yield s
    finally:
        s.close()


def write(stager: Stager, stageable: int) -> None:
    """One write that used no staged segment and could have used ``stageable``."""
    stager.take(stageable)
    stager.expect(stageable)
    stager.give_back([], done=True)


def test_stages_what_the_last_write_could_use_capped(stager: Stager, lease: LeaseLog) -> None:
    assert stager.take(2) == [] and stager.target == 0
    stager.expect(5)
    assert stager.target == 3, "capped at count (client_staging_bytes / segment size)"
    assert lease.count() == 0, "nothing is leased while the write is in flight"
    stager.give_back([], done=True)
    assert stager.wait_ready(timeout=30)
    assert lease.calls == [3] and stager.ready_bytes() == 3 * SEGMENT


def test_writes_that_fit_no_class_stage_nothing(stager: Stager, lease: LeaseLog) -> None:
    write(stager, 0)
    assert not stager.wait_ready(1, timeout=0.3)
    assert lease.count() == 0 and stager.ready_bytes() == 0


def test_small_segments_are_staged_as_their_own_class(stager: Stager, lease: LeaseLog) -> None:
    """A small put (one small pooled segment) stages a small segment, capped at
    small_count, and a later take offers it besides the whole segments asked for."""
    stager.take(0)
    stager.expect(1, small=5)
    stager.give_back([], done=True)
    assert stager.wait_ready(timeout=30)
    assert (lease.calls, lease.small_calls) == ([1], [2]), "small ones capped at SMALL_STAGED"
    assert stager.ready_bytes() == SEGMENT + 2 * SMALL
    taken = stager.take(0)
    assert sorted(st.size for st in taken) == [SMALL, SMALL], "no whole segment was asked for"
    stager.expect(1, small=1)
    stager.give_back(taken[1:])  # the write used one small segment
    stager.retire([taken[0].mapping])
    assert stager.wait_ready(timeout=30)
    assert lease.count() == 1, "one whole and one small are still ready: nothing to lease"
    assert sorted(st.size for st in stager.take(1)) == [SMALL, SEGMENT]


def test_refill_waits_until_the_write_ends(stager: Stager, lease: LeaseLog) -> None:
    """Leasing and mapping (MAP_POPULATE) during a put's copy competes with it for the CPU
    and memory bandwidth; the stager must refill only once the write is over."""
    write(stager, 3)
    assert stager.wait_ready(timeout=30)
    taken = stager.take(2)
    assert len(taken) == 2 and lease.count() == 1
    stager.expect(3)
    # A second write starts before the first ends: still no refill.
    other = stager.take(1)
    assert len(other) == 1
    stager.retire([s.mapping for s in taken])  # wakes the thread: it must keep waiting
    assert not stager.wait_ready(1, timeout=0.5), "refilled while a write was in flight"
    assert lease.count() == 1
    stager.give_back(other, done=True)  # the second write failed before using its segment
    assert stager.wait_ready(timeout=30)
    assert lease.calls == [3, 2]


def test_a_refusal_stops_refilling_until_the_next_write(stager: Stager, lease: LeaseLog) -> None:
    lease.refuse = True
    write(stager, 2)
    wait_for(lambda: lease.count() == 1, 30, "the refused lease")
    # No retry loop against a daemon that said no: the count stays at 1 ...
    assert not stager.wait_ready(1, timeout=0.2)
    assert lease.count() == 1 and stager.target == 0
    # ... until the next write asks again.
    lease.refuse = False
    write(stager, 2)
    assert stager.wait_ready(timeout=30)
    assert lease.calls == [2, 2]


def test_close_unmaps_everything(lease: LeaseLog) -> None:
    s = Stager(lease, lambda: "session-1", count=2, segment_bytes=SEGMENT)
    write(s, 2)
    assert s.wait_ready(timeout=30)
    mappings = [st.mapping for st in s._ready]
    s.close()
    assert all(m.closed for m in mappings)
    assert s.take(1) == []
