"""Daemon-owned POSIX shared memory, as plain files in a tmpfs directory.  [daemon, SDK]

Every byte of the CPU tier lives in *segments*: regular files in ``shm_dir`` (``/dev/shm`` by
default) whose names start with the daemon's :func:`segment_prefix`, so every segment one
daemon made can be listed by prefix (leak checks, restart recovery).  We do not use
``multiprocessing.shared_memory``: its resource tracker unlinks segments when the creating
process exits, behind the daemon's back.

One put, step by step::

    [daemon] SegmentPool.start() keeps ``reserve_bytes`` of ready segments: a background
             thread creates each with Segment.create(prefault=True), i.e. open(O_EXCL, 0o600)
             + ftruncate + posix_fallocate, so the tmpfs pages exist before anyone maps them.
    [daemon] SegmentPool.take(size) hands out a ready segment (or creates one of the exact
             size when it is larger than ``segment_bytes``) and wakes the refill thread.
    [SDK]    map_segment(..., writable=True) maps it MAP_SHARED | MAP_POPULATE, so the page
             table is filled in one pass and the copy that follows takes no page faults.
    [SDK]    _layout.copy_into() writes the tensors; the SDK unmaps and tells the daemon.

One get, step by step::

    [daemon] answers with (segment name, size) metadata only; no bytes move.
    [SDK]    map_segment(..., writable=False) maps it PROT_READ: a reader cannot corrupt
             everyone's weights, and a write through the mapping raises TypeError.
    [SDK]    _layout.wrap_tensor() wraps the mapping with no copy.

A delete only unlinks: a segment is never reused for other data, because readers may still
map the old bytes and must never see them change.  The kernel frees the memory when the last
mapping closes.  This module must not import torch: the daemon imports it and must start fast.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass

from tensorcast_ray._error_mapping import map_os_error
from tensorcast_ray._errors import (
    ArtifactError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
)

__all__ = [
    "DEFAULT_SHM_DIR",
    "PAGE_BYTES",
    "Segment",
    "SegmentPool",
    "close_maps",
    "list_segments",
    "map_segment",
    "new_segment_name",
    "remove_segments",
    "round_up",
    "segment_prefix",
]

DEFAULT_SHM_DIR = "/dev/shm"
#: segment sizes are whole pages, so a mapping never ends inside a page another file owns.
PAGE_BYTES = 4096

_MiB = 1024 * 1024
#: pooled small segments kept ready (see SegmentPool).
SMALL_RESERVE = 4
_NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
_NODE_ID_OK = re.compile(r"^[A-Za-z0-9_]+$")


def round_up(n: int, multiple: int = PAGE_BYTES) -> int:
    """``n`` rounded up to a multiple of ``multiple``.  [SDK, daemon]"""
    return -(-n // multiple) * multiple


def segment_prefix(namespace: str, node_id: str) -> str:
    """``tcr-<8 hex of sha1(namespace)>-<node_id[:12]>-``: the prefix of one daemon's segments.

    [daemon] The namespace is hashed because it may hold any character; Ray node ids are hex.
    """
    if not isinstance(namespace, str) or not namespace:
        raise InvalidArgumentError(f"namespace must be a non-empty str, got {namespace!r}")
    if not isinstance(node_id, str) or not _NODE_ID_OK.match(node_id):
        raise InvalidArgumentError(
            f"node_id must be a non-empty str of letters, digits and '_' (a Ray node id), "
            f"got {node_id!r}"
        )
    digest = hashlib.sha1(namespace.encode()).hexdigest()[:8]
    return f"tcr-{digest}-{node_id[:12]}-"


def new_segment_name(prefix: str) -> str:
    """A fresh unique name under ``prefix``.  [daemon]

    Random rather than a counter, so a restarted daemon never collides with the names of
    the segments it adopts from its journal.
    """
    return f"{prefix}{secrets.token_hex(8)}"


def _check_name(name: str) -> None:
    # A name is a single path component: no traversal out of shm_dir.
    if not isinstance(name, str) or not _NAME_OK.match(name) or name in (".", ".."):
        raise InvalidArgumentError(
            f"segment name must be one path component of letters, digits, '.', '_' or '-', "
            f"got {name!r}"
        )


def _os_error(exc: OSError, shm_dir: str, name: str, size: int, doing: str) -> ArtifactError:
    """``exc`` from ``doing`` segment ``name``, through the one OS-error mapping."""
    return map_os_error(
        exc, f"cannot {doing} segment {os.path.join(shm_dir, name)}", shm_dir=shm_dir, size=size
    )


@dataclass(frozen=True)
class Segment:
    """One shared-memory file of ``size`` bytes in ``shm_dir``.  [daemon]

    The file descriptor is closed once the segment exists: users reopen it by path, so the
    daemon holds no fd per segment and deletion is a plain unlink.
    """

    shm_dir: str
    name: str
    size: int

    @property
    def path(self) -> str:
        return os.path.join(self.shm_dir, self.name)

    @classmethod
    def create(
        cls, shm_dir: str, name: str, size: int, *, prefault: bool = True, touch: bool = False
    ) -> Segment:
        """Create a new segment; with ``prefault`` its tmpfs pages are allocated now.  [daemon]

        Without prefault a full tmpfs shows up later as SIGBUS in whoever writes the page;
        with it, as ResourceExhaustedError here. ``touch`` also writes every page once:
        fallocate'd tmpfs pages are still cleared on first touch (~0.3 s per 256 MiB), so the
        pool's background thread pays that instead of the writer of the next put.
        """
        _check_name(name)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"segment size must be a positive int, got {size!r}")
        path = os.path.join(shm_dir, name)
        doing = "create"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            raise _os_error(exc, shm_dir, name, size, doing) from exc
        try:
            os.ftruncate(fd, size)
            if prefault and hasattr(os, "posix_fallocate"):
                doing = "allocate"
                os.posix_fallocate(fd, 0, size)
            if touch:
                doing = "touch"
                _touch(fd, size)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(path)
            raise _os_error(exc, shm_dir, name, size, doing) from exc
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        return cls(shm_dir, name, size)

    @classmethod
    def adopt(cls, shm_dir: str, name: str) -> Segment:
        """The segment ``name`` that already exists (daemon restart); size from the file.

        [daemon]
        """
        _check_name(name)
        try:
            st = os.stat(os.path.join(shm_dir, name))
        except OSError as exc:
            raise _os_error(exc, shm_dir, name, 0, "adopt") from exc
        if not stat.S_ISREG(st.st_mode):
            raise FailedPreconditionError(
                f"{os.path.join(shm_dir, name)} is not a regular file; remove it by hand"
            )
        return cls(shm_dir, name, st.st_size)

    def unlink(self) -> None:
        """Remove the name; mapped bytes stay valid until the last mapping closes.  [daemon]

        Idempotent: unlinking a segment that is already gone is not an error.
        """
        _unlink_quietly(self.path)


def _touch(fd: int, size: int) -> None:
    """Write zeros over every page so later mappings find them resident."""
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        buf = (ctypes.c_char * size).from_buffer(m)
        ctypes.memset(buf, 0, size)
        del buf
    finally:
        m.close()


def lower_thread_priority(niceness: int = 10) -> None:
    """Make the calling background thread yield the CPU to hot paths (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass  # not permitted or not supported: background work just competes normally


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def map_segment(
    shm_dir: str, name: str, size: int, *, writable: bool, populate: bool = True
) -> mmap.mmap:
    """Map the first ``size`` bytes of segment ``name`` MAP_SHARED.  [SDK]

    ``writable=False`` maps PROT_READ: ``mmap`` then raises TypeError on writes, and a buffer
    exported from it is read-only.  ``populate`` adds MAP_POPULATE (Linux): every page-table
    entry is installed in one pass instead of one fault per page.  That suits a writer about
    to touch every byte; it costs ~9 ms (read-only) to ~25 ms (writable) per 256 MiB even for
    resident pages, so a get that must stay under a millisecond passes ``populate=False``
    and faults pages in as it reads them.  Tensors from _layout.wrap_tensor hold a buffer
    export, so closing the mmap under them raises BufferError instead of unmapping.
    """
    _check_name(name)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidArgumentError(f"mapping size must be a positive int, got {size!r}")
    path = os.path.join(shm_dir, name)
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as exc:
        raise _os_error(exc, shm_dir, name, size, "open") from exc
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            # Touching bytes past the end of a file is SIGBUS, not an exception: refuse here.
            raise DataLossError(
                f"segment {path} holds {actual} bytes but {size} were expected; it was "
                f"truncated behind the daemon's back. Delete the artifact and put it again."
            )
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        try:
            return mmap.mmap(fd, size, flags=flags, prot=prot)
        except OSError as exc:
            raise _os_error(exc, shm_dir, name, size, "map") from exc
    finally:
        os.close(fd)  # mmap keeps its own reference to the file


def list_segments(shm_dir: str, prefix: str) -> list[str]:
    """Sorted names of the files in ``shm_dir`` that start with ``prefix``.  [daemon]"""
    if not isinstance(prefix, str) or not prefix or "/" in prefix:
        raise InvalidArgumentError(f"prefix must be a non-empty str without '/', got {prefix!r}")
    try:
        with os.scandir(shm_dir) as entries:
            return sorted(
                e.name
                for e in entries
                if e.name.startswith(prefix) and e.is_file(follow_symlinks=False)
            )
    except OSError as exc:
        raise _os_error(exc, shm_dir, prefix, 0, "list") from exc


def remove_segments(shm_dir: str, prefix: str, keep: set[str]) -> int:
    """Unlink every segment under ``prefix`` not in ``keep``; returns how many.  [daemon]

    Restart recovery: ``keep`` is what the daemon's journal knows, the rest are orphans.
    """
    removed = 0
    for name in list_segments(shm_dir, prefix):
        if name not in keep:
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed += 1
            except FileNotFoundError:
                pass  # someone else removed it first; the end state is the same
    return removed


class SegmentPool:
    """A warm reserve of pre-faulted segments, refilled by one background thread.  [daemon]

    Only fresh segments are handed out, never reused ones (see the module docstring).
    ``take(size)`` returns, by rounded size ``r``:

    - ``min_pooled_bytes <= r <= segment_bytes``: a pooled segment of ``segment_bytes``
      whole (the caller uses the first ``r`` bytes).  Trimming it here would cost ~3-6 ms of
      page freeing on the hot path; the daemon may trim later, off that path.
    - ``small_bytes / 16 <= r <= small_bytes`` (``small_bytes`` is ``segment_bytes / 16``,
      when that is at least 1 MiB): a pooled *small* segment of ``small_bytes`` whole, from
      a reserve of :data:`SMALL_RESERVE` of them. Small puts (16 MiB of a 256 MiB pool)
      then skip creating a segment (~5 ms for 16 MiB) and its first-touch page clearing.
    - any other ``r < min_pooled_bytes``: a fresh segment of exactly ``r``; for such sizes
      creating one is cheaper than trimming a pooled one and wastes nothing.
    - ``r > segment_bytes``, or the pool is empty: a fresh, prefaulted segment of ``r``.

    ``reserve_bytes`` counts the ``segment_bytes`` segments; the small reserve comes on top.
    """

    def __init__(
        self,
        shm_dir: str,
        prefix: str,
        *,
        segment_bytes: int = 64 * _MiB,
        reserve_bytes: int = 256 * _MiB,
        min_pooled_bytes: int | None = None,
    ) -> None:
        for label, value in (("segment_bytes", segment_bytes), ("reserve_bytes", reserve_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"{label} must be a non-negative int, got {value!r}")
        if segment_bytes == 0 or segment_bytes % PAGE_BYTES:
            raise InvalidArgumentError(
                f"segment_bytes must be a positive multiple of {PAGE_BYTES}, got {segment_bytes}"
            )
        if not isinstance(prefix, str) or not prefix or not _NAME_OK.match(prefix):
            raise InvalidArgumentError(f"prefix must be a valid segment name start: {prefix!r}")
        self.shm_dir = shm_dir
        self.prefix = prefix
        self.segment_bytes = segment_bytes
        self.reserve_bytes = reserve_bytes
        self.min_pooled_bytes = segment_bytes // 4 if min_pooled_bytes is None else min_pooled_bytes
        small = segment_bytes // 16 // PAGE_BYTES * PAGE_BYTES
        self.small_bytes = small if small >= _MiB and reserve_bytes else 0
        self._ready: list[Segment] = []
        self._small_ready: list[Segment] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wakes = 0
        #: the last error the refill thread hit (e.g. a full tmpfs); None after a success.
        self.refill_error: ArtifactError | None = None

    def start(self) -> None:
        """Start the refill thread (idempotent).  [daemon]"""
        with self._cond:
            if self._closed:
                raise FailedPreconditionError("SegmentPool is closed; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._refill, name=f"tcr-shm-pool-{self.prefix}", daemon=True
                )
                self._thread.start()

    def _missing(self) -> int:
        """The size of the next segment to make (caller holds the lock); 0 when full."""
        if self.small_bytes and len(self._small_ready) < SMALL_RESERVE:
            return self.small_bytes
        if len(self._ready) < self.reserve_bytes // self.segment_bytes:
            return self.segment_bytes
        return 0

    def _refill(self) -> None:
        lower_thread_priority()
        while True:
            with self._cond:
                seen = self._wakes
                while not self._closed and not self._missing():
                    self._cond.wait()
                if self._closed:
                    return
                size = self._missing()
            try:
                # Outside the lock: posix_fallocate of 64 MiB takes ~10 ms and releases the GIL.
                seg = Segment.create(self.shm_dir, new_segment_name(self.prefix), size, touch=True)
            except ArtifactError as exc:
                with self._cond:
                    self.refill_error = exc
                    self._cond.notify_all()
                    # Retry only when something changes (a take, wake() or close), never
                    # in a busy loop against a full tmpfs.
                    while not self._closed and self._wakes == seen:
                        self._cond.wait()
                continue
            with self._cond:
                if self._closed:
                    seg.unlink()
                    return
                (self._small_ready if size != self.segment_bytes else self._ready).append(seg)
                self.refill_error = None
                self._cond.notify_all()

    def wake(self) -> None:
        """Tell the refill thread that memory may have been freed (e.g. after a delete).

        [daemon]
        """
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def take(self, size: int) -> Segment:
        """A fresh segment of at least ``size`` bytes, owned by the caller from now on.

        [daemon]
        """
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"segment size must be a positive int, got {size!r}")
        rounded = round_up(size)
        ready = None
        if self.min_pooled_bytes <= rounded <= self.segment_bytes:
            ready = self._ready
        elif self.small_bytes // 16 <= rounded <= self.small_bytes:
            ready = self._small_ready
        if ready is not None:
            with self._cond:
                if self._closed:
                    raise FailedPreconditionError("SegmentPool is closed; make a new one")
                seg = ready.pop(0) if ready else None
                self._wakes += 1
                self._cond.notify_all()
            if seg is not None:
                return seg
        return Segment.create(self.shm_dir, new_segment_name(self.prefix), rounded)

    def reserve_bytes_ready(self) -> int:
        """Bytes of pooled ``segment_bytes`` segments ready to hand out now.  [daemon]"""
        with self._cond:
            return len(self._ready) * self.segment_bytes

    def wait_ready(self, min_bytes: int, timeout: float) -> bool:
        """Wait until at least ``min_bytes`` are ready; False on timeout or close.  [daemon]"""
        with self._cond:
            return (
                self._cond.wait_for(
                    lambda: self._closed or len(self._ready) * self.segment_bytes >= min_bytes,
                    timeout,
                )
                and not self._closed
            )

    def close(self) -> None:
        """Stop the refill thread and unlink the segments nobody took (idempotent).  [daemon]"""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            ready, self._ready = self._ready + self._small_ready, []
            self._small_ready = []
        for seg in ready:
            seg.unlink()

    def __enter__(self) -> SegmentPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_maps(maps: list[object]) -> None:
    """Close every mapping in ``maps`` (placeholders without ``close`` are skipped) and empty
    the list. A mapping whose buffer is still exported stays open until its last view goes
    (the kernel frees it then), so BufferError is not a failure here."""
    for m in maps:
        try:
            m.close()  # type: ignore[attr-defined]
        except (AttributeError, BufferError):
            pass
    maps.clear()
