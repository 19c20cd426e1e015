"""Daemon-owned shared-memory segments and the warm pool (no Ray)."""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
from collections.abc import Iterator

import pytest

from tensorcast_ray import _shm
from tensorcast_ray._errors import (
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tensorcast_ray._shm import (
    Segment,
    SegmentPool,
    list_segments,
    map_segment,
    new_segment_name,
    remove_segments,
    segment_prefix,
)
from tests.helpers import wait_for

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
pytestmark = pytest.mark.skipif(SHM is None, reason="needs a tmpfs at /dev/shm")
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def prefix() -> Iterator[str]:
    """A prefix private to this test; no segment under it may outlive the test."""
    p = f"tcr-test-{uuid.uuid4().hex[:12]}-"
    yield p
    left = list_segments(SHM or "", p)
    remove_segments(SHM or "", p, set())
    assert left == [], f"test leaked segments: {left}"


def test_segment_prefix_is_stable_and_findable() -> None:
    p = segment_prefix("my namespace/with:odd chars", "0123456789abcdef0123")
    assert p.startswith("tcr-") and p.endswith("-0123456789ab-")
    assert len(p.split("-")[1]) == 8
    assert p == segment_prefix("my namespace/with:odd chars", "0123456789abcdef0123")
    assert p != segment_prefix("other", "0123456789abcdef0123")
    assert new_segment_name(p).startswith(p)
    assert new_segment_name(p) != new_segment_name(p)
    for ns, node in (("", "ab"), ("ns", ""), ("ns", "../x")):
        with pytest.raises(InvalidArgumentError):
            segment_prefix(ns, node)


def test_create_adopt_unlink(prefix: str) -> None:
    name = new_segment_name(prefix)
    seg = Segment.create(SHM or "", name, 64 * KiB)
    st = os.stat(seg.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == seg.size == 64 * KiB
    assert st.st_blocks * 512 >= 64 * KiB  # prefaulted: tmpfs pages exist already
    assert list_segments(SHM or "", prefix) == [name]
    adopted = Segment.adopt(SHM or "", name)
    assert adopted == seg
    with pytest.raises(AlreadyExistsError):
        Segment.create(SHM or "", name, 4 * KiB)
    seg.unlink()
    seg.unlink()  # idempotent
    assert not os.path.exists(seg.path)
    with pytest.raises(NotFoundError, match="deleted or the node daemon restarted"):
        Segment.adopt(SHM or "", name)


def test_create_without_prefault_is_sparse(prefix: str) -> None:
    seg = Segment.create(SHM or "", new_segment_name(prefix), 1024 * KiB, prefault=False)
    try:
        assert os.stat(seg.path).st_blocks == 0
    finally:
        seg.unlink()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "with space"])
def test_create_rejects_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        Segment.create(SHM or "", name, 4096)


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_create_rejects_bad_sizes(prefix: str, size: object) -> None:
    with pytest.raises(InvalidArgumentError):
        Segment.create(SHM or "", new_segment_name(prefix), size)  # type: ignore[arg-type]


def test_missing_shm_dir_is_a_precondition(prefix: str) -> None:
    with pytest.raises(FailedPreconditionError, match="does not exist"):
        Segment.create("/nonexistent-tcr-dir", new_segment_name(prefix), 4096)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.ENOMEM])
def test_full_tmpfs_is_resource_exhausted_and_cleans_up(
    prefix: str, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ResourceExhaustedError) as info:
        Segment.create(SHM or "", new_segment_name(prefix), 8 * KiB)
    assert "is full" in info.value.message and "--shm-size" in info.value.message
    assert not info.value.retryable
    assert list_segments(SHM or "", prefix) == []  # the half-made file is gone


def test_map_writable_then_read_only(prefix: str) -> None:
    seg = Segment.create(SHM or "", new_segment_name(prefix), 8 * KiB)
    try:
        w = map_segment(SHM or "", seg.name, seg.size, writable=True)
        w[100:105] = b"hello"
        r = map_segment(SHM or "", seg.name, seg.size, writable=False)
        assert r[100:105] == b"hello"
        w[100:105] = b"HELLO"
        assert r[100:105] == b"HELLO"  # MAP_SHARED: both see the same bytes
        with pytest.raises(TypeError):
            r[0] = 1
        with pytest.raises(TypeError):
            r.write(b"x")
        assert memoryview(r).readonly
        lazy = map_segment(SHM or "", seg.name, 4096, writable=False, populate=False)
        assert lazy[0:1] == b"\x00" and len(lazy) == 4096
        for m in (w, r, lazy):
            m.close()
    finally:
        seg.unlink()


def test_mapping_outlives_unlink(prefix: str) -> None:
    seg = Segment.create(SHM or "", new_segment_name(prefix), 4096)
    m = map_segment(SHM or "", seg.name, 4096, writable=True)
    m[:3] = b"abc"
    seg.unlink()
    assert m[:3] == b"abc"  # readers keep their bytes after a delete
    m.close()
    with pytest.raises(NotFoundError, match="deleted or the node daemon restarted"):
        map_segment(SHM or "", seg.name, 4096, writable=False)


def test_map_rejects_size_past_end_of_file(prefix: str) -> None:
    seg = Segment.create(SHM or "", new_segment_name(prefix), 4096)
    try:
        with pytest.raises(DataLossError, match="truncated"):
            map_segment(SHM or "", seg.name, 8192, writable=False)
        with pytest.raises(InvalidArgumentError):
            map_segment(SHM or "", seg.name, 0, writable=False)
    finally:
        seg.unlink()


def test_list_and_remove_segments(prefix: str) -> None:
    segs = [Segment.create(SHM or "", new_segment_name(prefix), 4096) for _ in range(3)]
    keep = {segs[0].name}
    assert list_segments(SHM or "", prefix) == sorted(s.name for s in segs)
    assert remove_segments(SHM or "", prefix, keep) == 2
    assert list_segments(SHM or "", prefix) == [segs[0].name]
    assert remove_segments(SHM or "", prefix, set()) == 1
    with pytest.raises(InvalidArgumentError):
        list_segments(SHM or "", "")


def test_pool_fills_hands_out_and_refills(prefix: str) -> None:
    seg_bytes = 64 * KiB
    pool = SegmentPool(SHM or "", prefix, segment_bytes=seg_bytes, reserve_bytes=3 * seg_bytes)
    taken: list[Segment] = []
    try:
        pool.start()
        assert pool.wait_ready(3 * seg_bytes, timeout=10)
        ready = set(list_segments(SHM or "", prefix))
        assert len(ready) == 3 and pool.reserve_bytes_ready() == 3 * seg_bytes

        pooled = pool.take(seg_bytes - 100)  # pooled: handed out whole
        taken.append(pooled)
        assert pooled.name in ready and pooled.size == seg_bytes
        small = pool.take(100)  # below min_pooled_bytes: fresh, exact size
        taken.append(small)
        assert small.name not in ready and small.size == 4096
        big = pool.take(seg_bytes + 1)  # oversize: fresh, rounded to a page
        taken.append(big)
        assert big.size == seg_bytes + 4096 and os.stat(big.path).st_blocks * 512 >= big.size

        assert pool.wait_ready(3 * seg_bytes, timeout=10)  # the thread refilled the reserve
        assert len(list_segments(SHM or "", prefix)) == 3 + len(taken)
        assert all(s.startswith(prefix) for s in list_segments(SHM or "", prefix))
    finally:
        pool.close()
    # close() unlinks only what nobody took.
    assert sorted(list_segments(SHM or "", prefix)) == sorted(s.name for s in taken)
    for s in taken:
        s.unlink()
    with pytest.raises(FailedPreconditionError):
        pool.take(seg_bytes)
    pool.close()  # idempotent


def test_pool_keeps_small_segments_for_small_writes(prefix: str) -> None:
    """A small write takes a pooled small segment (pre-faulted by the refill thread) rather
    than creating one on the hot path; tiny ones still get an exact fresh segment."""
    seg_bytes = 16 * MiB
    pool = SegmentPool(SHM or "", prefix, segment_bytes=seg_bytes, reserve_bytes=seg_bytes)
    taken: list[Segment] = []
    try:
        pool.start()
        assert pool.small_bytes == MiB
        wait_for(
            lambda: len(list_segments(SHM or "", prefix)) == 1 + _shm.SMALL_RESERVE,
            10,
            "the pool to fill its small reserve",
        )
        ready = set(list_segments(SHM or "", prefix))
        small = pool.take(MiB - 100)
        taken.append(small)
        assert small.name in ready and small.size == MiB
        assert os.stat(small.path).st_blocks * 512 >= MiB, "pre-faulted"
        tiny = pool.take(100)
        taken.append(tiny)
        assert tiny.name not in ready and tiny.size == 4096
        wait_for(
            lambda: len(list_segments(SHM or "", prefix)) == 1 + _shm.SMALL_RESERVE + 2,
            10,
            "the small reserve to be refilled",
        )
    finally:
        pool.close()
    assert sorted(list_segments(SHM or "", prefix)) == sorted(s.name for s in taken)
    for s in taken:
        s.unlink()


def test_pool_take_without_start_creates_fresh(prefix: str) -> None:
    with SegmentPool(SHM or "", prefix, segment_bytes=64 * KiB, reserve_bytes=0) as pool:
        seg = pool.take(64 * KiB)
        assert seg.size == 64 * KiB and pool.reserve_bytes_ready() == 0
        seg.unlink()


def test_pool_recovers_after_full_tmpfs(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = Segment.create
    full = threading.Event()
    failed = threading.Event()
    full.set()

    def create(
        shm_dir: str, name: str, size: int, *, prefault: bool = True, touch: bool = False
    ) -> Segment:
        if full.is_set():
            failed.set()
            raise ResourceExhaustedError("tmpfs is full (simulated)")
        return real_create(shm_dir, name, size, prefault=prefault, touch=touch)

    monkeypatch.setattr(_shm.Segment, "create", staticmethod(create))
    pool = SegmentPool(SHM or "", prefix, segment_bytes=64 * KiB, reserve_bytes=128 * KiB)
    try:
        pool.start()
        assert failed.wait(timeout=10)
        assert not pool.wait_ready(64 * KiB, timeout=0.05)
        assert isinstance(pool.refill_error, ResourceExhaustedError)
        full.clear()
        pool.wake()  # e.g. a delete freed memory
        assert pool.wait_ready(128 * KiB, timeout=10)
        assert pool.refill_error is None
    finally:
        pool.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"segment_bytes": 0},
        {"segment_bytes": 1000},
        {"reserve_bytes": -1},
        {"segment_bytes": True},
    ],
)
def test_pool_validates_config(prefix: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidArgumentError):
        SegmentPool(SHM or "", prefix, **kwargs)


def test_shm_does_not_import_torch() -> None:
    import subprocess
    import sys

    # Compared with the bare package, so this checks _shm alone, whatever __init__ imports.
    code = (
        "import sys, tensorcast_ray; before = 'torch' in sys.modules; "
        "import tensorcast_ray._shm; print(before or 'torch' not in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
