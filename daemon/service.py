"""The daemon's request handlers, shared by its gRPC server and its local socket.  [daemon]

A request arrives on either transport, is decoded into its protobuf message, and reaches
:meth:`DaemonService.handle` with the id of the session (local socket connection or gRPC
``Session`` stream) it belongs to. Handlers are synchronous and short: they take the
state lock, ask the local store's state machines for a decision and carry it out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message
from tensorcast_ray.daemon.metrics import DaemonMetrics

from tensorcast_ray._errors import (
    FailedPreconditionError,
    PermissionDeniedError,
    UnimplementedError,
)
from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, daemon_pb2
from tensorcast_ray._version import PROTOCOL_VERSION, __version__

logger = logging.getLogger(__name__)


@dataclass
class Session:
    session_id: str
    transport: str
    pid: int = 0
    hostname: str = ""
    client_name: str = ""
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class DaemonIdentity:
    node_id: str
    namespace: str
    version: str = __version__
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    hostname: str = field(default_factory=socket.gethostname)


class DaemonService:
    """[daemon] Every StoreDaemon method, transport-agnostic."""

    def __init__(
        self,
        identity: DaemonIdentity,
        store: Any,
        metrics: DaemonMetrics,
        global_store_info: Callable[[], tuple[str, str]] = lambda: ("", ""),
    ) -> None:
        self.identity = identity
        self.store = store
        self.metrics = metrics
        self._global_store_info = global_store_info
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        # Filled in by the server shell once it has bound its endpoints.
        self.address = ""
        self.metrics_address = ""
        self.local_socket = ""

    # ---- sessions -------------------------------------------------------------------
    def open_session(self, session_id: str, transport: str) -> None:
        with self._lock:
            self._sessions.setdefault(session_id, Session(session_id, transport))
            self.metrics.clients.set(len(self._sessions))

    def open_local_session(self, session_id: str, peer_pid: int) -> None:
        """A local socket connection: its process is the one the kernel names (SO_PEERCRED),
        so it may re-adopt the leases a previous daemon instance recorded for that pid."""
        self.open_session(session_id, "local")
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.pid, session.hostname = peer_pid, self.identity.hostname
        self.store.bind_session_pid(session_id, peer_pid, self.identity.hostname, pid_verified=True)

    def describe_session(self, session_id: str, request: daemon_pb2.SessionRequest) -> str:
        """Record a gRPC session's process; returns its lease secret (the one it resumes, or
        a fresh one), whose hash re-binds its leases after a daemon restart."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.pid, session.hostname = request.pid, request.hostname
                session.client_name = request.client_name
        secret = request.resume_secret or secrets.token_urlsafe(32)
        # The pid is claimed, not proven: recorded (the death watch of its leases after a
        # restart uses it), never used to take over leases recorded under that pid.
        self.store.bind_session_pid(
            session_id,
            request.pid,
            request.hostname,
            pid_verified=False,
            lease_key=hashlib.sha256(secret.encode()).hexdigest(),
        )
        return secret

    def close_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)
            self.metrics.clients.set(len(self._sessions))
        self.store.end_session(session_id)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ---- dispatch -------------------------------------------------------------------
    def handle(self, method: str, request: Any, session_id: str) -> Message:
        """Run ``method``; ``session_id`` is the local connection's session ("" over gRPC,
        where a request names its ``Session`` stream's id instead)."""
        with self.metrics.observe_rpc(method):
            fn = getattr(self, f"rpc_{method}", None) or getattr(self.store, f"rpc_{method}", None)
            if fn is None:
                raise UnimplementedError(f"{method} is not implemented by this daemon")
            if not session_id:
                self._check_named_session(getattr(request, "session_id", ""))
            return fn(request, session_id)

    def _check_named_session(self, named: str) -> None:
        """A gRPC request may act only in a gRPC session: a local connection's session (its
        staged segments, buffers, writes) belongs to that connection alone."""
        if not named:
            return
        with self._lock:
            session = self._sessions.get(named)
        if session is not None and session.transport != "grpc":
            raise PermissionDeniedError(
                f"session {named[:16]}... is a local-socket connection's; a gRPC request may "
                "only name the id its own Session stream returned"
            )

    # ---- control methods ---------------------------------------------------------------
    def rpc_Health(self, request: Any, session_id: str) -> common_pb2.HealthResponse:
        return common_pb2.HealthResponse(
            ok=True,
            version=self.identity.version,
            protocol=PROTOCOL_VERSION,
            uptime_s=self.uptime_s,
        )

    def rpc_Hello(
        self, request: daemon_pb2.HelloRequest, session_id: str
    ) -> daemon_pb2.HelloResponse:
        if request.protocol and request.protocol != PROTOCOL_VERSION:
            raise FailedPreconditionError(
                f"protocol mismatch: SDK speaks v{request.protocol} "
                f"(tensorcast_ray {request.sdk_version}), daemon speaks v{PROTOCOL_VERSION} "
                f"(tensorcast_ray {self.identity.version}); install the same version everywhere"
            )
        gs_address, gs_version = self._global_store_info()
        return daemon_pb2.HelloResponse(
            versions=common_pb2.VersionInfo(
                sdk=request.sdk_version,
                daemon=self.identity.version,
                global_store=gs_version,
                protocol=PROTOCOL_VERSION,
            ),
            node_id=self.identity.node_id,
            namespace=self.identity.namespace,
            instance_id=self.identity.instance_id,
            hostname=self.identity.hostname,
            local_socket=self.local_socket,
            shm_dir=self.store.shm_dir,
            epoch_segment=self.store.epoch_segment,
            epoch_slots=self.store.epoch_slots,
            global_store_address=gs_address,
            address=self.address,
            metrics_address=self.metrics_address,
            segment_bytes=int(self.store.config.shm_segment_bytes),
            staging_bytes=int(self.store.config.client_staging_bytes),
        )

    def rpc_Status(self, request: Any, session_id: str) -> daemon_pb2.StatusResponse:
        stats = self.store.stats()
        gs_address, _ = self._global_store_info()
        return daemon_pb2.StatusResponse(
            node_id=self.identity.node_id,
            version=self.identity.version,
            build=build_string(),
            address=self.address,
            metrics_address=self.metrics_address,
            uptime_s=self.uptime_s,
            clients=self.clients,
            artifacts=stats["artifacts"],
            bytes=stats["bytes"],
            leases=stats["leases"],
            tiers=[
                daemon_pb2.TierUsage(
                    tier=t["tier"],
                    used_bytes=t["used_bytes"],
                    capacity_bytes=t["capacity_bytes"],
                    entries=t["entries"],
                )
                for t in stats["tiers"]
            ],
            namespace=self.identity.namespace,
            local_socket=self.local_socket,
            pid=os.getpid(),
            global_store_address=gs_address,
            shm_pool_bytes=stats["shm_pool_bytes"],
            instance_id=self.identity.instance_id,
        )

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started


def build_string() -> str:
    import platform

    python = platform.python_version()
    return f"tensorcast_ray {__version__} (protocol v{PROTOCOL_VERSION}, python {python})"
