"""The guardian: frees a daemon's shared memory once the daemon is gone for good.  [guardian]

A daemon's files — segments, epochs table, journal and owner file (``<shm_dir>/<prefix>*``)
and its unix socket — would outlive it whenever it ends without a clean ``stop``: Ray shut
down or stopped, the node lost, ``ray.kill``. So every daemon starts one guardian
(:func:`spawn`): a small process outside Ray's process tree — a session of its own, and
re-parented away from the Ray worker by a double fork — which neither Ray's kill of a
worker's children or process group nor ``ray stop`` (it matches Ray's process names)
reaches. It loads only this module and :mod:`tensorcast_ray._gc` (both stdlib only), not
the package (which would cost ~270 ms and ~50 MB), and polls twice a second:

- the owner file names another live process → a successor (Ray restarted the daemon, or a
  new one started after a stop) claimed the prefix and started its own guardian → exit;
- the daemon lives → wait;
- the daemon is gone, and so is the process that started it (the raylet: no restart can
  come) or its owner file (a clean stop) → remove the prefix now and exit;
- the daemon is gone but its raylet lives → give Ray ``guardian_grace_s`` to restart it,
  then remove the prefix and exit.

Removal re-reads the owner file under :func:`~tensorcast_ray._gc.claim_lock`, which a
starting daemon holds while it writes that file: a successor either claims first (the
guardian leaves its files alone) or finds the prefix empty and starts empty.

It logs to the daemon's stderr it inherits: the daemon worker's log in Ray's log directory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tensorcast_ray._gc import claim_lock, pid_alive, read_owner, remove_prefix

__all__ = ["Guardian", "Observation", "reap", "spawn"]

logger = logging.getLogger("tensorcast_ray.guardian")

POLL_S = 0.5
# Run in a fresh interpreter: register the package as an empty namespace so importing this
# module does not run tensorcast_ray/__init__.py (see the module docstring).
_BOOT = (
    "import sys, types; pkg = types.ModuleType('tensorcast_ray'); pkg.__path__ = [sys.argv[1]]; "
    "sys.modules['tensorcast_ray'] = pkg; from tensorcast_ray._guardian import main; "
    "main(sys.argv[2:])"
)


@dataclass(frozen=True)
class Observation:
    """One look at the daemon, its parent and its owner file."""

    daemon_alive: bool
    parent_alive: bool
    owner_pid: int | None  # None: the owner file is gone (a clean stop) or unreadable
    owner_alive: bool  # owner_pid names a live process


@dataclass
class Guardian:
    """The decisions (pure: observations and a clock in, "wait" / "exit" / "reap" out)."""

    daemon_pid: int
    grace_s: float
    gone_since: float | None = None

    def decide(self, seen: Observation, now: float) -> tuple[str, str]:
        """(action, why)."""
        if seen.owner_pid not in (None, self.daemon_pid) and seen.owner_alive:
            return "exit", f"daemon pid {seen.owner_pid} took the prefix over"
        if seen.daemon_alive:
            self.gone_since = None
            return "wait", "the daemon lives"
        if seen.owner_pid is None:
            return "reap", "the daemon stopped"
        if not seen.parent_alive:
            return "reap", "the daemon's raylet is gone, so Ray cannot restart it"
        if self.gone_since is None:
            self.gone_since = now
        if now - self.gone_since >= self.grace_s:
            return "reap", f"Ray did not restart the daemon within {self.grace_s:g} s"
        return "wait", "the daemon is gone; Ray may restart it"


def reap(shm_dir: str, prefix: str, socket_dir: str, daemon_pid: int) -> tuple[list[str], int]:
    """Remove ``prefix`` unless a successor claimed it; returns (names removed, bytes)."""
    with contextlib.ExitStack() as lock:
        try:
            # Someone removed the socket dir: recreate it, so a daemon starting now (which
            # creates it too) still claims under the same lock.
            os.makedirs(socket_dir, mode=0o700, exist_ok=True)
            lock.enter_context(claim_lock(socket_dir))
        except OSError as exc:
            # A daemon claims only under a private directory it can lock, so none can
            # claim this prefix now; leaving the files would leave the shared memory.
            logger.warning(
                "%s: cannot lock socket_dir %s (%s); removing the prefix without the lock",
                prefix,
                socket_dir,
                exc,
            )
        owner = read_owner(shm_dir, prefix) or {}
        pid = owner.get("pid")
        if isinstance(pid, int) and pid != daemon_pid and pid_alive(pid):
            return [], 0
        return remove_prefix(shm_dir, prefix, socket_dir)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, start time in clock ticks since boot) of ``pid``, from
    /proc/<pid>/stat; None when it does not exist. The raw start time identifies a process
    exactly (psutil's create_time adds the boot time, which some kernels report a second off
    from one read to the next)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name may hold spaces, ")"
    except OSError:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _alive(pid: int, started: int) -> bool:
    """Process ``pid`` still runs and is the one that started at ``started`` (not a reused
    pid, not a zombie nobody reaped yet)."""
    stat = _stat(pid) if pid > 0 else None
    return stat is not None and stat[2] == started and stat[0] not in ("Z", "X")


def _owner_pid(shm_dir: str, prefix: str) -> int | None:
    owner = read_owner(shm_dir, prefix)
    pid = owner.get("pid") if owner else None
    return pid if isinstance(pid, int) else None


def run(
    guardian: Guardian,
    shm_dir: str,
    prefix: str,
    socket_dir: str,
    daemon: tuple[int, int],
    parent: tuple[int, int],
) -> str:
    """Watch until the prefix is handed over or removed; returns why it ended. ``daemon``
    and ``parent`` are (pid, start time) as :func:`_stat` reads them."""
    while True:
        owner = _owner_pid(shm_dir, prefix)
        seen = Observation(
            daemon_alive=_alive(*daemon),
            parent_alive=_alive(*parent),
            owner_pid=owner,
            owner_alive=owner is not None and pid_alive(owner),
        )
        action, why = guardian.decide(seen, time.monotonic())
        if action == "exit":
            logger.info("%s: %s", prefix, why)
            return why
        if action == "reap":
            removed, nbytes = reap(shm_dir, prefix, socket_dir, guardian.daemon_pid)
            if removed or _owner_pid(shm_dir, prefix) in (None, guardian.daemon_pid):
                # Quiet after a clean stop (at most its socket is left); loud after a crash.
                level = logging.INFO if seen.owner_pid is None else logging.WARNING
                logger.log(
                    level, "%s: %s; removed %d files (%d bytes)", prefix, why, len(removed), nbytes
                )
                return why
            continue  # a successor claimed the prefix just now: the next look exits
        time.sleep(POLL_S)


def spawn(shm_dir: str, prefix: str, socket_dir: str, grace_s: float) -> int:
    """[daemon] Start the guardian of this process's prefix; returns its pid."""
    # Identify the daemon and its parent (the raylet) by pid and start time, taken here: by
    # the time the guardian looks, either may be gone and its pid reused.
    me, parent = os.getpid(), os.getppid()
    args = ["--daemon", f"{me}:{_start_of(me)}", "--parent", f"{parent}:{_start_of(parent)}"]
    args += ["--shm-dir", shm_dir, "--prefix", prefix, "--socket-dir", socket_dir]
    args += ["--grace-s", repr(grace_s)]
    package_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT, package_dir, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,  # out of the worker's process group and session
        cwd="/",
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
    finally:
        proc.stdout.close()
        proc.wait(timeout=60)
    if proc.returncode != 0 or not line.strip().isdigit():
        raise RuntimeError(f"the guardian of {prefix} did not start (exit {proc.returncode})")
    guardian = int(line)
    stat = _stat(guardian)
    if (
        stat is not None and stat[1] == me
    ):  # this worker is a child subreaper: Ray kills what it adopted when it exits
        logger.warning(
            "the guardian of %s cannot outlive this daemon (Ray runs with "
            "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper=1): if the daemon "
            "ends without a clean stop, its shared memory stays until `tensorcast-ray gc` "
            "or a daemon started later on this host removes it",
            prefix,
        )
    return guardian


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="tensorcast_ray._guardian")
    parser.add_argument("--daemon", type=_pid_started, required=True)
    parser.add_argument("--parent", type=_pid_started, required=True)
    parser.add_argument("--shm-dir", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--socket-dir", required=True)
    parser.add_argument("--grace-s", type=float, required=True)
    opts = parser.parse_args(argv)
    # The second fork: the process spawn() started exits at once, so this one belongs to no
    # Ray worker (Ray kills a worker's children when the worker exits).
    child = os.fork()
    if child:
        print(child, flush=True)
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # let go of spawn()'s pipe
    os.close(devnull)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s tensorcast_ray guardian %(process)d: %(message)s"
    )
    guardian = Guardian(opts.daemon[0], opts.grace_s)
    run(guardian, opts.shm_dir, opts.prefix, opts.socket_dir, opts.daemon, opts.parent)


def _start_of(pid: int) -> int:
    stat = _stat(pid)
    return stat[2] if stat is not None else -1  # gone already: never alive to the guardian


def _pid_started(text: str) -> tuple[int, int]:
    pid, started = text.split(":")
    return int(pid), int(started)
