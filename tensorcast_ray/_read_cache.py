"""This process's view of the node's artifacts: mappings and wrapped tensors.  [SDK]

Costs are per artifact, not per tensor. One get, step by step:

1. A key this process already read, whose generation the node's validity table
   (:mod:`tensorcast_ray._epochs`) still shows, is a hit: no RPC (:meth:`ReadCache.lookup_key`).
   Reading its tensors stamps the artifact's slot in the table's reads file
   (:meth:`ReadCache.check_read`), so the daemon's TTL and LRU count the read.
2. Otherwise the daemon's ``Lookup`` answers the layout as one compact ``TensorTable``;
   :meth:`ReadCache.admit` decodes it column by column and maps each segment read-only once.
3. The first ``tensor_dict`` of that generation wraps every tensor once through the
   artifact's transport: one base tensor per segment, one typed view per (segment, dtype),
   then one ``as_strided`` per tensor, straight from the decoded columns (:meth:`Transport.tensors
   <tensorcast_ray._transport.base.Transport.tensors>`). Later gets return a new dict over
   the same read-only tensors: a warm get costs a dict copy, whatever the size.

Tensors of one segment share one storage (the segment's): ``torch.save`` or pickling a
single such tensor writes its whole segment; ``.clone()`` it first (or ``copy=True``).
A delete or eviction zeroes the artifact's validity slot; the next lookup in any process
sees it, drops the entry and asks the daemon, which answers NOT_FOUND. A process that does
not look anything up lets go too: while it caches anything, a background thread sweeps the
cache every :data:`SWEEP_S` seconds, so a deleted artifact's mappings close as soon as no
tensor over them is left, and its bytes return to the node. Tensors handed out stay valid:
the kernel frees the bytes after the last mapping goes.
"""

from __future__ import annotations

import bisect
import mmap
import threading
import time
import weakref
from typing import TYPE_CHECKING

from tensorcast_ray._epochs import EpochReader
from tensorcast_ray._layout import Columns, TensorMeta
from tensorcast_ray._metrics import get_sdk_metrics
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

if TYPE_CHECKING:
    import torch

    from tensorcast_ray._transport.base import Transport

__all__ = ["SWEEP_S", "CachedArtifact", "ReadCache", "in_read_only_mapping", "mark_read_only"]

#: how often a process that caches artifacts drops the ones the validity table says are gone.
SWEEP_S = 1.0


class _ReadOnlyRanges:
    """[SDK] Address ranges of this process's read-only segment mappings, so a write into
    one (``get_into`` into a tensor ``tc.get`` returned) is refused instead of faulting.

    A range is added when a segment is first wrapped and leaves with its mapping (which
    lives while any tensor over it does). Kept sorted: a check is one bisect. Mappings made
    before a fork stay mapped in the child, so the ranges stay true there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._ends: dict[int, tuple[int, object]] = {}  # start -> (end, owner token)

    def add(self, start: int, nbytes: int, mapping: mmap.mmap) -> None:
        token = object()  # a later mapping at a reused address must outlive this one's end
        with self._lock:
            if start not in self._ends:
                bisect.insort(self._starts, start)
            self._ends[start] = (start + nbytes, token)
        weakref.finalize(mapping, self._remove, start, token)

    def _remove(self, start: int, token: object) -> None:
        with self._lock:
            if self._ends.get(start, (0, None))[1] is token:
                del self._ends[start]
                del self._starts[bisect.bisect_left(self._starts, start)]

    def overlaps(self, start: int, nbytes: int) -> bool:
        with self._lock:
            i = bisect.bisect_right(self._starts, start + max(nbytes, 1) - 1) - 1
            return i >= 0 and self._ends[self._starts[i]][0] > start


_read_only = _ReadOnlyRanges()


def mark_read_only(mapping: mmap.mmap) -> int:
    """[SDK] Record a read-only mapping made outside the cache (a partial read's buffer), so
    ``get_into`` refuses its tensors as targets; returns its address."""
    from tensorcast_ray._layout import TensorMeta, wrap_tensor

    size = len(mapping)
    base = wrap_tensor(mapping, TensorMeta("<segment>", "uint8", (size,), 0, 0, size))
    start = int(base.data_ptr())
    _read_only.add(start, size, mapping)
    return start


def in_read_only_mapping(tensor: torch.Tensor) -> bool:
    """[SDK] Whether ``tensor``'s storage lies in one of tensorcast's read-only mappings."""
    if tensor.device.type != "cpu":
        return False
    storage = tensor.untyped_storage()
    return _read_only.overlaps(storage.data_ptr(), storage.nbytes())


class CachedArtifact:
    """[SDK] One artifact generation as this process maps it: its layout, one read-only
    mapping per segment, and its tensors, wrapped once on first use by its transport."""

    def __init__(
        self,
        info: daemon_pb2.ArtifactInfo,
        cols: Columns,
        transport: Transport,
        maps: tuple[mmap.mmap, ...],
    ) -> None:
        self.info = info
        self.cols = cols
        self.maps = maps
        self.index = {name: i for i, name in enumerate(cols.names)}
        self._transport = transport
        self._lock = threading.Lock()
        self._bases: list[torch.Tensor] | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._metas: dict[str, TensorMeta] | None = None

    @property
    def metas(self) -> dict[str, TensorMeta]:
        """``{name: TensorMeta}`` in stored order, built on first use."""
        if self._metas is None:
            self._metas = {name: self.cols.meta(i) for i, name in enumerate(self.cols.names)}
        return self._metas

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, wrapped once per process; do not mutate the returned dict."""
        tensors = self._tensors
        if tensors is None:
            with self._lock:
                if self._tensors is None:
                    self._tensors = self._transport.tensors(self._wrapped(), self.cols)
                tensors = self._tensors
        return tensors

    def wrap(self, meta: TensorMeta) -> torch.Tensor:
        """A read-only tensor over ``meta``'s bytes (a whole tensor or a contiguous part)."""
        with self._lock:
            bases = self._wrapped()
        return self._transport.tensor(bases, meta)

    def _wrapped(self) -> list[torch.Tensor]:
        """One base tensor per segment (caller holds the lock)."""
        if self._bases is None:
            bases = [self._transport.wrap_base(m) for m in self.maps]
            for base, mapping in zip(bases, self.maps, strict=True):
                _read_only.add(base.data_ptr(), base.numel(), mapping)
            self._bases = bases
        return self._bases


class ReadCache:
    """[SDK] Per-process cache of artifact layouts, read-only mappings and wrapped tensors,
    keyed by artifact id and checked against the node's validity table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, CachedArtifact] = {}
        self._by_key: dict[str, str] = {}
        # The reverse of _by_key, so dropping an artifact costs its own keys, not all keys.
        self._keys_of: dict[str, set[str]] = {}
        self._epochs: EpochReader | None = None
        self._instance = ""
        self._sweeper: threading.Thread | None = None

    def attach_epochs(self, shm_dir: str, name: str, slots: int, instance: str = "") -> None:
        """Map the validity table of daemon ``instance``. A different instance (the daemon
        was stopped and started again) has a new table: forget everything cached."""
        with self._lock:
            if self._epochs is not None and instance != self._instance:
                self._forget_all()
            if name and self._epochs is None:
                try:
                    self._epochs = EpochReader(shm_dir, name, slots)
                    self._instance = instance
                except OSError:
                    self._epochs = None  # no validity table: every lookup asks the daemon

    def valid(self, info: daemon_pb2.ArtifactInfo) -> bool:
        epochs = self._epochs  # once: attach_epochs may swap it from another thread
        return epochs is not None and epochs.valid(info.epoch_slot, info.generation)

    def check_read(self, info: daemon_pb2.ArtifactInfo) -> bool:
        """``valid``, and if so stamp the read for the daemon's TTL and LRU (no RPC)."""
        epochs = self._epochs
        if epochs is None or not epochs.valid(info.epoch_slot, info.generation):
            return False
        epochs.mark_read(info.epoch_slot)
        return True

    def lookup_key(self, key: str) -> CachedArtifact | None:
        """A cached, still-valid entry for an explicit version, else None."""
        with self._lock:
            artifact_id = self._by_key.get(key)
            entry = self._by_id.get(artifact_id) if artifact_id else None
            if entry is None:
                get_sdk_metrics().cache_misses.inc()
                return None
            if self.valid(entry.info):
                get_sdk_metrics().cache_hits.inc()
                return entry
            self._drop(entry.info.artifact_id)
            get_sdk_metrics().cache_invalidations.inc()
            return None

    def admit(self, info: daemon_pb2.ArtifactInfo) -> CachedArtifact:
        with self._lock:
            entry = self._by_id.get(info.artifact_id)
            if entry is not None:
                self._add_key(info.key, info.artifact_id)
                return entry
        # Decoded and mapped outside the lock: a cold get of 20,000 tensors must not hold up
        # other threads' cache hits. (The transport loads on first use, not with the package.)
        from tensorcast_ray._transport.shm import ShmTransport

        cols = Columns.from_table(info.tensors, [s.size for s in info.segments])
        transport = ShmTransport(info.shm_dir)
        maps = tuple(transport.map_for_read((s.name, s.size)) for s in info.segments)
        entry = CachedArtifact(info, cols, transport, maps)
        with self._lock:
            entry = self._by_id.setdefault(info.artifact_id, entry)
            self._add_key(info.key, info.artifact_id)
            if self._sweeper is None:
                self._sweeper = threading.Thread(
                    target=self._sweep_while_caching, name="tensorcast-read-cache", daemon=True
                )
                self._sweeper.start()
            return entry

    def _sweep_while_caching(self) -> None:
        """[SDK, background] Sweep every SWEEP_S while anything is cached (admit does not
        sweep: a get must not pay for the whole cache). The thread ends once nothing is
        cached, and a later admit starts it again."""
        while True:
            time.sleep(SWEEP_S)  # a timer, not a wait for state
            with self._lock:
                self._sweep()
                if not self._by_id:
                    self._sweeper = None
                    return

    def _sweep(self) -> None:
        """Forget artifacts the validity table says are gone, so their memory can go too."""
        for artifact_id, entry in list(self._by_id.items()):
            if not self.valid(entry.info):
                self._drop(artifact_id)
                get_sdk_metrics().cache_evictions.inc()

    def _drop(self, artifact_id: str) -> None:
        entry = self._by_id.pop(artifact_id, None)
        if entry is None:
            return
        for key in self._keys_of.pop(artifact_id, ()):
            del self._by_key[key]
        # Mappings are not closed here: tensors handed out may still use them; they are
        # unmapped when the last tensor (holding a buffer export) is garbage collected.

    def _add_key(self, key: str, artifact_id: str) -> None:
        previous = self._by_key.get(key)
        if previous is not None and previous != artifact_id:
            self._keys_of[previous].discard(key)
        self._by_key[key] = artifact_id
        self._keys_of.setdefault(artifact_id, set()).add(key)

    def _forget_all(self) -> None:
        # The reader is not closed: another thread may be inside valid() or check_read()
        # with it; it unmaps when the last reference goes.
        self._by_id.clear()
        self._by_key.clear()
        self._keys_of.clear()
        self._epochs = None

    def clear(self) -> None:
        with self._lock:
            self._forget_all()
