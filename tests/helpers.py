"""Helpers shared by the test modules: waiting on conditions and leak checks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def wait_for(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> object:
    """Poll ``predicate`` until truthy or fail after ``timeout`` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def shm_prefix(namespace: str) -> str:
    return f"tcr-{hashlib.sha1(namespace.encode()).hexdigest()[:8]}-"


def leftovers(namespace: str) -> list[str]:
    prefix = shm_prefix(namespace)
    found = [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    sock_dir = f"/tmp/tcr-{os.getuid()}"
    if os.path.isdir(sock_dir):
        found += [f"{sock_dir}/{n}" for n in os.listdir(sock_dir) if n.startswith(prefix)]
    return found


def guardians(namespace: str) -> list[int]:
    """Pids of the running guardians (tensorcast_ray._guardian) of ``namespace``'s daemons."""
    import psutil

    prefix = shm_prefix(namespace)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        args = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "--prefix" not in args[:-1]:
            continue
        if args[args.index("--prefix") + 1].startswith(prefix):
            found.append(proc.pid)
    return found


def named_actors(namespace: str) -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace
    ]


def stop_namespace(namespace: str) -> None:
    """Stop every tensorcast actor of ``namespace`` cleanly, then wait until they are gone."""
    import ray

    for name in named_actors(namespace):
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        try:
            ray.get(handle.stop.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(handle, no_restart=True)
    wait_for(lambda: not named_actors(namespace), 30, f"actors of {namespace} to exit")


@contextmanager
def python_child(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], Any]]:
    """Run ``script`` in a fresh interpreter from the repository root; yield the process and
    the JSON of the first line it prints. The child talks over its stdin / stdout; it is
    killed if still running when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
