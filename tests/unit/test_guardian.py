"""The guardian without Ray: its decisions, its removal, and real guardian processes watching
stand-in daemons (a plain process that spawns one, as the daemon actor does)."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tensorcast_ray.daemon.local_store import LocalStore
from tensorcast_ray.daemon.metrics import DaemonMetrics

from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._gc import write_owner
from tensorcast_ray._guardian import Guardian, Observation, _alive, _start_of, reap
from tensorcast_ray._layout import Columns
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tests.helpers import wait_for

PREFIX = "tcr-0badf00d-0123456789ab-"
OTHER = "tcr-0badf00d-ba9876543210-"


def seen(
    daemon: bool = True, parent: bool = True, owner: int | None = 10, owner_alive: bool = True
) -> Observation:
    return Observation(daemon, parent, owner, owner_alive)


def test_waits_while_the_daemon_lives_even_after_a_clean_stop() -> None:
    g = Guardian(daemon_pid=10, grace_s=5)
    assert g.decide(seen(), 0)[0] == "wait"
    assert g.decide(seen(owner=None, owner_alive=False), 1)[0] == "wait"  # stop() then kill


def test_gone_daemon_with_a_live_raylet_gets_the_grace_then_is_reaped() -> None:
    g = Guardian(daemon_pid=10, grace_s=5)
    gone = seen(daemon=False, owner_alive=False)
    assert g.decide(gone, 100)[0] == "wait"
    assert g.decide(gone, 104.9)[0] == "wait"
    action, why = g.decide(gone, 105)
    assert action == "reap" and "within 5 s" in why


def test_grace_restarts_when_the_daemon_is_seen_alive_again() -> None:
    g = Guardian(daemon_pid=10, grace_s=5)
    gone = seen(daemon=False, owner_alive=False)
    g.decide(gone, 100)
    g.decide(seen(), 103)
    assert g.decide(gone, 106)[0] == "wait"
    assert g.decide(gone, 111)[0] == "reap"


def test_gone_raylet_or_clean_stop_is_reaped_at_once() -> None:
    g = Guardian(daemon_pid=10, grace_s=600)
    assert g.decide(seen(daemon=False, parent=False, owner_alive=False), 0)[0] == "reap"
    assert g.decide(seen(daemon=False, owner=None, owner_alive=False), 0)[0] == "reap"


def test_a_live_successor_takes_over_and_a_dead_one_does_not() -> None:
    g = Guardian(daemon_pid=10, grace_s=600)
    assert g.decide(seen(daemon=False, owner=11), 0)[0] == "exit"
    assert g.decide(seen(daemon=True, owner=11), 0)[0] == "exit"  # a new daemon after a stop
    assert g.decide(seen(daemon=False, parent=False, owner=11, owner_alive=False), 0)[0] == "reap"


def test_a_process_is_known_by_pid_and_start_time_and_a_zombie_is_dead() -> None:
    me = os.getpid()
    assert _alive(me, _start_of(me))
    assert not _alive(me, _start_of(me) + 1), "same pid, another start: a reused pid"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = _start_of(child.pid)
    assert _alive(child.pid, started)
    child.kill()
    wait_for(lambda: not _alive(child.pid, started), 30, "the killed child to be a zombie")
    child.wait(timeout=30)  # only now reaped: above, it was a zombie


def make_prefix(shm: Path, sock: Path, prefix: str = PREFIX) -> list[Path]:
    paths = [shm / f"{prefix}{n}" for n in ("0011223344556677", "epochs", "journal.jsonl")]
    for p in paths:
        p.write_bytes(b"x" * 4096)
    paths.append(sock / f"{prefix}sock")
    paths[-1].write_bytes(b"")
    return paths


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    shm, sock = tmp_path / "shm", tmp_path / "sock"
    shm.mkdir()
    sock.mkdir(mode=0o700)
    return shm, sock


def test_reap_removes_the_prefix_and_its_socket_only(dirs: tuple[Path, Path]) -> None:
    shm, sock = dirs
    mine = make_prefix(shm, sock)
    other = make_prefix(shm, sock, OTHER)
    outside = shm.parent / "outside"
    outside.write_bytes(b"keep")
    (shm / f"{PREFIX}link").symlink_to(outside)
    removed, nbytes = reap(str(shm), PREFIX, str(sock), daemon_pid=10)
    assert sorted(removed) == sorted([p.name for p in mine] + [f"{PREFIX}link"])
    assert nbytes >= 3 * 4096
    assert not any(p.exists() for p in mine) and not (shm / f"{PREFIX}link").is_symlink()
    assert outside.read_bytes() == b"keep", "a link is removed, never followed"
    assert all(p.exists() for p in other)


def test_reap_leaves_a_prefix_a_successor_claimed(dirs: tuple[Path, Path]) -> None:
    shm, sock = dirs
    files = make_prefix(shm, sock)
    write_owner(str(shm), PREFIX, port=1)  # this (live) process is the successor
    assert reap(str(shm), PREFIX, str(sock), daemon_pid=10) == ([], 0)
    assert all(p.exists() for p in files)
    # The watched daemon's own claim does not protect it.
    assert len(reap(str(shm), PREFIX, str(sock), daemon_pid=os.getpid())[0]) == len(files) + 1


# ---- real guardian processes --------------------------------------------------------------
STAND_IN = textwrap.dedent(
    """
    import os, signal, sys
    from tensorcast_ray._gc import write_owner
    from tensorcast_ray._guardian import spawn
    shm, sock, prefix, grace, subreaper = sys.argv[1:6]
    if subreaper == "1":  # as Ray makes every worker in its deprecated subreaper mode
        import ctypes
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    write_owner(shm, prefix, port=1)
    print(os.getpid(), spawn(shm, prefix, sock, float(grace)), flush=True)
    signal.pause()  # a daemon idles until the test kills it
    """
)


class StandIn:
    """A process in the daemon's place: claims ``PREFIX`` and spawns its guardian."""

    def __init__(
        self,
        shm: Path,
        sock: Path,
        grace_s: float,
        *,
        middle: bool = False,
        subreaper: bool = False,
        stderr: int | None = None,
    ) -> None:
        argv = [sys.executable, "-c", STAND_IN, str(shm), str(sock), PREFIX, str(grace_s)]
        argv.append("1" if subreaper else "0")
        if middle:  # a parent of its own (the raylet's part), killable in the test
            argv = [sys.executable, "-c", _MIDDLE, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert self.proc.stdout is not None
        pid, guardian = self.proc.stdout.readline().split()
        self.pid, self.guardian = int(pid), int(guardian)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        wait_for(lambda: not _running(self.pid), 30, "the stand-in daemon to die")

    def close(self) -> None:
        for pid in (self.pid, self.proc.pid):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if _running(self.guardian):
            os.kill(self.guardian, signal.SIGKILL)


_MIDDLE = "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); p.wait()"  # forwards stdout


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def stand_ins() -> Iterator[list[StandIn]]:
    started: list[StandIn] = []
    yield started
    for s in started:
        s.close()


def prefix_files(shm: Path, sock: Path) -> list[str]:
    return [n for d in (shm, sock) for n in os.listdir(d) if n.startswith(PREFIX)]


def test_guardian_runs_outside_the_daemons_process_tree(
    dirs: tuple[Path, Path], stand_ins: list[StandIn]
) -> None:
    from ray.autoscaler._private.constants import RAY_PROCESSES

    shm, sock = dirs
    daemon = StandIn(shm, sock, 600)
    stand_ins.append(daemon)
    guardian = psutil.Process(daemon.guardian)
    assert guardian.ppid() != daemon.pid, "Ray kills a worker's children: not one of them"
    assert os.getsid(daemon.guardian) != os.getsid(daemon.pid)
    assert os.getpgid(daemon.guardian) != os.getpgid(daemon.pid)
    cmdline = subprocess.list2cmdline(guardian.cmdline())
    matched = [k for k, by_name in RAY_PROCESSES if k in (guardian.name() if by_name else cmdline)]
    assert not matched, f"`ray stop` would kill the guardian: {matched}"


def test_spawn_warns_when_the_daemon_is_a_subreaper_the_guardian_cannot_leave(
    dirs: tuple[Path, Path], stand_ins: list[StandIn]
) -> None:
    shm, sock = dirs
    daemon = StandIn(shm, sock, 600, subreaper=True, stderr=subprocess.PIPE)
    stand_ins.append(daemon)
    assert psutil.Process(daemon.guardian).ppid() == daemon.pid
    assert daemon.proc.stderr is not None
    assert "cannot outlive this daemon" in daemon.proc.stderr.readline()


def test_daemon_killed_with_its_parent_alive_is_reaped_after_the_grace(
    dirs: tuple[Path, Path], stand_ins: list[StandIn]
) -> None:
    shm, sock = dirs
    daemon = StandIn(shm, sock, 0.5)
    stand_ins.append(daemon)
    make_prefix(shm, sock)
    daemon.kill()
    wait_for(lambda: not prefix_files(shm, sock), 30, "the guardian to remove the prefix")
    wait_for(lambda: not _running(daemon.guardian), 30, "the guardian to exit")


def test_daemon_gone_with_its_parent_is_reaped_without_waiting_the_grace(
    dirs: tuple[Path, Path], stand_ins: list[StandIn]
) -> None:
    shm, sock = dirs
    daemon = StandIn(shm, sock, 3600, middle=True)
    stand_ins.append(daemon)
    make_prefix(shm, sock)
    os.kill(daemon.proc.pid, signal.SIGKILL)  # the raylet's part first
    daemon.kill()
    wait_for(lambda: not prefix_files(shm, sock), 60, "the guardian to remove the prefix")
    wait_for(lambda: not _running(daemon.guardian), 30, "the guardian to exit")


def test_guardian_hands_over_to_a_successor_and_leaves_its_files(
    dirs: tuple[Path, Path], stand_ins: list[StandIn]
) -> None:
    shm, sock = dirs
    daemon = StandIn(shm, sock, 0)
    stand_ins.append(daemon)
    files = make_prefix(shm, sock)
    successor = StandIn(shm, sock, 3600)  # claims the prefix: a restarted daemon
    stand_ins.append(successor)
    wait_for(lambda: not _running(daemon.guardian), 30, "the old guardian to exit")
    daemon.kill()
    assert all(p.exists() for p in files), "the successor's files stay"
    assert _running(successor.guardian)
    owner = json.loads((shm / f"{PREFIX}owner.json").read_text())
    assert owner["pid"] == successor.pid


def test_clean_stop_then_exit_removes_what_is_left(
    dirs: tuple[Path, Path], stand_ins: list[StandIn]
) -> None:
    shm, sock = dirs
    daemon = StandIn(shm, sock, 3600)
    stand_ins.append(daemon)
    make_prefix(shm, sock)
    (shm / f"{PREFIX}owner.json").unlink()  # what stop() does last but one
    assert _running(daemon.guardian)
    daemon.kill()  # ray.kill after stop()
    wait_for(lambda: not prefix_files(shm, sock), 30, "the guardian to remove the rest")
    wait_for(lambda: not _running(daemon.guardian), 30, "the guardian to exit")


def test_restarted_daemon_starts_empty_when_its_guardian_removed_everything(
    tmp_path: Path,
) -> None:
    config = DaemonConfig(shm_dir=str(tmp_path), shm_pool_bytes=0, shm_segment_bytes=1 << 20)
    first = LocalStore(config, prefix=PREFIX, metrics=DaemonMetrics())
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    put(first, "w:v1")
    first.close(unlink=False)  # a crash: everything stays
    assert reap(str(tmp_path), PREFIX, str(tmp_path), daemon_pid=10)[0]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(PREFIX)]
    second = LocalStore(config, prefix=PREFIX, metrics=DaemonMetrics())
    try:
        assert second.recovered == 0
        second.bind_session_pid("s1", os.getpid(), second.hostname, pid_verified=True)
        put(second, "w:v2")
        assert second.rpc_Lookup(daemon_pb2.LookupRequest(key="w:latest"), "").key == "w:v2"
    finally:
        second.close(unlink=True)


def put(store: LocalStore, key: str) -> None:
    started = store.rpc_BeginWrite(
        daemon_pb2.BeginWriteRequest(
            key=key,
            kind=daemon_pb2.WRITE_KIND_PUT,
            session_id="s1",
            tensors=Columns.of(["w"], ["uint8"], [(4096,)]).to_table(),
        ),
        "",
    )
    for seg in started.segments:
        with open(os.path.join(started.shm_dir, seg.name), "r+b") as f:
            with mmap.mmap(f.fileno(), seg.size) as m:
                m[:] = b"\x07" * seg.size
    store.rpc_CommitWrite(daemon_pb2.CommitWriteRequest(write_id=started.write_id), "")


def test_reap_recreates_a_removed_socket_dir_and_removes_the_prefix(
    dirs: tuple[Path, Path],
) -> None:
    shm, sock = dirs
    files = [p for p in make_prefix(shm, sock) if p.parent == shm]
    for p in sock.iterdir():
        p.unlink()
    sock.rmdir()
    removed, _ = reap(str(shm), PREFIX, str(sock), daemon_pid=10)
    assert sorted(removed) == sorted(p.name for p in files)
    assert sock.is_dir() and not sock.stat().st_mode & 0o077, "recreated private"


def test_reap_without_a_lockable_socket_dir_still_removes_the_prefix(
    dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    shm, sock = dirs
    files = [p for p in make_prefix(shm, sock) if p.parent == shm]
    for p in sock.iterdir():
        p.unlink()
    sock.rmdir()
    sock.write_bytes(b"")  # not a directory: no daemon can claim under it either
    removed, _ = reap(str(shm), PREFIX, str(sock), daemon_pid=10)
    assert sorted(removed) == sorted(p.name for p in files)
    assert "without the lock" in caplog.text
