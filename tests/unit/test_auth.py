"""The control plane's checks against a real in-process daemon (no Ray): the namespace token
on every gRPC call, peer credentials on the unix socket, writes bound to a live session, and
the token file. The other-user tests need root (CI runs as root): they create a throwaway
Unix user and remove it afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from tensorcast_ray.daemon.local_store import LocalStore
from tensorcast_ray.daemon.metrics import DaemonMetrics
from tensorcast_ray.daemon.server import DaemonServer
from tensorcast_ray.daemon.service import DaemonIdentity, DaemonService

from tensorcast_ray import _auth
from tensorcast_ray._client import DaemonClient
from tensorcast_ray._config import DaemonConfig, from_env
from tensorcast_ray._errors import (
    ArtifactError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnavailableError,
)
from tensorcast_ray._layout import Columns
from tensorcast_ray._local_channel import METHODS, LocalChannelServer
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tests.helpers import OtherUser, self_signed, wait_for

PREFIX = "tcr-authtest-000000000000-"
TOKEN = "the-namespace-token"
SERVICE = "/tensorcast_ray.v1.StoreDaemon/"


def begin_request(session_id: str = "") -> daemon_pb2.BeginWriteRequest:
    return daemon_pb2.BeginWriteRequest(
        key="w:v1",
        kind=daemon_pb2.WRITE_KIND_PUT,
        session_id=session_id,
        tensors=Columns.of(["t"], ["float32"], [(1024,)]).to_table(),
    )


#: The calls another user tried: list, look up, delete, and begin a write to commit.
REQUESTS: dict[str, Any] = {
    "ListKeys": daemon_pb2.ListKeysRequest(),
    "Lookup": daemon_pb2.LookupRequest(key="owner:v1"),
    "Delete": daemon_pb2.DeleteRequest(key="owner:v1"),
    "BeginWrite": begin_request(),
    "CommitWrite": daemon_pb2.CommitWriteRequest(write_id="x"),
    "Hello": daemon_pb2.HelloRequest(),
}


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser | None]:
    """Forked first (before any daemon thread or gRPC channel of this module)."""
    if os.geteuid() != 0:
        yield None
        return
    user = OtherUser()
    try:
        yield user
    finally:
        user.close()


def need(user: OtherUser | None) -> OtherUser:
    if user is None:
        pytest.skip("needs root to create a throwaway Unix user (CI runs as root)")
    return user


def daemon_config(root: str) -> DaemonConfig:
    return DaemonConfig(
        shm_dir=root, shm_pool_bytes=0, shm_segment_bytes=1 << 20, client_staging_bytes=0
    )


class Daemon:
    def __init__(self, root: str, **overrides: Any) -> None:
        self.root = root
        config = daemon_config(root).model_copy(update=overrides)
        metrics = DaemonMetrics()
        self.store = LocalStore(config, prefix=PREFIX, metrics=metrics)
        self.service = DaemonService(DaemonIdentity("authnode", "auth"), self.store, metrics)
        self.socket_path = os.path.join(root, "daemon.sock")
        self.server = DaemonServer(self.service, config, self.socket_path, TOKEN)
        self.server.start()
        self.address = self.service.address

    def used(self) -> int:
        return int(self.store.stats()["tiers"][0]["used_bytes"])

    def close(self) -> None:
        self.server.stop()
        self.store.close(unlink=True)


@pytest.fixture(scope="module")
def daemon(other_user: OtherUser | None) -> Iterator[Daemon]:
    root = tempfile.mkdtemp(prefix="tcr-auth-", dir="/tmp")  # mode 0700, as a socket dir
    d = Daemon(root)
    try:
        yield d
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def owner(daemon: Daemon) -> Iterator[DaemonClient]:
    """The owner's client over gRPC, with one artifact written."""
    client = DaemonClient(daemon.address, use_local_socket=False, token=TOKEN)
    put(client, "owner:v1")
    try:
        yield client
    finally:
        client.close()


def put(client: DaemonClient, key: str) -> None:
    request = begin_request(client.session_hint)
    request.key = key
    started = client.call("BeginWrite", request, 10)
    client.call("CommitWrite", daemon_pb2.CommitWriteRequest(write_id=started.write_id), 10)


# ---- run in the other user's worker (module level: they travel pickled by name) ------------


def grpc_call(address: str, method: str, request: bytes, token: str | None) -> tuple[str, str]:
    """One raw call; (status code name, details)."""
    with grpc.insecure_channel(address) as channel:
        fn = channel.unary_unary(SERVICE + method)
        try:
            fn(request, timeout=10, metadata=_auth.call_metadata(token))
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
    return "OK", ""


def connect_unix(path: str) -> str:
    """Connect to ``path`` and send a Health request; what came back (or why not)."""
    from tensorcast_ray._local_channel import _HEADER, _decode_error, _recv_exact

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(path)
        except PermissionError:
            return "EACCES"
        sock.sendall(_HEADER.pack(0, METHODS["Health"][0]))
        length, status = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
        body = bytes(_recv_exact(sock, length))
        if status == 0:
            return "OK"
        err = _decode_error(body)
        return f"{err.status_code.name}: {err.message}"


# ---- the token on gRPC ----------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_a_call_without_the_token_is_unauthenticated_and_never_handled(
    daemon: Daemon, owner: DaemonClient, method: str, token: str | None
) -> None:
    code, details = grpc_call(daemon.address, method, REQUESTS[method].SerializeToString(), token)
    assert code == "UNAUTHENTICATED"
    assert _auth.TOKEN_ENV in details and "docs/security.md" in details
    listed = owner.call("ListKeys", daemon_pb2.ListKeysRequest(), 10).keys
    assert "owner:v1" in listed and "w:v1" not in listed, "nothing was deleted or written"
    assert not daemon.store._leases.pending, "no write was begun"


def test_the_session_stream_needs_the_token_too(daemon: Daemon) -> None:
    with pytest.raises(PermissionDeniedError) as err:
        DaemonClient(daemon.address, use_local_socket=False, token="wrong")
    assert err.value.status_code == grpc.StatusCode.UNAUTHENTICATED
    sessions_before = daemon.service.clients
    with grpc.insecure_channel(daemon.address) as channel:
        stream = channel.unary_stream(SERVICE + "Session")
        with pytest.raises(grpc.RpcError) as rpc:
            next(iter(stream(b"", timeout=10)))
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert daemon.service.clients == sessions_before, "no session was opened"


def test_the_owner_with_the_token_works_on_both_channels(
    daemon: Daemon, owner: DaemonClient
) -> None:
    local = DaemonClient(daemon.address, token=TOKEN)
    try:
        assert local.transport == "local"
        for client in (owner, local):
            info = client.call("Lookup", daemon_pb2.LookupRequest(key="owner:v1"), 10)
            assert info.key == "owner:v1"
    finally:
        local.close()


# ---- writes belong to a live session ------------------------------------------------------


@pytest.mark.parametrize("session", ["", "grpc-not-a-session"])
def test_a_grpc_write_naming_no_live_session_is_refused(
    daemon: Daemon, owner: DaemonClient, session: str
) -> None:
    used = daemon.used()
    with pytest.raises(ArtifactError, match="session") as err:
        owner.call("BeginWrite", begin_request(session), 10)
    if not session:
        assert isinstance(err.value, FailedPreconditionError)
    assert daemon.used() == used and not daemon.store._leases.pending


@pytest.mark.parametrize("local", [False, True])
def test_an_uncommitted_write_ends_with_its_session(daemon: Daemon, local: bool) -> None:
    used = daemon.used()
    client = DaemonClient(daemon.address, use_local_socket=local, token=TOKEN)
    # On the local socket the connection is the session, whatever id a request names.
    named = client.session_hint if not local else "local-999"
    started = client.call("BeginWrite", begin_request(named), 10)
    assert started.write_id and daemon.used() > used
    client.close()
    wait_for(lambda: daemon.used() == used, 10, "the write's capacity to come back")
    assert started.write_id not in daemon.store._leases.pending


# ---- leases are bound to proof of identity, never a claimed pid ----------------------------


def test_after_a_restart_only_the_kernel_verified_pid_rebinds_register_leases() -> None:
    root = tempfile.mkdtemp(prefix="tcr-rebind-", dir="/tmp")
    first = LocalStore(daemon_config(root), prefix=PREFIX, metrics=DaemonMetrics())
    first.bind_session_pid("s1", os.getpid(), first.hostname, pid_verified=True)
    request = begin_request("s1")
    request.key, request.kind = "reg:v1", daemon_pb2.WRITE_KIND_REGISTER
    started = first.rpc_BeginWrite(request, "")
    first.rpc_CommitWrite(daemon_pb2.CommitWriteRequest(write_id=started.write_id), "")
    first.close(unlink=False)  # a crash: the producer (this process) lives on
    d = Daemon(root)
    try:
        (lease,) = d.store._leases.artifacts.values()
        assert lease.owner_session == "" and lease.owner_pid == os.getpid()
        # Another client claims the producer's pid over gRPC, then hangs up.
        with grpc.insecure_channel(d.address) as channel:
            stream = channel.unary_stream(
                SERVICE + "Session",
                request_serializer=daemon_pb2.SessionRequest.SerializeToString,
                response_deserializer=daemon_pb2.SessionEvent.FromString,
            )
            call = stream(
                daemon_pb2.SessionRequest(pid=os.getpid(), hostname=socket.gethostname()),
                metadata=_auth.call_metadata(TOKEN),
                timeout=30,
            )
            assert next(call).session_id
            assert lease.owner_session == "", "a claimed pid took the lease over"
            call.cancel()
        wait_for(lambda: d.service.clients == 0, 10, "the claiming session to end")
        assert d.store._leases.catalog.exists("reg:v1"), "hanging up ended the producer's lease"
        # The producer itself reconnects on the unix socket: the kernel vouches for its pid.
        producer = DaemonClient(d.address, token=TOKEN)
        assert producer.transport == "local"
        assert lease.owner_session.startswith("local-")
        producer.close()
        wait_for(lambda: not d.store._leases.catalog.exists("reg:v1"), 10, "the lease to end")
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


def session(address: str, resume: str = "") -> Any:
    """A raw gRPC Session stream (the caller cancels it) and its first event."""
    channel = grpc.insecure_channel(address)
    stream = channel.unary_stream(
        SERVICE + "Session",
        request_serializer=daemon_pb2.SessionRequest.SerializeToString,
        response_deserializer=daemon_pb2.SessionEvent.FromString,
    )
    call = stream(
        daemon_pb2.SessionRequest(pid=1, hostname="elsewhere", resume_secret=resume),
        metadata=_auth.call_metadata(TOKEN),
        timeout=30,
    )
    return channel, call, next(call)


def test_a_client_keeps_its_lease_secret_across_sessions(daemon: Daemon) -> None:
    client = DaemonClient(daemon.address, use_local_socket=False, token=TOKEN)
    try:
        secret, first = client._lease_secret, client.session_id
        assert len(secret) >= 43
        client.reconnect()  # e.g. after the daemon restarted: the new Session sends it back
        assert client._lease_secret == secret and client.session_id != first
    finally:
        client.close()


def test_after_a_restart_only_the_lease_secret_rebinds_a_grpc_clients_leases() -> None:
    root = tempfile.mkdtemp(prefix="tcr-resume-", dir="/tmp")
    secret = "the-secret-the-first-instance-issued"
    first = LocalStore(daemon_config(root), prefix=PREFIX, metrics=DaemonMetrics())
    key = hashlib.sha256(secret.encode()).hexdigest()
    first.bind_session_pid("g1", 1, "elsewhere", pid_verified=False, lease_key=key)
    request = begin_request("g1")
    request.key, request.kind = "greg:v1", daemon_pb2.WRITE_KIND_REGISTER
    started = first.rpc_BeginWrite(request, "")
    first.rpc_CommitWrite(daemon_pb2.CommitWriteRequest(write_id=started.write_id), "")
    first.close(unlink=False)  # a crash: the client lives on
    d = Daemon(root)
    try:
        (lease,) = d.store._leases.artifacts.values()
        assert lease.owner_session == "" and lease.owner_key
        channel, call, event = session(d.address, resume="a-guess")
        assert event.lease_secret == "a-guess" and lease.owner_session == ""
        call.cancel()
        channel.close()
        channel, call, event = session(d.address, resume=secret)
        assert event.lease_secret == secret and lease.owner_session == event.session_id
        call.cancel()
        channel.close()
        wait_for(lambda: not d.store._leases.catalog.exists("greg:v1"), 10, "the lease to end")
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


# ---- the token file ---------------------------------------------------------------------------


def test_the_token_file_is_private_and_found_by_port(tmp_path: Any) -> None:
    path = _auth.token_file(str(tmp_path), PREFIX)
    _auth.write_token_file(path, "tok-a", 4711, "")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    _auth.write_token_file(_auth.token_file(str(tmp_path), "tcr-other-"), "tok-b", 4712, "")
    assert _auth.token_for_address("127.0.0.1:4711", str(tmp_path)) == "tok-a"
    assert _auth.token_for_address(f"{socket.gethostname()}:4712", str(tmp_path)) == "tok-b"
    assert _auth.token_for_address("127.0.0.1:4713", str(tmp_path)) is None
    # Never sent elsewhere, whatever listens on that port there.
    assert _auth.token_for_address("192.0.2.7:4711", str(tmp_path)) is None
    _auth.remove_token_file(path)
    assert _auth.token_for_address("127.0.0.1:4711", str(tmp_path)) is None


def test_a_token_file_of_another_user_is_ignored(tmp_path: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a file to another uid")
    path = _auth.token_file(str(tmp_path), PREFIX)
    _auth.write_token_file(path, "planted", 4711, "")
    os.chown(path, 65534, 65534)
    assert _auth.token_for_address("127.0.0.1:4711", str(tmp_path)) is None


# ---- another user on the host ---------------------------------------------------------------


def test_another_user_cannot_reach_the_unix_socket(
    other_user: OtherUser | None, daemon: Daemon
) -> None:
    user = need(other_user)
    assert stat.S_IMODE(os.stat(daemon.root).st_mode) == 0o700
    assert user.run(connect_unix, daemon.socket_path) == "EACCES"


@pytest.mark.parametrize("method", ["ListKeys", "Lookup", "Delete", "BeginWrite", "CommitWrite"])
def test_another_user_without_the_token_is_unauthenticated(
    other_user: OtherUser | None, daemon: Daemon, owner: DaemonClient, method: str
) -> None:
    user = need(other_user)
    request = REQUESTS[method].SerializeToString()
    code, details = user.run(grpc_call, daemon.address, method, request, None)
    assert code == "UNAUTHENTICATED" and _auth.TOKEN_ENV in details
    assert "owner:v1" in owner.call("ListKeys", daemon_pb2.ListKeysRequest(), 10).keys


def test_peer_credentials_refuse_another_user_even_on_an_open_socket(
    other_user: OtherUser | None,
) -> None:
    """Defence in depth: a socket another user can reach (a loose directory, a chmod) still
    serves nobody but its own user."""
    user = need(other_user)
    root = tempfile.mkdtemp(prefix="tcr-open-", dir="/tmp")
    os.chmod(root, 0o755)
    path = os.path.join(root, "open.sock")
    served: list[tuple[str, int]] = []

    def handler(method: str, request: Any, conn_id: str) -> Any:
        return daemon_pb2.StatusResponse()

    server = LocalChannelServer(
        path, handler, lambda conn, pid: served.append((conn, pid)), lambda conn: None
    )
    try:
        os.chmod(path, 0o666)
        answer = user.run(connect_unix, path)
        assert answer.startswith("PERMISSION_DENIED") and f"uid {user.uid}" in answer
        assert served == [], "the other user's connection never became a session"
        assert connect_unix(path) == "OK"
        wait_for(lambda: served, 10, "the owner's connection")
        assert served[0][1] == os.getpid(), "the session's pid is the kernel's, not claimed"
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


# ---- TLS ------------------------------------------------------------------------------------


def test_a_tls_daemon_serves_clients_that_trust_its_certificate() -> None:
    root = tempfile.mkdtemp(prefix="tcr-tls-", dir="/tmp")
    cert_file, key_file = self_signed(root, "daemon")
    other_cert, _ = self_signed(root, "other")
    d = Daemon(root, tls_cert_file=cert_file, tls_key_file=key_file)
    try:
        with open(cert_file, "rb") as f:
            cert = f.read()
        assert d.server.tls_cert == cert
        client = DaemonClient(
            d.address, use_local_socket=False, token=TOKEN, root_certificates=cert
        )
        try:
            assert client.transport == "grpc"
            assert client.call("ListKeys", daemon_pb2.ListKeysRequest(), 10).keys == []
        finally:
            client.close()
        local = DaemonClient(d.address, token=TOKEN, root_certificates=cert)
        assert local.transport == "local"  # Hello over TLS, then the unix socket
        local.close()
        with open(other_cert, "rb") as f:
            untrusted = f.read()
        for certs in (None, untrusted):  # plaintext, or a certificate it does not trust
            with pytest.raises(UnavailableError):
                DaemonClient(
                    d.address,
                    use_local_socket=False,
                    token=TOKEN,
                    root_certificates=certs,
                    connect_timeout=5,
                )
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)


def test_tls_needs_both_files_and_readable_ones(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="set both or neither"):
        DaemonConfig(tls_cert_file=str(tmp_path / "x.crt"))
    config = daemon_config(str(tmp_path)).model_copy(
        update={"tls_cert_file": str(tmp_path / "none.crt"), "tls_key_file": "k"}
    )
    with pytest.raises(InvalidArgumentError, match="tls_cert_file"):
        DaemonServer(None, config, None, TOKEN)  # type: ignore[arg-type]


def test_every_endpoint_binds_loopback_by_default() -> None:
    """/metrics is unauthenticated (read-only): it stays on loopback unless configured."""
    from tensorcast_ray._config import (
        GlobalStoreConfig,
        load_daemon_config,
        load_global_store_config,
    )

    packaged = from_env({})
    configs = [DaemonConfig(), GlobalStoreConfig(), load_daemon_config(env=packaged)]
    for config in [*configs, load_global_store_config(env=packaged)]:
        assert config.listen_host == config.metrics_host == "127.0.0.1"


def test_a_grpc_request_cannot_act_in_a_local_connections_session(
    daemon: Daemon, owner: DaemonClient
) -> None:
    """A token holder over gRPC names a local connection's session: its staged segments,
    buffers and writes are that connection's alone (the old code let a LeaseSegments naming
    it unlink the connection's staged segments, and a BeginWrite be charged to it)."""
    local = DaemonClient(daemon.address, token=TOKEN)
    try:
        assert local.transport == "local"
        (sid,) = [s for s in daemon.service._sessions if s.startswith("local-")]
        assert len(sid) > len("local-1-") + 16, "a local session id must not be guessable"
        used = daemon.used()
        for request in (
            daemon_pb2.LeaseSegmentsRequest(session_id=sid, count=0),
            begin_request(sid),
        ):
            with pytest.raises(PermissionDeniedError, match="local-socket connection"):
                owner.call(type(request).__name__.removesuffix("Request"), request, 10)
        assert not daemon.store._leases.pending and daemon.used() == used
    finally:
        local.close()


def test_grpc_session_ids_are_128_bit_random(owner: DaemonClient) -> None:
    sid = owner.session_hint
    assert sid.startswith("grpc-") and len(sid) == len("grpc-") + 32
