"""One failure, one error, whichever channel it took: a real daemon server (gRPC and the
local socket, in this process, no Ray) whose handler raises each kind of failure; clients on
both channels must see the same class, code, ``retryable`` flag and message."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import ray.exceptions as rex
from tensorcast_ray.daemon.local_store import LocalStore
from tensorcast_ray.daemon.metrics import DaemonMetrics
from tensorcast_ray.daemon.server import DaemonServer
from tensorcast_ray.daemon.service import DaemonIdentity, DaemonService

from tensorcast_ray import _errors
from tensorcast_ray._client import DaemonClient
from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._errors import (
    ArtifactError,
    DeadlineExceededError,
    FailedPreconditionError,
    UnavailableError,
)
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

C = grpc.StatusCode
PREFIX = "tcr-unittest-000000000000-"
TOKEN = "error-boundary-test-token"
ALL_ERROR_CLASSES = [
    obj
    for name in _errors.__all__
    if isinstance(obj := getattr(_errors, name), type) and issubclass(obj, ArtifactError)
]


class LeaseExpiredError(FailedPreconditionError):
    """A subclass the client does not know: it must arrive as its nearest known class."""


@dataclass
class Daemon:
    server: DaemonServer
    store: LocalStore
    failure: Callable[[], Any] = field(default=lambda: None)

    def handler(self, request: Any, session_id: str) -> daemon_pb2.ExistsResponse:
        self.failure()
        return daemon_pb2.ExistsResponse(exists=True)

    def client(self, *, local: bool) -> DaemonClient:
        client = DaemonClient(self.server.service.address, use_local_socket=local, token=TOKEN)
        assert client.transport == ("local" if local else "grpc")
        return client


def start_daemon(shm_dir: str) -> Daemon:
    config = DaemonConfig(
        shm_dir=shm_dir,
        shm_pool_bytes=0,
        shm_segment_bytes=1 << 20,
        client_staging_bytes=1 << 20,
    )
    metrics = DaemonMetrics()
    store = LocalStore(config, prefix=PREFIX, metrics=metrics)
    service = DaemonService(DaemonIdentity("errnode", "errors"), store, metrics)
    server = DaemonServer(service, config, os.path.join(shm_dir, "daemon.sock"), TOKEN)
    daemon = Daemon(server, store)
    store.rpc_Exists = daemon.handler  # type: ignore[method-assign]
    server.start()
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    daemon.server.stop()
    daemon.store.close(unlink=True)


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[str]:
    # A short path of our own: a unix socket path is at most 107 bytes.
    path = tempfile.mkdtemp(prefix="tcr-errs-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def channels(shm_dir: str) -> Iterator[tuple[Daemon, DaemonClient, DaemonClient]]:
    daemon = start_daemon(shm_dir)
    local, remote = daemon.client(local=True), daemon.client(local=False)
    try:
        yield daemon, local, remote
    finally:
        local.close()
        remote.close()
        stop_daemon(daemon)


def exists(client: DaemonClient, timeout: float = 10) -> Any:
    return client.call("Exists", daemon_pb2.ExistsRequest(key="k:v1"), timeout)


def raised(client: DaemonClient, timeout: float = 10) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        exists(client, timeout)
    return info.value


def same_error(local: ArtifactError, remote: ArtifactError) -> ArtifactError:
    assert type(local) is type(remote)
    assert (local.status_code, local.retryable, local.message) == (
        remote.status_code,
        remote.retryable,
        remote.message,
    )
    return local


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


E = _errors
#: (name, what the handler raises, the class, code and retryable flag the caller must see).
HANDLER_FAILURES: list[tuple[str, Callable[[], BaseException], type, grpc.StatusCode, bool]] = [
    *[
        (cls.__name__, lambda cls=cls: cls("tested"), cls, cls.default_code,
         cls.default_code in E.RETRYABLE_CODES)
        for cls in ALL_ERROR_CLASSES
    ],
    ("UNAVAILABLE, not retryable", lambda: UnavailableError("x", None, False), UnavailableError,
     C.UNAVAILABLE, False),
    ("foreign subclass", lambda: LeaseExpiredError("expired"), FailedPreconditionError,
     C.FAILED_PRECONDITION, False),
    ("ENOSPC", lambda: os_error(errno.ENOSPC), E.ResourceExhaustedError,
     C.RESOURCE_EXHAUSTED, False),
    ("ENOMEM", lambda: os_error(errno.ENOMEM), E.ResourceExhaustedError,
     C.RESOURCE_EXHAUSTED, False),
    ("EACCES", lambda: PermissionError(errno.EACCES, "denied"), E.PermissionDeniedError,
     C.PERMISSION_DENIED, False),
    ("ENOENT", lambda: FileNotFoundError(errno.ENOENT, "gone"), E.NotFoundError,
     C.NOT_FOUND, False),
    ("EEXIST", lambda: FileExistsError(errno.EEXIST, "there"), E.AlreadyExistsError,
     C.ALREADY_EXISTS, False),
    ("EIO", lambda: os_error(errno.EIO), E.InternalError, C.INTERNAL, False),
    ("bug", lambda: ValueError("a bug"), E.InternalError, C.INTERNAL, False),
    ("TimeoutError", lambda: TimeoutError("slow peer"), DeadlineExceededError,
     C.DEADLINE_EXCEEDED, True),
    ("futures timeout", lambda: concurrent.futures.TimeoutError(), DeadlineExceededError,
     C.DEADLINE_EXCEEDED, True),
    ("Ray timeout", lambda: rex.GetTimeoutError("ray.get timed out"), DeadlineExceededError,
     C.DEADLINE_EXCEEDED, True),
    ("connection reset", lambda: ConnectionResetError(errno.ECONNRESET, "reset"),
     UnavailableError, C.UNAVAILABLE, True),
    ("EPIPE", lambda: os_error(errno.EPIPE), UnavailableError, C.UNAVAILABLE, True),
    ("Ray actor died", lambda: rex.ActorDiedError(), UnavailableError, C.UNAVAILABLE, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "cls", "code", "retryable"),
    [pytest.param(*case[1:], id=case[0]) for case in HANDLER_FAILURES],
)
def test_a_handler_failure_reads_the_same_over_both_channels(
    channels: tuple[Daemon, DaemonClient, DaemonClient],
    make: Callable[[], BaseException],
    cls: type,
    code: grpc.StatusCode,
    retryable: bool,
) -> None:
    daemon, local, remote = channels

    def fail() -> None:
        raise make()

    daemon.failure = fail
    try:
        err = same_error(raised(local), raised(remote))
    finally:
        daemon.failure = lambda: None
    assert (type(err), err.status_code, err.retryable) == (cls, code, retryable)
    if not isinstance(make(), ArtifactError):
        assert err.message.startswith("Exists: ")  # what was being done, then why
    # Neither channel lost its session over an error the daemon answered with.
    assert exists(local).exists and exists(remote).exists


def test_a_full_tmpfs_in_a_handler_says_how_to_grow_it_on_both_channels(
    channels: tuple[Daemon, DaemonClient, DaemonClient],
    shm_dir: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorcast_ray._shm import Segment

    daemon, local, remote = channels

    def full(fd: int, offset: int, length: int) -> None:
        raise os_error(errno.ENOSPC)

    monkeypatch.setattr(os, "posix_fallocate", full)
    daemon.failure = lambda: Segment.create(shm_dir, f"{PREFIX}full", 1 << 20)
    try:
        err = same_error(raised(local), raised(remote))
    finally:
        daemon.failure = lambda: None
    assert err.status_code is C.RESOURCE_EXHAUSTED and not err.retryable
    assert "is full" in err.message and "--shm-size" in err.message


def test_a_reply_that_does_not_come_in_time_is_a_retryable_deadline_on_both(
    channels: tuple[Daemon, DaemonClient, DaemonClient],
) -> None:
    daemon, local, remote = channels
    release = threading.Event()
    daemon.failure = lambda: release.wait(30)
    try:
        errors = [raised(local, timeout=0.2), raised(remote, timeout=0.2)]
    finally:
        release.set()
        daemon.failure = lambda: None
    for err in errors:
        assert type(err) is DeadlineExceededError and err.retryable
        assert err.message.startswith("the call to the tensorcast daemon at ")
    # The late reply is dropped; both sessions carry on.
    assert exists(local).exists and exists(remote).exists


def test_a_connection_closed_mid_call_is_a_retryable_unavailable_on_both(
    shm_dir: str,
) -> None:
    daemon = start_daemon(tempfile.mkdtemp(prefix="tcr-errc-", dir="/tmp"))
    local, remote = daemon.client(local=True), daemon.client(local=False)
    entered = threading.Semaphore(0)
    release = threading.Event()

    def block() -> None:
        entered.release()
        release.wait(30)

    daemon.failure = block
    got: dict[str, BaseException] = {}

    def call(name: str, client: DaemonClient) -> None:
        try:
            exists(client)
        except BaseException as exc:
            got[name] = exc

    threads = [
        threading.Thread(target=call, args=("local", local)),
        threading.Thread(target=call, args=("grpc", remote)),
    ]
    try:
        for t in threads:
            t.start()
        assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
        # The daemon goes away with both calls in flight.
        assert daemon.server._local is not None
        daemon.server._local.close()
        daemon.server._aio.stop(grace=0)
    finally:
        release.set()
        for t in threads:
            t.join(30)
        shm = daemon.store.config.shm_dir
        stop_daemon(daemon)
        shutil.rmtree(shm, ignore_errors=True)
    for client in (local, remote):
        got[f"after {client.transport}"] = raised(client)
        client.close()
    assert set(got) == {"local", "grpc", "after local", "after grpc"}
    for err in got.values():
        assert type(err) is UnavailableError and err.retryable, err
        assert "is not reachable" in str(err) and "retry" in str(err)
