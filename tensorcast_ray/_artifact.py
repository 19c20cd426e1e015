"""Artifacts as the SDK sees them: zero-copy tensor dicts over the daemon's memory.  [SDK]

One get, step by step:

1. ``tc.artifact("llama:v1")``: a key whose layout this process already knows, and whose
   generation the node's validity table (:mod:`tensorcast_ray._epochs`) still shows, is a
   cache hit: no RPC. Otherwise one ``Lookup`` to the daemon (``latest`` always asks).
2. ``.tensor_dict()``: each segment is mapped read-only once per process (cached while the
   artifact lives) and each tensor wraps its bytes: no copy, so the cost is metadata only
   whatever the size. Such tensors must not be written (the mapping is read-only; a write
   is a segmentation fault); ``copy=True`` gives private writable copies.
3. A delete or eviction zeroes the artifact's slot before it returns; the next lookup in
   any process sees it and answers NOT_FOUND. Tensors already handed out stay valid: the
   daemon unlinks segments, and the kernel frees the bytes after the last mapping goes.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensorcast_ray._epochs import EpochReader
from tensorcast_ray._errors import InvalidArgumentError, NotFoundError, UnimplementedError
from tensorcast_ray._layout import (
    NO_SEGMENT,
    TensorMeta,
    normalize_slices,
    slice_region,
    wrap_tensor,
)
from tensorcast_ray._metrics import get_sdk_metrics
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tensorcast_ray._shm import map_segment

if TYPE_CHECKING:
    import torch

__all__ = ["Artifact", "ArtifactView", "ReadCache"]


@dataclass(frozen=True)
class _Entry:
    info: daemon_pb2.ArtifactInfo
    metas: dict[str, TensorMeta]
    maps: tuple[mmap.mmap | None, ...]


class ReadCache:
    """[SDK] Per-process cache of artifact layouts and read-only segment mappings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, _Entry] = {}
        self._by_key: dict[str, str] = {}
        self._epochs: EpochReader | None = None
        self._instance = ""

    def attach_epochs(self, shm_dir: str, name: str, slots: int, instance: str = "") -> None:
        """Map the validity table of daemon ``instance``. A different instance (the daemon
        was stopped and started again) has a new table: forget everything cached."""
        with self._lock:
            if self._epochs is not None and instance != self._instance:
                # Not closed here: another thread may be reading it; it unmaps when dropped.
                self._by_id.clear()
                self._by_key.clear()
                self._epochs = None
            if name and self._epochs is None:
                try:
                    self._epochs = EpochReader(shm_dir, name, slots)
                    self._instance = instance
                except OSError:
                    self._epochs = None  # no validity table: every lookup asks the daemon

    def valid(self, info: daemon_pb2.ArtifactInfo) -> bool:
        epochs = self._epochs  # once: attach_epochs may swap it from another thread
        return epochs is not None and epochs.valid(info.epoch_slot, info.generation)

    def lookup_key(self, key: str) -> _Entry | None:
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

    def admit(self, info: daemon_pb2.ArtifactInfo) -> _Entry:
        with self._lock:
            self._sweep()
            entry = self._by_id.get(info.artifact_id)
            if entry is None:
                maps = tuple(
                    map_segment(info.shm_dir, s.name, s.size, writable=False, populate=False)
                    for s in info.segments
                )
                metas = {
                    t.name: TensorMeta(
                        t.name, t.dtype, tuple(t.shape), t.segment, t.offset, t.nbytes
                    )
                    for t in info.tensors
                }
                entry = _Entry(info, metas, maps)
                self._by_id[info.artifact_id] = entry
            self._by_key[info.key] = info.artifact_id
            return entry

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
        self._by_key = {k: v for k, v in self._by_key.items() if v != artifact_id}
        # Mappings are not closed here: tensors handed out may still use them; they are
        # unmapped when the last tensor (holding a buffer export) is garbage collected.

    def clear(self) -> None:
        with self._lock:
            self._by_id.clear()
            self._by_key.clear()
            if self._epochs is not None:
                self._epochs.close()
                self._epochs = None


def _check_device(device: Any) -> Any:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"device={device!r} is not a torch device: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device={device!r}: CUDA is not available in this process")
    if dev.type not in ("cpu", "cuda"):
        raise UnimplementedError(
            f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda:N'"
        )
    return dev


class Artifact:
    """One version of an artifact on this node. Made by ``tc.artifact(key)``; ``latest`` is
    resolved once, at creation, so every call on one ``Artifact`` sees the same version."""

    def __init__(self, entry: _Entry, store: Any) -> None:
        self._entry = entry
        self._store = store

    @property
    def key(self) -> str:
        return self._entry.info.key

    @property
    def artifact_id(self) -> str:
        return self._entry.info.artifact_id

    @property
    def nbytes(self) -> int:
        return int(self._entry.info.nbytes)

    @property
    def names(self) -> list[str]:
        return list(self._entry.metas)

    def specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{name: (dtype, shape)}`` without touching any bytes."""
        return {n: (m.dtype, m.shape) for n, m in self._entry.metas.items()}

    def __repr__(self) -> str:
        return f"Artifact(key={self.key!r}, tensors={len(self._entry.metas)}, nbytes={self.nbytes})"

    def _select(self, names: Sequence[str] | None) -> list[TensorMeta]:
        if names is None:
            return list(self._entry.metas.values())
        if isinstance(names, str):
            raise InvalidArgumentError("names must be a list of tensor names, not a single str")
        names = list(names)  # a generator would be used up by the check below
        missing = [n for n in names if n not in self._entry.metas]
        if missing:
            raise InvalidArgumentError(
                f"{self.key} has no tensor named {missing[0]!r}; it holds {len(self._entry.metas)} "
                f"tensors, e.g. {list(self._entry.metas)[:5]}"
            )
        return [self._entry.metas[n] for n in names]

    def _check_alive(self) -> None:
        if not self._store._read_cache.valid(self._entry.info):
            raise NotFoundError(f"{self.key} was deleted (or evicted) after it was opened")

    def _wrap(self, meta: TensorMeta) -> torch.Tensor:
        if meta.segment == NO_SEGMENT:
            return wrap_tensor(bytearray(), meta)
        return wrap_tensor(self._entry.maps[meta.segment], meta)  # type: ignore[arg-type]

    def tensor_dict(
        self, device: Any = "cpu", names: Sequence[str] | None = None, copy: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors. On CPU without ``copy``: read-only zero-copy views of shared memory."""
        dev = _check_device(device)
        metas = self._select(names)
        self._check_alive()
        out = {m.name: self._wrap(m) for m in metas}
        get_sdk_metrics().record_data_path("shm")
        return _materialize(out, dev, copy)

    def tensor_dict_into(
        self, targets: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
    ) -> None:
        """Copy into ``targets`` in place; names, shapes and dtypes are checked first."""
        metas = self._select(list(targets) if names is None else names)
        _validate_targets(self.key, targets, {m.name: (m.dtype, m.shape) for m in metas})
        self._check_alive()
        _copy_into_targets(targets, [(m.name, self._wrap(m)) for m in metas])
        get_sdk_metrics().record_data_path("shm")

    def view(self, slices: Mapping[str, Any]) -> ArtifactView:
        """A per-rank selection: ``{"w": (slice(0, 1024), slice(None))}`` or ``[(dim, slice)]``."""
        if not isinstance(slices, Mapping):
            raise InvalidArgumentError("slices must be a mapping of tensor name to slices")
        self._select(list(slices))
        resolved = {n: normalize_slices(self._entry.metas[n], spec) for n, spec in slices.items()}
        return ArtifactView(self, resolved)


class ArtifactView:
    """Selected slices of an artifact. Contiguous leading-dim slices stay zero-copy on CPU."""

    def __init__(self, artifact: Artifact, slices: dict[str, tuple[slice, ...]]) -> None:
        self._artifact = artifact
        self._slices = slices

    def _tensor(self, meta: TensorMeta) -> tuple[torch.Tensor, bool]:
        sl = self._slices.get(meta.name)
        if sl is None:
            return self._artifact._wrap(meta), True
        region = slice_region(meta, sl)
        if region.contiguous:
            sub = TensorMeta(
                meta.name, meta.dtype, region.shape, meta.segment, region.offset, region.nbytes
            )
            return self._artifact._wrap(sub), True
        return self._artifact._wrap(meta)[sl].contiguous(), False

    def tensor_dict(
        self, device: Any = "cpu", names: Sequence[str] | None = None, copy: bool = False
    ) -> dict[str, torch.Tensor]:
        dev = _check_device(device)
        metas = self._artifact._select(names)
        self._artifact._check_alive()
        out = {m.name: self._tensor(m)[0] for m in metas}
        get_sdk_metrics().record_data_path("shm")
        return _materialize(out, dev, copy)

    def tensor_dict_into(
        self, targets: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
    ) -> None:
        metas = self._artifact._select(list(targets) if names is None else names)
        expected = {}
        for m in metas:
            sl = self._slices.get(m.name)
            shape = slice_region(m, sl).shape if sl is not None else m.shape
            expected[m.name] = (m.dtype, shape)
        _validate_targets(self._artifact.key, targets, expected)
        self._artifact._check_alive()
        _copy_into_targets(targets, [(m.name, self._tensor(m)[0]) for m in metas])


def _materialize(out: dict[str, Any], dev: Any, copy: bool) -> dict[str, Any]:
    if dev.type == "cpu":
        return {k: v.clone() for k, v in out.items()} if copy else out
    # CPU tier → GPU consumer: one host-to-device copy per tensor.
    return {k: v.to(dev, non_blocking=False) for k, v in out.items()}


def _copy_into_targets(targets: Mapping[str, Any], sources: list[tuple[str, Any]]) -> None:
    """In-place copies into validated targets. Under no_grad: targets are often parameters
    (``dict(model.named_parameters())``), and copying into a leaf that requires grad is an
    autograd error, not a weight update."""
    import torch

    with torch.no_grad():
        for name, source in sources:
            targets[name].copy_(source)


def _validate_targets(
    key: str, targets: Mapping[str, Any], expected: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    import torch

    from tensorcast_ray._dtypes import dtype_name

    if not isinstance(targets, Mapping):
        raise InvalidArgumentError("targets must be a mapping of tensor name to torch.Tensor")
    for name, (dtype, shape) in expected.items():
        target = targets.get(name)
        if not isinstance(target, torch.Tensor):
            raise InvalidArgumentError(
                f"target {name!r} must be a torch.Tensor, got {type(target).__name__}"
            )
        if tuple(target.shape) != tuple(shape) or dtype_name(target.dtype) != dtype:
            raise InvalidArgumentError(
                f"target {name!r} is {dtype_name(target.dtype)}{list(target.shape)} but {key} "
                f"holds {dtype}{list(shape)}; allocate a matching tensor"
            )
        # Checked here, before any copy, so a bad target never leaves the others half-written.
        if target.is_inference() and not torch.is_inference_mode_enabled():
            raise InvalidArgumentError(
                f"target {name!r} was created in inference mode and cannot be written outside "
                "it; call get_into inside torch.inference_mode() or allocate it normally"
            )
        if target.numel() > 1 and torch._debug_has_internal_overlap(target) == 1:
            raise InvalidArgumentError(
                f"target {name!r} has elements that share memory (e.g. made by expand()); "
                "copy into a tensor with its own storage"
            )
