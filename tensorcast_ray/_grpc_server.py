"""gRPC server helpers shared by the node daemon and the Global Store.  [daemon, Global Store]

Both serve a ``grpc.aio`` server on an event loop of its own thread, so held-open streams
cost no thread each, and run their synchronous handlers in a thread pool. Every call, the
daemon's Session stream included, passes one token check first (:class:`tensorcast_ray._auth.
TokenCheck`). Errors leave
through :func:`tensorcast_ray._error_mapping.handler_error` and ``abort_with``, the codec
the daemon's local socket shares. The Global Store imports this module, never the daemon package.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from tensorcast_ray._auth import TokenCheck
from tensorcast_ray._error_mapping import abort_with, handler_error
from tensorcast_ray._errors import UnavailableError

__all__ = ["AioServerThread", "bind_error", "bind_preferring", "unary_handlers"]

logger = logging.getLogger(__name__)


def bind_error(what: str, host: str, port: int, exc: BaseException) -> UnavailableError:
    """The error for an endpoint that cannot bind: not retryable, the config must change."""
    return UnavailableError(
        f"cannot bind the {what} to {host}:{port}: {exc}; pick another port in the config "
        "or PortConfig (0 = any free port)",
        retryable=False,
    )


def bind_preferring(bind: Callable[[int], int], port: int, what: str) -> int:
    """``bind(port)``, or ``bind(0)`` (any free port) when ``port`` is taken; the bound port.

    For a port that is only a preference — a restarted daemon's old port, the Global Store's
    default metrics port — which must never fail a start: a second namespace or Ray cluster on
    the host may hold it. The port actually bound is logged here and published by the caller.
    """
    try:
        return bind(port)
    except (OSError, UnavailableError) as exc:
        bound = bind(0)
        logger.warning("%s: port %d is taken (%s); serving on port %d", what, port, exc, bound)
        return bound


#: Clients ping every 10 s to keep their ``Session`` stream (their leases) alive through idle
#: periods; the server's defaults (a ping at most every 5 min without data, 2 strikes) would
#: answer GOAWAY ``too_many_pings`` and end the stream, and with it the client's leases.
_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


class AioServerThread:
    """[daemon, Global Store] A grpc.aio server running on its own event-loop thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.server: grpc.aio.Server | None = None

    def start(
        self,
        handlers: list[grpc.GenericRpcHandler],
        host: str,
        port: int,
        token: str,
        credentials: grpc.ServerCredentials | None = None,
    ) -> int:
        """Serve ``handlers`` on ``host:port`` to callers that present ``token``; over TLS
        with ``credentials``, else in plaintext."""

        async def _start() -> int:
            server = grpc.aio.server(interceptors=[TokenCheck(token)], options=_SERVER_OPTIONS)
            server.add_generic_rpc_handlers(handlers)
            if credentials is not None:
                bound = server.add_secure_port(f"{host}:{port}", credentials)
            else:
                bound = server.add_insecure_port(f"{host}:{port}")
            await server.start()
            self.server = server
            return bound

        try:
            return asyncio.run_coroutine_threadsafe(_start(), self.loop).result(timeout=30)
        except Exception as exc:
            raise bind_error("gRPC server", host, port, exc) from exc

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds) and end the loop. Idempotent."""
        if self.loop.is_closed():
            return
        server, self.server = self.server, None
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(grace), self.loop).result(
                timeout=grace + 10
            )
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def unary_handlers(
    service_name: str,
    methods: Mapping[str, tuple[int, type[Message], type[Message]]],
    call: Callable[[str, Any], Any],
    executor: concurrent.futures.Executor,
    executors: Mapping[str, concurrent.futures.Executor] | None = None,
) -> grpc.GenericRpcHandler:
    """gRPC handlers that run ``call(method, request)`` in ``executor`` (or the one
    ``executors`` names for the method: calls held open run apart); errors become statuses."""

    def make(name: str) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]:
        pool = (executors or {}).get(name, executor)

        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(pool, call, name, request)
            except Exception as exc:
                await abort_with(context, handler_error(exc, name))

        return handler

    return grpc.method_handlers_generic_handler(
        service_name,
        {
            name: grpc.unary_unary_rpc_method_handler(
                make(name),
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )
            for name, (_, req, resp) in methods.items()
        },
    )
