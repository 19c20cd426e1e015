"""The daemon's same-node fast channel: the StoreDaemon service over a unix socket.  [SDK, daemon]

Why: a unary gRPC call from Python costs ~0.9 ms on these machines; the same protobuf
messages over a unix socket cost ~0.1 ms. gRPC stays the contract (remote clients, CLI,
processes on other hosts); processes on the daemon's node use this channel when they can
reach its socket. Both transports dispatch into the same handlers.

Framing (little endian)::

    request : u32 length | u8 method index | serialized request message
    response: u32 length | u8 status (0 ok, 1 error) | message or JSON error

An error travels as the JSON of :func:`tensorcast_ray._error_mapping.wire_fields` (code,
message, class, retryable), the same fields gRPC carries in its status and trailing metadata,
and what a handler raised becomes an error through the same
:func:`~tensorcast_ray._error_mapping.handler_error` as on gRPC: one failure, one error,
whichever channel it took.

The method index is the method's position in the ``StoreDaemon`` service descriptor, so the
table is derived from ``proto/`` and cannot drift. One connection is one session: when the
client process exits, the daemon sees the connection close and ends the session's leases.

[SDK] :class:`LocalChannel` — one connection per process, calls serialized by a lock.
[daemon] :class:`LocalChannelServer` — a listening socket and a thread per connection. Who
may connect: the socket's directory is private (0700) and the socket 0600, and each
connection's peer credentials (``SO_PEERCRED``, from the kernel) must name the daemon's own
user or root, or its first request is answered PERMISSION_DENIED and the connection closed.
The peer's pid, not one a request claims, is the session's process.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message

from tensorcast_ray._error_mapping import (
    daemon_deadline_error,
    daemon_unreachable_error,
    from_wire,
    handler_error,
    wire_fields,
)
from tensorcast_ray._errors import ArtifactError, UnimplementedError
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

_HEADER = struct.Struct("<IB")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SERVICE = daemon_pb2.DESCRIPTOR.services_by_name["StoreDaemon"]
#: Unary methods by name: (index, request class, response class). Streams are not carried.
METHODS: dict[str, tuple[int, type[Message], type[Message]]] = {
    m.name: (
        m.index,
        message_factory.GetMessageClass(m.input_type),
        message_factory.GetMessageClass(m.output_type),
    )
    for m in _SERVICE.methods
    if not m.server_streaming and not m.client_streaming
}
_BY_INDEX = {index: (name, req, resp) for name, (index, req, resp) in METHODS.items()}

#: Handler signature: (method name, request, connection id) -> response.
Handler = Callable[[str, Any, str], Message]


def _check_private_socket(path: str) -> None:
    """[SDK] Only talk to a socket of this user: in a shared /tmp another user could plant
    one where the daemon said its socket is, and answer with segment names of their choice."""
    import stat

    from tensorcast_ray._errors import PermissionDeniedError

    try:
        st = os.lstat(path)
    except OSError as exc:
        raise daemon_unreachable_error(path, f"cannot open the local socket: {exc}") from exc
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionDeniedError(
            f"{path} is not a socket owned by this user (uid {st.st_uid}); refusing to use it"
        )


class _NotStarted(Exception):
    """[SDK] A wait for a reply ended before its first byte (see LocalChannel._read_reply)."""


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf


def _encode_error(err: ArtifactError) -> bytes:
    code, message, cls_name, retryable = wire_fields(err)
    return json.dumps(
        {"code": code.name, "message": message, "class": cls_name, "retryable": retryable}
    ).encode()


def _decode_error(payload: bytes) -> ArtifactError:
    data = json.loads(payload)
    code = grpc.StatusCode.__members__.get(str(data.get("code")), grpc.StatusCode.UNKNOWN)
    return from_wire(code, str(data["message"]), str(data.get("class", "")), data["retryable"])


class LocalChannel:
    """[SDK] A connection to the daemon's unix socket. Thread-safe; not fork-safe (the
    SDK drops it in a forked child and connects anew)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pid = os.getpid()
        _check_private_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise daemon_unreachable_error(
                path, f"cannot connect to the local socket: {exc}"
            ) from exc
        self._sock: socket.socket | None = sock
        # Methods whose replies are still to come: calls that gave up waiting (timeout,
        # interrupt). The connection is this process's session, so it is kept: the next call
        # reads and drops them first, which keeps requests and replies in step.
        self._owed: list[str] = []

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _settle_owed(self, sock: socket.socket) -> None:
        """Read the replies of calls that gave up. A write begun for a caller that stopped
        waiting is aborted: nobody will fill or commit it, and it holds its key."""
        while self._owed:
            status, body = self._read_reply(sock)
            method = self._owed.pop(0)
            if method == "BeginWrite" and status == 0:
                write_id = daemon_pb2.BeginWriteResponse.FromString(body).write_id
                if write_id:
                    abort = daemon_pb2.AbortWriteRequest(write_id=write_id).SerializeToString()
                    sock.sendall(_HEADER.pack(len(abort), METHODS["AbortWrite"][0]) + abort)
                    self._owed.append("AbortWrite")

    def _read_reply(self, sock: socket.socket) -> tuple[int, bytes]:
        """One reply frame. Raises _NotStarted if the wait ended before its first byte."""
        head = bytearray(_HEADER.size)
        view = memoryview(head)
        got = 0
        while got < len(head):
            try:
                k = sock.recv_into(view[got:])
            except (TimeoutError, InterruptedError, KeyboardInterrupt) as exc:
                if got == 0:
                    raise _NotStarted from exc
                raise
            if k == 0:
                raise EOFError
            got += k
        length, status = _HEADER.unpack(head)
        return status, bytes(_recv_exact(sock, length))

    def call(self, method: str, request: Message, timeout: float | None = None) -> Any:
        index, _, resp_cls = METHODS[method]
        payload = request.SerializeToString()
        with self._lock:
            sock = self._sock
            if sock is None:
                raise daemon_unreachable_error(self.path, "this process closed its local socket")
            sent = False
            try:
                if timeout is not None:
                    sock.settimeout(max(timeout, 0.001))
                self._settle_owed(sock)
                sock.sendall(_HEADER.pack(len(payload), index) + payload)
                sent = True
                status, body = self._read_reply(sock)
            except _NotStarted as exc:
                # No byte of the reply was read: the stream is still in step.
                if sent:
                    self._owed.append(method)
                if isinstance(exc.__cause__, KeyboardInterrupt):
                    raise exc.__cause__ from None
                raise daemon_deadline_error(
                    self.path,
                    f"{method} got no reply on the local socket within "
                    f"{timeout if timeout is not None else 0:.3f} s",
                ) from exc.__cause__
            except (OSError, EOFError) as exc:
                self._close_locked()
                raise daemon_unreachable_error(
                    self.path,
                    f"the local socket closed during {method}: {str(exc) or 'connection closed'}",
                ) from exc
            except BaseException:
                # Interrupted mid-frame: requests and replies can no longer be matched.
                self._close_locked()
                raise
        if status != 0:
            raise _decode_error(body)
        response = resp_cls()
        response.ParseFromString(body)
        return response

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        if os.getpid() != self._pid:
            # A forked child drops its copy of the descriptor (the parent's connection is
            # unaffected; only the last close ends it), so the parent's session still ends
            # when the parent exits. No lock: a parent thread may have held it at fork.
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()
            return
        with self._lock:
            self._close_locked()


class LocalChannelServer:
    """[daemon] Serves the unary StoreDaemon methods on a unix socket (mode 0600)."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        on_connect: Callable[[str, int], None],
        on_disconnect: Callable[[str], None],
    ) -> None:
        """``on_connect(connection id, peer pid)`` and ``on_disconnect(connection id)``."""
        self.path = path
        self._handler = handler
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._closed = threading.Event()
        self._conns: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._counter = 0
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a crashed daemon
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old_umask)
        self._sock.listen(128)
        self._thread = threading.Thread(
            target=self._accept_loop, name="tc-local-accept", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._counter += 1
                # Unguessable: the id names the connection's session and its leases inside
                # the daemon, and no other client may name it (it is never sent out).
                conn_id = f"local-{self._counter}-{secrets.token_hex(16)}"
                self._conns[conn_id] = conn
            threading.Thread(
                target=self._serve, args=(conn, conn_id), name=f"tc-{conn_id}", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, conn_id: str) -> None:
        pid, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid not in (os.getuid(), 0):
            self._refuse(conn, conn_id, uid)
            return
        self._on_connect(conn_id, pid)
        try:
            while True:
                try:
                    length, index = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
                    body = bytes(_recv_exact(conn, length))
                except (OSError, EOFError):
                    return
                conn.sendall(self._dispatch(index, body, conn_id))
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.pop(conn_id, None)
            conn.close()
            self._on_disconnect(conn_id)

    def _refuse(self, conn: socket.socket, conn_id: str, uid: int) -> None:
        """Answer the first request of another user's process PERMISSION_DENIED, then hang up."""
        from tensorcast_ray._errors import PermissionDeniedError

        err = PermissionDeniedError(
            f"the daemon's local socket serves only its own user (uid {os.getuid()}); this "
            f"process runs as uid {uid}. Run as that user, or connect over gRPC with the "
            "namespace's token (see docs/security.md)"
        )
        try:
            conn.settimeout(5.0)
            length, _ = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
            _recv_exact(conn, length)
            payload = _encode_error(err)
            conn.sendall(_HEADER.pack(len(payload), 1) + payload)
        except (OSError, EOFError):
            pass
        finally:
            with self._lock:
                self._conns.pop(conn_id, None)
            conn.close()

    def _dispatch(self, index: int, body: bytes, conn_id: str) -> bytes:
        entry = _BY_INDEX.get(index)
        name = entry[0] if entry is not None else f"method #{index}"
        try:
            if entry is None:
                raise UnimplementedError(
                    f"{name} is not served on the local channel; upgrade the daemon"
                )
            _, req_cls, _ = entry
            request = req_cls()
            request.ParseFromString(body)
            payload = self._handler(name, request, conn_id).SerializeToString()
            status = 0
        except Exception as exc:  # keep serving: the caller gets the error, as over gRPC
            payload, status = _encode_error(handler_error(exc, name)), 1
        return _HEADER.pack(len(payload), status) + payload

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
