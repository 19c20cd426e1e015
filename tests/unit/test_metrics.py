"""SDK, daemon and Global Store metrics: names exist at zero, move when fed, are served."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from tensorcast_ray.daemon.metrics import PERSIST_STATES, DaemonMetrics
from tensorcast_ray.global_store.metrics import GlobalStoreMetrics

from tensorcast_ray import _metrics
from tensorcast_ray._errors import InvalidArgumentError, NotFoundError
from tensorcast_ray._metrics import SdkMetrics, get_sdk_metrics, observe
from tensorcast_ray._metrics_base import MetricsRegistry
from tensorcast_ray._retry import VERBS

SDK_NAMES = [
    "tc_store_artifact_cache_hits_total",
    "tc_store_artifact_cache_misses_total",
    "tc_store_artifact_cache_evictions_total",
    "tc_store_artifact_cache_invalidations_total",
    "tc_store_operation_latency_seconds_count",
    "tc_store_operation_errors_total",
    "tc_store_operation_retries_total",
    "tc_store_batch_hits_total",
    "tc_store_batch_coalesced_total",
    "tc_store_batch_window_seconds_count",
    "tc_store_prefetch_events_total",
    "tc_store_region_backed_fallback_total",
    "tc_store_region_backed_verification_skipped_total",
    "tc_store_data_path_total",
]
DAEMON_NAMES = [
    "tc_local_stable_tier_total",
    "tc_local_stable_tier_seconds_count",
    "tc_store_materialize_into_target_total",
    "tc_store_materialize_into_target_verification_skipped_total",
    "tc_persist_tasks_active",
    "tc_persist_errors_total",
    "tc_persist_progress_ratio",
    "tc_daemon_tier_bytes_used",
    "tc_daemon_tier_bytes_capacity",
    "tc_daemon_artifacts",
    "tc_daemon_clients",
    "tc_daemon_leases",
    "tc_daemon_shm_pool_bytes",
    "tc_daemon_rpc_total",
    "tc_daemon_rpc_latency_seconds_count",
    "tc_daemon_info",
]
GS_NAMES = [
    "tc_global_store_catalog_keys",
    "tc_global_store_catalog_artifacts",
    "tc_global_store_daemons_known",
    "tc_global_store_rpc_latency_seconds_count",
    "tc_global_store_rpc_errors_total",
    "tc_global_store_durable_artifacts",
    "tc_global_store_journal_writes_total",
    "tc_global_store_journal_errors_total",
    "tc_global_store_info",
]


class StepClock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] not in "#"}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode("utf-8"))


@pytest.fixture
def sdk() -> Iterator[SdkMetrics]:
    m = SdkMetrics(clock=StepClock(0.25))
    yield m
    m.close()


def test_each_instance_has_its_own_registry() -> None:
    """Every metric family lives in a private registry, so two instances never collide."""
    a, b = SdkMetrics(), SdkMetrics()
    a.cache_hits.inc()
    assert a.sample("tc_store_artifact_cache_hits_total") == 1.0
    assert b.sample("tc_store_artifact_cache_hits_total") == 0.0


@pytest.mark.parametrize(
    ("factory", "names"),
    [
        (SdkMetrics, SDK_NAMES),
        (lambda: DaemonMetrics(node_id="n1", tiers=("shm",), rpc_methods=("Get",)), DAEMON_NAMES),
        (lambda: GlobalStoreMetrics(rpc_methods=("Lookup",)), GS_NAMES),
    ],
    ids=["sdk", "daemon", "global_store"],
)
def test_served_over_http_with_every_name_then_port_freed(
    factory: type[MetricsRegistry], names: list[str]
) -> None:
    metrics = factory()
    port = metrics.serve(0)
    try:
        assert port > 0 and metrics.serve(0) == port  # a second serve reuses the endpoint
        text = scrape(port)
        assert set(names) <= sample_names(text), set(names) - sample_names(text)
    finally:
        metrics.close()
    assert metrics.port is None
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    # The port is free again: binding it succeeds.
    with socket.socket() as s:
        # REUSEADDR tolerates the scrape's TIME_WAIT, never a listener still bound.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    metrics.close()  # closing twice is harmless


def test_sdk_series_start_at_zero_and_move(sdk: SdkMetrics) -> None:
    for verb in VERBS:
        assert sdk.sample("tc_store_operation_latency_seconds_count", {"verb": verb}) == 0.0
        assert sdk.sample("tc_store_operation_retries_total", {"verb": verb}) == 0.0
        assert (
            sdk.sample("tc_store_operation_errors_total", {"verb": verb, "status": "UNAVAILABLE"})
            == 0.0
        )
    for path in ("shm", "cuda_ipc", "pinned_h2d", "object_store", "disk"):
        assert sdk.sample("tc_store_data_path_total", {"path": path}) == 0.0
    assert sdk.sample("tc_store_operation_errors_total", {"verb": "get", "status": "OK"}) is None

    sdk.record_data_path("cuda_ipc")
    sdk.region_backed_fallback.labels(reason="layout_mismatch").inc()
    sdk.batch_window.observe(0.001)
    assert sdk.sample("tc_store_data_path_total", {"path": "cuda_ipc"}) == 1.0
    assert sdk.sample("tc_store_region_backed_fallback_total", {"reason": "layout_mismatch"}) == 1
    assert sdk.sample("tc_store_batch_window_seconds_count") == 1.0
    with pytest.raises(InvalidArgumentError):
        sdk.record_data_path("carrier_pigeon")


def test_observe_times_and_counts_errors_by_code(sdk: SdkMetrics) -> None:
    with sdk.observe("get"):
        pass
    assert sdk.sample("tc_store_operation_latency_seconds_count", {"verb": "get"}) == 1.0
    assert sdk.sample("tc_store_operation_latency_seconds_sum", {"verb": "get"}) == 0.25

    with pytest.raises(NotFoundError), sdk.observe("get"):
        raise NotFoundError("no key")
    with pytest.raises(FileExistsError), sdk.observe("put"):
        raise FileExistsError("/ckpt")
    assert (
        sdk.sample("tc_store_operation_errors_total", {"verb": "get", "status": "NOT_FOUND"}) == 1
    )
    assert (
        sdk.sample("tc_store_operation_errors_total", {"verb": "put", "status": "ALREADY_EXISTS"})
        == 1
    )
    assert sdk.sample("tc_store_operation_latency_seconds_count", {"verb": "get"}) == 2.0
    with pytest.raises(InvalidArgumentError), sdk.observe("fetch"):
        pass


def test_record_retry_matches_on_retry_signature(sdk: SdkMetrics) -> None:
    sdk.record_retry("get_into", NotFoundError("x"), 1)
    assert sdk.sample("tc_store_operation_retries_total", {"verb": "get_into"}) == 1.0


def test_singleton_is_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_sdk_metrics()
    assert get_sdk_metrics() is first
    with observe("exists"):
        pass
    assert first.sample("tc_store_operation_latency_seconds_count", {"verb": "exists"}) >= 1.0  # type: ignore[operator]
    real_pid = os.getpid()
    monkeypatch.setattr(_metrics.os, "getpid", lambda: real_pid + 1)
    child = get_sdk_metrics()
    assert child is not first
    assert child.sample("tc_store_operation_latency_seconds_count", {"verb": "exists"}) == 0.0


def test_daemon_series_start_at_zero_and_move() -> None:
    m = DaemonMetrics(version="9.9", node_id="abc", tiers=("shm", "disk"), rpc_methods=("Get",))
    assert m.sample("tc_daemon_info", {"version": "9.9", "node_id": "abc"}) == 1.0
    for state in PERSIST_STATES:
        assert m.sample("tc_persist_tasks_active", {"state": state}) == 0.0
    labels = {"op": "put", "status": "DEGRADED", "requirement": "should"}
    assert m.sample("tc_local_stable_tier_total", labels) == 0.0
    assert m.sample("tc_daemon_tier_bytes_capacity", {"tier": "disk"}) == 0.0
    assert m.sample("tc_daemon_rpc_total", {"method": "Get", "code": "OK"}) == 0.0

    m.local_stable_tier.labels(**labels).inc()
    m.persist_tasks_active.labels(state="running").set(2)
    m.tier_bytes_used.labels(tier="shm").set(1024)
    m.persist_progress_ratio.set(0.5)
    assert m.sample("tc_local_stable_tier_total", labels) == 1.0
    assert m.sample("tc_persist_tasks_active", {"state": "running"}) == 2.0
    assert m.sample("tc_daemon_tier_bytes_used", {"tier": "shm"}) == 1024.0
    assert m.sample("tc_persist_progress_ratio") == 0.5


def test_daemon_observe_rpc_counts_codes() -> None:
    m = DaemonMetrics(rpc_methods=("Get",), clock=StepClock(0.5))
    with m.observe_rpc("Get"):
        pass
    with pytest.raises(NotFoundError), m.observe_rpc("Get"):
        raise NotFoundError("no key")
    with pytest.raises(ConnectionResetError), m.observe_rpc("Put"):
        raise ConnectionResetError("peer gone")
    assert m.sample("tc_daemon_rpc_total", {"method": "Get", "code": "OK"}) == 1.0
    assert m.sample("tc_daemon_rpc_total", {"method": "Get", "code": "NOT_FOUND"}) == 1.0
    assert m.sample("tc_daemon_rpc_total", {"method": "Put", "code": "UNAVAILABLE"}) == 1.0
    assert m.sample("tc_daemon_rpc_latency_seconds_sum", {"method": "Get"}) == 1.0


def test_global_store_series_and_observe_rpc() -> None:
    m = GlobalStoreMetrics(version="1.2", rpc_methods=("Lookup",))
    assert m.sample("tc_global_store_info", {"version": "1.2"}) == 1.0
    assert m.sample("tc_global_store_catalog_keys") == 0.0
    assert m.sample("tc_global_store_rpc_latency_seconds_count", {"method": "Lookup"}) == 0.0
    m.catalog_keys.set(3)
    with m.observe_rpc("Lookup"):
        pass
    with pytest.raises(NotFoundError), m.observe_rpc("Lookup"):
        raise NotFoundError("no key")
    assert m.sample("tc_global_store_catalog_keys") == 3.0
    assert m.sample("tc_global_store_rpc_latency_seconds_count", {"method": "Lookup"}) == 2.0
    errors = {"method": "Lookup", "code": "NOT_FOUND"}
    assert m.sample("tc_global_store_rpc_errors_total", errors) == 1.0


def test_daemon_persist_errors_and_materialize_series() -> None:
    m = DaemonMetrics()
    by_code = {"stage": "write", "reason": "PERMISSION_DENIED"}
    assert m.sample("tc_persist_errors_total", by_code) == 0.0
    m.record_persist_error("write", PermissionError("s3 refused"))
    m.record_persist_error("write", NotFoundError("bucket"))
    assert m.sample("tc_persist_errors_total", by_code) == 1.0
    assert m.sample("tc_persist_errors_total", {"stage": "write", "reason": "NOT_FOUND"}) == 1.0
    success = {"result": "success", "reason": "none", "source": "shm"}
    assert m.sample("tc_store_materialize_into_target_total", success) == 0.0
    m.materialize_into_target.labels(**success).inc()
    assert m.sample("tc_store_materialize_into_target_total", success) == 1.0
