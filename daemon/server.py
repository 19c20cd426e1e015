"""The daemon's endpoints: gRPC, the local unix socket, and Prometheus /metrics.  [daemon]

The gRPC server is a ``grpc.aio`` server on an event loop of its own thread, so held-open
``Session`` streams (one per SDK process) cost no thread each. Unary handlers run the
synchronous :class:`DaemonService` in a small thread pool: a slow segment allocation never
blocks a health check. The local socket serves the same handlers to same-node processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import stat
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tensorcast_ray.daemon.service import DaemonService

from tensorcast_ray._auth import tls_server_credentials
from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._errors import FailedPreconditionError
from tensorcast_ray._grpc_server import (
    AioServerThread,
    bind_error,
    bind_preferring,
    unary_handlers,
)
from tensorcast_ray._local_channel import METHODS, LocalChannelServer
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME = "tensorcast_ray.v1.StoreDaemon"
#: WaitLatest calls held at once per daemon (more wait for a thread: a subscriber each)
WAIT_THREADS = 64


class DaemonServer:
    """[daemon] Owns the endpoints and the periodic tick of one daemon."""

    def __init__(
        self, service: DaemonService, config: DaemonConfig, socket_path: str | None, token: str
    ) -> None:
        self.service = service
        self.config = config
        self._token = token  # of the namespace: every gRPC call must carry it
        self._credentials: grpc.ServerCredentials | None = None
        self.tls_cert = b""  # the PEM certificate clients must trust ("" = plaintext)
        if config.tls_cert_file and config.tls_key_file:
            self._credentials, self.tls_cert = tls_server_credentials(
                config.tls_cert_file, config.tls_key_file
            )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            16, thread_name_prefix="tc-daemon-rpc"
        )
        # WaitLatest calls are held open (weight sync subscribers): threads of their own.
        self._waits = concurrent.futures.ThreadPoolExecutor(
            WAIT_THREADS, thread_name_prefix="tc-daemon-wait"
        )
        self._aio = AioServerThread("tc-daemon-grpc")
        self._local: LocalChannelServer | None = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="tc-daemon-tick", daemon=True)
        self.port = 0
        self.metrics_port = 0
        self._socket_path = socket_path

    def start(self, preferred_port: int | None = None) -> None:
        cfg = self.config
        handlers = [
            unary_handlers(
                SERVICE_NAME,
                METHODS,
                lambda name, req: self.service.handle(name, req, ""),
                self._executor,
                {"WaitLatest": self._waits},
            ),
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {
                    "Session": grpc.unary_stream_rpc_method_handler(
                        self._session,
                        request_deserializer=daemon_pb2.SessionRequest.FromString,
                        response_serializer=daemon_pb2.SessionEvent.SerializeToString,
                    )
                },
            ),
        ]
        port = cfg.listen_port
        if port == 0 and preferred_port:
            # A restarted daemon takes its old port back so address= clients reconnect.
            self.port = bind_preferring(
                lambda p: self._aio.start(
                    handlers, cfg.listen_host, p, self._token, self._credentials
                ),
                preferred_port,
                "daemon gRPC server",
            )
        else:
            self.port = self._aio.start(
                handlers, cfg.listen_host, port, self._token, self._credentials
            )
        self.service.address = f"{_host_for_clients(cfg.listen_host)}:{self.port}"
        try:
            self.metrics_port = self.service.metrics.serve(cfg.metrics_port, cfg.metrics_host)
        except OSError as exc:
            self._aio.stop()
            raise bind_error("metrics endpoint", cfg.metrics_host, cfg.metrics_port, exc) from exc
        self.service.metrics_address = f"{_host_for_clients(cfg.metrics_host)}:{self.metrics_port}"
        if self._socket_path:
            self._local = LocalChannelServer(
                self._socket_path,
                self.service.handle,
                on_connect=self.service.open_local_session,
                on_disconnect=self.service.close_session,
            )
            self.service.local_socket = self._socket_path
        self._ticker.start()

    async def _session(
        self, request: daemon_pb2.SessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[daemon_pb2.SessionEvent]:
        # 128 random bits: the id is what a gRPC request names to act in this session.
        session_id = "grpc-" + secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        try:  # from the first await: a client gone meanwhile must still close its session
            await loop.run_in_executor(
                self._executor, self.service.open_session, session_id, "grpc"
            )
            secret = await loop.run_in_executor(
                self._executor, self.service.describe_session, session_id, request
            )
            yield daemon_pb2.SessionEvent(session_id=session_id, lease_secret=secret)
            await asyncio.Event().wait()  # held until the client goes away or we stop
        finally:
            # Runs on cancellation too: the client's process exited or closed the channel.
            self._executor.submit(self.service.close_session, session_id)

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.service.store.tick()
            except Exception:
                logger.exception("daemon tick failed")

    def stop(self) -> None:
        self._stop.set()
        if self._local is not None:
            self._local.close()
        self.service.store.weights.close()  # held WaitLatest calls answer now
        self._aio.stop()
        self.service.metrics.close()
        self._waits.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)


def _host_for_clients(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        import socket

        return socket.gethostbyname(socket.gethostname())
    return host


def private_socket_dir(path: str) -> str:
    """Create ``path`` (mode 0700) or accept it only if it is a real directory of this user
    that nobody else can enter: in a shared /tmp another user could create the predictable
    default first and put their own socket in it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise FailedPreconditionError(
            f"socket_dir {path} is not a private directory of this user (owner uid "
            f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}; need uid {os.getuid()}, mode "
            "700); remove it, or set socket_dir in the daemon config"
        )
    return path
