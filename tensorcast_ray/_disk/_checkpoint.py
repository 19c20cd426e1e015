"""Hugging Face style checkpoints: scan safetensors headers, read tensors in place.  [SDK, daemon]

``scan_checkpoint`` accepts a directory of ``*.safetensors`` files (with or without a
``*.safetensors.index.json`` weight map, as ``transformers`` writes them), a single
``.safetensors`` file, or a tensorcast export directory (``manifest.json``).  It reads only
the headers (one ranged read per file, in parallel) and checks every byte range against the
file size, so a truncated file fails at scan time.  ``read_checkpoint_into`` then streams
tensors into caller buffers exactly as :func:`read_into` does: plain safetensors files carry
no checksums, so ``verify`` checks that sizes did not change since the scan; tensorcast
exports are verified against their manifest checksums.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec

from tensorcast_ray._disk._manifest import Manifest, ManifestTensor
from tensorcast_ray._disk._paths import MANIFEST_NAME, cat, filesystem, join, map_os_error
from tensorcast_ray._disk._reader import as_dest, load_manifest, read_into, select
from tensorcast_ray._disk._safetensors import ParsedHeader, header_length, parse_header
from tensorcast_ray._disk._streams import (
    Progress,
    ReadTarget,
    check_deadline,
    check_tuning,
    read_targets,
)
from tensorcast_ray._errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

__all__ = ["Checkpoint", "CheckpointTensor", "read_checkpoint_into", "scan_checkpoint"]

_FIRST_READ = 64 << 10  # most headers fit; a larger one costs one more ranged read


@dataclass(frozen=True)
class CheckpointTensor:
    """A tensor of a checkpoint: bytes ``[offset, offset + nbytes)`` of ``file``."""

    name: str
    dtype: str  # canonical
    shape: tuple[int, ...]
    file: str  # name relative to Checkpoint.url
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`scan_checkpoint` found; pass it to :func:`read_checkpoint_into`."""

    url: str  # the directory
    kind: str  # "safetensors" or "tensorcast"
    files: tuple[str, ...]
    file_sizes: Mapping[str, int]
    tensors: tuple[CheckpointTensor, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)  # first file's __metadata__
    manifest: Manifest | None = None  # tensorcast exports only

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _read_header(fs: fsspec.AbstractFileSystem, path: str, where: str) -> tuple[ParsedHeader, int]:
    try:
        size = fs.size(path)
        head = cat(fs, path, start=0, end=min(size, _FIRST_READ))
        n = header_length(head, where)
        if len(head) < 8 + n:
            if size < 8 + n:
                raise DataLossError(f"{where} is truncated inside its header")
            head = cat(fs, path, start=0, end=8 + n)
    except FileNotFoundError:
        raise NotFoundError(f"{where} does not exist") from None
    except OSError as exc:
        raise map_os_error(exc, f"reading {where}") from exc
    header = parse_header(head, where)
    if header.data_end > size:
        raise DataLossError(
            f"{where} is truncated: its header needs {header.data_end} bytes, it has {size}"
        )
    return header, int(size)


def _from_manifest(url: str, m: Manifest) -> Checkpoint:
    files = tuple(s.file for s in m.shards)
    tensors = tuple(
        CheckpointTensor(t.name, t.dtype, t.shape, files[t.shard], t.offset, t.nbytes)
        for t in m.tensors
    )
    sizes = {s.file: s.size for s in m.shards}
    return Checkpoint(url, "tensorcast", files, sizes, tensors, {"tensorcast.key": m.key}, m)


def _listing(
    fs: fsspec.AbstractFileSystem, directory: str, url: str
) -> tuple[list[str], dict[str, str]]:
    """(files to scan, weight map or {})."""
    try:
        fs.invalidate_cache(directory)
        names = [str(p).rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)]
    except FileNotFoundError:
        raise NotFoundError(f"checkpoint {url!r} does not exist") from None
    except OSError as exc:
        raise map_os_error(exc, f"listing checkpoint {url!r}") from exc
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
        raise InvalidArgumentError(
            f"checkpoint {url!r} has several index files {indexes}; point at one file instead"
        )
    if indexes:
        where = f"{indexes[0]} of checkpoint {url!r}"
        try:
            weight_map = json.loads(cat(fs, join(directory, indexes[0])))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and "/" not in v and "\0" not in v and v not in ("", ".", "..")
                for v in weight_map.values()
            ):
                raise ValueError("weight_map must map names to file names in the directory")
        except (ValueError, KeyError, TypeError) as exc:
            raise DataLossError(f"{where} is not a valid index ({exc})") from None
        return sorted(set(weight_map.values())), weight_map
    files = sorted(n for n in names if n.endswith(".safetensors"))
    if not files:
        raise NotFoundError(
            f"checkpoint {url!r} holds no *.safetensors files and no {MANIFEST_NAME}"
        )
    return files, {}


def scan_checkpoint(
    url: str, *, storage_options: Mapping[str, Any] | None = None, deadline: float | None = None
) -> Checkpoint:
    """List a checkpoint's tensors (name, dtype, shape, file, byte range) from headers only.

    ``deadline`` (``time.monotonic()`` seconds) is checked before each file's header read."""
    fs, path = filesystem(url, storage_options)
    if path.endswith(".safetensors") and fs.isfile(path):
        directory, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
        url = url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."
        files: list[str] = [leaf]
        weight_map: dict[str, str] = {}
    else:
        directory = path
        try:
            has_manifest = fs.isfile(join(directory, MANIFEST_NAME))
        except OSError as exc:
            raise map_os_error(exc, f"opening checkpoint {url!r}") from exc
        if has_manifest:
            return _from_manifest(url, load_manifest(fs, directory, f"export {url!r}"))
        files, weight_map = _listing(fs, directory, url)

    def head(name: str) -> tuple[ParsedHeader, int]:
        check_deadline(deadline, f"scanning checkpoint {url!r}")
        return _read_header(fs, join(directory, name), f"file {name!r} of checkpoint {url!r}")

    with ThreadPoolExecutor(min(8, len(files)), thread_name_prefix="tc-disk-scan") as pool:
        headers = list(pool.map(head, files))
    tensors: list[CheckpointTensor] = []
    where_is: dict[str, str] = {}
    for name, (header, _) in zip(files, headers, strict=True):
        for t in header.tensors:
            if t.name in where_is:
                raise InvalidArgumentError(
                    f"checkpoint {url!r}: tensor {t.name!r} is in both {where_is[t.name]!r} "
                    f"and {name!r}; remove the stale file"
                )
            where_is[t.name] = name
            tensors.append(
                CheckpointTensor(t.name, t.dtype, t.shape, name, t.begin, t.end - t.begin)
            )
    for tname, fname in weight_map.items():
        if where_is.get(tname) != fname:
            raise DataLossError(
                f"checkpoint {url!r}: the index puts {tname!r} in {fname!r} but that file "
                "does not hold it; the checkpoint is incomplete"
            )
    sizes = {name: size for name, (_, size) in zip(files, headers, strict=True)}
    meta = dict(headers[0][0].metadata) if headers else {}
    return Checkpoint(url, "safetensors", tuple(files), sizes, tuple(tensors), meta)


def read_checkpoint_into(
    ckpt: Checkpoint,
    dest: Callable[[CheckpointTensor], memoryview],
    *,
    names: Sequence[str] | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    max_buffer_bytes: int = 64 << 20,
    parallelism: int = 4,
    progress: Callable[[int, int], None] | None = None,
    deadline: float | None = None,
) -> None:
    """Read the checkpoint's tensors (all, or ``names``) into the buffers ``dest`` gives
    (``deadline``: see :func:`~._streams.read_targets`)."""
    check_tuning(max_buffer_bytes, parallelism)
    if ckpt.manifest is not None:
        by_name = {t.name: t for t in ckpt.tensors}

        def dest_of(t: ManifestTensor) -> memoryview:
            return dest(by_name[t.name])

        read_into(
            "",
            ckpt.manifest,
            dest_of,
            names=names,
            verify=verify,
            storage_options=storage_options,
            max_buffer_bytes=max_buffer_bytes,
            parallelism=parallelism,
            progress=progress,
            directory_url=ckpt.url,  # where it was scanned, whatever its name now
            deadline=deadline,
        )
        return
    fs, directory = filesystem(ckpt.url, storage_options)
    wanted = select([t.name for t in ckpt.tensors], names, f"checkpoint {ckpt.url!r}")
    chosen = [t for t in ckpt.tensors if t.name in wanted]
    if verify:
        for name in sorted({t.file for t in chosen}):
            try:
                size = fs.size(join(directory, name))
            except FileNotFoundError:
                raise DataLossError(
                    f"checkpoint file {name!r} disappeared since the scan"
                ) from None
            if size != ckpt.file_sizes[name]:
                raise FailedPreconditionError(
                    f"checkpoint file {name!r} changed size since the scan "
                    f"({ckpt.file_sizes[name]} → {size}); scan the checkpoint again"
                )
    targets = []
    for t in chosen:
        label = f"tensor {t.name!r} in file {t.file!r} of checkpoint {ckpt.url!r}"
        targets.append(
            ReadTarget(join(directory, t.file), t.offset, as_dest(dest(t), t.nbytes, label), label)
        )
    read_targets(
        fs,
        targets,
        algo=None,
        max_buffer_bytes=max_buffer_bytes,
        parallelism=parallelism,
        progress=Progress(sum(t.nbytes for t in chosen), progress),
        deadline=deadline,
    )
