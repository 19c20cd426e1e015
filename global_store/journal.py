"""The Global Store's journal of durable artifacts, through fsspec.  [Global Store]

A restarted Global Store recovers every durable key from here, even when the daemons that
wrote them are gone (their files are on shared disk; a reader rehydrates them). One small
JSON object per durable artifact::

    <journal_url>/durable/<artifact_id>.json    {"format": 1, "key": ..., "seq": ..., ...}

written whole or not at all (:class:`~tensorcast_ray._disk._paths.atomic_writer`: a rename
on local and ``memory://`` file systems, one PUT on object stores). Recording an artifact
creates its object, forgetting it deletes it: there is no log to compact, and object stores
(``s3://``) work as well as a shared POSIX directory. :meth:`CatalogJournal.load` lists and
parses every record; a hostile or torn object (not JSON, the wrong format, over 64 KiB,
wrong types, a name that does not match its ``artifact_id``, a symlink or anything but a
regular file on a local disk) is skipped with a warning and counted, never followed.
``artifact_id`` keeps ``[A-Za-z0-9_-]`` (at most 64 characters), so no record's path leaves
the journal's directory. Local files are created ``0600`` in a ``0700`` directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from typing import Any

from tensorcast_ray._disk._paths import (
    _ATOMIC_PUT_PROTOCOLS,
    _protocols,
    atomic_writer,
    filesystem,
    is_local,
    join,
    map_os_error,
)
from tensorcast_ray._errors import InvalidArgumentError

__all__ = ["FORMAT", "MAX_RECORD_BYTES", "CatalogJournal", "check_artifact_id"]

logger = logging.getLogger("tensorcast_ray.global_store")

FORMAT = 1
MAX_RECORD_BYTES = 64 << 10
_DIR = "durable"
_SUFFIX = ".json"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BATCH = 512  # records fetched at once from a remote file system
_BLOCK_SIZE = 8 << 20  # an upload buffer (S3 wants >= 5 MiB); a record is one PUT
#: record fields and their types (extra fields are kept as they are)
_FIELDS: dict[str, type] = {
    "key": str,
    "artifact_id": str,
    "node_id": str,
    "seq": int,
    "nbytes": int,
    "tensors": int,
    "kind": str,
    "created_ms": int,
    "persist_task_id": str,
}
_OPTIONAL = frozenset({"persist_task_id"})


def check_artifact_id(artifact_id: object) -> str:
    if not isinstance(artifact_id, str) or not _ID.fullmatch(artifact_id):
        raise InvalidArgumentError(
            f"artifact_id {artifact_id!r} cannot be journaled: it must be 1-64 characters of "
            "[A-Za-z0-9_-]"
        )
    return artifact_id


class CatalogJournal:
    """The durable records under ``url`` (any fsspec URL or path; ``storage_options`` go to
    the file system). Thread-safe: every call is independent I/O."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self._fs, root = filesystem(url, storage_options)
        self._local = is_local(self._fs)
        self._dir = join(root, _DIR)
        self._dir_ready = False
        #: records the last :meth:`load` skipped (hostile, torn or malformed)
        self.last_skipped = 0

    def path(self, artifact_id: str) -> str:
        return join(self._dir, check_artifact_id(artifact_id) + _SUFFIX)

    # ---- writes ------------------------------------------------------------------------
    def record(self, record: Mapping[str, Any]) -> None:
        """Write (or replace) the record of ``record["artifact_id"]``, atomically."""
        data = _validate(dict(record))
        if data is None:
            raise InvalidArgumentError(f"not a journal record: {dict(record)!r}")
        body = json.dumps(
            {**data, "format": FORMAT}, sort_keys=True, separators=(",", ":")
        ).encode()
        if len(body) > MAX_RECORD_BYTES:
            raise InvalidArgumentError(
                f"the journal record of {data['artifact_id']} is {len(body)} bytes; the limit "
                f"is {MAX_RECORD_BYTES}"
            )
        path = self.path(data["artifact_id"])
        self._ensure_dir()
        try:
            with atomic_writer(self._fs, path, block_size=_BLOCK_SIZE) as f:
                if self._local:
                    os.fchmod(f.fileno(), 0o600)
                f.write(body)
        except Exception as exc:  # ArtifactErrors come back as they are
            raise map_os_error(exc, f"cannot write the journal record {path}") from exc

    def forget(self, artifact_id: str) -> None:
        """Delete the record of ``artifact_id`` (none is fine)."""
        path = self.path(artifact_id)
        try:
            if self._local:
                os.unlink(path)
            else:
                self._fs.rm_file(path)
        except FileNotFoundError:
            return
        except Exception as exc:  # object-store clients fail with their own types too
            raise map_os_error(exc, f"cannot delete the journal record {path}") from exc

    def _ensure_dir(self) -> None:
        if self._dir_ready:
            return
        try:
            if self._local:
                os.makedirs(self._dir, mode=0o700, exist_ok=True)
            elif not _protocols(self._fs) & _ATOMIC_PUT_PROTOCOLS:  # object stores: no dirs
                try:
                    self._fs.makedirs(self._dir, exist_ok=True)
                except (FileExistsError, NotImplementedError):
                    pass
        except Exception as exc:
            raise map_os_error(exc, f"cannot create the journal directory {self._dir}") from exc
        self._dir_ready = True

    # ---- reads -------------------------------------------------------------------------
    def load(self) -> list[dict[str, Any]]:
        """Every valid record. Bad ones are skipped and counted in :attr:`last_skipped`; a
        journal that cannot be listed raises (UNAVAILABLE when the storage is down)."""
        self.last_skipped = 0
        out: list[dict[str, Any]] = []
        for name, raw in self._local_files() if self._local else self._remote_files():
            record = None if raw is None else _parse(raw)
            if record is None or record["artifact_id"] + _SUFFIX != name:
                self._skip(name, "not a valid record" if raw is not None else "unreadable")
                continue
            out.append(record)
        return out

    def _skip(self, name: str, why: str) -> None:
        self.last_skipped += 1
        logger.warning("journal %s: skipped %s (%s)", self.url, name, why)

    def _local_files(self) -> list[tuple[str, bytes | None]]:
        try:
            scan = list(os.scandir(self._dir))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise map_os_error(exc, f"cannot list the journal {self._dir}") from exc
        files: list[tuple[str, bytes | None]] = []
        for entry in scan:
            name = entry.name
            if name.startswith("."):
                continue  # a temp file of a write that never finished
            if not name.endswith(_SUFFIX) or not _ID.fullmatch(name[: -len(_SUFFIX)]):
                self._skip(name, "not a record name")
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:  # a symlink (ELOOP), gone meanwhile, unreadable
                self._skip(name, f"cannot open: {exc.strerror or exc}")
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    self._skip(name, "not a regular file")
                    continue
                if st.st_size > MAX_RECORD_BYTES:
                    self._skip(name, f"{st.st_size} bytes, over {MAX_RECORD_BYTES}")
                    continue
                files.append((name, os.read(fd, MAX_RECORD_BYTES + 1)))
            except OSError as exc:
                self._skip(name, f"cannot read: {exc.strerror or exc}")
            finally:
                os.close(fd)
        return files

    def _remote_files(self) -> list[tuple[str, bytes | None]]:
        try:
            self._fs.invalidate_cache(self._dir)
            listing = self._fs.ls(self._dir, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # object-store clients fail with their own types too
            raise map_os_error(exc, f"cannot list the journal {self._dir}") from exc
        wanted: list[tuple[str, str]] = []
        for info in listing:
            path = str(info.get("name", ""))
            name = path.rstrip("/").rpartition("/")[2]
            if name.startswith(".") or info.get("type") == "directory":
                continue
            if not name.endswith(_SUFFIX) or not _ID.fullmatch(name[: -len(_SUFFIX)]):
                self._skip(name, "not a record name")
                continue
            size = info.get("size")
            if not isinstance(size, int) or size > MAX_RECORD_BYTES:
                self._skip(name, f"{size} bytes, over {MAX_RECORD_BYTES}")
                continue
            wanted.append((name, path))
        files: list[tuple[str, bytes | None]] = []
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            try:
                got = self._fs.cat([p for _, p in batch], on_error="return")
            except Exception as exc:
                raise map_os_error(exc, f"cannot read the journal {self._dir}") from exc
            if not isinstance(got, dict):  # one path: some file systems answer bytes
                got = {batch[0][1]: got}
            by_stripped = {self._fs._strip_protocol(k): v for k, v in got.items()}
            for name, path in batch:
                raw = got.get(path, by_stripped.get(self._fs._strip_protocol(path)))
                if isinstance(raw, FileNotFoundError):
                    continue  # forgotten since the listing
                if isinstance(raw, BaseException):  # the storage failed: not a bad record
                    raise map_os_error(raw, f"cannot read the journal record {path}") from raw
                if isinstance(raw, bytes | bytearray) and len(raw) <= MAX_RECORD_BYTES:
                    files.append((name, bytes(raw)))
                else:
                    files.append((name, None))
        return files


def _parse(raw: bytes) -> dict[str, Any] | None:
    if len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    version = data.pop("format", None)
    if type(version) is not int or version != FORMAT:
        return None
    return _validate(data)


def _validate(data: dict[str, Any]) -> dict[str, Any] | None:
    """``data`` when every known field has its type (ints not bools, not negative) and the
    artifact id is safe for a path, else None."""
    for name, kind in _FIELDS.items():
        if name not in data:
            if name in _OPTIONAL:
                data[name] = ""
                continue
            return None
        value = data[name]
        if type(value) is not kind or (isinstance(value, int) and value < 0):
            return None
    if not data["key"] or not _ID.fullmatch(data["artifact_id"]):
        return None
    return data
