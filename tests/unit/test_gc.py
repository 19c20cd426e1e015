"""Stale shared memory of dead daemons: found by owner pid and age, removed, others spared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tensorcast_ray._gc import collect, read_owner, stale_prefixes, write_owner

DEAD = "tcr-0123abcd-0123456789ab-"
LIVE = "tcr-0123abcd-ba9876543210-"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make(shm: Path, prefix: str, pid: int | None, age_s: float, files: int = 2) -> list[Path]:
    paths = [shm / f"{prefix}{i:016x}" for i in range(files)]
    for p in paths:
        p.write_bytes(b"x" * 4096)
    if pid is not None:
        owner = shm / f"{prefix}owner.json"
        owner.write_text(json.dumps({"pid": pid, "port": 1234}))
        paths.append(owner)
    old = time.time() - age_s
    for p in paths:
        os.utime(p, (old, old))
    return paths


def test_dead_and_old_prefix_is_collected_live_one_is_kept(tmp_path: Path) -> None:
    dead = make(tmp_path, DEAD, dead_pid(), age_s=3600)
    live = make(tmp_path, LIVE, os.getpid(), age_s=3600)
    other = tmp_path / "not-ours"
    other.write_bytes(b"keep")
    found = stale_prefixes(str(tmp_path), min_age_s=600)
    assert [f.prefix for f in found] == [DEAD]
    assert found[0].nbytes == sum(p.stat().st_size for p in dead)
    collect(str(tmp_path), min_age_s=600)
    assert not any(p.exists() for p in dead)
    assert all(p.exists() for p in live) and other.exists()


def test_recently_touched_prefix_is_spared_for_a_restart(tmp_path: Path) -> None:
    make(tmp_path, DEAD, dead_pid(), age_s=5)
    assert stale_prefixes(str(tmp_path), min_age_s=600) == []
    assert [f.prefix for f in stale_prefixes(str(tmp_path), min_age_s=1)] == [DEAD]


def test_collect_removes_the_dead_daemons_socket(tmp_path: Path) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    (sockets / f"{DEAD}sock").write_bytes(b"")
    (sockets / f"{LIVE}sock").write_bytes(b"")
    shm = tmp_path / "shm"
    shm.mkdir()
    make(shm, DEAD, dead_pid(), age_s=3600)
    make(shm, LIVE, os.getpid(), age_s=3600)
    collect(str(shm), min_age_s=600, socket_dir=str(sockets))
    assert not (sockets / f"{DEAD}sock").exists()
    assert (sockets / f"{LIVE}sock").exists()


def test_dry_run_and_exclude_remove_nothing(tmp_path: Path) -> None:
    paths = make(tmp_path, DEAD, None, age_s=3600)
    assert [f.owner_pid for f in collect(str(tmp_path), min_age_s=0, dry_run=True)] == [None]
    assert collect(str(tmp_path), min_age_s=0, exclude=DEAD) == []
    assert all(p.exists() for p in paths)


def test_owner_file_round_trip_is_private(tmp_path: Path) -> None:
    write_owner(str(tmp_path), LIVE, port=4321, node_id="n")
    owner = read_owner(str(tmp_path), LIVE)
    assert owner == {"pid": os.getpid(), "port": 4321, "node_id": "n"}
    assert (tmp_path / f"{LIVE}owner.json").stat().st_mode & 0o777 == 0o600
    assert read_owner(str(tmp_path), DEAD) is None


def test_cli_gc_reports_and_removes(tmp_path: Path) -> None:
    paths = make(tmp_path, DEAD, dead_pid(), age_s=3600)
    base = [sys.executable, "-m", "tensorcast_ray.cli", "gc", "--shm-dir", str(tmp_path)]
    dry = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and f"would remove {DEAD}*" in dry.stdout
    assert all(p.exists() for p in paths)
    done = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    (row,) = json.loads(done.stdout)
    assert row["prefix"] == DEAD and row["removed"] and row["files"] == len(paths)
    assert not any(p.exists() for p in paths)


def test_owner_file_is_never_written_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / f"{LIVE}owner.json.tmp").symlink_to(victim)
    write_owner(str(tmp_path), LIVE, port=1)
    assert victim.read_text() == "keep me"
    assert read_owner(str(tmp_path), LIVE)["port"] == 1  # type: ignore[index]
    (tmp_path / f"{LIVE}owner.json").unlink()
    (tmp_path / f"{LIVE}owner.json").symlink_to(victim)
    assert read_owner(str(tmp_path), LIVE) is None, "a link is not our owner record"
