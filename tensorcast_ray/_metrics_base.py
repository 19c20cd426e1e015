"""Shared machinery of the SDK, daemon and Global Store metrics.  [SDK, daemon, Global Store]

Each process owns one :class:`MetricsRegistry` subclass holding its metrics in a private
``prometheus_client.CollectorRegistry`` -- never the global one, so two stores in one process
(or a test) never collide on names.  This base builds metrics, pre-initialises label sets (a
series that exists at zero can be alerted on before the first event), renders the Prometheus
text format and runs an optional HTTP ``/metrics`` endpoint.

Counters are declared without the ``_total`` suffix: prometheus_client appends it, so
``_counter("tc_x", ...)`` is scraped as ``tc_x_total``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS", "MetricsRegistry"]

#: Seconds; from sub-millisecond control calls to multi-second transfers.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class MetricsRegistry:
    """A private registry with ``text()``, ``serve()`` and ``close()``."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- building ---------------------------------------------------------------------------

    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labelnames=tuple(labels), registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labelnames=tuple(labels), registry=self.registry)

    def _histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(
            name, doc, labelnames=tuple(labels), buckets=tuple(buckets), registry=self.registry
        )

    @staticmethod
    def _preinit(metric: Counter | Gauge | Histogram, **values: Iterable[str]) -> None:
        """Create every combination of ``values`` (label name -> values) at zero."""
        names = list(values)
        for combo in itertools.product(*(tuple(values[n]) for n in names)):
            metric.labels(**dict(zip(names, combo, strict=True)))

    @contextlib.contextmanager
    def _timed(self, on_done: Callable[[float, BaseException | None], None]) -> Iterator[None]:
        """Time the block; ``on_done(seconds, error_or_None)`` runs whatever happens."""
        start = self.clock()
        try:
            yield
        except BaseException as exc:
            on_done(self.clock() - start, exc)
            raise
        on_done(self.clock() - start, None)

    # -- exposing ---------------------------------------------------------------------------

    def text(self) -> str:
        """Every metric in the Prometheus text exposition format."""
        return prometheus_client.generate_latest(self.registry).decode("utf-8")

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The current value of one exposed sample (e.g. ``"tc_x_total"``), or None."""
        value = self.registry.get_sample_value(name, dict(labels or {}))
        return None if value is None else float(value)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a free port); the bound port.

        Serving twice returns the port already bound.
        """
        with self._lock:
            if self._server is not None:
                return int(self._server.server_port)
            server, thread = prometheus_client.start_http_server(
                port, addr=host, registry=self.registry
            )
            self._server, self._thread = server, thread
            return int(server.server_port)

    @property
    def port(self) -> int | None:
        """The port being served, or None."""
        server = self._server
        return None if server is None else int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint (if any) and free its port.  Safe to call twice."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> MetricsRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
