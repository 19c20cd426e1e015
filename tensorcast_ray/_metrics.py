"""Client-side metrics of the SDK: verbs, cache, batching, data paths.  [SDK]

One :class:`SdkMetrics` per process (:func:`get_sdk_metrics`), in its own registry.  The SDK
wraps each verb in ``observe(verb)``, which records the latency and, when an error escapes,
counts it by status code name; the retry loop reports through :meth:`SdkMetrics.record_retry`
(its signature matches ``call_with_retry``'s ``on_retry``).  ``tc.metrics_text()`` returns
:meth:`~tensorcast_ray._metrics_base.MetricsRegistry.text`; ``tc.init(metrics_port=N)`` calls
:meth:`~tensorcast_ray._metrics_base.MetricsRegistry.serve`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from tensorcast_ray._error_mapping import map_exception
from tensorcast_ray._errors import ArtifactError, InvalidArgumentError
from tensorcast_ray._metrics_base import MetricsRegistry
from tensorcast_ray._retry import VERBS

__all__ = [
    "DATA_PATHS",
    "ERROR_STATUSES",
    "REGION_BACKED_FALLBACK_REASONS",
    "SdkMetrics",
    "get_sdk_metrics",
    "observe",
]

#: Every error status label value: gRPC code names except OK.
ERROR_STATUSES: tuple[str, ...] = tuple(
    c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK
)

#: Which data path served a request (see DESIGN.md, "Control plane and data plane").
DATA_PATHS: tuple[str, ...] = ("shm", "cuda_ipc", "pinned_h2d", "object_store", "nccl", "disk")

#: Known reasons a region-backed ``get_into`` fell back to a copy; other reasons still count.
REGION_BACKED_FALLBACK_REASONS: tuple[str, ...] = (
    "layout_mismatch",  # targets of get_into that are not one canonical region
    "not_shared_memory",  # register of tensors outside tc.empty buffers: copied once
    "staging_empty",  # a put found no staged segments ready: copy faults pages
)

_BATCH_WINDOW_BUCKETS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class SdkMetrics(MetricsRegistry):
    """The SDK's metrics; every series named in docs/metrics.md exists from construction."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(clock=clock)
        c, h = self._counter, self._histogram
        self.cache_hits = c(
            "tc_store_artifact_cache_hits", "Artifact lookups served from the SDK's cache."
        )
        self.cache_misses = c(
            "tc_store_artifact_cache_misses", "Artifact lookups that had to ask the daemon."
        )
        self.cache_evictions = c(
            "tc_store_artifact_cache_evictions", "Entries evicted from the SDK's artifact cache."
        )
        self.cache_invalidations = c(
            "tc_store_artifact_cache_invalidations",
            "Cache entries dropped because the key moved to a new version or was deleted.",
        )
        self.operation_latency = h(
            "tc_store_operation_latency_seconds",
            "Wall time of one SDK verb, retries included.",
            ["verb"],
        )
        self.operation_errors = c(
            "tc_store_operation_errors",
            "SDK verbs that failed, by final status code name.",
            ["verb", "status"],
        )
        self.operation_retries = c(
            "tc_store_operation_retries",
            "Attempts the SDK retried after a transient error.",
            ["verb"],
        )
        self.batch_hits = c("tc_store_batch_hits", "Requests answered from a coalesced batch.")
        self.batch_coalesced = c(
            "tc_store_batch_coalesced", "Requests merged into another request's batch."
        )
        self.batch_window = h(
            "tc_store_batch_window_seconds",
            "How long a batch stayed open collecting requests.",
            buckets=_BATCH_WINDOW_BUCKETS,
        )
        self.prefetch_events = c("tc_store_prefetch_events", "Prefetches the SDK started.")
        self.region_backed_fallback = c(
            "tc_store_region_backed_fallback",
            "Region-backed get_into calls that fell back to a copy, by reason.",
            ["reason"],
        )
        self.region_backed_verification_skipped = c(
            "tc_store_region_backed_verification_skipped",
            "Region-backed get_into calls that skipped checksum verification.",
        )
        self.data_path = c(
            "tc_store_data_path", "Requests by the data path that served them.", ["path"]
        )
        # Weight sync (tensorcast_ray.weights).
        self.weights_publish = h(
            "tc_weights_publish_seconds",
            "Publisher.publish: the write, replication to subscriber nodes and collection.",
        )
        self.weights_pull = h(
            "tc_weights_pull_seconds", "Subscriber.pull: hold, read and copy into the target."
        )
        self.weights_lag = h(
            "tc_weights_update_lag_seconds",
            "From a version's commit to a subscriber's pull of it finishing (wall clocks).",
        )
        self.weights_gc = c(
            "tc_weights_gc_versions",
            "Old versions the publisher's collection deleted, or passed by (held by a reader).",
            ["outcome"],
        )
        # Ray Serve (tensorcast_ray.integrations.serve).
        self.serve_swaps = c(
            "tc_serve_swaps",
            "SharedWeights swaps to a new version, or loads of one that failed.",
            ["outcome"],
        )
        self.serve_swap = h(
            "tc_serve_swap_seconds",
            "SharedWeights: from a new version's notification to it serving (map and build).",
        )
        self._preinit(self.operation_latency, verb=VERBS)
        self._preinit(self.operation_errors, verb=VERBS, status=ERROR_STATUSES)
        self._preinit(self.operation_retries, verb=VERBS)
        self._preinit(self.region_backed_fallback, reason=REGION_BACKED_FALLBACK_REASONS)
        self._preinit(self.data_path, path=DATA_PATHS)
        self._preinit(self.weights_gc, outcome=("deleted", "held"))
        self._preinit(self.serve_swaps, outcome=("swapped", "failed"))

    @staticmethod
    def _check_verb(verb: str) -> None:
        # One spelling per verb: an unknown name here is a bug in the SDK, caught by its tests.
        if verb not in VERBS:
            raise InvalidArgumentError(f"unknown verb {verb!r}; expected one of {', '.join(VERBS)}")

    @contextlib.contextmanager
    def observe(self, verb: str) -> Iterator[None]:
        """Time the block as ``verb``; count an escaping error by its status code name."""
        self._check_verb(verb)

        def done(seconds: float, exc: BaseException | None) -> None:
            self.operation_latency.labels(verb=verb).observe(seconds)
            if isinstance(exc, ArtifactError):
                status = exc.status_code.name
            elif isinstance(exc, Exception):
                status = map_exception(exc).status_code.name
            else:
                return  # KeyboardInterrupt and friends are not operation errors
            self.operation_errors.labels(verb=verb, status=status).inc()

        with self._timed(done):
            yield

    def record_retry(self, verb: str, err: ArtifactError, attempt: int) -> None:
        """Count one retry; pass as ``call_with_retry(on_retry=...)``."""
        self._check_verb(verb)
        self.operation_retries.labels(verb=verb).inc()

    def record_data_path(self, path: str) -> None:
        if path not in DATA_PATHS:
            raise InvalidArgumentError(f"unknown data path {path!r}; expected one of {DATA_PATHS}")
        self.data_path.labels(path=path).inc()


_singleton_lock = threading.Lock()
_singleton: tuple[int, SdkMetrics] | None = None


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock would leave it held forever in the child.
    global _singleton_lock
    _singleton_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def get_sdk_metrics() -> SdkMetrics:
    """This process's SdkMetrics; a forked child gets a fresh one (the parent's server thread
    does not exist in the child, and its counts are the parent's)."""
    global _singleton
    pid = os.getpid()
    current = _singleton
    if current is not None and current[0] == pid:
        return current[1]
    with _singleton_lock:
        if _singleton is None or _singleton[0] != pid:
            _singleton = (pid, SdkMetrics())
        return _singleton[1]


@contextlib.contextmanager
def observe(verb: str) -> Iterator[None]:
    """``get_sdk_metrics().observe(verb)``."""
    with get_sdk_metrics().observe(verb):
        yield
