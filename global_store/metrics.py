"""The Global Store's metrics: catalog size, known daemons, RPCs, the journal.  [Global Store]

One :class:`GlobalStoreMetrics` per Global Store actor, in its own registry.  The catalog
gauges are set by the actor shell after each catalog change; RPC handlers are wrapped in
:meth:`GlobalStoreMetrics.observe_rpc`, which times them and counts escaping errors by code.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import grpc

from tensorcast_ray._error_mapping import map_exception
from tensorcast_ray._errors import ArtifactError
from tensorcast_ray._metrics_base import MetricsRegistry
from tensorcast_ray._version import __version__

__all__ = ["JOURNAL_ERROR_OPS", "JOURNAL_WRITE_OPS", "GlobalStoreMetrics"]

JOURNAL_WRITE_OPS = ("record", "forget")
JOURNAL_ERROR_OPS = ("record", "forget", "load")


class GlobalStoreMetrics(MetricsRegistry):
    """The Global Store's metrics; ``rpc_methods`` are created at zero."""

    def __init__(
        self,
        *,
        version: str = __version__,
        rpc_methods: Sequence[str] = (),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(clock=clock)
        self.catalog_keys = self._gauge("tc_global_store_catalog_keys", "Keys in the catalog.")
        self.catalog_artifacts = self._gauge(
            "tc_global_store_catalog_artifacts", "Artifact versions in the catalog."
        )
        self.daemons_known = self._gauge(
            "tc_global_store_daemons_known", "Node daemons registered with the Global Store."
        )
        self.rpc_latency = self._histogram(
            "tc_global_store_rpc_latency_seconds",
            "Time the Global Store spent serving a call.",
            ["method"],
        )
        self.rpc_errors = self._counter(
            "tc_global_store_rpc_errors",
            "Global Store calls that failed, by method and status code.",
            ["method", "code"],
        )
        self.reader_holds = self._gauge(
            "tc_global_store_reader_holds", "Reader holds open (weight subscribers copying)."
        )
        self.watchers = self._gauge(
            "tc_global_store_watchers", "Daemons holding a wait_commits call open now."
        )
        self.durable_artifacts = self._gauge(
            "tc_global_store_durable_artifacts",
            "Artifact versions in the catalog with a complete copy on shared disk.",
        )
        self.journal_writes = self._counter(
            "tc_global_store_journal_writes",
            "Journal records written (record) or removed (forget).",
            ["op"],
        )
        self.journal_errors = self._counter(
            "tc_global_store_journal_errors",
            "Journal operations that failed (record, forget, load).",
            ["op"],
        )
        self._preinit(self.journal_writes, op=JOURNAL_WRITE_OPS)
        self._preinit(self.journal_errors, op=JOURNAL_ERROR_OPS)
        self.info = self._gauge(
            "tc_global_store_info", "Always 1; labels say which version runs.", ["version"]
        )
        self.info.labels(version=version).set(1)
        self._preinit(self.rpc_latency, method=rpc_methods)
        self._preinit(
            self.rpc_errors,
            method=rpc_methods,
            code=tuple(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK),
        )

    @contextlib.contextmanager
    def observe_rpc(self, method: str) -> Iterator[None]:
        """Time one call; count an escaping error by its status code name."""

        def done(seconds: float, exc: BaseException | None) -> None:
            self.rpc_latency.labels(method=method).observe(seconds)
            if exc is None:
                return
            if isinstance(exc, ArtifactError):
                code = exc.status_code.name
            elif isinstance(exc, Exception):
                code = map_exception(exc).status_code.name
            else:
                code = "CANCELLED"
            self.rpc_errors.labels(method=method, code=code).inc()

        with self._timed(done):
            yield
