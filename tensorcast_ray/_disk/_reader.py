"""Import: find committed artifacts and read their tensors into caller buffers.  [SDK, daemon]

A directory is trusted only through its manifest.  ``read_into`` with ``verify=True``:

1. checks each touched shard's size and header checksum (one small ranged read);
2. streams every tensor into ``dest(tensor)`` (see :mod:`._streams`), checksumming it;
3. when all tensors of a shard were read, also checks the shard's whole-file checksum
   (CRC-combined from the header's and tensors' checksums, no second pass).

Any mismatch raises :class:`DataLossError` naming the shard or tensor; wrong bytes never
reach the caller unflagged.  ``verify=False`` skips the checks (callers count such reads);
a file that ends early is reported even then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fsspec

from tensorcast_ray._disk._checksum import checksum_for, to_hex
from tensorcast_ray._disk._manifest import Manifest, ManifestTensor
from tensorcast_ray._disk._paths import (
    MANIFEST_NAME,
    artifact_dirname,
    cat,
    filesystem,
    join,
    map_os_error,
)
from tensorcast_ray._disk._streams import Progress, ReadTarget, check_tuning, read_targets
from tensorcast_ray._errors import DataLossError, InvalidArgumentError, NotFoundError

__all__ = ["list_artifacts", "load_manifest", "read_into", "read_manifest", "read_tensor_range"]

_log = logging.getLogger(__name__)


def load_manifest(fs: fsspec.AbstractFileSystem, directory: str, where: str) -> Manifest:
    path = join(directory, MANIFEST_NAME)
    try:
        raw = cat(fs, path)
    except FileNotFoundError:
        raise NotFoundError(
            f"{where} has no committed manifest (never exported, deleted, or its export "
            "did not finish); export it again"
        ) from None
    except OSError as exc:
        raise map_os_error(exc, f"reading the manifest of {where}") from exc
    return Manifest.from_json(bytes(raw), f"manifest of {where}")


def read_manifest(
    root: str, key: str, *, storage_options: Mapping[str, Any] | None = None
) -> Manifest:
    """The committed manifest of ``key`` under ``root`` (NotFoundError if none)."""
    fs, root_path = filesystem(root, storage_options)
    leaf = artifact_dirname(key)
    where = f"artifact {key!r} at {join(root, leaf)}"
    manifest = load_manifest(fs, join(root_path, leaf), where)
    if manifest.key != key:
        raise DataLossError(
            f"the manifest of {where} names key {manifest.key!r}; the directory was copied "
            "or altered: re-export the artifact"
        )
    return manifest


def list_artifacts(root: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted keys under ``root`` with a committed, valid manifest."""
    fs, root_path = filesystem(root, storage_options)
    try:
        fs.invalidate_cache(root_path)
        paths = fs.glob(join(root_path, f"*/{MANIFEST_NAME}"))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise map_os_error(exc, f"listing artifacts under {root}") from exc
    keys = []
    for path in sorted(paths):
        directory = str(path).rsplit("/", 1)[0]
        leaf = directory.rsplit("/", 1)[-1]
        try:
            m = load_manifest(fs, directory, f"directory {leaf!r} under {root}")
        except (NotFoundError, DataLossError) as exc:
            _log.warning("skipping %s: %s", directory, exc)
            continue
        if artifact_dirname(m.key) == leaf:
            keys.append(m.key)
        else:
            _log.warning("skipping %s: its manifest names key %r", directory, m.key)
    return sorted(keys)


def as_dest(buf: Any, nbytes: int, label: str) -> memoryview:
    """A writable byte view of what ``dest`` returned, exactly ``nbytes`` long."""
    try:
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"dest returned an unusable buffer for {label} ({exc}); return a contiguous, "
            "writable memoryview"
        ) from None
    if view.readonly:
        raise InvalidArgumentError(f"dest returned a read-only buffer for {label}")
    if view.nbytes != nbytes:
        raise InvalidArgumentError(
            f"dest returned {view.nbytes} bytes for {label}, which needs exactly {nbytes}"
        )
    return view


def select(manifest_names: Sequence[str], names: Sequence[str] | None, where: str) -> set[str]:
    if names is None:
        return set(manifest_names)
    if isinstance(names, str):
        raise InvalidArgumentError("names must be a sequence of tensor names, not one string")
    missing = sorted(set(names) - set(manifest_names))
    if missing:
        raise NotFoundError(f"{where} has no tensors named {missing[:10]}")
    return set(names)


def _check_shard_heads(
    fs: fsspec.AbstractFileSystem, directory: str, manifest: Manifest, shards: set[int]
) -> None:
    algo = checksum_for(manifest.checksum_algorithm)
    for s in sorted(shards):
        shard = manifest.shards[s]
        path = join(directory, shard.file)
        label = f"shard {shard.file!r} of artifact {manifest.key!r}"
        try:
            size = fs.size(path)
            head = cat(fs, path, start=0, end=shard.header_size)
        except FileNotFoundError:
            raise DataLossError(f"{label} is missing; re-export the artifact") from None
        except OSError as exc:
            raise map_os_error(exc, f"reading {label}") from exc
        if size != shard.size:
            raise DataLossError(
                f"{label} has {size} bytes, the manifest says {shard.size} "
                f"({'truncated' if size < shard.size else 'overwritten'}); re-export the artifact"
            )
        if to_hex(algo.of(bytes(head))) != shard.header_checksum:
            raise DataLossError(f"{label}: header checksum mismatch; re-export the artifact")


def read_into(
    root: str,
    manifest: Manifest,
    dest: Callable[[ManifestTensor], memoryview],
    *,
    names: Sequence[str] | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    max_buffer_bytes: int = 64 << 20,
    parallelism: int = 4,
    progress: Callable[[int, int], None] | None = None,
    directory_url: str | None = None,
    deadline: float | None = None,
) -> None:
    """Read the tensors of ``manifest`` (all, or ``names``) into the buffers ``dest`` gives.

    The artifact's directory is ``root`` + the key's directory name, or ``directory_url``
    when given (an export that was copied or renamed, opened by its own path)."""
    check_tuning(max_buffer_bytes, parallelism)
    if directory_url is not None:
        fs, directory = filesystem(directory_url, storage_options)
    else:
        fs, root_path = filesystem(root, storage_options)
        directory = join(root_path, artifact_dirname(manifest.key))
    wanted = select([t.name for t in manifest.tensors], names, f"artifact {manifest.key!r}")
    chosen = [t for t in manifest.tensors if t.name in wanted]
    touched = {t.shard for t in chosen}
    if verify:
        _check_shard_heads(fs, directory, manifest, touched)
    targets = []
    for t in chosen:
        shard = manifest.shards[t.shard]
        label = f"tensor {t.name!r} in shard {shard.file!r} of artifact {manifest.key!r}"
        targets.append(
            ReadTarget(
                join(directory, shard.file),
                t.offset,
                as_dest(dest(t), t.nbytes, label),
                label,
                t.checksum if verify else None,
            )
        )
    algo = checksum_for(manifest.checksum_algorithm) if verify else None
    crcs = read_targets(
        fs,
        targets,
        algo=algo,
        max_buffer_bytes=max_buffer_bytes,
        parallelism=parallelism,
        progress=Progress(sum(t.nbytes for t in chosen), progress),
        deadline=deadline,
    )
    if algo is None:
        return
    got = {t.name: crc for t, crc in zip(chosen, crcs, strict=True)}
    for s in touched:
        members = [t for t in manifest.tensors if t.shard == s]
        shard = manifest.shards[s]
        if any(t.name not in got for t in members):
            continue  # partial read: tensor and header checksums cover what was read
        crc, pos = int(shard.header_checksum, 16), shard.header_size
        for t in sorted(members, key=lambda t: t.offset):
            if t.offset != pos:
                break  # not our contiguous layout; the tensor checks stand alone
            crc, pos = algo.combine(crc, got[t.name], t.nbytes), t.end
        else:
            if pos == shard.size and to_hex(crc) != shard.checksum:
                raise DataLossError(
                    f"shard {shard.file!r} of artifact {manifest.key!r}: checksum mismatch "
                    "with its manifest; re-export the artifact"
                )


def read_tensor_range(
    root: str,
    manifest: Manifest,
    name: str,
    out: memoryview,
    *,
    start: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    max_buffer_bytes: int = 64 << 20,
) -> None:
    """Read bytes ``[start, start + len(out))`` of one tensor with ranged reads only.

    For slices (e.g. rows of a weight for one tensor-parallel rank).  Checksums cover
    whole tensors, so a slice is not verified; a short file still raises DataLossError.
    """
    check_tuning(max_buffer_bytes, 1)
    t = manifest.tensor(name)
    view = memoryview(out)
    label = f"bytes [{start}, {start + view.nbytes}) of tensor {name!r}"
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InvalidArgumentError(f"start must be an int >= 0, got {start!r}")
    if start + view.nbytes > t.nbytes:
        raise InvalidArgumentError(f"{label} lie outside the tensor ({t.nbytes} bytes)")
    fs, root_path = filesystem(root, storage_options)
    path = join(join(root_path, artifact_dirname(manifest.key)), manifest.shards[t.shard].file)
    read_targets(
        fs,
        [ReadTarget(path, t.offset + start, as_dest(view, view.nbytes, label), label)],
        algo=None,
        max_buffer_bytes=max_buffer_bytes,
        parallelism=1,
        progress=Progress(0, None),
    )
