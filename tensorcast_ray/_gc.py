"""Collect shared memory left by daemons that died for good.  [daemon, CLI]

A daemon stopped cleanly frees its segments. One killed with its node (``ray stop``, the OOM
killer, a crashed raylet) leaves them in ``shm_dir``: the next daemon of that node has a new
Ray node id, so a new prefix, and never adopts them. Each daemon records its owner
(``<prefix>owner.json``: pid, port, node, namespace); a prefix is stale when that process is
gone *and* none of its files changed for ``min_age_s`` — the age test spares a daemon Ray is
restarting right now (a restart takes seconds and re-adopts everything).

Each daemon's guardian (tensorcast_ray._guardian) frees its prefix within seconds of the
daemon's end; this age-based sweep is the fallback for prefixes no guardian watched (a guardian
killed by hand, files of older versions). It runs at every daemon start (for other prefixes on
the host) and as ``tensorcast-ray gc``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "OWNER_SUFFIX",
    "StalePrefix",
    "claim_lock",
    "collect",
    "pid_alive",
    "read_owner",
    "remove_prefix",
    "stale_prefixes",
    "write_owner",
]

OWNER_SUFFIX = "owner.json"
#: ``tcr-<8 hex namespace hash>-<12 char node id>-`` (see tensorcast_ray._shm.segment_prefix)
_PREFIX = re.compile(r"^(tcr-[0-9a-f]{8}-[0-9A-Za-z]{1,12}-)")


@dataclass(frozen=True)
class StalePrefix:
    prefix: str
    files: tuple[str, ...]
    nbytes: int
    owner_pid: int | None


def write_owner(shm_dir: str, prefix: str, **fields: object) -> None:
    """[daemon] Record this process as the owner of ``prefix`` (mode 0600, atomic)."""
    path = os.path.join(shm_dir, prefix + OWNER_SUFFIX)
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)  # a leftover (or a planted link): never write through it
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), **fields}, f)
    os.replace(tmp, path)


def read_owner(shm_dir: str, prefix: str) -> dict[str, object] | None:
    try:
        fd = os.open(os.path.join(shm_dir, prefix + OWNER_SUFFIX), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            if os.fstat(f.fileno()).st_uid != os.getuid():
                return None  # not ours: never trust another user's record
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's process counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_prefixes(
    shm_dir: str, *, min_age_s: float = 600.0, exclude: str = "", now: float | None = None
) -> list[StalePrefix]:
    """Prefixes in ``shm_dir`` whose owner is gone and whose files are all older than
    ``min_age_s``. Only files this user owns are considered."""
    now = time.time() if now is None else now
    groups: dict[str, list[tuple[str, os.stat_result]]] = {}
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    for name in names:
        match = _PREFIX.match(name)
        if match is None or match.group(1) == exclude:
            continue
        try:
            st = os.lstat(os.path.join(shm_dir, name))
        except OSError:
            continue
        if st.st_uid == os.getuid():
            groups.setdefault(match.group(1), []).append((name, st))
    stale = []
    for prefix, entries in sorted(groups.items()):
        owner = read_owner(shm_dir, prefix)
        pid = owner.get("pid") if owner else None
        if isinstance(pid, int) and pid_alive(pid):
            continue
        if now - max(st.st_mtime for _, st in entries) < min_age_s:
            continue
        stale.append(
            StalePrefix(
                prefix,
                tuple(sorted(n for n, _ in entries)),
                sum(st.st_size for _, st in entries),
                pid if isinstance(pid, int) else None,
            )
        )
    return stale


def collect(
    shm_dir: str,
    *,
    min_age_s: float = 600.0,
    exclude: str = "",
    dry_run: bool = False,
    socket_dir: str | None = None,
) -> list[StalePrefix]:
    """Remove every stale prefix's files, and its unix socket in ``socket_dir`` (unless
    ``dry_run``); returns what was found."""
    found = stale_prefixes(shm_dir, min_age_s=min_age_s, exclude=exclude)
    if not dry_run:
        for stale in found:
            remove_prefix(shm_dir, stale.prefix, socket_dir)
    return found


def remove_prefix(shm_dir: str, prefix: str, socket_dir: str | None) -> tuple[list[str], int]:
    """Unlink every entry of this user named ``<prefix>*`` in ``shm_dir``, the socket
    ``<socket_dir>/<prefix>sock`` and token file ``<socket_dir>/<prefix>token``; returns
    (names removed, their bytes).

    Links are removed, never followed; another user's entries are left alone.
    """
    if not prefix or "/" in prefix:
        raise ValueError(f"not a daemon prefix: {prefix!r}")
    paths = []
    try:
        paths = [os.path.join(shm_dir, n) for n in os.listdir(shm_dir) if n.startswith(prefix)]
    except OSError:
        pass
    if socket_dir:
        paths += [os.path.join(socket_dir, prefix + end) for end in ("sock", "token")]
    removed, nbytes = [], 0
    for path in paths:
        try:
            st = os.lstat(path)
            if st.st_uid != os.getuid() or stat.S_ISDIR(st.st_mode):
                continue
            os.unlink(path)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        removed.append(os.path.basename(path))
        nbytes += st.st_size
    return removed, nbytes


@contextlib.contextmanager
def claim_lock(socket_dir: str) -> Iterator[None]:
    """Serialize a daemon claiming its prefix (writing its owner file) against a guardian
    removing it: an exclusive ``flock`` on the private socket directory, which only this
    user can open (see ``private_socket_dir``), held for milliseconds."""
    fd = os.open(socket_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
