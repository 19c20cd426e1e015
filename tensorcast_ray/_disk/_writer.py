"""Export: stream tensors into safetensors shards, then commit the manifest.  [daemon, SDK]

Runs in the daemon's persistence tasks (and in the SDK for a direct export).  One export:

1. Validate the sources and plan shards: all tensors in one file up to ``shard_threshold``,
   else files of at most ``shard_bytes`` of data (tensors whole and in order; a tensor
   above the cap gets a file of its own).
2. If the directory already has a valid manifest: same tensors and bytes → verify the shard
   files against their checksums and return it (idempotent re-export), or rewrite them if
   one is damaged; different → :class:`AlreadyExistsError` (versions are immutable).  With
   no valid manifest, leftovers of a crashed export are removed.  A manifest that cannot be
   read for another reason (permissions, storage down) fails the export: it is never taken
   for a missing one.
3. Write the shards, ``parallelism`` at a time, each streamed from the source memoryviews
   in chunks of at most ``max_buffer_bytes`` (never a whole shard in memory) and published
   atomically (see :class:`atomic_writer`), checksumming as the bytes go.
4. Write ``manifest.json`` last, atomically.  Until then readers see NOT_FOUND.

Concurrent exports of one key must carry the same bytes (the Global Store runs one
persistence task per key); the idempotency check makes retries safe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from tensorcast_ray._disk._checksum import Checksum, checksum_for, default_checksum, to_hex
from tensorcast_ray._disk._manifest import FORMAT_VERSION, Manifest, ManifestShard, ManifestTensor
from tensorcast_ray._disk._paths import (
    MANIFEST_NAME,
    artifact_dirname,
    atomic_writer,
    filesystem,
    join,
    map_os_error,
)
from tensorcast_ray._disk._reader import load_manifest
from tensorcast_ray._disk._safetensors import build_header, stored_dtype
from tensorcast_ray._disk._streams import Progress, check_tuning
from tensorcast_ray._dtypes import itemsize
from tensorcast_ray._errors import (
    AlreadyExistsError,
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
)

__all__ = ["TensorSource", "delete_artifact", "write_artifact"]

_MIN_UPLOAD_BLOCK = 5 << 20  # S3's smallest multipart part


@dataclass(frozen=True)
class TensorSource:
    """A tensor to export: canonical dtype, shape and its contiguous bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview  # contiguous bytes, exactly prod(shape) * itemsize(dtype) long


def _bytes_of(src: TensorSource) -> memoryview:
    if not isinstance(src, TensorSource):
        raise InvalidArgumentError(f"expected a TensorSource, got {type(src).__name__}")
    if not isinstance(src.name, str) or not src.name or src.name == "__metadata__":
        raise InvalidArgumentError(f"tensor name must be a non-empty string, got {src.name!r}")
    size = itemsize(src.dtype)
    if not isinstance(src.shape, tuple) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in src.shape
    ):
        raise InvalidArgumentError(
            f"tensor {src.name!r}: shape must be a tuple of non-negative ints, got {src.shape!r}"
        )
    try:
        view = memoryview(src.data)
        if not view.c_contiguous:
            raise ValueError("not C-contiguous")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"tensor {src.name!r}: data must be a contiguous buffer ({exc}); "
            "call .contiguous() first"
        ) from None
    want = math.prod(src.shape) * size
    if view.nbytes != want:
        raise InvalidArgumentError(
            f"tensor {src.name!r}: data has {view.nbytes} bytes but {src.dtype}{list(src.shape)} "
            f"needs {want}"
        )
    return view


def plan_shards(sizes: Sequence[int], shard_bytes: int, shard_threshold: int) -> list[list[int]]:
    """Indexes of the tensors in each shard (in order)."""
    if sum(sizes) <= shard_threshold:
        return [list(range(len(sizes)))]
    shards: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, n in enumerate(sizes):
        if current and filled + n > shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(i)
        filled += n
    if current:
        shards.append(current)
    return shards


def _write_all(f: Any, view: memoryview) -> None:
    while view.nbytes:
        n = f.write(view)
        view = view[view.nbytes if n is None else n :]


def _write_shard(
    fs: fsspec.AbstractFileSystem,
    path: str,
    header: bytes,
    views: Sequence[memoryview],
    algo: Checksum,
    chunk: int,
    progress: Progress,
) -> tuple[int, list[int]]:
    """Stream one shard; returns (its checksum, each tensor's checksum)."""
    crcs = []
    with atomic_writer(fs, path, max(chunk, _MIN_UPLOAD_BLOCK)) as f:
        _write_all(f, memoryview(header))
        shard_crc = algo.of(header)
        for view in views:
            crc = 0
            for pos in range(0, view.nbytes, chunk):
                piece = view[pos : pos + chunk]
                _write_all(f, piece)
                crc = algo.update(crc, piece)
                progress.add(piece.nbytes)
            crcs.append(crc)
            shard_crc = algo.combine(shard_crc, crc, view.nbytes)
    return shard_crc, crcs


def _existing(fs: fsspec.AbstractFileSystem, directory: str, where: str) -> Manifest | None:
    try:
        return load_manifest(fs, directory, where)
    except NotFoundError:
        return None
    except DataLossError:
        return None  # corrupt: nothing was committed that readers trust; write it again
    # Anything else (PERMISSION_DENIED, UNAVAILABLE, ...) propagates: the directory may hold
    # a committed version we could not read, and it must not be removed or overwritten.


def _matches(
    old: Manifest,
    key: str,
    artifact_id: str,
    tensors: Sequence[TensorSource],
    views: Sequence[memoryview],
) -> bool:
    if old.key != key or (artifact_id and old.artifact_id and old.artifact_id != artifact_id):
        return False
    if [(t.name, t.dtype, t.shape) for t in old.tensors] != [
        (s.name, s.dtype, s.shape) for s in tensors
    ]:
        return False
    algo = checksum_for(old.checksum_algorithm)
    return all(algo.of(v) == int(t.checksum, 16) for t, v in zip(old.tensors, views, strict=True))


def _shards_intact(
    fs: fsspec.AbstractFileSystem, directory: str, m: Manifest, chunk_bytes: int
) -> bool:
    """Every shard file has its recorded size and whole-file checksum (streamed in chunks of
    ``chunk_bytes``: a re-export reads what it would otherwise write, never all at once)."""
    algo = checksum_for(m.checksum_algorithm)
    try:
        for shard in m.shards:
            path = join(directory, shard.file)
            if fs.size(path) != shard.size:
                return False
            crc = 0
            with fs.open(path, "rb") as f:
                while chunk := f.read(chunk_bytes):
                    crc = algo.update(crc, chunk)
            if to_hex(crc) != shard.checksum:
                return False
    except FileNotFoundError:
        return False
    return True


def write_artifact(
    root: str,
    key: str,
    tensors: Sequence[TensorSource],
    *,
    artifact_id: str = "",
    storage_options: Mapping[str, Any] | None = None,
    shard_bytes: int = 256 << 20,
    shard_threshold: int = 128 << 20,
    max_buffer_bytes: int = 64 << 20,
    parallelism: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Export ``tensors`` as artifact ``key`` under ``root``; returns the committed manifest."""
    check_tuning(max_buffer_bytes, parallelism)
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise InvalidArgumentError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
    if not isinstance(shard_threshold, int) or shard_threshold < 0:
        raise InvalidArgumentError(f"shard_threshold must be an int >= 0, got {shard_threshold!r}")
    views = [_bytes_of(t) for t in tensors]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgumentError(f"tensor names must be unique; repeated: {dup}")
    fs, root_path = filesystem(root, storage_options)
    directory = join(root_path, artifact_dirname(key))
    where = f"artifact {key!r} at {join(root, artifact_dirname(key))}"

    old = _existing(fs, directory, where)
    if old is not None:
        if not _matches(old, key, artifact_id, tensors, views):
            raise AlreadyExistsError(
                f"{where} is already committed with different tensors; versions are immutable: "
                "export under a new version key, or delete_artifact() it first"
            )
        try:
            if _shards_intact(fs, directory, old, max_buffer_bytes):
                return old
        except OSError as exc:
            raise map_os_error(exc, f"verifying {where}") from exc
    try:
        fs.invalidate_cache(directory)
        if old is None and fs.exists(directory):
            fs.rm(directory, recursive=True)  # leftovers of a crashed export
        fs.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise map_os_error(exc, f"preparing {where}") from exc

    algo = default_checksum()
    plan = plan_shards([v.nbytes for v in views], shard_bytes, shard_threshold)
    files = [f"shard-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    meta = {"format": "pt", "tensorcast.key": key, "tensorcast.artifact_id": artifact_id}
    headers = [
        build_header(
            [(names[i], tensors[i].dtype, tensors[i].shape, views[i].nbytes) for i in idx], meta
        )
        for idx in plan
    ]
    tracker = Progress(sum(v.nbytes for v in views), progress)

    def one(s: int) -> tuple[int, list[int]]:
        return _write_shard(
            fs,
            join(directory, files[s]),
            headers[s],
            [views[i] for i in plan[s]],
            algo,
            max_buffer_bytes,
            tracker,
        )

    workers = min(parallelism, len(plan))
    if workers == 1:
        results = [one(s) for s in range(len(plan))]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="tc-disk-write") as pool:
            results = list(pool.map(one, range(len(plan))))

    shards, entries = [], []
    for s, idx in enumerate(plan):
        shard_crc, crcs = results[s]
        offset = len(headers[s])
        size = offset + sum(views[i].nbytes for i in idx)
        shards.append(
            ManifestShard(files[s], size, to_hex(shard_crc), offset, to_hex(algo.of(headers[s])))
        )
        for i, crc in zip(idx, crcs, strict=True):
            t = tensors[i]
            entries.append(
                ManifestTensor(
                    t.name,
                    t.dtype,
                    tuple(t.shape),
                    s,
                    offset,
                    views[i].nbytes,
                    to_hex(crc),
                    stored_dtype(t.dtype, t.shape)[0],
                )
            )
            offset += views[i].nbytes
    manifest = Manifest(
        FORMAT_VERSION, artifact_id, key, time.time(), algo.name, tuple(shards), tuple(entries)
    )
    with atomic_writer(fs, join(directory, MANIFEST_NAME), _MIN_UPLOAD_BLOCK) as f:
        f.write(manifest.to_json())
    return manifest


def delete_artifact(
    root: str, key: str, *, storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Remove ``key``'s directory (manifest first, so readers stop at once); False if absent."""
    fs, root_path = filesystem(root, storage_options)
    directory = join(root_path, artifact_dirname(key))
    try:
        fs.invalidate_cache(directory)
        if not fs.exists(directory):
            return False
        manifest = join(directory, MANIFEST_NAME)
        if fs.exists(manifest):
            fs.rm_file(manifest)
        fs.rm(directory, recursive=True)
    except FileNotFoundError:
        return True  # removed concurrently
    except OSError as exc:
        raise map_os_error(exc, f"deleting artifact {key!r} under {root}") from exc
    return True
