"""How an artifact's tensors sit in shared-memory segments, and zero-copy wrapping.  [SDK, daemon]

An artifact is a list of tensors packed, in order, into one or more segments (see
:mod:`tensorcast_ray._shm`).  The plan is metadata only (names, canonical dtype strings,
shapes, segment index, byte offset), so the daemon and the Global Store handle it without
torch; torch is imported lazily inside the functions that touch bytes.

One put, step by step::

    [SDK]    describe_tensors(state_dict) -> [(name, dtype, shape), ...]
    [SDK]    plan_layout(specs, segment_bytes) -> LayoutPlan: each tensor 256-byte aligned,
             segments of up to segment_bytes, a tensor larger than that alone in its own.
    [daemon] takes one segment per entry of plan.segment_sizes (pre-faulted, from its pool).
    [SDK]    maps each segment writable and copy_into(tensor, mapping, meta.offset) for each
             tensor: one torch copy_ per tensor, so large copies use every intra-op thread.

One get, step by step::

    [daemon] answers with the LayoutPlan (to_dict()) and the segment names.
    [SDK]    maps each segment read-only and wrap_tensor(mapping, meta) for each tensor: a
             tensor over the mapped bytes, no copy.  Such tensors must not be written.
    [SDK]    for artifact.view(slices=...): normalize_slices() then slice_region(); a
             contiguous selection is wrapped in place, any other is wrapped, indexed, copied.

A zero-byte tensor takes no bytes and has ``segment == NO_SEGMENT`` (-1).
"""

from __future__ import annotations

import math
import mmap
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensorcast_ray._dtypes import ITEMSIZE, itemsize, torch_dtype
from tensorcast_ray._dtypes import dtype_name as _dtype_name
from tensorcast_ray._errors import ArtifactError, DataLossError, InvalidArgumentError
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_TENSOR_NAME_LENGTH",
    "NO_SEGMENT",
    "Columns",
    "LayoutPlan",
    "SliceRegion",
    "TensorMeta",
    "copy_into",
    "describe_tensors",
    "normalize_slices",
    "place",
    "plan_layout",
    "slice_region",
    "wrap_tensor",
]

NO_SEGMENT = -1
_PAGE_BYTES = 4096  # same as _shm.PAGE_BYTES; not imported so this module stands alone

Buffer = memoryview | mmap.mmap | bytearray


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor's bytes are: ``segment`` index and byte ``offset`` in it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segment: int
    offset: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "segment": self.segment,
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorMeta:
        try:
            meta = cls(
                name=str(data["name"]),
                dtype=str(data["dtype"]),
                shape=tuple(int(d) for d in data["shape"]),
                segment=int(data["segment"]),
                offset=int(data["offset"]),
                nbytes=int(data["nbytes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed tensor metadata {data!r}: {exc!r}") from None
        expected = math.prod(meta.shape) * itemsize(meta.dtype)
        if meta.nbytes != expected or meta.offset < 0 or min(meta.shape, default=0) < 0:
            raise DataLossError(
                f"tensor metadata for {meta.name!r} is inconsistent: {meta.dtype} "
                f"{meta.shape} is {expected} bytes, metadata says {meta.nbytes} at offset "
                f"{meta.offset}. The artifact's manifest is corrupt; put it again."
            )
        return meta


@dataclass(frozen=True)
class LayoutPlan:
    """Every tensor of one artifact and the size of each segment they sit in."""

    tensors: tuple[TensorMeta, ...]
    segment_sizes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.segment_sizes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "segment_sizes": list(self.segment_sizes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayoutPlan:
        try:
            tensors = tuple(TensorMeta.from_dict(t) for t in data["tensors"])
            sizes = tuple(int(s) for s in data["segment_sizes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed layout plan: {exc!r}") from None
        for t in tensors:
            if t.nbytes and not (
                0 <= t.segment < len(sizes) and t.offset + t.nbytes <= sizes[t.segment]
            ):
                raise DataLossError(
                    f"tensor {t.name!r} lies outside its segment {t.segment} "
                    f"(segment sizes {sizes}); the artifact's manifest is corrupt"
                )
        return cls(tensors, sizes)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def plan_layout(
    specs: Sequence[tuple[str, str, tuple[int, ...]]], segment_bytes: int, align: int = 256
) -> LayoutPlan:
    """Pack ``(name, dtype, shape)`` specs, in order, into segments.  [SDK or daemon]

    Each offset is a multiple of ``align``; a tensor larger than ``segment_bytes`` gets a
    segment of its own (packing then goes on in the segment that was open); segment sizes
    are rounded up to 4096; zero-byte tensors take no bytes (segment NO_SEGMENT).
    """
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, (tuple, list)) or len(spec) != 3:
            raise InvalidArgumentError(
                f"tensor spec #{i} must be (name, dtype, shape), got {spec!r}"
            )
        name, dtype, shape = spec
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"tensor #{i} needs a non-empty str name, got {name!r}")
        if not isinstance(shape, (tuple, list)) or not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidArgumentError(
                f"tensor {name!r}: shape must be a tuple of non-negative ints, got {shape!r}"
            )
        names.append(name)
        dtypes.append(dtype)
        shapes.append(tuple(shape))
    cols = Columns.of(names, dtypes, shapes)
    segments, offsets, sizes = place(cols.nbytes, segment_bytes, align)
    metas = tuple(
        TensorMeta(n, d, sh, seg, off, nb)
        for n, d, sh, seg, off, nb in zip(
            names, dtypes, shapes, segments, offsets, cols.nbytes, strict=True
        )
    )
    return LayoutPlan(metas, sizes)


def place(
    nbytes: Sequence[int], segment_bytes: int, align: int = 256
) -> tuple[list[int], list[int], tuple[int, ...]]:
    """``(segment per tensor, offset per tensor, segment sizes)`` for tensors of ``nbytes``,
    packed in order as :func:`plan_layout` describes.  [SDK or daemon]

    Plain integer work, one short step per tensor: it runs on every put of up to 20,000
    tensors, so the per-tensor validation happened before, column by column."""
    if not _is_int(segment_bytes) or segment_bytes <= 0:
        raise InvalidArgumentError(f"segment_bytes must be a positive int, got {segment_bytes!r}")
    if not _is_int(align) or align <= 0 or align & (align - 1):
        raise InvalidArgumentError(f"align must be a positive power of two, got {align!r}")
    used: list[int] = []  # bytes used in each segment so far
    open_seg = NO_SEGMENT  # the segment small tensors are packed into
    fill = 0  # bytes used in open_seg
    segments: list[int] = []
    offsets: list[int] = []
    mask = align - 1
    for nb in nbytes:
        if nb == 0:
            segments.append(NO_SEGMENT)
            offsets.append(0)
        elif nb > segment_bytes:
            used.append(nb)
            segments.append(len(used) - 1)
            offsets.append(0)
        else:
            offset = (fill + mask) & ~mask
            if open_seg == NO_SEGMENT or offset + nb > segment_bytes:
                used.append(0)
                open_seg, offset = len(used) - 1, 0
            fill = offset + nb
            used[open_seg] = fill
            segments.append(open_seg)
            offsets.append(offset)
    return segments, offsets, tuple(_round_up(u, _PAGE_BYTES) for u in used)


@dataclass(frozen=True)
class Columns:
    """An artifact's tensors as parallel lists (entry ``i`` of each is tensor ``i``): the
    in-memory twin of the wire's ``TensorTable``, so no object is made per tensor.

    ``segments`` / ``offsets`` are empty until the tensors are placed.  [SDK, daemon]
    """

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    nbytes: list[int]
    segments: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def of(cls, names: list[str], dtypes: list[str], shapes: list[tuple[int, ...]]) -> Columns:
        """Validated columns of unplaced tensors: unique non-empty names, known dtypes."""
        if len(set(names)) != len(names):
            seen: set[str] = set()
            for dup in names:
                if dup in seen:
                    break
                seen.add(dup)
            raise InvalidArgumentError(f"tensor name {dup!r} appears twice; names must be unique")
        if "" in names:
            raise InvalidArgumentError("every tensor needs a non-empty name")
        sizes: dict[str, int] = {}
        for d in set(dtypes):
            try:
                sizes[d] = itemsize(d)
            except ArtifactError as exc:
                name = names[dtypes.index(d)]
                raise InvalidArgumentError(f"tensor {name!r}: {exc.message}") from None
        nbytes = [math.prod(sh) * sizes[d] for d, sh in zip(dtypes, shapes, strict=True)]
        return cls(names, dtypes, shapes, nbytes)

    def placed(self, segments: list[int], offsets: list[int], sizes: Sequence[int]) -> Columns:
        """These columns with their placement, checked against the segment ``sizes``: a
        tensor outside its segment would read or write another file's bytes."""
        n = len(self.names)
        if len(segments) != n or len(offsets) != n:
            raise DataLossError(
                f"the layout places {len(segments)} of {n} tensors; the artifact's metadata "
                "is corrupt"
            )
        count = len(sizes)
        for name, seg, off, nb in zip(self.names, segments, offsets, self.nbytes, strict=True):
            if nb and not (0 <= seg < count and 0 <= off and off + nb <= sizes[seg]):
                raise DataLossError(
                    f"tensor {name!r} ({nb} bytes at offset {off}) lies outside its segment "
                    f"{seg} (segment sizes {list(sizes)}); the artifact's metadata is corrupt"
                )
        return Columns(self.names, self.dtypes, self.shapes, self.nbytes, segments, offsets)

    def meta(self, i: int) -> TensorMeta:
        seg = self.segments[i] if self.segments else NO_SEGMENT
        off = self.offsets[i] if self.offsets else 0
        return TensorMeta(self.names[i], self.dtypes[i], self.shapes[i], seg, off, self.nbytes[i])

    def to_table(self) -> common_pb2.TensorTable:
        """The wire form.  [SDK, daemon]"""
        joined = "\0".join(self.names)
        if joined.count("\0") > max(len(self.names) - 1, 0):
            bad = next(n for n in self.names if "\0" in n)
            raise InvalidArgumentError(f"tensor name {bad!r} holds a NUL character")
        distinct = list(dict.fromkeys(self.dtypes))
        code = {d: i for i, d in enumerate(distinct)}
        dims: list[int] = []
        for sh in self.shapes:
            dims.extend(sh)
        return common_pb2.TensorTable(
            names=joined.encode(),
            dtypes=distinct,
            dtype_index=[code[d] for d in self.dtypes],
            ndim=[len(sh) for sh in self.shapes],
            dims=dims,
            segment=self.segments,
            offset=self.offsets,
        )

    @classmethod
    def from_table(
        cls, table: common_pb2.TensorTable, segment_sizes: Sequence[int] | None = None
    ) -> Columns:
        """Decode and validate the wire form; with ``segment_sizes`` the placement too (an
        artifact's layout), else none may be given (a write request).  [SDK, daemon]"""
        try:
            text = table.names.decode()
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"tensor names are not UTF-8: {exc}") from None
        codes, ndims, flat = list(table.dtype_index), list(table.ndim), list(table.dims)
        n = len(codes)
        names = text.split("\0") if n else ([] if not text else [text])
        if len(names) != n or len(ndims) != n or sum(ndims) != len(flat):
            raise InvalidArgumentError(
                f"malformed tensor table: {len(names)} names, {n} dtypes, {len(ndims)} ranks "
                f"and {len(flat)} dims do not describe the same tensors"
            )
        distinct = list(table.dtypes)
        if codes and max(codes) >= len(distinct):
            raise InvalidArgumentError(
                f"malformed tensor table: dtype index {max(codes)} of {len(distinct)} dtypes"
            )
        if flat and min(flat) < 0:
            raise InvalidArgumentError("malformed tensor table: a shape has a negative dimension")
        dtypes = [distinct[c] for c in codes]
        shapes: list[tuple[int, ...]] = []
        pos = 0
        for k in ndims:
            shapes.append(tuple(flat[pos : pos + k]))
            pos += k
        cols = cls.of(names, dtypes, shapes)
        if segment_sizes is None:
            if len(table.segment) or len(table.offset):
                raise InvalidArgumentError("a write request must not place its tensors")
            return cols
        return cols.placed(list(table.segment), list(table.offset), segment_sizes)


#: the longest tensor name a put, register or import accepts.
MAX_TENSOR_NAME_LENGTH = 4096


def describe_tensors(tensors: Mapping[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, canonical dtype, shape)`` of each torch tensor or numpy array.  [SDK]

    Any device is described (a CUDA tensor's metadata is the same); moving its bytes is the
    business of the transport that handles that device.
    """
    cols = describe(tensors)
    return list(zip(cols.names, cols.dtypes, cols.shapes, strict=True))


def describe(tensors: Mapping[str, Any]) -> Columns:
    """:func:`describe_tensors` as validated, unplaced :class:`Columns`.  [SDK]"""
    import numpy as np
    import torch

    if not isinstance(tensors, Mapping):
        raise InvalidArgumentError(
            f"expected a mapping of name -> tensor (e.g. a state_dict), got {type(tensors)}"
        )
    known = _torch_dtype_names()
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"tensor names must be str, got {key!r} ({type(key)})")
        if len(key) > MAX_TENSOR_NAME_LENGTH:
            raise InvalidArgumentError(
                f"tensor name {key[:40]!r}... is {len(key)} characters; the limit is "
                f"{MAX_TENSOR_NAME_LENGTH}"
            )
        if "\0" in key:
            raise InvalidArgumentError(f"tensor name {key!r} holds a NUL character; remove it")
        if isinstance(value, torch.Tensor):
            if value.is_nested:
                raise InvalidArgumentError(
                    f"tensor {key!r} is a nested tensor; only dense tensors are stored: store "
                    "its components (.unbind()) as separate tensors"
                )
            if value.layout != torch.strided:
                raise InvalidArgumentError(
                    f"tensor {key!r} has layout {value.layout}; only dense tensors are "
                    f"stored: call .to_dense() first"
                )
            name = known.get(value.dtype)
            dtype: Any = value.dtype
        elif isinstance(value, np.ndarray):
            # copy_into stores foreign byte orders native, so describe them native too.
            dtype = value.dtype if value.dtype.isnative else value.dtype.newbyteorder("=")
            name = None
        else:
            raise InvalidArgumentError(
                f"value of {key!r} is a {type(value).__module__}.{type(value).__qualname__}; "
                f"only torch.Tensor and numpy.ndarray are stored as tensors"
            )
        if name is None:
            try:
                name = _dtype_name(dtype)
            except ArtifactError as exc:
                raise InvalidArgumentError(f"tensor {key!r}: {exc.message}") from None
        names.append(key)
        dtypes.append(name)
        shapes.append(tuple(value.shape))
    return Columns.of(names, dtypes, shapes)


_TORCH_NAMES: dict[Any, str] = {}


def _torch_dtype_names() -> dict[Any, str]:
    """torch dtype → canonical name, built once: ``str(dtype)`` per tensor is measurable
    at 20,000 tensors."""
    if not _TORCH_NAMES:
        import torch

        for name in ITEMSIZE:
            dtype = getattr(torch, name, None)
            if isinstance(dtype, torch.dtype):
                _TORCH_NAMES[dtype] = name
    return _TORCH_NAMES


def _as_torch(tensor: Any) -> torch.Tensor:
    import numpy as np
    import torch

    if isinstance(tensor, np.ndarray):
        if any(s < 0 for s in tensor.strides) or not tensor.dtype.isnative:
            # torch.from_numpy refuses negative strides and foreign byte order.
            tensor = np.ascontiguousarray(tensor, dtype=tensor.dtype.newbyteorder("="))
        try:
            with warnings.catch_warnings():
                # A read-only array is only read here.
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(tensor)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"numpy dtype {tensor.dtype} has no torch equivalent: {exc}"
            ) from None
    if isinstance(tensor, torch.Tensor):
        return tensor
    raise InvalidArgumentError(
        f"expected a torch.Tensor or numpy.ndarray, got {type(tensor).__qualname__}"
    )


def _bytes_view(buf: Buffer, offset: int, nbytes: int, what: str) -> torch.Tensor:
    """A uint8 tensor over ``buf[offset:offset + nbytes]``, no copy."""
    length = memoryview(buf).nbytes
    if offset < 0 or offset + nbytes > length:
        raise InvalidArgumentError(
            f"{what}: bytes [{offset}, {offset + nbytes}) do not fit a buffer of {length} bytes"
        )
    return bytes_tensor(buf, nbytes, offset)


_readonly_lock = threading.Lock()
_readonly_seen = False


def bytes_tensor(buf: Buffer, count: int = -1, offset: int = 0) -> torch.Tensor:
    """``torch.frombuffer`` as uint8 over ``buf``, no copy.  [SDK]

    Through a memoryview: torch keeps the object it is given alive but releases its buffer
    export, so an mmap passed directly could be closed under a live tensor (a segfault on
    the next read). A memoryview holds the export until the last tensor over it dies.

    torch warns, once per process, that a read-only buffer makes a tensor it cannot protect;
    callers document that tensors over read-only mappings must not be written. The warning
    is silenced for the first such call only (``catch_warnings`` swaps process-wide state,
    so it must not run per tensor, nor while other threads read).
    """
    global _readonly_seen
    import torch

    view = memoryview(buf)
    if view.readonly and not _readonly_seen:
        with _readonly_lock:
            if not _readonly_seen:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    out = torch.frombuffer(view, dtype=torch.uint8, count=count, offset=offset)
                _readonly_seen = True
                return out
    return torch.frombuffer(view, dtype=torch.uint8, count=count, offset=offset)


def copy_into(tensor: Any, dest: Buffer, offset: int) -> None:
    """Copy one tensor's bytes, C-contiguous, into ``dest`` at ``offset``.  [SDK]

    Every dtype is copied as raw bytes (viewed as uint8), so bool, complex, bfloat16 and
    float8 round-trip bit-exactly.  torch's ``copy_`` splits large copies over the intra-op
    threads.  Conjugate / negative views are resolved, non-contiguous inputs stored
    contiguous.  A tensor on another device is copied to host by the same ``copy_``.
    """
    import torch

    src = _as_torch(tensor)
    if src.layout != torch.strided or src.device.type == "meta":
        raise InvalidArgumentError(
            f"cannot copy a {src.layout} tensor on device {src.device}: it has no dense bytes"
        )
    src = src.detach().resolve_conj().resolve_neg().contiguous()
    nbytes = src.numel() * src.element_size()
    if nbytes == 0:
        return
    if memoryview(dest).readonly:
        raise InvalidArgumentError("copy_into needs a writable buffer; map the segment writable")
    _bytes_view(dest, offset, nbytes, "copy_into").copy_(src.reshape(-1).view(torch.uint8))


def wrap_tensor(buf: Buffer, meta: TensorMeta, base_offset: int = 0) -> torch.Tensor:
    """A tensor over ``buf[base_offset + meta.offset:][:meta.nbytes]``, no copy.  [SDK]

    ``base_offset`` is where the segment starts in ``buf`` (e.g. when only part of it is
    mapped).  Over a read-only buffer the tensor MUST NOT be written: the write would hit
    a read-only page (SIGSEGV).  Callers hand users such tensors only behind an explicit
    ``.clone()`` or a documented read-only contract.  While the tensor lives, its mmap
    cannot be closed (BufferError), which keeps its bytes mapped.
    """
    import torch

    dtype = torch_dtype(meta.dtype)
    expected = math.prod(meta.shape) * itemsize(meta.dtype)
    if meta.nbytes != expected:
        raise DataLossError(
            f"tensor {meta.name!r}: {meta.dtype} {meta.shape} is {expected} bytes but its "
            f"metadata says {meta.nbytes}; the artifact's manifest is corrupt"
        )
    if expected == 0:
        return torch.empty(meta.shape, dtype=dtype)
    raw = _bytes_view(buf, base_offset + meta.offset, expected, f"tensor {meta.name!r}")
    return raw.view(dtype).reshape(meta.shape)


@dataclass(frozen=True)
class SliceRegion:
    """The bytes a slice selection touches.

    ``contiguous``: the selection is exactly ``[offset, offset + nbytes)`` in the segment
    (absolute, i.e. ``meta.offset`` included), a C-contiguous tensor of ``shape``: map and
    wrap it.  Otherwise ``[offset, offset + nbytes)`` is the bounding range from the first
    to the last selected element: wrap it (or the whole tensor), index, copy.
    """

    contiguous: bool
    offset: int
    nbytes: int
    shape: tuple[int, ...]


SliceSpec = slice | tuple[slice, ...] | Sequence[tuple[int, slice]]


def normalize_slices(meta: TensorMeta, spec: SliceSpec) -> tuple[slice, ...]:
    """One ``slice(start, stop, step)`` of plain ints per dim of ``meta``.  [SDK]

    ``spec`` is a slice, a tuple of slices for the leading dims, or a list of
    ``(dim, slice)`` pairs.  Unlike Python, out-of-range bounds are errors, not clamped:
    a view that asks for rows that are not there is a bug in the caller.
    """
    ndim = len(meta.shape)
    by_dim: dict[int, slice] = {}
    if isinstance(spec, slice):
        spec = (spec,)
    if isinstance(spec, tuple):
        if len(spec) > ndim:
            raise InvalidArgumentError(
                f"tensor {meta.name!r} has {ndim} dims (shape {meta.shape}); got {len(spec)} slices"
            )
        by_dim = dict(enumerate(spec))
    elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        for pair in spec:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not _is_int(pair[0]):
                raise InvalidArgumentError(
                    f"tensor {meta.name!r}: expected (dim, slice) pairs, got {pair!r}"
                )
            dim, sl = pair
            if not -ndim <= dim < ndim:
                raise InvalidArgumentError(
                    f"tensor {meta.name!r}: dim {dim} is out of range for shape {meta.shape}"
                )
            dim %= ndim
            if dim in by_dim:
                raise InvalidArgumentError(f"tensor {meta.name!r}: dim {dim} is sliced twice")
            by_dim[dim] = sl
    else:
        raise InvalidArgumentError(
            f"tensor {meta.name!r}: slices must be a tuple of slices or a list of (dim, slice) "
            f"pairs, got {type(spec).__qualname__}"
        )
    return tuple(_resolve(meta, d, by_dim.get(d, slice(None))) for d in range(ndim))


def _resolve(meta: TensorMeta, dim: int, sl: Any) -> slice:
    size = meta.shape[dim]
    where = f"tensor {meta.name!r} dim {dim} (size {size})"
    if not isinstance(sl, slice):
        raise InvalidArgumentError(f"{where}: expected a slice, got {sl!r}")
    for part in (sl.start, sl.stop, sl.step):
        if part is not None and not _is_int(part):
            raise InvalidArgumentError(f"{where}: slice bounds must be ints or None, got {sl}")
    step = 1 if sl.step is None else sl.step
    if step <= 0:
        raise InvalidArgumentError(f"{where}: step must be positive, got {step}")
    start = 0 if sl.start is None else sl.start + size if sl.start < 0 else sl.start
    stop = size if sl.stop is None else sl.stop + size if sl.stop < 0 else sl.stop
    if not (0 <= start <= size and 0 <= stop <= size):
        raise InvalidArgumentError(
            f"{where}: slice {sl.start}:{sl.stop} resolves to {start}:{stop}, outside [0, {size}]"
        )
    if start > stop:
        raise InvalidArgumentError(f"{where}: start {start} is after stop {stop}")
    return slice(start, stop, step)


def slice_region(meta: TensorMeta, slices: SliceSpec) -> SliceRegion:
    """Whether the selection is one contiguous byte range, and which.  [SDK]"""
    norm = normalize_slices(meta, slices)
    size = itemsize(meta.dtype)
    counts = [len(range(s.start, s.stop, s.step)) for s in norm]
    shape = tuple(counts)
    # Element strides of the stored (C-contiguous) tensor.
    strides = [1] * len(meta.shape)
    for d in range(len(meta.shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * meta.shape[d + 1]
    first = sum(s.start * st for s, st in zip(norm, strides, strict=True))
    if 0 in counts:
        return SliceRegion(True, meta.offset + first * size, 0, shape)
    # Contiguous iff, from the last dim up, each dim that keeps more than one element steps
    # by exactly the number of elements selected below it.
    expected, contiguous = 1, True
    for n, s, st in zip(reversed(counts), reversed(norm), reversed(strides), strict=True):
        if n == 1:
            continue
        if s.step * st != expected:
            contiguous = False
            break
        expected *= n
    last = sum(
        (s.start + (n - 1) * s.step) * st for s, n, st in zip(norm, counts, strides, strict=True)
    )
    return SliceRegion(contiguous, meta.offset + first * size, (last - first + 1) * size, shape)
