"""Checkpoint I/O: explicit moves between the node's shared memory and a disk.  [SDK]

Both are :class:`~tensorcast_ray._store.Store` methods, so they run under the store's options
and retry overrides (``tc.store(opts).export(...)``); ``tc.export`` / ``tc.import_checkpoint``
use the default store.

``export(key, url)``: look the artifact up once (``latest`` resolved then), and stream its
tensors straight from the read-only shared-memory mappings into safetensors shards + a
manifest under ``url`` (:func:`tensorcast_ray._disk.write_artifact`): no intermediate copy.

``import_checkpoint(url, key)``: refuse an existing ``key`` before touching the disk, scan
the checkpoint's headers (a safetensors file or directory, with or without an index json, or
a tensorcast export), then one write whose bytes land straight in the daemon's segments:
``BeginWrite`` with the specs from the headers → map the segments writable → read every
tensor into its place (:func:`tensorcast_ray._disk.read_checkpoint_into`, verified against
the manifest checksums for exports) → ``CommitWrite``; any failure aborts the write, so a
corrupt file never leaves a key behind. Both run under their retry policy verb
(``export`` / ``import``) and are counted under it in the SDK metrics.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from tensorcast_ray._artifact import Artifact
from tensorcast_ray._catalog import parse_key
from tensorcast_ray._errors import (
    AlreadyExistsError,
    ArtifactError,
    InvalidArgumentError,
    NotFoundError,
)
from tensorcast_ray._layout import NO_SEGMENT, Columns
from tensorcast_ray._metrics import get_sdk_metrics
from tensorcast_ray._policy import StorePolicy, resolve_policy
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tensorcast_ray._store import default_store
from tensorcast_ray._write import PutResult, placement, put_result, write_segments

if TYPE_CHECKING:  # the disk layer (fsspec) loads on first use, not with the package
    from tensorcast_ray._disk import Checkpoint, CheckpointTensor, TensorSource
    from tensorcast_ray._store import Store

__all__ = ["export", "export_artifact", "import_checkpoint", "import_into"]

Progress = Callable[[int, int], None]


def _check_progress(progress: Progress | None) -> None:
    if progress is not None and not callable(progress):
        raise InvalidArgumentError("progress must be a callable(done_bytes, total_bytes) or None")


def _check_url(url: object, what: str) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidArgumentError(f"{what} must be a non-empty URL or path, got {url!r}")
    if "\0" in url:
        raise InvalidArgumentError(f"{what} {url!r} holds a NUL character; no path can")
    return url


def _guarded(progress: Progress | None, verb: str) -> Progress | None:
    """``progress``, with what it raises reported as the caller's own stop (CANCELLED, never
    retried) rather than as a tensorcast bug."""
    if progress is None:
        return None
    callback = progress

    def call(done: int, total: int) -> None:
        try:
            callback(done, total)
        except Exception as exc:
            raise ArtifactError(
                f"{verb}: the progress callback raised {type(exc).__name__}: {exc}; the "
                f"{verb} was stopped (fix the callback, or raise from it only to stop)",
                grpc.StatusCode.CANCELLED,
                False,
            ) from exc

    return call


# ---- export --------------------------------------------------------------------------------
def _sources(art: Artifact) -> tuple[list[TensorSource], list[memoryview]]:
    """Zero-copy read-only views of the artifact's tensors, in stored order."""
    from tensorcast_ray._disk import TensorSource

    art._localize()  # an export of a remote artifact pulls a replica first
    entry = art._cached
    bases: dict[int, memoryview] = {}
    views: list[memoryview] = []
    sources = []
    for meta in entry.metas.values():
        if meta.segment == NO_SEGMENT or meta.nbytes == 0:
            data = memoryview(b"")
        else:
            base = bases.get(meta.segment)
            if base is None:
                mapping = entry.maps[meta.segment]
                assert mapping is not None
                base = bases[meta.segment] = memoryview(mapping)
            data = base[meta.offset : meta.offset + meta.nbytes]
        views.append(data)
        sources.append(TensorSource(meta.name, meta.dtype, meta.shape, data))
    return sources, views + list(bases.values())


def export(
    key: str,
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    layout: str = "auto",
) -> str:
    """Write artifact ``key`` (``name:latest`` resolves once) as safetensors shards + manifest
    under the root ``url``; returns the artifact's directory URL (pass it to
    :func:`import_checkpoint`). Re-exporting the same version is a no-op; a different one
    under the same key is ``ALREADY_EXISTS``. ``layout`` (``auto`` / ``unsharded`` /
    ``sharded``) picks the shards. Layout: docs/disk-format.md."""
    if layout == "auto":
        return default_store().export(key, url, storage_options=storage_options, progress=progress)
    return export_artifact(
        default_store(), key, url, storage_options=storage_options, progress=progress, layout=layout
    )


def export_artifact(
    store: Store,
    key: str,
    url: str,
    *,
    storage_options: Mapping[str, Any] | None,
    progress: Progress | None,
    layout: str = "auto",
) -> str:
    """:meth:`Store.export <tensorcast_ray._store.Store.export>`."""
    from tensorcast_ray._disk import artifact_path, write_artifact

    with store._verb("export"):
        _check_url(url, "url")
        _check_progress(progress)
        art = store._artifact(key, None, "export")
        art._check_alive()
        sources, views = _sources(art)
        try:
            store._retrier.call(
                "export",
                lambda _timeout: write_artifact(
                    url,
                    art.key,
                    sources,
                    artifact_id=art.artifact_id,
                    storage_options=storage_options,
                    layout=layout,
                    progress=_guarded(progress, "export"),
                ),
            )
        finally:
            sources.clear()
            for v in views:
                with contextlib.suppress(BufferError):
                    v.release()
        get_sdk_metrics().record_data_path("disk")
        return artifact_path(url, art.key)


# ---- import --------------------------------------------------------------------------------
def _select(ckpt: Checkpoint, names: Sequence[str] | None) -> list[CheckpointTensor]:
    if names is None:
        return list(ckpt.tensors)
    wanted = set(names)
    if not wanted:
        raise InvalidArgumentError(
            "names is empty: an artifact needs at least one tensor; pass None for all"
        )
    missing = sorted(wanted - {t.name for t in ckpt.tensors})
    if missing:
        # The same code as get's names=: the argument is wrong, the checkpoint exists.
        known = [t.name for t in ckpt.tensors[:10]]
        raise InvalidArgumentError(
            f"checkpoint {ckpt.url!r} has no tensors named {missing[:10]}; it holds "
            f"{len(ckpt.tensors)} tensors, e.g. {known}"
        )
    return [t for t in ckpt.tensors if t.name in wanted]


def _check_committed(url: str, ckpt: Checkpoint) -> None:
    """A directory of tensorcast shards without its manifest is an export that never
    committed (crashed or still running): some shards may be missing. Refuse it."""
    if (
        ckpt.kind == "safetensors"
        and "tensorcast.key" in ckpt.metadata
        and not url.rstrip("/").endswith(".safetensors")
    ):
        raise NotFoundError(
            f"{url!r} holds shards of the tensorcast export {ckpt.metadata['tensorcast.key']!r} "
            "but no manifest.json: the export never committed (it crashed or is still "
            "running); export it again"
        )


def import_checkpoint(
    url: str,
    key: str,
    *,
    names: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    policy: StorePolicy | None = None,
    progress: Progress | None = None,
) -> PutResult:
    """Put a checkpoint from disk as version ``key``: its bytes are read once, straight into
    the node's shared memory. ``url``: a ``.safetensors`` file, a directory of them (with or
    without ``*.safetensors.index.json``), or a directory :func:`export` returned (verified
    against its checksums). ``names`` imports a subset. An existing ``key`` is
    ``ALREADY_EXISTS`` before any disk read; a checksum mismatch is ``DATA_LOSS`` and leaves
    no key behind."""
    return default_store().import_checkpoint(
        url,
        key,
        names=names,
        storage_options=storage_options,
        policy=policy,
        progress=progress,
    )


def import_into(
    store: Store,
    url: str,
    key: str,
    *,
    names: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
    policy: StorePolicy | None,
    progress: Progress | None,
) -> PutResult:
    """:meth:`Store.import_checkpoint <tensorcast_ray._store.Store.import_checkpoint>`."""
    from tensorcast_ray._disk import read_checkpoint_into, scan_checkpoint

    with store._verb("import"):
        parse_key(key, for_write=True)
        _check_url(url, "url")
        _check_progress(progress)
        if names is not None and (
            isinstance(names, str) or not all(isinstance(n, str) for n in names)
        ):
            raise InvalidArgumentError("names must be a sequence of tensor names, not one string")
        policy_json = json.dumps(resolve_policy(policy).to_dict())
        store._require_same_host()
        exists = daemon_pb2.ExistsRequest(key=key)
        if store._retrier.call("import", lambda t: store._call("Exists", exists, t)).exists:
            raise AlreadyExistsError(
                f"{key} already exists; versions are immutable — import under a new version "
                "(e.g. 'v2'), or delete it first"
            )
        # Every storage step (header scan, each ranged read) is bounded by the verb's deadline:
        # a storage that stalls ends the import with DEADLINE_EXCEEDED, never holds it forever.
        deadline = time.monotonic() + store._retrier.policy_for("import").deadline_seconds
        ckpt = store._retrier.call(
            "import",
            lambda _t: scan_checkpoint(url, storage_options=storage_options, deadline=deadline),
        )
        _check_committed(url, ckpt)
        chosen = _select(ckpt, names)
        cols = Columns.of(
            [t.name for t in chosen], [t.dtype for t in chosen], [tuple(t.shape) for t in chosen]
        )
        begin = daemon_pb2.BeginWriteRequest(
            key=key,
            kind=daemon_pb2.WRITE_KIND_PUT,
            tensors=cols.to_table(),
            policy_json=policy_json,
        )

        def fill(started: daemon_pb2.BeginWriteResponse, maps: Sequence[mmap.mmap]) -> None:
            bases = [memoryview(m) for m in maps]
            segments, offsets = placement(started, cols)
            where = dict(
                zip(cols.names, zip(segments, offsets, cols.nbytes, strict=True), strict=True)
            )

            def dest(t: CheckpointTensor) -> memoryview:
                segment, offset, nbytes = where[t.name]
                if segment == NO_SEGMENT:
                    return memoryview(bytearray(0))
                return bases[segment][offset : offset + nbytes]

            try:
                read_checkpoint_into(
                    ckpt,
                    dest,
                    names=[t.name for t in chosen],
                    storage_options=storage_options,
                    progress=_guarded(progress, "import"),
                    deadline=deadline,
                )
            finally:
                for b in bases:
                    with contextlib.suppress(BufferError):
                        b.release()

        result = write_segments(store, "import", begin, cols, fill)
        get_sdk_metrics().record_data_path("disk")
        return put_result(result)
