"""The node's artifact validity table in shared memory.  [daemon writes, SDK reads]

Each live artifact owns one 8-byte slot holding its generation (a number never reused on
this node). Delete, eviction and lease end zero the slot before the verb returns, so an
SDK process that cached an artifact's layout checks one integer — no RPC — to know the
artifact is still the one it mapped. That keeps a same-node ``get`` of a known version at
metadata cost while a deleted version still answers NOT_FOUND to new readers at once.

Walk-through: [daemon] ``commit`` → ``alloc()`` gives ``(slot, gen)`` and writes ``gen``
into the slot; [SDK] ``get`` of a cached artifact → ``EpochReader.valid(slot, gen)``;
[daemon] ``delete`` → ``free(slot)`` writes 0; the SDK's next check fails and it asks the
daemon, which answers NOT_FOUND.

Reads the SDK serves from its cache (no RPC) still count as use: next to the table, a reads
file holds one 8-byte stamp per slot. [SDK] a cached read writes ``time.monotonic_ns()``
into its artifact's slot (one memory write); [daemon] each tick, ``EpochTable.read_slots``
compares the file with its last snapshot and answers the slots that changed, which the
daemon touches (sliding TTL, LRU order) as if they had been looked up.

A table that goes away (a clean daemon stop, or a new daemon that does not adopt it) is
zeroed before it is unlinked, so a process still mapping it sees nothing valid and asks the
new daemon; and a new table starts its generations at a random point, so a (slot, gen) pair
from an old table never matches a new one.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
import sys
import time

from tensorcast_ray._errors import ResourceExhaustedError

__all__ = ["EpochReader", "EpochTable", "reads_name"]

_SLOT = 8
_CHUNK = 4096  # bytes of the reads file compared at once before looking at single slots


def reads_name(name: str) -> str:
    """The reads file of the table ``name``."""
    return name + ".reads"


class EpochTable:
    """[daemon] Owner of the table. Not thread-safe: the daemon's store lock guards it."""

    def __init__(self, shm_dir: str, name: str, slots: int, *, adopt: bool = False) -> None:
        self.shm_dir, self.name, self.slots = shm_dir, name, slots
        path = os.path.join(shm_dir, name)
        size = slots * _SLOT
        adopt = adopt and os.path.exists(path) and os.path.getsize(path) == size
        if adopt:
            fd = os.open(path, os.O_RDWR)
        else:
            if os.path.exists(path):
                _invalidate(path)
                os.unlink(path)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("Q")
        self.reads_name = reads_name(name)
        self._reads = _open_reads(os.path.join(shm_dir, self.reads_name), size, adopt=adopt)
        # An adopted file's stamps were counted (or lost) by the previous instance; what SDK
        # processes stamp from now on is what counts.
        self._reads_seen = self._reads[:]
        live = [i for i in range(slots) if self._view[i]]
        # Generations only grow within a table; a new table starts at a random point.
        self._next_gen = max((self._view[i] for i in live), default=secrets.randbits(62)) + 1
        self._free = [i for i in range(slots - 1, -1, -1) if not self._view[i]]
        # Slots a previous instance left live; restore() claims them, the rest are freed.
        self._unclaimed = set(live)

    def alloc(self) -> tuple[int, int]:
        if not self._free:
            raise ResourceExhaustedError(
                f"this daemon holds {self.slots} live artifacts, its limit; delete some or raise "
                "epoch_slots in the daemon config"
            )
        slot, gen = self._free.pop(), self._next_gen
        self._next_gen += 1
        self._view[slot] = gen
        return slot, gen

    def read_slots(self) -> list[int]:
        """Slots SDK processes stamped as read since the last call, least recent first (the
        stamps share one clock, ``CLOCK_MONOTONIC``, across the host's processes)."""
        now = self._reads[:]
        seen, self._reads_seen = self._reads_seen, now
        if now == seen:
            return []
        out: list[tuple[int, int]] = []
        for start in range(0, len(now), _CHUNK):
            end = start + _CHUNK
            if now[start:end] == seen[start:end]:
                continue
            for off in range(start, min(end, len(now)), _SLOT):
                stamp = now[off : off + _SLOT]
                if stamp != seen[off : off + _SLOT] and any(stamp):
                    out.append((int.from_bytes(stamp, sys.byteorder), off // _SLOT))
        return [slot for _, slot in sorted(out)]

    def restore(self, slot: int, gen: int) -> bool:
        """Re-claim a slot recorded by a previous daemon instance (restart recovery)."""
        if slot in self._unclaimed and self._view[slot] == gen:
            self._unclaimed.discard(slot)
            return True
        return False

    def release_unclaimed(self) -> int:
        """Zero every slot left live by a previous instance that nobody re-adopted."""
        count = len(self._unclaimed)
        for slot in self._unclaimed:
            self._view[slot] = 0
            self._free.append(slot)
        self._unclaimed.clear()
        return count

    def free(self, slot: int) -> None:
        if 0 <= slot < self.slots and self._view[slot]:
            self._view[slot] = 0
            self._free.append(slot)

    def close(self, *, unlink: bool) -> None:
        if unlink:  # readers that still map the table must see every artifact gone
            self._map[:] = bytes(len(self._map))
        self._view.release()
        self._map.close()
        self._reads.close()
        if unlink:
            for name in (self.name, self.reads_name):
                try:
                    os.unlink(os.path.join(self.shm_dir, name))
                except FileNotFoundError:
                    pass


def _open_reads(path: str, size: int, *, adopt: bool) -> mmap.mmap:
    """The reads file: an adopted table keeps its own, since SDK processes that only hit
    their caches never re-attach and keep stamping the file they mapped; any other table
    starts a fresh one."""
    if adopt:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size == size:
                    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _invalidate(path: str) -> None:
    """Zero a table some reader may still map (best effort: it is unlinked right after)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        if size:
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[:] = bytes(size)
    finally:
        os.close(fd)


class EpochReader:
    """[SDK] Read-only view of a daemon's table."""

    def __init__(self, shm_dir: str, name: str, slots: int) -> None:
        fd = os.open(os.path.join(shm_dir, name), os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, slots * _SLOT, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("Q")
        self.name = name
        self._reads: mmap.mmap | None = None
        self._stamps: memoryview | None = None
        try:
            fd = os.open(os.path.join(shm_dir, reads_name(name)), os.O_RDWR)
        except OSError:
            return  # a daemon without a reads file: cached reads go unreported
        try:
            self._reads = mmap.mmap(fd, slots * _SLOT, mmap.MAP_SHARED)
        except (OSError, ValueError):
            return
        finally:
            os.close(fd)
        self._stamps = memoryview(self._reads).cast("Q")

    def valid(self, slot: int, gen: int) -> bool:
        return 0 <= slot < len(self._view) and gen != 0 and self._view[slot] == gen

    def mark_read(self, slot: int) -> None:
        """Tell the daemon slot ``slot`` was just read (one memory write, no RPC)."""
        stamps = self._stamps
        if stamps is not None and 0 <= slot < len(stamps):
            stamps[slot] = time.monotonic_ns()

    def close(self) -> None:
        self._view.release()
        self._map.close()
        if self._stamps is not None and self._reads is not None:
            self._stamps.release()
            self._reads.close()
