"""Shards of an artifact between nodes: the plan (pure) and the serving side's open
transfers over real read-only mappings. ``serve``/``receive`` need Ray: not here."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tensorcast_ray._errors import (
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._transport.base import SegmentRef
from tensorcast_ray._transport.object_store import (
    MIN_SHARD_BYTES,
    Piece,
    ShardSource,
    full_pieces,
    plan_shards,
)
from tensorcast_ray._transport.shm import ShmTransport

MiB = 1 << 20


def assert_exact_cover(pieces: Sequence[Piece], shards: Sequence[Sequence[Piece]]) -> None:
    """Every byte of every piece, once, in order; destinations move with the sources."""
    spans = [p for shard in shards for p in shard]
    assert sum(p[2] for p in spans) == sum(p[2] for p in pieces)
    merged: list[Piece] = []  # consecutive spans of one piece joined back together
    for s, so, n, d, do in spans:
        if merged:
            ps, pso, pn, pd, pdo = merged[-1]
            if (ps, pso + pn, pd, pdo + pn) == (s, so, d, do):
                merged[-1] = (ps, pso, pn + n, pd, pdo)
                continue
        merged.append((s, so, n, d, do))
    assert merged == [p for p in pieces if p[2]]


# ---- plan_shards -------------------------------------------------------------------------


def test_small_pieces_share_a_shard() -> None:
    pieces: list[Piece] = [(0, 0, 100, 0, 0), (1, 0, 200, 1, 0), (2, 50, 300, 2, 10)]
    assert plan_shards(pieces, MiB) == [pieces]


def test_a_large_piece_is_split_and_destinations_follow() -> None:
    pieces: list[Piece] = [(3, 1000, 2 * MiB + 5, 7, 40)]
    shards = plan_shards(pieces, MiB)
    assert shards == [
        [(3, 1000, MiB, 7, 40)],
        [(3, 1000 + MiB, MiB, 7, 40 + MiB)],
        [(3, 1000 + 2 * MiB, 5, 7, 40 + 2 * MiB)],
    ]


def test_pieces_pack_across_shard_boundaries_in_order() -> None:
    pieces: list[Piece] = [(0, 0, 700_000, 0, 0), (1, 0, 700_000, 1, 0), (2, 0, 10, 2, 0)]
    shards = plan_shards(pieces, MiB)
    first = MiB - 700_000
    assert shards == [
        [(0, 0, 700_000, 0, 0), (1, 0, first, 1, 0)],
        [(1, first, 700_000 - first, 1, first), (2, 0, 10, 2, 0)],
    ]
    assert all(sum(p[2] for p in s) <= MiB for s in shards)
    assert_exact_cover(pieces, shards)


def test_an_exact_fit_closes_the_shard() -> None:
    pieces: list[Piece] = [(0, 0, MiB, 0, 0), (1, 0, MiB, 1, 0)]
    assert plan_shards(pieces, MiB) == [[pieces[0]], [pieces[1]]]


def test_the_plan_is_deterministic_and_covers_every_byte_once() -> None:
    pieces: list[Piece] = [
        (0, 0, 3 * MiB + 17, 0, 0),
        (1, 4096, 5, 1, 4096),
        (2, 0, 0, 2, 0),  # empty: nothing to send
        (3, 0, MiB - 1, 5, 3),
        (4, 8, 2 * MiB, 4, 8),
    ]
    for shard_bytes in (MiB, MiB + 3, 4 * MiB, 64 * MiB):
        shards = plan_shards(pieces, shard_bytes)
        assert shards == plan_shards(list(pieces), shard_bytes), "same pieces, same shards"
        assert all(0 < sum(p[2] for p in s) <= shard_bytes for s in shards)
        assert all(sum(p[2] for p in s) == shard_bytes for s in shards[:-1]), "full but the last"
        assert all(p[2] > 0 for s in shards for p in s)
        assert_exact_cover(pieces, shards)


def test_nothing_to_send_is_no_shard() -> None:
    assert plan_shards([], MiB) == []
    assert plan_shards([(0, 0, 0, 0, 0)], MiB) == []


@pytest.mark.parametrize("shard_bytes", [0, -1, 4096, MIN_SHARD_BYTES - 1])
def test_shards_smaller_than_a_mebibyte_are_refused(shard_bytes: int) -> None:
    with pytest.raises(InvalidArgumentError, match="shard_bytes"):
        plan_shards([(0, 0, 10, 0, 0)], shard_bytes)


def test_full_pieces_land_every_segment_in_place() -> None:
    segments: list[SegmentRef] = [("a", 10), ("empty", 0), ("c", 3 * MiB)]
    assert full_pieces(segments) == [(0, 0, 10, 0, 0), (2, 0, 3 * MiB, 2, 0)]
    assert full_pieces([]) == []
    assert plan_shards(full_pieces(segments), MiB)[0][0] == (0, 0, 10, 0, 0)


# ---- ShardSource over real mappings --------------------------------------------------------


class Recorder:
    """``map_for_read`` of a real ShmTransport that remembers what it mapped."""

    def __init__(self, shm_dir: Path) -> None:
        self._shm = ShmTransport(str(shm_dir))
        self.maps: list[mmap.mmap] = []
        self.calls: list[SegmentRef] = []

    def __call__(self, segment: SegmentRef) -> Any:
        self.calls.append(segment)
        m = self._shm.map_for_read(segment)
        self.maps.append(m)
        return m


def segment(shm_dir: Path, name: str, data: bytes) -> SegmentRef:
    (shm_dir / name).write_bytes(data)
    return (name, len(data))


@pytest.fixture
def rec(tmp_path: Path) -> Recorder:
    return Recorder(tmp_path)


def test_open_maps_every_segment_read_only(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    segs = [segment(tmp_path, "s0", b"abc"), ("", 0), segment(tmp_path, "s2", b"xyz123")]
    tid = source.open(segs)
    assert len(source) == 1 and rec.calls == [segs[0], segs[2]], "an empty segment maps nothing"
    maps = source.wait_landed(tid, 0, timeout_s=0)
    assert [bytes(m[:]) for m in maps] == [b"abc", b"", b"xyz123"]
    with pytest.raises(TypeError):
        maps[0][0] = 0  # PROT_READ
    other = source.open(segs)
    assert other != tid and len(source) == 2, "one transfer per open"


def test_a_mapping_keeps_its_bytes_after_the_file_is_gone(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    tid = source.open([segment(tmp_path, "s0", b"version-1")])
    os.unlink(tmp_path / "s0")  # deleted or evicted meanwhile
    assert bytes(source.wait_landed(tid, 0, timeout_s=0)[0][:]) == b"version-1"


def test_open_of_a_missing_segment_is_not_found(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    with pytest.raises(NotFoundError):
        source.open([segment(tmp_path, "s0", b"abc"), ("gone", 10)])
    assert len(source) == 0


def test_open_of_a_missing_segment_unmaps_the_others(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    with pytest.raises(NotFoundError):
        source.open([segment(tmp_path, "s0", b"abc"), ("gone", 10)])
    assert [m.closed for m in rec.maps] == [True]


def test_open_maps_a_missing_file_error_to_not_found(tmp_path: Path) -> None:
    """A map function that raises the OS error itself (as a plain open would)."""
    opened: list[mmap.mmap] = []

    def map_for_read(seg: SegmentRef) -> mmap.mmap:
        m = ShmTransport(str(tmp_path)).map_for_read(seg) if seg[0] != "gone" else None
        if m is None:
            raise FileNotFoundError(seg[0])
        opened.append(m)
        return m

    source = ShardSource(map_for_read)
    with pytest.raises(NotFoundError, match="deleted or evicted"):
        source.open([segment(tmp_path, "s0", b"abc"), ("gone", 10)])
    assert [m.closed for m in opened] == [True] and len(source) == 0


def test_close_unmaps_and_forgets_the_transfer(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    tid = source.open([segment(tmp_path, "s0", b"abc"), segment(tmp_path, "s1", b"de")])
    keep = source.open([segment(tmp_path, "s2", b"f")])
    source.close(tid)
    assert [m.closed for m in rec.maps] == [True, True, False] and len(source) == 1
    with pytest.raises(UnavailableError, match="not open"):
        source.wait_landed(tid, 0, timeout_s=0)
    source.close(tid)  # twice: nothing
    source.close("unknown")
    assert source.wait_landed(keep, 0, timeout_s=0)[0][:] == b"f"


def test_close_with_a_view_still_alive_does_not_raise(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    tid = source.open([segment(tmp_path, "s0", b"abcdef")])
    view = memoryview(source.wait_landed(tid, 0, timeout_s=0)[0])
    source.close(tid)  # the view keeps the mapping until it goes
    assert bytes(view[:3]) == b"abc" and len(source) == 0
    view.release()


def test_expire_closes_only_idle_transfers(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec, idle_s=10.0)
    before = time.monotonic()
    old = source.open([segment(tmp_path, "s0", b"abc")])
    between = time.monotonic()
    fresh = source.open([segment(tmp_path, "s1", b"de")])
    assert source.expire(now=before + 10.0) == 0, "idle exactly idle_s: kept"
    assert source.expire(now=before - 100) == 0
    assert source.expire(now=between + 10.0) == 1, "only the one opened before `between`"
    assert rec.maps[0].closed and not rec.maps[1].closed and len(source) == 1
    with pytest.raises(UnavailableError):
        source.wait_landed(old, 0, timeout_s=0)
    assert source.wait_landed(fresh, 0, timeout_s=0)[0][:] == b"de"
    assert source.expire(now=time.monotonic() + 11) == 1 and len(source) == 0
    assert rec.maps[1].closed


def test_use_keeps_a_transfer_from_expiring(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec, idle_s=10.0)
    tid = source.open([segment(tmp_path, "s0", b"abc")])
    used_at = time.monotonic()
    source.wait_landed(tid, 0, timeout_s=0)  # a use resets the idle clock
    assert source.expire(now=used_at + 9) == 0
    assert source.expire(now=time.monotonic() + 11) == 1 and len(source) == 0


def test_close_all_unmaps_everything(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    source.open([segment(tmp_path, "s0", b"abc")])
    source.open([segment(tmp_path, "s1", b"de"), segment(tmp_path, "s2", b"f")])
    assert len(source) == 2
    source.close_all()
    assert len(source) == 0 and all(m.closed for m in rec.maps) and len(rec.maps) == 3
    source.close_all()  # nothing left: fine


# ---- a landing transfer (a replica served onward as it arrives) ----------------------------


def test_a_landing_shard_is_served_once_it_is_in_place(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    tid = source.open([segment(tmp_path, "s0", b"abcd")], landing=2)
    with pytest.raises(UnavailableError, match="did not land"):
        source.wait_landed(tid, 0, timeout_s=0)
    source.landed(tid, 0)
    assert source.wait_landed(tid, 0, timeout_s=0)[0][:] == b"abcd"
    with pytest.raises(UnavailableError, match="shard 1 did not land"):
        source.wait_landed(tid, 1, timeout_s=0)  # shard 0 landing says nothing of shard 1
    source.landed(tid, 1)
    assert source.wait_landed(tid, 1, timeout_s=0) == source.wait_landed(tid, 0, timeout_s=0)


def test_a_failed_landing_fails_every_waiting_shard(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    tid = source.open([segment(tmp_path, "s0", b"abcd")], landing=3)
    source.landed(tid, 1, error="upstream daemon died")
    for shard in (1, 2):
        with pytest.raises(UnavailableError, match="upstream copy failed: upstream"):
            source.wait_landed(tid, shard, timeout_s=5)  # returns at once: no wait


def test_landed_for_unknown_or_plain_transfers_is_ignored(tmp_path: Path, rec: Recorder) -> None:
    source = ShardSource(rec)
    plain = source.open([segment(tmp_path, "s0", b"abcd")])
    source.landed(plain, 0)
    source.landed(plain, 0, error="ignored")
    assert source.wait_landed(plain, 0, timeout_s=0)[0][:] == b"abcd", "already in place"
    source.landed("unknown", 0)
    source.landed("unknown", 0, error="x")
    landing = source.open([segment(tmp_path, "s1", b"ef")], landing=1)
    source.landed(landing, 7)  # outside the plan: nothing
    with pytest.raises(UnavailableError, match="did not land"):
        source.wait_landed(landing, 0, timeout_s=0)


def test_wait_landed_of_a_closed_transfer_is_unavailable(rec: Recorder) -> None:
    source = ShardSource(rec)
    with pytest.raises(UnavailableError, match="not open here"):
        source.wait_landed("never-opened", 0, timeout_s=0)
