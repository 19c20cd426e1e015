"""A toggleable TCP proxy on loopback, to make a storage server "go away and come back".

Put it in front of the moto S3 server (or any TCP server) and point the client at the proxy::

    from tests.s3_faults import FaultProxy

    proxy = FaultProxy("127.0.0.1", moto_port)      # listens on 127.0.0.1:<proxy.port>
    opts = {**s3_options, "endpoint_url": proxy.url}  # the client talks to the proxy
    try:
        proxy.down()   # new connections are refused, open ones are reset (RST)
        ...            # the client sees ECONNREFUSED / ECONNRESET, as with a dead server
        proxy.up()     # accepted and forwarded again
    finally:
        proxy.close()  # or: with FaultProxy(...) as proxy:

``down()`` closes the listening socket (so a connect is refused, like a stopped server) and
resets every forwarded connection (``SO_LINGER`` 0: the peer gets a reset, so an upload in
flight fails at once); ``up()`` listens again on the same port.  ``down_after(n_bytes)`` goes
down by itself once ``n_bytes`` more request bytes have been forwarded: a failure in the
middle of an upload rather than between requests.  ``connections`` counts accepted client
connections, ``forwarded`` the request bytes sent on.  Threads only (``socket``,
``threading``), no pytest: the integration tests and scripts may use it as they are.  Tests
import it as ``tests.s3_faults`` (``pythonpath = ["."]`` in pyproject.toml).

Keep clients' own retries short when using it: botocore retries connection errors by
itself, so pass ``storage_options={..., "endpoint_url": proxy.url, "config_kwargs":
{"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}}}``.  What s3fs
then raises: a refused connection is botocore's ``EndpointConnectionError`` at once; a
connection reset mid-request is ``ConnectionClosedError``, which s3fs retries itself (5
tries over ~2 s) before raising the last error.  ``tensorcast_ray._disk._paths.map_os_error``
maps both to retryable UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

__all__ = ["FaultProxy"]


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (no FIN handshake, no lingering data).  ``SHUT_RD``
    first wakes a pump thread blocked in ``recv`` on it, and sends nothing to the peer."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Forward TCP connections from ``127.0.0.1:port`` to ``(target_host, target_port)``."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target = (target_host, int(target_port))
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._open: dict[int, int] = {}
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._closed = False
        self._down_after: int | None = None
        self.connections = 0
        self.forwarded = 0
        self.port = port
        self.up()

    # ---- control ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: an ``endpoint_url`` for s3fs / boto3."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        """Accept and forward connections (again, on the same port)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the proxy is closed")
            if self._listener is not None:
                return
            self._down_after = None
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self.port = listener.getsockname()[1]
            self._listener = listener
            t = threading.Thread(
                target=self._accept, args=(listener,), name="s3-fault-accept", daemon=True
            )
            self._threads.append(t)
        t.start()

    def down(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
            self._open.clear()
            self._down_after = None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def down_after(self, n_bytes: int) -> None:
        """Go :meth:`down` once ``n_bytes`` more request bytes have been forwarded."""
        with self._lock:
            self._down_after = self.forwarded + int(n_bytes)

    def close(self) -> None:
        """Stop for good and join every thread."""
        self.down()
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, []
        for t in threads:
            t.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- forwarding ------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    _reset(client)
                    _reset(upstream)
                    return
                pair = (client, upstream)
                self._pairs.append(pair)
                self._open[id(pair)] = 2
                self.connections += 1
                pumps = [
                    threading.Thread(
                        target=self._pump, args=(pair, client, upstream, True), daemon=True
                    ),
                    threading.Thread(
                        target=self._pump, args=(pair, upstream, client, False), daemon=True
                    ),
                ]
                self._threads = [t for t in self._threads if t.is_alive()] + pumps
            for t in pumps:
                t.start()

    def _pump(
        self,
        pair: tuple[socket.socket, socket.socket],
        src: socket.socket,
        dst: socket.socket,
        request: bool,
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if request:
                    trip = False
                    with self._lock:
                        self.forwarded += len(data)
                        limit = self._down_after
                        trip = limit is not None and self.forwarded >= limit
                    if trip:
                        self.down()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                left = self._open.get(id(pair), 0) - 1
                if left <= 0:
                    self._open.pop(id(pair), None)
                    if pair in self._pairs:
                        self._pairs.remove(pair)
                else:
                    self._open[id(pair)] = left
            if left <= 0:  # both directions ended: release the sockets
                for s in pair:
                    with contextlib.suppress(OSError):
                        s.close()
