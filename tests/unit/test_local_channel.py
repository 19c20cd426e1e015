"""The same-host unix-socket channel, client and server, without Ray or a daemon: the
handler below stands in for the daemon's service."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tensorcast_ray._errors import DeadlineExceededError, NotFoundError
from tensorcast_ray._local_channel import LocalChannel, LocalChannelServer
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, daemon_pb2
from tests.helpers import wait_for


class Service:
    """Answers Health with its version string; Exists blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.connected: list[tuple[str, int]] = []  # (connection id, peer pid)
        self.disconnected: list[str] = []
        self.calls: list[str] = []
        self.aborted: list[str] = []

    def __call__(self, method: str, request: Any, conn_id: str) -> Any:
        self.calls.append(method)
        if method == "Health":
            return common_pb2.HealthResponse(version="health-reply")
        if method == "Exists":
            self.release.wait(30)
            return daemon_pb2.ExistsResponse(exists=True)
        if method == "Delete":
            raise NotFoundError(f"{request.key} does not exist (test)")
        if method == "BeginWrite":
            self.release.wait(30)
            return daemon_pb2.BeginWriteResponse(write_id="w-unheard")
        if method == "AbortWrite":
            self.aborted.append(request.write_id)
            return daemon_pb2.AbortWriteResponse()
        return daemon_pb2.StatusResponse()


@pytest.fixture
def served() -> Iterator[tuple[Service, LocalChannel]]:
    path = f"/tmp/tcr-test-{uuid.uuid4().hex[:10]}.sock"
    service = Service()
    server = LocalChannelServer(
        path,
        service,
        lambda conn, pid: service.connected.append((conn, pid)),
        service.disconnected.append,
    )
    channel = LocalChannel(path, timeout=10)
    try:
        yield service, channel
    finally:
        service.release.set()
        channel.close()
        server.close()
        assert not os.path.exists(path) or os.stat(path).st_mode & 0o777 == 0o600


def test_a_call_that_times_out_keeps_the_session_and_the_stream_in_step(
    served: tuple[Service, LocalChannel],
) -> None:
    service, channel = served
    wait_for(lambda: service.connected, 10, "the server to see the connection")
    with pytest.raises(DeadlineExceededError) as err:
        channel.call("Exists", daemon_pb2.ExistsRequest(key="k:v1"), timeout=0.2)
    assert err.value.retryable
    # The connection is the process's session: a slow call must not end it.
    assert service.disconnected == []
    service.release.set()
    # The next call first drops the late Exists reply, then gets its own answer.
    reply = channel.call("Health", common_pb2.HealthRequest(), timeout=10)
    assert isinstance(reply, common_pb2.HealthResponse) and reply.version == "health-reply"
    assert service.calls == ["Exists", "Health"]
    assert isinstance(
        channel.call("Status", daemon_pb2.StatusRequest(), timeout=10), daemon_pb2.StatusResponse
    )
    assert service.disconnected == []


def test_errors_cross_the_channel_with_their_class(served: tuple[Service, LocalChannel]) -> None:
    _, channel = served
    with pytest.raises(NotFoundError, match="does not exist"):
        channel.call("Delete", daemon_pb2.DeleteRequest(key="gone:v1"), timeout=10)
    assert channel.call("Health", common_pb2.HealthRequest(), timeout=10).version == "health-reply"


def test_closing_the_client_ends_the_session(served: tuple[Service, LocalChannel]) -> None:
    service, channel = served
    wait_for(lambda: service.connected, 10, "the server to see the connection")
    channel.close()
    wait_for(
        lambda: service.disconnected == [c for c, _ in service.connected], 10, "the session to end"
    )


def test_client_refuses_a_path_that_is_not_its_users_socket(tmp_path: Any) -> None:
    from tensorcast_ray._errors import PermissionDeniedError, UnavailableError

    planted = tmp_path / "tcr-x-sock"
    planted.write_text("not a socket")
    with pytest.raises(PermissionDeniedError, match="not a socket"):
        LocalChannel(str(planted), timeout=1)
    with pytest.raises(UnavailableError):
        LocalChannel(str(tmp_path / "missing.sock"), timeout=1)


def test_daemon_socket_dir_must_be_private(tmp_path: Any) -> None:
    from tensorcast_ray.daemon.server import private_socket_dir

    from tensorcast_ray._errors import FailedPreconditionError

    fresh = tmp_path / "fresh"
    assert private_socket_dir(str(fresh)) == str(fresh)
    assert os.stat(fresh).st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(FailedPreconditionError, match="not a private directory"):
        private_socket_dir(str(shared))
    link = tmp_path / "link"
    link.symlink_to(fresh)
    with pytest.raises(FailedPreconditionError, match="not a private directory"):
        private_socket_dir(str(link))


def test_a_forked_child_does_not_keep_the_parents_session_open(
    served: tuple[Service, LocalChannel],
) -> None:
    service, channel = served
    wait_for(lambda: service.connected, 10, "the server to see the connection")
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what the SDK does when a forked process calls init() again
        try:
            channel.close()
            os.write(ready_w, b"x")
            os.read(release_r, 1)  # stay alive while the parent checks
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        channel.close()  # the parent goes away: its session must end now
        wait_for(
            lambda: service.disconnected == [c for c, _ in service.connected],
            10,
            "the session to end",
        )
    finally:
        os.write(release_w, b"x")
        os.waitpid(pid, 0)
        for fd in (release_r, release_w, ready_r, ready_w):
            os.close(fd)


def test_a_write_begun_for_a_caller_that_stopped_waiting_is_aborted(
    served: tuple[Service, LocalChannel],
) -> None:
    """Nobody will fill or commit it, and it holds its key: the late BeginWrite reply is
    answered with AbortWrite before the next call goes out."""
    service, channel = served
    with pytest.raises(DeadlineExceededError):
        channel.call("BeginWrite", daemon_pb2.BeginWriteRequest(key="k:v1"), timeout=0.2)
    service.release.set()
    reply = channel.call("Health", common_pb2.HealthRequest(), timeout=10)
    assert reply.version == "health-reply"
    assert service.calls == ["BeginWrite", "AbortWrite", "Health"]
    assert service.aborted == ["w-unheard"]
