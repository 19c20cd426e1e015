"""The seam every data path plugs into: static capabilities and the two halves.  [SDK, daemon]

A transport moves one artifact's bytes between an SDK process and memory the node daemon
owns.  One module holds both halves of a transport, and every method says which process
calls it: the daemon half owns the memory (``allocate``, ``free``, ``close``); the SDK half
maps it and moves tensors in and out (``map_for_write``, ``fill``, ``map_for_read``,
``wrap_base``, ``unmap``).  Bytes never travel through the control plane: the daemon only
answers :data:`SegmentRef` metadata.  Subclasses implement those primitives; the helper
:meth:`Transport.tensors` is derived from them.  Every transport passes the conformance
suite in :mod:`tensorcast_ray.testing` by subclassing it.

One put through a transport, step by step::

    [SDK]    BeginWrite(key, tensor specs): metadata only; the daemon plans the layout.
    [daemon] allocate(size) for each planned segment -> SegmentRef (name, size).
    [SDK]    map_for_write(ref) for each segment; fill(region, tensor, offset) per tensor;
             unmap(region); CommitWrite.
    [daemon] publishes the key; on abort, free(refs).

One get, step by step::

    [daemon] Lookup answers the SegmentRefs and the layout (one compact TensorTable).
    [SDK]    map_for_read(ref) per segment; wrap_base(region) once per segment; then
             tensors(bases, columns): one strided view of its segment's base per tensor.

A delete is [daemon] free(refs): a region is never handed out again, and a mapping made
before the free keeps its bytes (readers never see them change).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tensorcast_ray._dtypes import itemsize, torch_dtype
from tensorcast_ray._errors import DataLossError, InvalidArgumentError
from tensorcast_ray._layout import NO_SEGMENT, Columns, TensorMeta

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICES", "Capabilities", "SegmentRef", "Transport"]

#: one region of transport memory as the control plane names it: (name, size in bytes).
SegmentRef = tuple[str, int]

#: the tensor devices a transport may declare.
DEVICES = frozenset({"cpu", "cuda"})


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do, known without instantiating it (the SDK picks by these).

    ``name``: its registry name.  ``same_node_only``: writer, daemon and reader must share a
    host.  ``one_sided``: a reader reaches the bytes without the writer's process taking
    part (the writer may have exited).  ``devices``: where the tensors it reads and writes
    live, with no host copy in between.  ``zero_copy_reads``: a read returns tensors over
    the transport's memory itself, so it sees the bytes without copying them.
    """

    name: str
    same_node_only: bool
    one_sided: bool
    devices: frozenset[str]
    zero_copy_reads: bool

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise InvalidArgumentError(f"a transport name is an identifier, got {self.name!r}")
        if not self.devices or not self.devices <= DEVICES:
            raise InvalidArgumentError(
                f"transport {self.name!r}: devices must be a non-empty subset of "
                f"{sorted(DEVICES)}, got {sorted(self.devices)}"
            )


class Transport(abc.ABC):
    """A data path's two halves.  Each method's docstring names the process that calls it.

    Errors are ``ArtifactError``: a bad size or name is InvalidArgumentError, memory that is
    gone NotFoundError, a region shorter than its ref DataLossError, full memory
    ResourceExhaustedError.
    """

    capabilities: ClassVar[Capabilities]

    # ---- daemon half -------------------------------------------------------------------
    @abc.abstractmethod
    def allocate(self, size: int) -> SegmentRef:
        """[daemon] A fresh region of at least ``size`` bytes, owned by the caller.

        Never a region that held other data: readers may still map freed ones."""

    @abc.abstractmethod
    def free(self, segments: Iterable[SegmentRef]) -> None:
        """[daemon] Release regions (idempotent); mappings made before keep their bytes."""

    def close(self) -> None:  # noqa: B027 - most transports have no background work
        """[daemon] Stop background work and release memory nobody was handed."""

    # ---- SDK half ----------------------------------------------------------------------
    @abc.abstractmethod
    def map_for_write(self, segment: SegmentRef, *, prefault: bool = False) -> Any:
        """[SDK] A writable region over ``segment``; ``prefault`` installs every page now
        (for a writer that maps ahead of its copy, e.g. write staging)."""

    @abc.abstractmethod
    def fill(self, region: Any, tensor: Any, offset: int) -> None:
        """[SDK] Copy one tensor's bytes, C-contiguous, into ``region`` at ``offset``."""

    @abc.abstractmethod
    def map_for_read(self, segment: SegmentRef) -> Any:
        """[SDK] A read-only region over ``segment``: ``fill`` into it is refused."""

    @abc.abstractmethod
    def wrap_base(self, region: Any) -> torch.Tensor:
        """[SDK] One uint8 tensor over the whole region, no copy: the base every tensor of
        the segment is sliced from.  Over a read-only region it must not be written."""

    @abc.abstractmethod
    def unmap(self, region: Any) -> None:
        """[SDK] Drop this process's mapping; tensors still over it keep it alive."""

    # ---- derived -----------------------------------------------------------------------
    def tensor(self, bases: Sequence[torch.Tensor], meta: TensorMeta) -> torch.Tensor:
        """[SDK] The tensor ``meta`` describes, over its segment's base (no copy)."""
        one = Columns(
            [meta.name], [meta.dtype], [meta.shape], [meta.nbytes], [meta.segment], [meta.offset]
        )
        return self.tensors(bases, one)[meta.name]

    def tensors(self, bases: Sequence[torch.Tensor], cols: Columns) -> dict[str, torch.Tensor]:
        """[SDK] Every tensor of the placed ``cols``, over the segments' bases (no copy).

        Straight from the columns (no object per tensor): one ``as_strided`` per tensor over
        a typed view of its segment, made once per (segment, dtype), with the strides made
        once per distinct shape (a state_dict repeats a few shapes).  Raises DataLossError
        for a layout that does not fit its segments."""
        import torch

        sizes = {d: itemsize(d) for d in set(cols.dtypes)}
        typed: dict[tuple[int, str], tuple[torch.Tensor, int, int]] = {}
        strides_of: dict[tuple[int, ...], list[int]] = {}
        out: dict[str, torch.Tensor] = {}
        count = len(bases)
        for name, dtype, shape, nbytes, seg, off in zip(
            cols.names,
            cols.dtypes,
            cols.shapes,
            cols.nbytes,
            cols.segments,
            cols.offsets,
            strict=True,
        ):
            size = sizes[dtype]
            strides = strides_of.get(shape)
            if strides is None:
                strides = [1] * len(shape)
                for i in range(len(shape) - 2, -1, -1):
                    strides[i] = strides[i + 1] * shape[i + 1]
                strides_of[shape] = strides
            if nbytes != (strides[0] * shape[0] if shape else 1) * size:
                raise _corrupt(name, f"{dtype} {shape} is not {nbytes} bytes")
            if seg == NO_SEGMENT:
                out[name] = torch.empty(shape, dtype=torch_dtype(dtype))
                continue
            found = typed.get((seg, dtype))
            if found is None:
                if not 0 <= seg < count:
                    raise _corrupt(name, f"segment {seg} of {count}")
                base = bases[seg]
                whole = base.numel() - base.numel() % size
                view = base[:whole].view(torch_dtype(dtype))
                found = (view, whole, view.storage_offset())
                typed[(seg, dtype)] = found
            view, limit, start = found
            if off % size or off < 0 or off + nbytes > limit:
                raise _corrupt(name, f"bytes [{off}, {off + nbytes}) of its segment")
            out[name] = view.as_strided(shape, strides, start + off // size)
        return out


def _corrupt(name: str, what: str) -> DataLossError:
    return DataLossError(
        f"tensor {name!r} does not fit its segments ({what}); the artifact's manifest "
        "is corrupt: delete it and put it again"
    )
