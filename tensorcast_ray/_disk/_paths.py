"""Where an artifact lives under a root; the file-system primitives of the format.  [SDK, daemon]

Key → directory (documented in docs/disk-format.md)::

    "llama:v1"  →  <root>/llama@v1-<h>        h = first 32 hex digits of sha256(key, UTF-8)
    "ckpt"      →  <root>/ckpt-<h>            (no ":" → no version part)

The name (before the last ``:``) and the version keep ``[A-Za-z0-9._-]``; every other
character becomes ``_``, leading dots and dashes are dropped (so never ``.`` or ``..``),
and the parts are capped at 64 and 32 characters.  The readable part is only for people:
the hash of the exact key (lone surrogates included) keeps distinct keys apart, and the
leaf is a single path component, so no key can leave the root.

Roots are any fsspec URL or plain path; ``storage_options`` go to the file system
(``s3fs`` and friends are found through fsspec's registry, imported only when used).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tensorcast_ray._errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)

__all__ = [
    "MANIFEST_NAME",
    "artifact_dirname",
    "artifact_path",
    "atomic_writer",
    "cat",
    "filesystem",
    "is_local",
    "join",
    "open_read",
]

MANIFEST_NAME = "manifest.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_NAME_CAP = 64
_VERSION_CAP = 32
# Object stores publish an object whole when its upload completes, so writing the final
# name directly is already atomic; elsewhere (memory:// included: it publishes a file when
# it is opened) a temp name is renamed into place.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "adl"})


def _sanitize(part: str, cap: int) -> str:
    return _UNSAFE.sub("_", part).lstrip(".-")[:cap] or "_"


def artifact_dirname(key: str) -> str:
    """The single path component that holds ``key``'s files."""
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"artifact key must be a non-empty string, got {key!r}")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    name, sep, version = key.rpartition(":")
    if not sep:
        return f"{_sanitize(key, _NAME_CAP)}-{digest}"
    return f"{_sanitize(name, _NAME_CAP)}@{_sanitize(version, _VERSION_CAP)}-{digest}"


def join(base: str, leaf: str) -> str:
    return base + leaf if base.endswith("/") else f"{base}/{leaf}"


def artifact_path(root: str, key: str) -> str:
    """The directory (URL or path, in ``root``'s own form) holding ``key``'s files."""
    if not isinstance(root, str) or not root:
        raise InvalidArgumentError(f"root must be a non-empty URL or path, got {root!r}")
    return join(root, artifact_dirname(key))


def filesystem(
    root: str, storage_options: Mapping[str, Any] | None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, root path inside it); missing backends say what to install."""
    if not isinstance(root, str) or not root:
        raise InvalidArgumentError(f"root must be a non-empty URL or path, got {root!r}")
    try:
        fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
    except ImportError as exc:
        raise FailedPreconditionError(
            f"the file system for {root!r} needs a package that is not installed: {exc}; "
            "e.g. pip install 'tensorcast_ray[s3]' for s3:// roots"
        ) from exc
    except ValueError as exc:
        raise InvalidArgumentError(f"cannot open root {root!r}: {exc}") from exc
    return fs, str(path).rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _open_local(path: str) -> Any:
    """Open a local file to read, refusing anything that is not a regular file lying in the
    directory that lists it.

    A FIFO or device named ``*.safetensors`` would block ``open()`` forever or stream
    endless bytes; a link could point anywhere on the host.  So: open non-blocking (a FIFO
    then opens at once), check the opened file (not the name, so a swap after the check
    changes nothing), and resolve where it really is through ``/proc/self/fd``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise InvalidArgumentError(
                f"{path} is {kind}; checkpoints are read only from regular files: remove "
                "it or point at another directory"
            )
        proc = f"/proc/self/fd/{fd}"
        real = os.readlink(proc) if os.path.exists(proc) else os.path.realpath(path)
        home = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        if os.path.dirname(real) != home:
            raise PermissionDeniedError(
                f"{path} is a link to {real}, outside its directory {home}; tensorcast never "
                "reads outside the directory it is given: copy the file in (e.g. "
                "`huggingface-cli download --local-dir DIR` writes real files)"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def open_read(fs: fsspec.AbstractFileSystem, path: str, **kwargs: Any) -> Any:
    """[SDK, daemon] A binary file to read; local files only if regular and not linked out of
    their directory (see :func:`_open_local`)."""
    if is_local(fs):
        return _open_local(path)
    return fs.open(path, "rb", **kwargs)


def cat(
    fs: fsspec.AbstractFileSystem, path: str, start: int | None = None, end: int | None = None
) -> bytes:
    """[SDK, daemon] Bytes ``[start, end)`` of a file (all of it by default), through
    :func:`open_read` on local disks so a hostile file is refused, never waited on."""
    if not is_local(fs):
        return bytes(fs.cat_file(path, start=start, end=end))
    with _open_local(path) as f:
        if start:
            f.seek(start)
        return bytes(f.read() if end is None else f.read(end - (start or 0)))


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


class atomic_writer:
    """Context manager: a writable file that appears at ``path`` whole or not at all.

    Local: a temp name in the same directory, fsync, ``os.replace``, fsync the directory.
    Object stores: the final name (one PUT / multipart completion is atomic; on error the
    upload is abandoned, so an older object of that name stays).  Other file systems: a
    temp name then ``fs.mv``.  On error the partial temp file is removed.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, block_size: int) -> None:
        self._fs = fs
        self._path = path
        self._direct = bool(_protocols(fs) & _ATOMIC_PUT_PROTOCOLS)
        parent, _, leaf = path.rpartition("/")
        self._tmp = path if self._direct else f"{parent}/.{leaf}.tmp-{uuid.uuid4().hex[:12]}"
        self._block_size = block_size
        self._file: Any = None

    def __enter__(self) -> Any:
        try:
            if is_local(self._fs):
                self._file = open(self._tmp, "wb", buffering=0)
            else:
                self._file = self._fs.open(self._tmp, "wb", block_size=self._block_size)
        except OSError as exc:
            raise map_os_error(exc, f"cannot create {self._tmp}") from exc
        return self._file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        file, self._file = self._file, None
        if exc_type is not None:
            self._abort(file)
            return
        try:
            if is_local(self._fs):
                os.fsync(file.fileno())
                file.close()
                os.replace(self._tmp, self._path)
                _fsync_dir(os.path.dirname(self._path))
            else:
                file.close()
                if not self._direct:
                    self._fs.mv(self._tmp, self._path)
        except OSError as exc:
            self._abort(file)
            raise map_os_error(exc, f"cannot write {self._path}") from exc

    def _abort(self, file: Any) -> None:
        try:
            if self._direct and hasattr(file, "discard"):
                file.discard()  # object stores: abandon the upload, publish nothing
                file.closed = True  # so a later close() does not upload the rest
            else:
                file.close()
        except Exception:
            pass  # already failing; the first error is the one to report
        if not self._direct:
            try:
                self._fs.rm_file(self._tmp)
            except (OSError, FileNotFoundError):
                pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Connection-level failures of the object-store clients, by class name (so mapping needs no
#: botocore / aiohttp import): botocore's ``EndpointConnectionError`` (connection refused:
#: what s3fs raises when the endpoint is down), ``ConnectTimeoutError`` and ``ProxyConnection
#: Error`` derive from its ``ConnectionError``; ``ConnectionClosedError`` (reset mid-request),
#: ``ReadTimeoutError`` and ``ResponseStreamingError`` from ``HTTPClientError``; aiohttp's
#: ``ClientConnectionError`` covers ``ServerDisconnectedError``, ``ClientPayloadError`` a
#: body cut short.
_CONNECTION_FAILURES = {
    "botocore": frozenset({"ConnectionError", "HTTPClientError"}),
    "aiohttp": frozenset({"ClientConnectionError", "ClientPayloadError", "ServerTimeoutError"}),
}


def _is_connection_failure(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        names = _CONNECTION_FAILURES.get(cls.__module__.split(".")[0])
        if names is not None and cls.__name__ in names:
            return True
    return False


def map_os_error(exc: BaseException, what: str) -> Exception:
    """A storage failure while doing ``what``, as the public tree (with ``raise ... from``):
    OS errors go through the one OS mapping in its storage flavour, which treats fsspec's
    failed or throttled remote requests as retryable UNAVAILABLE (docs/errors.md); the
    object-store clients' connection failures (refused, reset, timed out: botocore and
    aiohttp errors that are no OSError) are retryable UNAVAILABLE too, as are the builtin
    ``ConnectionError`` (UNAVAILABLE) and ``TimeoutError`` (DEADLINE_EXCEEDED)."""
    from tensorcast_ray._error_mapping import map_exception
    from tensorcast_ray._error_mapping import map_os_error as map_os
    from tensorcast_ray._errors import UnavailableError

    if _is_connection_failure(exc):
        err = UnavailableError(
            f"{what}: the storage is unreachable (connection refused, reset or timed out) "
            f"-- retry once it is back ({type(exc).__name__}: {exc})"
        )
        err.__cause__ = exc
        return err
    if isinstance(exc, OSError):
        return map_os(exc, what, storage=True)
    return map_exception(exc, context=what)
