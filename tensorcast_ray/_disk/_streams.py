"""Parallel, bounded-memory ranged reads straight into caller buffers.  [SDK, daemon]

One read of an artifact or checkpoint goes like this:

1. The caller lists :class:`ReadTarget` s: a byte range of a file and the writable
   memoryview it must land in (in production a slice of the store's shared memory).
2. Each target is cut into parts of at most ``max_buffer_bytes``; runs of small adjacent
   parts of one file are coalesced into one ranged read (fewer round trips on object
   stores) through a per-worker buffer of at most ``min(4 MiB, max_buffer_bytes)``.
3. ``parallelism`` worker threads run the reads.  Local files are read with ``readinto``
   directly into the destination (no intermediate buffer at all), 2 MiB at a time; other
   file systems with ranged ``read`` calls of at most one part (fsspec
   ``cache_type="none"``).
4. Each part is checksummed as it lands (local files: each 2 MiB right after it landed,
   while it is in cache); a target's checksum is the CRC-combine of its parts, checked
   against the expected one (``DataLossError`` on mismatch).

Memory in flight is therefore ``parallelism * max_buffer_bytes`` at most, whatever the size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec

from tensorcast_ray._disk._checksum import Checksum, to_hex
from tensorcast_ray._disk._paths import is_local, map_os_error, open_read
from tensorcast_ray._errors import DataLossError, DeadlineExceededError, InvalidArgumentError

__all__ = ["Progress", "ReadTarget", "check_deadline", "check_tuning", "read_targets"]

_SMALL = 1 << 20  # parts below this are coalesced with their neighbours...
_RUN_CAP = 4 << 20  # ...into ranged reads of at most this (and max_buffer_bytes)
_PIECE = 2 << 20  # local reads land, and are checksummed, this much at a time


def check_tuning(max_buffer_bytes: int, parallelism: int) -> None:
    if not isinstance(max_buffer_bytes, int) or max_buffer_bytes < 4096:
        raise InvalidArgumentError(
            f"max_buffer_bytes must be an int >= 4096, got {max_buffer_bytes!r}"
        )
    if not isinstance(parallelism, int) or parallelism < 1:
        raise InvalidArgumentError(f"parallelism must be an int >= 1, got {parallelism!r}")


def check_deadline(deadline: float | None, doing: str) -> None:
    """DeadlineExceededError once ``deadline`` (``time.monotonic()``) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceededError(
            f"{doing}: the storage did not answer within the call's deadline; check that it "
            "is reachable, or raise the verb's deadline (RetryPolicy.deadline_seconds)"
        )


class Progress:
    """Thread-safe ``(done_bytes, total_bytes)`` reporting; callbacks run in worker threads."""

    def __init__(self, total: int, callback: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.done = 0
        self._callback = callback
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self._callback is None or n == 0:
            return
        with self._lock:
            self.done += n
            self._callback(self.done, self.total)


@dataclass(frozen=True)
class ReadTarget:
    path: str  # path inside the file system
    offset: int  # absolute offset in the file
    dest: memoryview  # format "B", exactly the range's length
    label: str  # names the tensor and file in errors
    checksum: str | None = None  # expected, hex; None: not checked


@dataclass(frozen=True)
class _Part:
    target: int
    index: int  # position within the target
    offset: int
    dest: memoryview


def _plan(targets: Sequence[ReadTarget], part_bytes: int) -> tuple[list[list[_Part]], list[int]]:
    """Jobs (each one ranged read of one file) and the number of parts of each target."""
    by_file: dict[str, list[_Part]] = {}
    counts = []
    for ti, t in enumerate(targets):
        n = t.dest.nbytes
        starts = range(0, n, part_bytes) if n else range(1)
        counts.append(len(starts))
        for pi, s in enumerate(starts):
            by_file.setdefault(t.path, []).append(
                _Part(ti, pi, t.offset + s, t.dest[s : s + part_bytes])
            )
    jobs: list[list[_Part]] = []
    run_cap = min(part_bytes, _RUN_CAP)
    for parts in by_file.values():
        parts.sort(key=lambda p: p.offset)
        run: list[_Part] = []
        run_bytes = 0
        for p in parts:
            n = p.dest.nbytes
            contiguous = run and run[-1].offset + run[-1].dest.nbytes == p.offset
            if n < _SMALL and contiguous and run_bytes + n <= run_cap:
                run.append(p)
                run_bytes += n
                continue
            if run:
                jobs.append(run)
            run, run_bytes = [p], n
        if run:
            jobs.append(run)
    jobs.sort(key=lambda j: -sum(p.dest.nbytes for p in j))  # big first: better balance
    return jobs, counts


def _open(fs: fsspec.AbstractFileSystem, path: str, part_bytes: int) -> Any:
    if is_local(fs):
        return open_read(fs, path)  # regular files in their own directory only
    try:
        return fs.open(path, "rb", block_size=part_bytes, cache_type="none")
    except TypeError:
        return fs.open(path, "rb")


def _fill(
    f: Any, dest: memoryview, label: str, algo: Checksum | None = None, piece: int = _PIECE
) -> int:
    """Read exactly ``dest.nbytes`` into ``dest``; returns their checksum (0 without
    ``algo``), taken ``piece`` bytes at a time right after each lands (still in cache)."""
    pos = crc = 0
    while pos < dest.nbytes:
        end = min(dest.nbytes, pos + piece)
        got = f.readinto(dest[pos:end])
        if not got:
            raise DataLossError(f"{label}: the file ends early (truncated); re-export the artifact")
        if algo is not None:
            crc = algo.update(crc, dest[pos : pos + got])
        pos += got
    return crc


def read_targets(
    fs: fsspec.AbstractFileSystem,
    targets: Sequence[ReadTarget],
    *,
    algo: Checksum | None,
    max_buffer_bytes: int,
    parallelism: int,
    progress: Progress,
    deadline: float | None = None,
) -> list[int]:
    """Read every target; returns each target's computed checksum (0 when ``algo`` is None).

    ``deadline`` (``time.monotonic()`` seconds) is checked before every ranged read, each at
    most ``max_buffer_bytes``: a storage that stalls or crawls ends the read with
    DeadlineExceededError instead of holding the caller forever."""
    jobs, counts = _plan(targets, max_buffer_bytes)
    part_crcs: list[list[int]] = [[0] * c for c in counts]
    local = threading.local()
    opened: list[Any] = []
    opened_lock = threading.Lock()

    def handle(path: str) -> Any:
        files = getattr(local, "files", None)
        if files is None:
            files = local.files = {}
        f = files.get(path)
        if f is None:
            f = files[path] = _open(fs, path, max_buffer_bytes)
            with opened_lock:
                opened.append(f)
        return f

    def run(job: list[_Part]) -> None:
        label = targets[job[0].target].label
        check_deadline(deadline, f"reading {label}")
        try:
            f = handle(targets[job[0].target].path)
            f.seek(job[0].offset)
            if len(job) == 1:
                # Local files: land and checksum in cache-sized pieces; remote ones in one
                # ranged read of the part (a request per piece would cost round trips).
                piece = _PIECE if is_local(fs) else max(job[0].dest.nbytes, 1)
                crc = _fill(f, job[0].dest, label, algo, piece)
                if algo is not None:
                    part_crcs[job[0].target][job[0].index] = crc
            else:
                total = sum(p.dest.nbytes for p in job)
                buf = getattr(local, "buf", None)
                if buf is None or len(buf) < total:
                    buf = local.buf = bytearray(total)
                view = memoryview(buf)[:total]
                _fill(f, view, label, None, max(total, 1))  # one ranged read
                pos = 0
                for p in job:
                    p.dest[:] = view[pos : pos + p.dest.nbytes]
                    pos += p.dest.nbytes
        except FileNotFoundError as exc:
            raise DataLossError(f"{label}: the file is missing; re-export the artifact") from exc
        except OSError as exc:
            raise map_os_error(exc, f"reading {label}") from exc
        for p in job:
            if algo is not None and len(job) > 1:
                part_crcs[p.target][p.index] = algo.of(p.dest)
            progress.add(p.dest.nbytes)

    try:
        if parallelism == 1 or len(jobs) <= 1:
            for job in jobs:
                run(job)
        else:
            with ThreadPoolExecutor(parallelism, thread_name_prefix="tc-disk-read") as pool:
                futures = [pool.submit(run, job) for job in jobs]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for fut in futures:
                    if fut in done and fut.exception() is not None:
                        for other in futures:
                            other.cancel()
                        fut.result()  # raises the first failure
                for fut in futures:
                    fut.result()
    finally:
        for f in opened:
            try:
                f.close()
            except Exception:
                pass  # read-only handles; nothing to lose

    crcs = []
    for ti, t in enumerate(targets):
        crc = 0
        if algo is not None:
            for pi, pc in enumerate(part_crcs[ti]):
                n = min(max_buffer_bytes, t.dest.nbytes - pi * max_buffer_bytes)
                crc = algo.combine(crc, pc, max(n, 0))
            if t.checksum is not None and to_hex(crc) != t.checksum:
                raise DataLossError(
                    f"{t.label}: checksum mismatch (expected {t.checksum}, read "
                    f"{to_hex(crc)}); the data on disk is corrupt; re-export the artifact"
                )
        crcs.append(crc)
    return crcs
