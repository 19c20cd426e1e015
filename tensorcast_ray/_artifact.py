"""Artifacts as the SDK sees them: zero-copy tensor dicts over the daemon's memory.  [SDK]

One get, step by step:

1. ``tc.artifact("llama:v1")``: a key whose layout this process already knows, and whose
   generation the node's validity table (:mod:`tensorcast_ray._epochs`) still shows, is a
   cache hit: no RPC. Otherwise one ``Lookup`` to the daemon (``latest`` always asks).
2. ``.tensor_dict()``: the tensors of that generation, wrapped once per process over the
   read-only mappings (:mod:`tensorcast_ray._read_cache`), in a new dict: no copy, so the
   cost is metadata only whatever the size. Such tensors must not be written (the mapping
   is read-only; a write is a segmentation fault); ``copy=True`` gives private copies.
3. A delete or eviction zeroes the artifact's slot before it returns; the next lookup in
   any process sees it and answers NOT_FOUND. Tensors already handed out stay valid: the
   daemon unlinks segments, and the kernel frees the bytes after the last mapping goes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensorcast_ray._errors import InvalidArgumentError, NotFoundError, UnimplementedError
from tensorcast_ray._layout import Columns, TensorMeta, normalize_slices, slice_region
from tensorcast_ray._metrics import get_sdk_metrics
from tensorcast_ray._read_cache import CachedArtifact, in_read_only_mapping

if TYPE_CHECKING:
    import torch

__all__ = ["Artifact", "ArtifactInfo", "ArtifactView", "RemoteEntry"]


@dataclass(frozen=True)
class ArtifactInfo:
    """Where one artifact version lives in the cluster (``Artifact.info()``).

    ``replicas``: the node ids holding a copy (``replica_kinds`` says how: ``original``,
    ``replica`` kept by replicate, ``cache`` pulled by a read). ``served_by``: how this
    process's last read of it was served: ``"local"`` (this node's copy), ``"object_store"``
    or ``"collective"`` (pulled from another node by that read), ``"disk"`` (read back from
    shared disk by that read), or None before any read. ``durable`` and ``persistence_*``:
    see docs/persistence.md.
    """

    key: str
    artifact_id: str
    nbytes: int
    tensors: int
    kind: str
    writer: str
    replicas: list[str]
    replica_kinds: dict[str, str] = field(default_factory=dict)
    local: bool = False
    local_kind: str | None = None
    served_by: str | None = None
    created_unix_ms: int = 0
    #: a complete copy is on shared disk (it survives every node's copy going)
    durable: bool = False
    #: the task placing its tiers beyond this node (None: its policy asked for none)
    persistence_task_id: str | None = None
    #: that task's state and error (a ``must`` tier's failure shows here), when known
    persistence_state: str | None = None
    persistence_error: str | None = None


class RemoteEntry:
    """[SDK] The layout of an artifact with no copy on this node (a lazy ``tc.artifact``):
    whole reads pull a replica first; views and ``get_into`` read only their bytes."""

    remote = True

    def __init__(self, info: Any) -> None:
        self.info = info
        self.cols = Columns.from_table(info.tensors, [s.size for s in info.segments])
        self.index = {name: i for i, name in enumerate(self.cols.names)}
        self._metas: dict[str, TensorMeta] | None = None

    @property
    def metas(self) -> dict[str, TensorMeta]:
        if self._metas is None:
            self._metas = {name: self.cols.meta(i) for i, name in enumerate(self.cols.names)}
        return self._metas


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

    def __init__(
        self, entry: CachedArtifact | RemoteEntry, store: Any, served_by: str = "local"
    ) -> None:
        self._entry = entry
        self._store = store
        # How this artifact's next read is served: the Lookup that made it may have pulled
        # it from another node; after one read it is this node's copy ("local").
        self._served_by = served_by

    def _read(self, how: str | None = None) -> None:
        """A read happened (tensors handed out or copied): remember how it was served."""
        from tensorcast_ray._store import served

        served(self.artifact_id, how or self._served_by)
        if how is None:
            self._served_by = "local"

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
        return list(self._entry.cols.names)

    def specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{name: (dtype, shape)}`` without touching any bytes."""
        cols = self._entry.cols
        return dict(zip(cols.names, zip(cols.dtypes, cols.shapes, strict=True), strict=True))

    def __repr__(self) -> str:
        return f"Artifact(key={self.key!r}, tensors={len(self._entry.cols)}, nbytes={self.nbytes})"

    def _select_names(self, names: Sequence[str]) -> list[str]:
        if isinstance(names, str):
            raise InvalidArgumentError("names must be a list of tensor names, not a single str")
        names = list(names)  # a generator would be used up by the check below
        index = self._entry.index
        missing = [n for n in names if n not in index]
        if missing:
            raise InvalidArgumentError(
                f"{self.key} has no tensor named {missing[0]!r}; it holds {len(index)} "
                f"tensors, e.g. {self._entry.cols.names[:5]}"
            )
        return names

    def _select(self, names: Sequence[str] | None) -> list[TensorMeta]:
        if names is None:
            return list(self._entry.metas.values())
        metas = self._entry.metas
        return [metas[n] for n in self._select_names(names)]

    def info(self) -> ArtifactInfo:
        """Where this version lives in the cluster now, and how this process last read it."""
        return self._store._info(self.artifact_id)

    @property
    def _remote(self) -> bool:
        return getattr(self._entry, "remote", False)

    def _localize(self) -> None:
        """A whole read of an artifact with no copy here: pull a replica (once per node)."""
        if self._remote:
            self._entry, self._served_by = self._store._pull_replica(self._entry)

    def _check_alive(self) -> None:
        if self._remote:
            return
        if not self._store._read_cache.check_read(self._entry.info):
            raise NotFoundError(f"{self.key} was deleted (or evicted) after it was opened")

    @property
    def _cached(self) -> CachedArtifact:
        """This node's mapped copy (after ``_localize`` for a remote artifact)."""
        entry = self._entry
        assert isinstance(entry, CachedArtifact), "a remote artifact must be localized first"
        return entry

    def _wrap(self, meta: TensorMeta) -> torch.Tensor:
        return self._cached.wrap(meta)

    def tensor_dict(
        self, device: Any = "cpu", names: Sequence[str] | None = None, copy: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors. On CPU without ``copy``: read-only zero-copy views of shared memory,
        the same tensor objects for every call in this process (each call a new dict)."""
        dev = _check_device(device)
        chosen = None if names is None else self._select_names(names)
        self._localize()
        self._check_alive()
        wrapped = self._cached.tensors()
        out = dict(wrapped) if chosen is None else {n: wrapped[n] for n in chosen}
        get_sdk_metrics().record_data_path("shm")
        self._read()
        return _materialize(out, dev, copy)

    def tensor_dict_into(
        self, targets: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
    ) -> None:
        """Copy into ``targets`` in place; names, shapes and dtypes are checked first."""
        if not isinstance(targets, Mapping):
            raise InvalidArgumentError("targets must be a mapping of tensor name to torch.Tensor")
        chosen = self._select_names(list(targets) if names is None else names)
        cols, index = self._entry.cols, self._entry.index
        expected = {n: (cols.dtypes[index[n]], cols.shapes[index[n]]) for n in chosen}
        _validate_targets(self.key, targets, expected)
        if self._remote:  # only the chosen tensors' bytes cross the network
            metas = self._entry.metas
            read = self._store._read_ranges(self._entry, [metas[n] for n in chosen])
            _copy_into_targets(targets, [(n, read[n]) for n in chosen])
            self._read("object_store")
            return
        self._check_alive()
        wrapped = self._cached.tensors()
        _copy_into_targets(targets, [(n, wrapped[n]) for n in chosen])
        get_sdk_metrics().record_data_path("shm")
        self._read()

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

    def _remote_tensors(self, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
        """[remote artifact] Read only the selected bytes: a contiguous selection is read
        exactly; any other is read as its whole tensor and indexed here."""
        parts: list[TensorMeta] = []
        how: dict[str, Any] = {}
        for m in metas:
            sl = self._slices.get(m.name)
            region = slice_region(m, sl) if sl is not None else None
            if region is not None and region.contiguous:
                parts.append(
                    TensorMeta(
                        m.name, m.dtype, region.shape, m.segment, region.offset, region.nbytes
                    )
                )
                how[m.name] = None
            else:
                parts.append(m)
                how[m.name] = sl
        read = self._artifact._store._read_ranges(self._artifact._entry, parts)
        self._artifact._read("object_store")
        return {
            name: (read[name] if sl is None else read[name][sl].contiguous())
            for name, sl in how.items()
        }

    def tensor_dict(
        self, device: Any = "cpu", names: Sequence[str] | None = None, copy: bool = False
    ) -> dict[str, torch.Tensor]:
        dev = _check_device(device)
        metas = self._artifact._select(names)
        if self._artifact._remote:
            return _materialize(self._remote_tensors(metas), dev, copy)
        self._artifact._check_alive()
        out = {m.name: self._tensor(m)[0] for m in metas}
        get_sdk_metrics().record_data_path("shm")
        self._artifact._read()
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
        if self._artifact._remote:
            read = self._remote_tensors(metas)
            _copy_into_targets(targets, [(m.name, read[m.name]) for m in metas])
            return
        self._artifact._check_alive()
        _copy_into_targets(targets, [(m.name, self._tensor(m)[0]) for m in metas])
        self._artifact._read()


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
        if target.layout != torch.strided or target.is_nested:
            raise InvalidArgumentError(
                f"target {name!r} is a {target.layout} tensor; copy into a dense (strided) one"
            )
        if target.device.type not in ("cpu", "cuda"):
            raise InvalidArgumentError(
                f"target {name!r} is on device {str(target.device)!r}, which holds no bytes to "
                "copy into; allocate it on 'cpu' or 'cuda:N'"
            )
        if in_read_only_mapping(target):
            raise InvalidArgumentError(
                f"target {name!r} is a read-only zero-copy tensor returned by get (writing it "
                "would kill the process); pass a writable tensor, e.g. from get(copy=True) or "
                ".clone()"
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
