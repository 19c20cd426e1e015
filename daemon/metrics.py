"""The node daemon's metrics: tiers, materialisation, persistence, RPCs.  [daemon]

One :class:`DaemonMetrics` per daemon actor, in its own registry, served on the daemon's
``/metrics`` port.  Gauges describing state (tier bytes, artifacts, clients, leases) are set by
the daemon's shell from its local index after each change; counters and histograms are fed as
events happen.  A servicer method is wrapped like this so an ArtifactError is counted with its
code before it is turned into a gRPC abort::

    try:
        with metrics.observe_rpc("Get"):
            return await self._get(request)
    except ArtifactError as err:
        await abort_with(context, err)
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

__all__ = [
    "LOCAL_STABLE_STATUSES",
    "MATERIALIZE_SOURCES",
    "PERSIST_STAGES",
    "PERSIST_STATES",
    "REQUIREMENTS",
    "DaemonMetrics",
]

#: Persistence task states (pending -> running -> success | degraded | failed).
PERSIST_STATES: tuple[str, ...] = ("pending", "running", "degraded", "success", "failed")

#: StorePolicy requirement levels.
REQUIREMENTS: tuple[str, ...] = ("must", "should", "may")

#: Outcome of placing an artifact on the node's local stable tier.
LOCAL_STABLE_STATUSES: tuple[str, ...] = ("OK", "DEGRADED", "FAILED")

_LOCAL_STABLE_OPS: tuple[str, ...] = ("put", "register")

#: Stages of a persistence task; ``tc_persist_errors_total{reason}`` is the error's code name.
PERSIST_STAGES: tuple[str, ...] = (
    "plan",
    "write",
    "verify",
    "commit",
    "replicate",
    "read",
    "delete",
)

#: Where a materialisation into a caller's target read from (the data paths of DESIGN.md).
MATERIALIZE_SOURCES: tuple[str, ...] = (
    "shm",
    "cuda_ipc",
    "pinned_h2d",
    "object_store",
    "nccl",
    "disk",
)

#: the cross-node transports (tc_transfer_bytes_total's ``transport`` label)
TRANSFER_TRANSPORTS = ("object_store", "collective")

_ERROR_CODES: tuple[str, ...] = tuple(
    c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK
)


class DaemonMetrics(MetricsRegistry):
    """The daemon's metrics.

    ``tiers`` and ``rpc_methods`` name the label values to create at zero (the daemon knows
    them at start-up); other values appear when first used.
    """

    def __init__(
        self,
        *,
        version: str = __version__,
        node_id: str = "",
        tiers: Sequence[str] = (),
        rpc_methods: Sequence[str] = (),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(clock=clock)
        c, g, h = self._counter, self._gauge, self._histogram
        self.local_stable_tier = c(
            "tc_local_stable_tier",
            "Placements on the node's local stable tier, by op, outcome and policy requirement.",
            ["op", "status", "requirement"],
        )
        self.local_stable_tier_seconds = h(
            "tc_local_stable_tier_seconds",
            "Time to place an artifact on the local stable tier.",
            ["op", "status"],
        )
        self.materialize_into_target = c(
            "tc_store_materialize_into_target",
            "Materialisations into a caller's target buffers, by result, reason and source.",
            ["result", "reason", "source"],
        )
        self.materialize_verification_skipped = c(
            "tc_store_materialize_into_target_verification_skipped",
            "Materialisations into a target that skipped checksum verification.",
        )
        self.persist_tasks_active = g(
            "tc_persist_tasks_active", "Persistence tasks known to the daemon, by state.", ["state"]
        )
        self.persist_errors = c(
            "tc_persist_errors",
            "Persistence failures, by stage and reason (the error's status code name).",
            ["stage", "reason"],
        )
        self.persist_progress_ratio = g(
            "tc_persist_progress_ratio",
            "Bytes persisted / bytes to persist over the running tasks (0..1).",
        )
        self.persist_bytes = c(
            "tc_persist_bytes",
            "Bytes written to shared disk by persistence tasks (write) and read back from it "
            "by rehydrations (read).",
            ["direction"],
        )
        self.persist_task_seconds = h(
            "tc_persist_task_seconds",
            "Time from a persistence task's start to its end, by the state it ended in.",
            ["state"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
        )
        self.rehydrations = c(
            "tc_persist_rehydrations",
            "Artifacts read back from shared disk into this node's memory, by result.",
            ["result"],
        )
        self.tier_bytes_used = g(
            "tc_daemon_tier_bytes_used", "Bytes held in each of the node's tiers.", ["tier"]
        )
        self.tier_bytes_capacity = g(
            "tc_daemon_tier_bytes_capacity", "Capacity of each of the node's tiers.", ["tier"]
        )
        self.artifacts = g("tc_daemon_artifacts", "Artifacts with a replica on this node.")
        self.clients = g("tc_daemon_clients", "SDK processes connected to this daemon.")
        self.weight_waiters = g(
            "tc_daemon_weight_waiters", "WaitLatest calls held open now (weight subscribers)."
        )
        self.reader_holds = g(
            "tc_daemon_reader_holds",
            "Reader holds open on this lone daemon (in a cluster the Global Store keeps them).",
        )
        self.leases = g(
            "tc_daemon_leases", "Live leases (mappings, CUDA IPC handles) on this node."
        )
        self.shm_pool_bytes = g(
            "tc_daemon_shm_pool_bytes", "Pre-faulted shared memory held in the daemon's pool."
        )
        self.rpc = c(
            "tc_daemon_rpc",
            "gRPC calls the daemon served, by method and status code.",
            ["method", "code"],
        )
        self.rpc_latency = h(
            "tc_daemon_rpc_latency_seconds",
            "Time the daemon spent serving a gRPC call.",
            ["method"],
        )
        self.transfer_bytes = c(
            "tc_transfer_bytes",
            "Bytes moved between nodes by this daemon, by direction (in: landed here, out: "
            "served from here) and transport.",
            ["direction", "transport"],
        )
        self.transfers = c(
            "tc_transfers",
            "Cross-node pulls this daemon made (whole replicas and partial reads), by "
            "transport and result.",
            ["transport", "result"],
        )
        self.transfer_seconds = h(
            "tc_transfer_seconds", "Time one cross-node pull took, by transport.", ["transport"]
        )
        self.transfer_fallbacks = c(
            "tc_transfer_fallbacks",
            "Transfers that asked for the collective path and used the object store, by reason.",
            ["reason"],
        )
        self.info = g(
            "tc_daemon_info", "Always 1; labels say which daemon this is.", ["version", "node_id"]
        )
        self.info.labels(version=version, node_id=node_id).set(1)

        self._preinit(
            self.local_stable_tier,
            op=_LOCAL_STABLE_OPS,
            status=LOCAL_STABLE_STATUSES,
            requirement=REQUIREMENTS,
        )
        self._preinit(
            self.local_stable_tier_seconds, op=_LOCAL_STABLE_OPS, status=LOCAL_STABLE_STATUSES
        )
        self._preinit(self.persist_tasks_active, state=PERSIST_STATES)
        self._preinit(self.persist_errors, stage=PERSIST_STAGES, reason=_ERROR_CODES)
        self._preinit(self.persist_bytes, direction=("write", "read"))
        self._preinit(self.persist_task_seconds, state=("success", "degraded", "failed"))
        self._preinit(self.rehydrations, result=("ok", "failed"))
        # A success has no reason; its series exist from the start so ratios are defined.
        self._preinit(
            self.materialize_into_target,
            result=("success",),
            reason=("none",),
            source=MATERIALIZE_SOURCES,
        )
        self._preinit(self.transfer_bytes, direction=("in", "out"), transport=TRANSFER_TRANSPORTS)
        self._preinit(self.transfers, transport=TRANSFER_TRANSPORTS, result=("ok", "failed"))
        self._preinit(self.transfer_seconds, transport=TRANSFER_TRANSPORTS)
        self._preinit(
            self.transfer_fallbacks, reason=("collective_unavailable", "collective_failed")
        )
        self._preinit(self.tier_bytes_used, tier=tiers)
        self._preinit(self.tier_bytes_capacity, tier=tiers)
        self._preinit(self.rpc, method=rpc_methods, code=("OK",))
        self._preinit(self.rpc_latency, method=rpc_methods)

    def record_persist_error(self, stage: str, err: BaseException) -> None:
        """Count a persistence failure at ``stage``, by the error's status code name."""
        code = err.status_code if isinstance(err, ArtifactError) else map_exception(err).status_code
        self.persist_errors.labels(stage=stage, reason=code.name).inc()

    @contextlib.contextmanager
    def observe_rpc(self, method: str) -> Iterator[None]:
        """Time one RPC and count it by the code it ends with (OK when nothing escapes)."""

        def done(seconds: float, exc: BaseException | None) -> None:
            self.rpc_latency.labels(method=method).observe(seconds)
            if exc is None:
                code = "OK"
            elif isinstance(exc, ArtifactError):
                code = exc.status_code.name
            elif isinstance(exc, Exception):
                code = map_exception(exc).status_code.name
            else:
                code = "CANCELLED"  # asyncio cancellation of the handler
            self.rpc.labels(method=method, code=code).inc()

        with self._timed(done):
            yield
