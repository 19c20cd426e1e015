"""Across nodes through Ray's object store: shards of an artifact, both halves.  [daemon]

The default path between nodes. It moves bytes between two daemons' shared-memory segments;
SDK processes never see it (they ask their own daemon, which lands a replica and answers as
for a local artifact).

One shard, step by step::

    [receiving daemon] plans the artifact's bytes as shards of about ``shard_bytes``
                       (64-256 MiB; :func:`plan_shards`, pure) and asks the serving daemon
                       for several shards at once.
    [serving daemon]   ShardSource.serve: ``ray.put`` of read-only views of its segments
                       (one copy, into its node's object store); the object is owned by the
                       serving daemon and returned to the caller as a borrowed ref.
    [receiving daemon] receive: ``ray.get`` pulls the object into its node's store (Ray's
                       object manager moves it), then one copy into the landing segments;
                       the ref is dropped, so the object is freed as soon as the pull ends.

The serving daemon maps an artifact's segments once per transfer (:meth:`ShardSource.open`):
a mapping keeps the bytes even if the artifact is deleted or evicted meanwhile, so every
shard of one transfer is of one consistent version. Idle transfers are closed after
``idle_s``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tensorcast_ray._errors import (
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from tensorcast_ray._transport.base import SegmentRef

__all__ = ["Piece", "ShardSource", "full_pieces", "plan_shards", "receive"]

#: (source segment index, source offset, length, destination segment index, destination offset)
Piece = tuple[int, int, int, int, int]

MIN_SHARD_BYTES = 1 << 20


def full_pieces(segments: Sequence[SegmentRef]) -> list[Piece]:
    """Every byte of an artifact, landing at the same place in segments of the same sizes."""
    return [(i, 0, size, i, 0) for i, (_, size) in enumerate(segments) if size]


def plan_shards(pieces: Sequence[Piece], shard_bytes: int) -> list[list[Piece]]:
    """Pack ``pieces`` into shards of at most ``shard_bytes`` (a longer piece is split, small
    ones share a shard), in order. Deterministic: two daemons planning the same pieces with
    the same size get the same shards (a chain forwards shard k as it lands)."""
    if shard_bytes < MIN_SHARD_BYTES:
        raise InvalidArgumentError(f"shard_bytes must be >= {MIN_SHARD_BYTES}, got {shard_bytes}")
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for src_seg, src_off, length, dst_seg, dst_off in pieces:
        done = 0
        while done < length:
            take = min(length - done, shard_bytes - used)
            current.append((src_seg, src_off + done, take, dst_seg, dst_off + done))
            used += take
            done += take
            if used == shard_bytes:
                shards.append(current)
                current, used = [], 0
    if current:
        shards.append(current)
    return shards


@dataclass
class _Open:
    maps: list[Any]
    last_used: float
    users: int = 0
    # shard index -> set when those bytes are in place (a landing replica served onward)
    landed: dict[int, threading.Event] | None = None
    failed: str = ""


class ShardSource:
    """[serving daemon] Open transfers and the shards they serve."""

    def __init__(
        self,
        map_for_read: Callable[[SegmentRef], Any],
        *,
        idle_s: float = 120.0,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._map = map_for_read
        self._idle_s = idle_s
        self._on_bytes = on_bytes
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}

    def open(self, segments: Sequence[SegmentRef], *, landing: int = 0) -> str:
        """Map ``segments`` for one transfer; ``landing``: the bytes are still arriving in
        that many shards (a replica served onward as it lands; see :meth:`landed`)."""
        maps = []
        try:
            for seg in segments:
                maps.append(self._map(seg) if seg[1] else b"")
        except (FileNotFoundError, NotFoundError) as exc:
            _close(maps)
            raise NotFoundError(
                f"a segment of the artifact is gone ({exc}); it was deleted or evicted"
            ) from exc
        transfer_id = uuid.uuid4().hex
        events = {k: threading.Event() for k in range(landing)} if landing else None
        with self._lock:
            self._open[transfer_id] = _Open(maps, time.monotonic(), landed=events)
        return transfer_id

    def landed(self, transfer_id: str, shard: int, error: str = "") -> None:
        """[serving daemon] Shard ``shard`` of a landing transfer is in place (or, with
        ``error``, never will be)."""
        with self._lock:
            entry = self._open.get(transfer_id)
        if entry is None or entry.landed is None:
            return
        if error:
            entry.failed = error
            for event in entry.landed.values():
                event.set()
        elif shard in entry.landed:
            entry.landed[shard].set()

    def wait_landed(self, transfer_id: str, shard: int, timeout_s: float) -> list[Any]:
        """The transfer's mappings once shard ``shard`` is in place (at once unless the copy
        is still landing)."""
        with self._lock:
            entry = self._open.get(transfer_id)
        if entry is None:
            raise UnavailableError(
                f"transfer {transfer_id} is not open here (closed, or idle too long)"
            )
        entry.last_used = time.monotonic()
        if entry.landed is not None and shard in entry.landed:
            if not entry.landed[shard].wait(timeout_s):
                raise UnavailableError(
                    f"shard {shard} did not land upstream within {timeout_s:.0f} s"
                )
            if entry.failed:
                raise UnavailableError(f"the upstream copy failed: {entry.failed}")
        return entry.maps

    def serve(self, transfer_id: str, shard: int, pieces: Sequence[Piece], timeout_s: float) -> Any:
        """One shard as an object in this node's store, owned by this process."""
        import numpy as np
        import ray

        with self._lock:
            entry = self._open.get(transfer_id)
            if entry is None:
                raise UnavailableError(
                    f"transfer {transfer_id} is not open here (closed, idle too long, or this "
                    "daemon restarted); start the pull again"
                )
            entry.users += 1
            entry.last_used = time.monotonic()
        try:
            self.wait_landed(transfer_id, shard, timeout_s)
            views = []
            total = 0
            for src_seg, src_off, length, _, _ in pieces:
                if not (0 <= src_seg < len(entry.maps)) or not (
                    0 <= src_off and length > 0 and src_off + length <= len(entry.maps[src_seg])
                ):
                    raise InvalidArgumentError(
                        f"a shard asks for bytes [{src_off}, {src_off + length}) of segment "
                        f"{src_seg}, outside the artifact"
                    )
                views.append(np.frombuffer(entry.maps[src_seg], np.uint8, length, src_off))
                total += length
            ref = ray.put(views)
            self._on_bytes(total)
            return ref
        finally:
            with self._lock:
                entry.users -= 1
                entry.last_used = time.monotonic()

    def close(self, transfer_id: str) -> None:
        with self._lock:
            entry = self._open.pop(transfer_id, None)
        if entry is not None:
            _close(entry.maps)

    def expire(self, now: float | None = None) -> int:
        """Close transfers idle for ``idle_s`` (a puller that died); returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [
                t for t, e in self._open.items() if not e.users and now - e.last_used > self._idle_s
            ]
            entries = [self._open.pop(t) for t in idle]
        for entry in entries:
            _close(entry.maps)
        return len(entries)

    def close_all(self) -> None:
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        for entry in entries:
            _close(entry.maps)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


def receive(ref: Any, pieces: Sequence[Piece], dest: Sequence[Any], timeout_s: float) -> int:
    """[receiving daemon] Pull one shard and copy it into the landing mappings ``dest``
    (writable, indexed by destination segment). Returns the bytes copied."""
    import numpy as np
    import ray

    arrays = ray.get(ref, timeout=timeout_s)
    if len(arrays) != len(pieces):
        raise DataLossError(
            f"a shard came back with {len(arrays)} pieces, {len(pieces)} were asked for"
        )
    total = 0
    for arr, (_, _, length, dst_seg, dst_off) in zip(arrays, pieces, strict=True):
        if arr.nbytes != length:
            raise DataLossError(
                f"a shard piece came back with {arr.nbytes} bytes, {length} were asked for"
            )
        np.frombuffer(dest[dst_seg], np.uint8, length, dst_off)[:] = arr
        total += length
    del arrays
    return total


def _close(maps: Sequence[Any]) -> None:
    for m in maps:
        try:
            m.close()
        except (AttributeError, BufferError):
            pass  # b"" for an empty segment; or a view still alive (freed with it)
