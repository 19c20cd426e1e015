"""The SDK's connection to its node's daemon.  [SDK]

Connecting: gRPC ``Hello`` to the daemon's address exchanges versions and learns the
daemon's local socket; when this process runs on the daemon's host and can open that
socket, requests go over it (~0.1 ms a call instead of ~0.9 ms), and the socket connection
itself is this process's session. Otherwise requests use gRPC and a held-open ``Session``
stream is the session. Either way, when this process exits the daemon ends its leases.

The transport chosen is logged and counted (``tc_store_data_path_total`` is for bytes; the
control channel shows up in ``DaemonClient.transport``).

After a daemon restart the first call fails UNAVAILABLE; :meth:`DaemonClient.reconnect`
(run by the retry loop between attempts) re-resolves the address — through Ray when the
client was made from a Ray actor handle — and connects again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from tensorcast_ray._auth import call_metadata
from tensorcast_ray._error_mapping import from_grpc_error
from tensorcast_ray._errors import ArtifactError, FailedPreconditionError, UnavailableError
from tensorcast_ray._local_channel import METHODS, LocalChannel
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tensorcast_ray._version import PROTOCOL_VERSION, __version__

logger = logging.getLogger(__name__)

SERVICE = "tensorcast_ray.v1.StoreDaemon"
# Objects a forked child inherited: kept referenced so their finalizers never run there.
_INHERITED: list[Any] = []


def versions_compatible(*versions: str) -> bool:
    """Same major.minor for every non-empty version string."""
    cores = {".".join(v.split(".")[:2]) for v in versions if v}
    return len(cores) <= 1


class DaemonClient:
    def __init__(
        self,
        address: str,
        *,
        resolve_address: Callable[[], str] | None = None,
        use_local_socket: bool = True,
        connect_timeout: float = 10.0,
        token: str | None = None,
        root_certificates: bytes | None = None,
    ) -> None:
        """``token``: the namespace's (tensorcast_ray._auth), carried by every gRPC call;
        ``root_certificates``: PEM to verify a TLS daemon by (None: plaintext gRPC)."""
        self._root_certificates = root_certificates
        self.address = address
        self._metadata = call_metadata(token)
        # Issued by the daemon with the first gRPC Session and sent back by every later one
        # (after a daemon restart): it re-binds this process's leases, where a pid would not.
        self._lease_secret = ""
        self._resolve = resolve_address
        self._use_local = use_local_socket
        self._timeout = connect_timeout
        self.pid = os.getpid()
        self.transport = "grpc"
        self.hello: daemon_pb2.HelloResponse | None = None
        self._channel: grpc.Channel | None = None
        self._local: LocalChannel | None = None
        self._session_call: Any = None
        self._callables: dict[str, Any] = {}
        self.connect()

    # ---- connection ------------------------------------------------------------------
    def connect(self) -> None:
        self._lost: str | None = None
        options = [("grpc.enable_retries", 0), ("grpc.keepalive_time_ms", 10_000)]
        if self._root_certificates is not None:
            self._channel = grpc.secure_channel(
                self.address, grpc.ssl_channel_credentials(self._root_certificates), options
            )
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._callables = {
            name: self._channel.unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )
            for name, (_, req, resp) in METHODS.items()
        }
        request = daemon_pb2.HelloRequest(
            sdk_version=__version__,
            protocol=PROTOCOL_VERSION,
            pid=os.getpid(),
            hostname=socket.gethostname(),
        )
        hello = self._grpc_call("Hello", request, self._timeout)
        self._check_versions(hello)
        self.hello = hello
        self._local = None
        if self._use_local and hello.local_socket and hello.hostname == socket.gethostname():
            try:
                local = LocalChannel(hello.local_socket, timeout=self._timeout)
                local_hello = local.call("Hello", request, self._timeout)
                if local_hello.instance_id == hello.instance_id:
                    self._local, self.transport = local, "local"
                else:
                    local.close()
            except (ArtifactError, OSError) as exc:
                logger.info(
                    "local socket %s unusable (%s); using gRPC",
                    hello.local_socket,
                    exc,
                    extra={"tc.store.mode": "grpc", "tc.store.artifact_id": "", "tc.store.key": ""},
                )
        if self._local is None:
            self.transport = "grpc"
            self._open_grpc_session()
        logger.debug("connected to daemon %s over %s", self.address, self.transport)

    def _open_grpc_session(self) -> None:
        assert self._channel is not None
        stream = self._channel.unary_stream(
            f"/{SERVICE}/Session",
            request_serializer=daemon_pb2.SessionRequest.SerializeToString,
            response_deserializer=daemon_pb2.SessionEvent.FromString,
        )
        call = stream(
            daemon_pb2.SessionRequest(
                pid=os.getpid(),
                hostname=socket.gethostname(),
                client_name="tensorcast_ray",
                resume_secret=self._lease_secret,
            ),
            metadata=self._metadata,
        )
        try:
            event = next(call)  # type: ignore[call-overload]
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, target=self.address) from exc
        self.session_id, self._lease_secret = event.session_id, event.lease_secret
        self._session_call = call

    def _check_versions(self, hello: daemon_pb2.HelloResponse) -> None:
        v = hello.versions
        if not versions_compatible(__version__, v.daemon, v.global_store):
            raise FailedPreconditionError(
                f"incompatible tensorcast_ray versions: SDK {__version__}, daemon "
                f"{v.daemon or '?'}, Global Store {v.global_store or 'none'}; install the same "
                "tensorcast_ray version in every process and restart the daemons "
                "(`tensorcast-ray daemon stop --all`)"
            )

    def connection_lost(self) -> bool:
        """Whether the session with the daemon is gone (a closed local socket, or an ended
        gRPC session stream). Only then may a retry reconnect: closing a live session would
        end this process's leases (``register``, ``tc.empty`` buffers, staged segments)."""
        if self._lost is not None:
            return True
        if self._local is not None:
            return self._local.closed  # closed after an interrupt mid-reply
        call = self._session_call
        return call is None or bool(call.done())

    def reconnect(self) -> None:
        """Drop the connection and connect again (re-resolving the address when we can)."""
        self._close_transports()
        if self._resolve is not None:
            self.address = self._resolve()
        self.connect()

    # ---- calls --------------------------------------------------------------------------
    def call(self, method: str, request: Message, timeout: float | None = None) -> Any:
        if os.getpid() != self.pid:
            raise FailedPreconditionError(
                "this tensorcast client was created before fork(); call tensorcast_ray.init() "
                "in the child process"
            )
        if self._lost is not None:
            raise UnavailableError(
                f"the connection to the daemon at {self.address} was lost ({self._lost}); "
                "it may be restarting — the next attempt reconnects"
            )
        if self._local is not None:
            try:
                return self._local.call(method, request, timeout)
            except UnavailableError as exc:
                # Only a closed socket ends the session; an UNAVAILABLE the daemon sent back
                # (a peer of the daemon is down) leaves this connection as it is.
                if self._local.closed:
                    self._local = None
                    self._lost = exc.message  # never fall back to a session-less gRPC channel
                raise
        return self._grpc_call(method, request, timeout)

    def start_call(self, method: str, request: Message, timeout: float) -> Any:
        """A gRPC call that runs beside this process's other calls (the local socket carries
        one at a time): for calls the daemon holds open (WaitLatest). Returns a
        ``grpc.Future``; ``result()`` raises grpc.RpcError (map it with from_grpc_error),
        ``cancel()`` ends the wait on this side."""
        if os.getpid() != self.pid:
            raise FailedPreconditionError(
                "this tensorcast client was created before fork(); call tensorcast_ray.init() "
                "in the child process"
            )
        if self._channel is None:
            raise UnavailableError(f"the connection to the daemon at {self.address} is closed")
        return self._callables[method].future(request, timeout=timeout, metadata=self._metadata)

    def _grpc_call(self, method: str, request: Message, timeout: float | None) -> Any:
        try:
            return self._callables[method](request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, target=self.address) from exc

    @property
    def session_hint(self) -> str:
        """The session id to send in requests (empty on the local socket: the connection is it)."""
        return "" if self._local is not None else getattr(self, "session_id", "")

    def _close_transports(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        if self._session_call is not None:
            self._session_call.cancel()
            self._session_call = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def close(self) -> None:
        if os.getpid() != self.pid:
            # The gRPC objects stay referenced, never closed from a forked child; the local
            # socket's descriptor copy is dropped so it cannot keep the parent's session open.
            if self._local is not None:
                self._local.close()
                self._local = None
            _INHERITED.append(self)
            return
        self._close_transports()
