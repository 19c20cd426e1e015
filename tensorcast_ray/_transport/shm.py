"""Shared memory on one node: today's CPU data path, both halves.  [SDK, daemon]

Regions are the files of :mod:`tensorcast_ray._shm` in the daemon's ``shm_dir`` (a tmpfs,
``/dev/shm`` by default); this module puts them behind :class:`~._transport.base.Transport`
and delegates to :mod:`tensorcast_ray._shm` (segments, the pool, mappings) and
:mod:`tensorcast_ray._layout` (copying and wrapping) rather than repeating them.

One put, step by step::

    [daemon] ShmTransport.for_daemon(...) starts a SegmentPool of pre-faulted segments.
    [daemon] allocate(size) takes one from the pool (or creates one of the exact size) for
             each planned segment; segments larger than a write uses go on a trim list and
             shrink(name, used) cuts them later, off the hot path.
    [SDK]    map_for_write(ref) maps it MAP_SHARED (prefault: MAP_POPULATE, for staging);
             fill(region, tensor, offset) is one torch copy_ per tensor (_layout.copy_into);
             unmap(region) after CommitWrite.

One get, step by step::

    [SDK]    map_for_read(ref) maps it PROT_READ without MAP_POPULATE (a get that must stay
             under a millisecond faults pages in as it reads them).
    [SDK]    wrap_base(region): one uint8 tensor per segment; tensors(bases, columns) views
             each tensor over it, so a get costs one as_strided per tensor, not a frombuffer.

A delete is [daemon] free(refs): unlink only, so readers keep their mapped bytes and the
kernel frees the memory with the last mapping.  Importing this module does not import torch
(the daemon imports it and must start fast).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tensorcast_ray._errors import FailedPreconditionError, InvalidArgumentError
from tensorcast_ray._layout import TensorMeta, copy_into, wrap_tensor
from tensorcast_ray._shm import Segment, SegmentPool, map_segment
from tensorcast_ray._transport.base import Capabilities, SegmentRef, Transport

if TYPE_CHECKING:
    import torch

__all__ = ["ShmTransport"]


class ShmTransport(Transport):
    """POSIX shared memory in ``shm_dir``.  The SDK makes one with just ``shm_dir``; the
    daemon makes its own with :meth:`for_daemon`, which owns a segment pool."""

    capabilities = Capabilities(
        name="shm",
        same_node_only=True,
        one_sided=True,
        devices=frozenset({"cpu"}),
        zero_copy_reads=True,
    )

    def __init__(self, shm_dir: str, *, pool: SegmentPool | None = None) -> None:
        self.shm_dir = shm_dir
        self._pool = pool

    @classmethod
    def for_daemon(
        cls, shm_dir: str, prefix: str, *, segment_bytes: int, reserve_bytes: int
    ) -> ShmTransport:
        """[daemon] The daemon half: a started pool of segments named ``prefix...``."""
        pool = SegmentPool(
            shm_dir, prefix, segment_bytes=segment_bytes, reserve_bytes=reserve_bytes
        )
        pool.start()
        return cls(shm_dir, pool=pool)

    @property
    def pool(self) -> SegmentPool:
        """[daemon] The segment pool (only the daemon half has one)."""
        if self._pool is None:
            raise FailedPreconditionError(
                "this shared-memory transport has no segment pool: only the node daemon "
                "allocates and frees segments; ask it with BeginWrite / AllocateBuffer"
            )
        return self._pool

    # ---- daemon half -------------------------------------------------------------------
    def allocate(self, size: int) -> SegmentRef:
        """[daemon] A fresh segment of at least ``size`` bytes, pre-faulted (see SegmentPool)."""
        seg = self.pool.take(size)
        return seg.name, seg.size

    def free(self, segments: Iterable[SegmentRef]) -> None:
        """[daemon] Unlink; mapped bytes stay valid until the last mapping closes."""
        for name, size in segments:
            Segment(self.shm_dir, name, size).unlink()

    def close(self) -> None:
        """[daemon] Stop the pool's refill thread and unlink the segments nobody took."""
        if self._pool is not None:
            self._pool.close()

    def staging_size(self, size: int) -> int:
        """[daemon] The size of staged segment a planned segment of ``size`` may use, 0 for
        none: the pool's own size classes (whole pooled, or small pooled), so a small
        artifact never takes a whole pooled segment."""
        pool = self.pool
        if pool.min_pooled_bytes <= size <= pool.segment_bytes:
            return pool.segment_bytes
        if pool.small_bytes and pool.small_bytes // 16 <= size <= pool.small_bytes:
            return pool.small_bytes
        return 0

    def shrink(self, name: str, used: int) -> None:
        """[daemon] Cut a segment to the ``used`` bytes its artifact holds (gone: nothing)."""
        try:
            os.truncate(os.path.join(self.shm_dir, name), used)
        except FileNotFoundError:
            pass  # aborted or deleted meanwhile

    def ready_bytes(self) -> int:
        """[daemon] Bytes of pooled segments ready to hand out now."""
        return self._pool.reserve_bytes_ready() if self._pool is not None else 0

    # ---- SDK half ----------------------------------------------------------------------
    def map_for_write(self, segment: SegmentRef, *, prefault: bool = False) -> mmap.mmap:
        """[SDK] MAP_SHARED read-write; ``prefault`` adds MAP_POPULATE."""
        name, size = segment
        return map_segment(self.shm_dir, name, size, writable=True, populate=prefault)

    def fill(self, region: Any, tensor: Any, offset: int) -> None:
        """[SDK] One copy per tensor, raw bytes (every dtype bit-exact): _layout.copy_into."""
        copy_into(tensor, region, offset)

    def map_for_read(self, segment: SegmentRef) -> mmap.mmap:
        """[SDK] PROT_READ, pages faulted in as they are read."""
        name, size = segment
        return map_segment(self.shm_dir, name, size, writable=False, populate=False)

    def wrap_base(self, region: Any) -> torch.Tensor:
        """[SDK] A uint8 tensor over the whole mapping (it holds a buffer export, so the
        mapping outlives :meth:`unmap` while any tensor sliced from it lives)."""
        size = len(region)
        if size <= 0:
            raise InvalidArgumentError("cannot wrap an empty mapping")
        return wrap_tensor(region, TensorMeta("<segment>", "uint8", (size,), 0, 0, size))

    def unmap(self, region: Any) -> None:
        """[SDK] Close the mapping unless tensors still use it (then it goes with them)."""
        try:
            region.close()
        except BufferError:
            pass  # exported to a live tensor: unmapped when the last one is collected
