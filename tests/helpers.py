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

#: A daemon config for capacity and lifetime tests: 64 MiB of stable DRAM in 16 MiB segments,
#: no pool (so every byte in /dev/shm belongs to an artifact), loopback, ephemeral ports.
SMALL_DAEMON_CONFIG = """\
listen_host: 127.0.0.1
listen_port: 0
metrics_port: 0
stable_dram_capacity_bytes: 64MiB
shm_segment_bytes: 16MiB
shm_pool_bytes: 0
epoch_slots: 4096
"""


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


class OtherUser:
    """A throwaway Unix user and a worker process running as it, for tests of what another
    user on the host can do. Needs root (CI runs as root); removes the user on ``close``.

    The worker is forked (never exec'd: another user cannot run the venv's python under a
    0700 /root) and drops to the user with setgroups / setgid / setuid. Fork it before the
    parent starts Ray or any gRPC channel, so the child inherits no threads. ``run(fn,
    *args)`` runs a module-level function there; its result, or the exception it raised,
    comes back pickled.
    """

    def __init__(self) -> None:
        import pwd
        import uuid

        self.name = f"tc-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", self.name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the worker
            os.close(self._to_child)
            os.close(self._from_child)
            try:
                os.setgroups([])
                os.setgid(self.gid)
                os.setuid(self.uid)
                self._serve(to_child_r, from_child_w)
            finally:
                os._exit(0)
        os.close(to_child_r)
        os.close(from_child_w)

    @staticmethod
    def _serve(requests: int, replies: int) -> None:
        import pickle

        with os.fdopen(requests, "rb") as rd, os.fdopen(replies, "wb") as wr:
            while True:
                try:
                    fn, args = pickle.load(rd)
                except EOFError:
                    return
                try:
                    reply: tuple[bool, Any] = (True, fn(*args))
                except BaseException as exc:  # sent back for the test to assert on
                    reply = (False, exc)
                try:
                    pickle.dump(reply, wr)
                except Exception as exc:  # an unpicklable result or exception
                    pickle.dump((False, RuntimeError(repr(exc))), wr)
                wr.flush()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """``fn(*args)`` as the other user; re-raises what it raised."""
        import pickle
        import select

        os.write(self._to_child, pickle.dumps((fn, args)))
        ready, _, _ = select.select([self._from_child], [], [], timeout)
        if not ready:
            raise AssertionError(f"the other user's worker gave no answer in {timeout}s")
        with os.fdopen(os.dup(self._from_child), "rb") as rd:
            ok, value = pickle.load(rd)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        import signal

        os.close(self._to_child)
        os.close(self._from_child)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        subprocess.run(["userdel", self.name], check=False, capture_output=True)


def self_signed(folder: str, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``folder``."""
    import datetime
    import ipaddress

    import pytest

    pytest.importorskip("cryptography", reason="cryptography (from the test extra) is missing")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = os.path.join(folder, f"{name}.crt"), os.path.join(folder, f"{name}.key")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_file, key_file
