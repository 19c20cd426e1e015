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
from typing import TYPE_CHECKING, Any

from tensorcast_ray._errors import InvalidArgumentError, NotFoundError, UnimplementedError
from tensorcast_ray._layout import TensorMeta, normalize_slices, slice_region
from tensorcast_ray._metrics import get_sdk_metrics
from tensorcast_ray._read_cache import CachedArtifact, in_read_only_mapping

if TYPE_CHECKING:
    import torch

__all__ = ["Artifact", "ArtifactView"]


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

    def __init__(self, entry: CachedArtifact, store: Any) -> None:
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

    def _check_alive(self) -> None:
        if not self._store._read_cache.check_read(self._entry.info):
            raise NotFoundError(f"{self.key} was deleted (or evicted) after it was opened")

    def _wrap(self, meta: TensorMeta) -> torch.Tensor:
        return self._entry.wrap(meta)

    def tensor_dict(
        self, device: Any = "cpu", names: Sequence[str] | None = None, copy: bool = False
    ) -> dict[str, torch.Tensor]:
        """The tensors. On CPU without ``copy``: read-only zero-copy views of shared memory,
        the same tensor objects for every call in this process (each call a new dict)."""
        dev = _check_device(device)
        chosen = None if names is None else self._select_names(names)
        self._check_alive()
        wrapped = self._entry.tensors()
        out = dict(wrapped) if chosen is None else {n: wrapped[n] for n in chosen}
        get_sdk_metrics().record_data_path("shm")
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
        self._check_alive()
        wrapped = self._entry.tensors()
        _copy_into_targets(targets, [(n, wrapped[n]) for n in chosen])
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
