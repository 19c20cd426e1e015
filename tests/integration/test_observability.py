"""Errors, retries, metrics and tracing against a real local Ray and a real daemon.

Metrics are scraped over HTTP the way Prometheus would: the SDK's endpoint from
``tc.init(metrics_port=0)``, the daemon's from its actor's ``info()["metrics_address"]``, the
Global Store's from its actor's ``info()``.  The SDK registry is per process and shared by
every test in this module, so SDK assertions compare before/after deltas.
"""

from __future__ import annotations

import subprocess
import sys
import types
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tensorcast_ray as tc
from tensorcast_ray import _actors, _bootstrap, _tracing
from tensorcast_ray._retry import DEFAULT_RETRY_POLICIES, VERBS
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(300)

SDK_REQUIRED = (
    "tc_store_artifact_cache_hits_total",
    "tc_store_artifact_cache_misses_total",
    "tc_store_artifact_cache_evictions_total",
    "tc_store_artifact_cache_invalidations_total",
    "tc_store_operation_latency_seconds_bucket",
    "tc_store_operation_latency_seconds_count",
    "tc_store_operation_latency_seconds_sum",
    "tc_store_operation_errors_total",
    "tc_store_operation_retries_total",
    "tc_store_batch_hits_total",
    "tc_store_batch_coalesced_total",
    "tc_store_batch_window_seconds_count",
    "tc_store_prefetch_events_total",
    "tc_store_region_backed_fallback_total",
    "tc_store_region_backed_verification_skipped_total",
)
DAEMON_REQUIRED = (
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
    "tc_daemon_rpc_total",
    "tc_daemon_rpc_latency_seconds_count",
)
GS_REQUIRED = (
    "tc_global_store_catalog_keys",
    "tc_global_store_catalog_artifacts",
    "tc_global_store_daemons_known",
    "tc_global_store_rpc_latency_seconds_count",
    "tc_global_store_rpc_errors_total",
)
STABLE = {"tier": "stable_dram"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---- scraping ----------------------------------------------------------------------------------
def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError (a failing test) when the series does not exist."""
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def daemon_handle(ctx: tc.InitContext) -> Any:
    handle = _actors.get_actor(_actors.daemon_name(ctx.node_id), ctx.namespace)
    assert handle is not None
    return handle


def daemon_metrics(ctx: tc.InitContext) -> Samples:
    return scrape(_actors.call(daemon_handle(ctx), "info")["metrics_address"])


def kill_daemon_and_wait_dead(ctx: tc.InitContext, *, wait_restarted: bool = False) -> None:
    """``ray.kill`` with restart, returning once the old daemon process is gone (so the next
    call on the SDK's connection fails for sure: its socket ends in a dead process) and, with
    ``wait_restarted``, once the restarted daemon answers."""
    import ray

    handle = daemon_handle(ctx)
    old = _actors.call(handle, "info")
    ray.kill(handle, no_restart=False)
    wait_for(lambda: not psutil.pid_exists(old["pid"]), 60, "the daemon process to exit")
    if wait_restarted:

        def restarted() -> bool:
            try:
                info = _actors.call(handle, "info", timeout=10)
            except tc.ArtifactError:
                return False
            return bool(info["instance_id"] != old["instance_id"])

        wait_for(restarted, 120, "the daemon to restart")


# ---- tracing (no Ray) --------------------------------------------------------------------------
def test_span_names_cover_the_verbs() -> None:
    assert _tracing.span_name("register") == "Store/Register"
    assert _tracing.span_name("put") == "Store/Put"
    assert _tracing.span_name("get") == "Store/Get"
    assert _tracing.span_name("get_into") == "Store/GetInto"
    assert set(_tracing.SPAN_NAMES) == set(VERBS)
    with pytest.raises(tc.InvalidArgumentError):
        _tracing.span_name("fetch")


@pytest.fixture
def fresh_tracer() -> Iterator[None]:
    _tracing._reset()
    yield
    _tracing._reset()


def test_span_is_a_no_op_without_opentelemetry(
    monkeypatch: pytest.MonkeyPatch, fresh_tracer: None
) -> None:
    # None in sys.modules makes `import opentelemetry` raise ImportError.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    assert not _tracing.enabled()
    cm = _tracing.span("get")
    assert cm is _tracing.span("put"), "the no-op path allocates nothing per call"
    with cm as inside:
        assert inside is None
    with pytest.raises(tc.NotFoundError), _tracing.span("get"):
        raise tc.NotFoundError("x")  # errors pass through untouched
    with pytest.raises(tc.InvalidArgumentError):
        _tracing.span("fetch")  # the name check does not depend on opentelemetry


def test_span_uses_the_tensorcast_tracer(
    monkeypatch: pytest.MonkeyPatch, fresh_tracer: None
) -> None:
    """With ``opentelemetry`` importable: get_tracer("tensorcast_ray"), one span per call."""
    calls: list[tuple[str, str]] = []
    attributes: dict[str, object] = {}

    class FakeSpan:
        def set_attribute(self, key: str, value: object) -> None:
            attributes[key] = value

    class FakeTracer:
        def start_as_current_span(self, name: str) -> Any:
            import contextlib

            calls.append(("span", name))
            return contextlib.nullcontext(FakeSpan())

    trace = types.ModuleType("opentelemetry.trace")

    def get_tracer(name: str) -> FakeTracer:
        calls.append(("tracer", name))
        return FakeTracer()

    trace.get_tracer = get_tracer  # type: ignore[attr-defined]
    otel = types.ModuleType("opentelemetry")
    otel.trace = trace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry", otel)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", trace)
    assert _tracing.enabled()
    with _tracing.span("get_into"):
        pass
    with pytest.raises(tc.NotFoundError), _tracing.span("get"):
        raise tc.NotFoundError("gone")
    assert calls == [("tracer", "tensorcast_ray"), ("span", "Store/GetInto"), ("span", "Store/Get")]
    assert attributes == {
        "tensorcast.verb": "get",
        "tensorcast.status_code": "NOT_FOUND",
        "tensorcast.retryable": False,
    }


def test_fresh_process_exposes_every_sdk_metric_at_zero() -> None:
    """Before any verb runs, every required SDK series exists and reads zero."""
    text = subprocess.run(
        [sys.executable, "-c", "import tensorcast_ray as tc; print(tc.metrics_text())"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    samples = parse(text)
    missing = [n for n in SDK_REQUIRED if n not in names(samples)]
    assert not missing, f"missing SDK metrics at start: {missing}"
    for (name, labels), value in samples.items():
        if name.startswith("tc_store_") and not name.endswith("_created"):
            assert value == 0.0, (name, dict(labels), value)
    for verb in VERBS:
        assert val(samples, "tc_store_operation_retries_total", verb=verb) == 0.0
        assert val(samples, "tc_store_operation_latency_seconds_count", verb=verb) == 0.0
        for status in ("NOT_FOUND", "INVALID_ARGUMENT", "UNAVAILABLE", "FAILED_PRECONDITION"):
            assert val(samples, "tc_store_operation_errors_total", verb=verb, status=status) == 0
    for reason in ("layout_mismatch", "not_shared_memory", "staging_empty"):
        assert val(samples, "tc_store_region_backed_fallback_total", reason=reason) == 0


# ---- Ray -----------------------------------------------------------------------------------------
def test_sdk_cache_metrics_latency_and_spans_move(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from tensorcast_ray._read_cache import ReadCache

    # The reader's background sweep (every SWEEP_S) would race the invalidation counted below:
    # hold it until the reads are done, then let it drop b:v1's dead entry.
    sweep = ReadCache._sweep
    monkeypatch.setattr(ReadCache, "_sweep", lambda self: None)
    ctx = tc.init(namespace=namespace, global_store_mode="none", metrics_port=0)
    assert ctx.metrics_address is not None
    before = scrape(ctx.metrics_address)
    assert not [n for n in SDK_REQUIRED if n not in names(before)]

    # Real OpenTelemetry spans when the SDK is importable (it is an optional test extra).
    exporter = _otel_exporter()
    tc.put({"w": torch.arange(4.0)}, key="a:v1")
    tc.put({"w": torch.arange(4.0)}, key="b:v1")
    tc.get("a:v1")  # miss: asks the daemon, then caches the layout
    tc.get("b:v1")  # miss
    tc.get("a:v1")  # hit: no RPC
    out = {"w": torch.zeros(4)}
    tc.get_into("a:v1", out)  # hit
    assert out["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert tc.delete("a:v1")
    with pytest.raises(tc.NotFoundError):
        tc.get("a:v1")  # the cached entry is invalid now: dropped, then NOT_FOUND
    assert tc.delete("b:v1")
    tc.put({"w": torch.ones(1)}, key="c:v1")
    tc.get("c:v1")  # miss
    tc.register({"w": torch.ones(2)}, key="r:v1")
    monkeypatch.setattr(ReadCache, "_sweep", sweep)  # the background sweep drops b:v1's entry
    evictions = "tc_store_artifact_cache_evictions_total"
    wait_for(
        lambda: val(scrape(ctx.metrics_address), evictions) > val(before, evictions),
        10,
        "the read cache's background sweep to drop b:v1's dead entry",
    )

    after = scrape(ctx.metrics_address)

    def delta(name: str, **labels: str) -> float:
        return val(after, name, **labels) - val(before, name, **labels)

    # a, b, c; the lookup after the delete counts as an invalidation, not also as a miss.
    assert delta("tc_store_artifact_cache_misses_total") == 3
    assert delta("tc_store_artifact_cache_hits_total") == 2
    assert delta("tc_store_artifact_cache_invalidations_total") == 1
    assert delta("tc_store_artifact_cache_evictions_total") == 1
    assert delta("tc_store_operation_latency_seconds_count", verb="put") == 3
    assert delta("tc_store_operation_latency_seconds_count", verb="get") == 5
    assert delta("tc_store_operation_latency_seconds_count", verb="get_into") == 1
    assert delta("tc_store_operation_latency_seconds_count", verb="register") == 1
    assert delta("tc_store_operation_latency_seconds_count", verb="delete") == 2
    assert delta("tc_store_operation_latency_seconds_sum", verb="put") > 0
    assert delta("tc_store_operation_errors_total", verb="get", status="NOT_FOUND") == 1
    # A register of tensors outside tc.empty buffers copies them once: a counted fallback.
    assert delta("tc_store_region_backed_fallback_total", reason="not_shared_memory") == 1
    # tc.metrics_text() is the same registry as the HTTP endpoint.
    text = parse(tc.metrics_text())
    assert val(text, "tc_store_artifact_cache_hits_total") == val(
        after, "tc_store_artifact_cache_hits_total"
    )

    if exporter is not None:
        spans = [(s.name, dict(s.attributes or {})) for s in exporter.get_finished_spans()]
        span_names = [n for n, _ in spans]
        for name in ("Store/Put", "Store/Get", "Store/GetInto", "Store/Register"):
            assert name in span_names, (name, span_names)
        failed = [a for n, a in spans if a.get("tensorcast.status_code") == "NOT_FOUND"]
        assert failed == [
            {
                "tensorcast.verb": "get",
                "tensorcast.status_code": "NOT_FOUND",
                "tensorcast.retryable": False,
            }
        ]


def _otel_exporter() -> Any:
    """An in-memory exporter behind a private provider wired into _tracing, or None."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Not the global provider: that can be set once per process and would leak into others.
    _tracing._tracer = provider.get_tracer(_tracing.TRACER_NAME)
    return exporter


@pytest.fixture(autouse=True)
def _restore_tracer() -> Iterator[None]:
    yield
    _tracing._reset()


def test_not_found_and_invalid_argument_are_counted_and_never_retried(namespace: str) -> None:
    import torch

    ctx = tc.init(namespace=namespace, global_store_mode="none", metrics_port=0)
    assert ctx.metrics_address is not None
    before = scrape(ctx.metrics_address)
    d_before = daemon_metrics(ctx)

    with pytest.raises(tc.NotFoundError) as err:
        tc.get("nothing:latest")
    assert err.value.status_code == grpc.StatusCode.NOT_FOUND
    assert err.value.retryable is False
    assert isinstance(err.value, KeyError)
    with pytest.raises(tc.NotFoundError):
        tc.artifact("nothing:v3")

    # Bad arguments fail in the SDK, before any RPC reaches the daemon.
    bad_calls = [
        ("get", lambda: tc.get("no version here")),
        ("get", lambda: tc.get("x:v1", device="tpu")),
        ("put", lambda: tc.put({"w": torch.ones(1)}, key="x:latest")),
        ("put", lambda: tc.put([torch.ones(1)], key="x:v1")),  # type: ignore[arg-type]
        ("get_into", lambda: tc.get_into("bad key!", {})),
        ("list_keys", lambda: tc.list_keys(3)),  # type: ignore[arg-type]
    ]
    d_mid = daemon_metrics(ctx)
    for _, call in bad_calls:
        with pytest.raises(tc.InvalidArgumentError) as bad:
            call()
        assert bad.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.retryable is False
    d_after = daemon_metrics(ctx)
    rpc_mid = total(d_mid, "tc_daemon_rpc_total")
    assert total(d_after, "tc_daemon_rpc_total") == rpc_mid, "an RPC reached the daemon"

    after = scrape(ctx.metrics_address)

    def delta(name: str, **labels: str) -> float:
        return val(after, name, **labels) - val(before, name, **labels)

    assert delta("tc_store_operation_errors_total", verb="get", status="NOT_FOUND") == 1
    assert delta("tc_store_operation_errors_total", verb="artifact", status="NOT_FOUND") == 1
    assert delta("tc_store_operation_errors_total", verb="get", status="INVALID_ARGUMENT") == 2
    assert delta("tc_store_operation_errors_total", verb="put", status="INVALID_ARGUMENT") == 2
    assert delta("tc_store_operation_errors_total", verb="get_into", status="INVALID_ARGUMENT") == 1
    assert (
        delta("tc_store_operation_errors_total", verb="list_keys", status="INVALID_ARGUMENT") == 1
    )
    for verb in VERBS:
        assert delta("tc_store_operation_retries_total", verb=verb) == 0, verb
    # The daemon counted the two lookups by code; NOT_FOUND is an answer, not a failure.
    assert (
        total(d_mid, "tc_daemon_rpc_total", method="Lookup", code="NOT_FOUND")
        - total(d_before, "tc_daemon_rpc_total", method="Lookup", code="NOT_FOUND")
        == 2
    )


def test_store_options_source_and_retry_overrides(namespace: str) -> None:
    import torch

    ctx = tc.init(namespace=namespace, global_store_mode="none", metrics_port=0)
    assert ctx.metrics_address is not None
    override = tc.RetryPolicy(20.0, 2, 0.1, 2.0, 0.5)
    local = tc.store(
        opts=tc.StoreOptions(
            get=tc.GetArtifactOptions(source="local_only"), retry_overrides={"get": override}
        )
    )
    default = tc.store()
    verbs = ("put", "register", "artifact", "get", "get_into", "exists", "delete", "list_keys")
    for verb in verbs:
        assert callable(getattr(local, verb)) and callable(getattr(default, verb))
    assert local._retrier.policy_for("get") == override
    assert local._retrier.policy_for("get_into") == DEFAULT_RETRY_POLICIES["get_into"]
    assert default._retrier.policy_for("get") == DEFAULT_RETRY_POLICIES["get"]

    local.put({"w": torch.arange(3.0)}, key="opt:v1")
    assert local.get("opt:latest")["w"].tolist() == [0.0, 1.0, 2.0]
    assert local.exists("opt:v1") and local.list_keys("opt") == ["opt:v1"]
    out = {"w": torch.zeros(3)}
    local.get_into("opt:v1", out)
    assert out["w"].tolist() == [0.0, 1.0, 2.0]

    before = scrape(ctx.metrics_address)
    for source in ("remote", "disk"):
        remote = tc.store(opts=tc.StoreOptions(get=tc.GetArtifactOptions(source=source)))
        # remote needs a cluster (this daemon runs without a Global Store); disk, for a
        # version not on this node, needs persistence (a persist_url), which it has not.
        key = "opt:v1" if source == "remote" else "elsewhere:v1"
        for call in (
            lambda s, key=key: s.get(key),
            lambda s, key=key: s.get_into(key, {"w": torch.zeros(3)}),
            lambda s, key=key: s.artifact(key.replace(":v1", ":latest")),
        ):
            with pytest.raises(tc.FailedPreconditionError) as err:
                call(remote)
            assert err.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
            why = "not part of a cluster" if source == "remote" else "persistence is not configured"
            assert source in str(err.value) and why in str(err.value)
        # Writes do not read, so they are not refused.
        remote.put({"w": torch.ones(1)}, key=f"w-{source}:v1")
    # A disk read of a version on this node is served by its copy (the same bytes).
    disk = tc.store(opts=tc.StoreOptions(get=tc.GetArtifactOptions(source="disk")))
    assert disk.get("opt:v1")["w"].tolist() == [0.0, 1.0, 2.0]
    after = scrape(ctx.metrics_address)
    for verb in ("get", "get_into", "artifact"):
        key = (
            "tc_store_operation_errors_total",
            frozenset({"verb": verb, "status": "FAILED_PRECONDITION"}.items()),
        )
        assert after[key] - before[key] == 2, verb

    with pytest.raises(tc.InvalidArgumentError):
        tc.GetArtifactOptions(source="cloud")
    with pytest.raises(tc.InvalidArgumentError) as err:
        tc.store(opts=tc.StoreOptions(retry_overrides={"fetch": override}))
    assert "fetch" in str(err.value)
    with pytest.raises(tc.InvalidArgumentError):
        tc.store(opts=tc.StoreOptions(retry_overrides={"get": (20.0, 2)}))  # type: ignore[dict-item]


def test_killed_daemon_get_retries_and_succeeds_one_attempt_policy_does_not(
    namespace: str,
) -> None:
    import torch

    ctx = tc.init(namespace=namespace, global_store_mode="none", metrics_port=0)
    assert ctx.metrics_address is not None
    assert ctx.transport == "local", "the kill must cut a connection the SDK holds"
    # Registered from a tc.empty buffer: no put, so no write-stager thread shares the client
    # (its calls could meet the dead connection first; see the report on _client.py).
    w = tc.empty((10,), torch.float32)
    w.copy_(torch.arange(10.0))
    tc.register({"w": w}, key="survivor:v1")
    assert _bootstrap.current().stager is None

    before = scrape(ctx.metrics_address)
    kill_daemon_and_wait_dead(ctx, wait_restarted=True)
    # The SDK's connection ends in the dead process: attempt 1 fails UNAVAILABLE, the retry
    # loop reconnects to the restarted daemon (which re-adopted the shared memory), attempt 2
    # succeeds.  name:latest always asks the daemon (an explicit version may be a cache hit).
    got = tc.get("survivor:latest")
    assert float(got["w"].sum()) == 45.0
    mid = scrape(ctx.metrics_address)
    assert val(mid, "tc_store_operation_retries_total", verb="get") > val(
        before, "tc_store_operation_retries_total", verb="get"
    )
    assert val(mid, "tc_store_operation_errors_total", verb="get", status="UNAVAILABLE") == val(
        before, "tc_store_operation_errors_total", verb="get", status="UNAVAILABLE"
    ), "the get succeeded: no final error"

    # The same failure with max_attempts=1 is not retried: UNAVAILABLE at once.
    once = tc.store(opts=tc.StoreOptions(retry_overrides={"get": tc.RetryPolicy(20.0, 1)}))
    kill_daemon_and_wait_dead(ctx, wait_restarted=True)
    with pytest.raises(tc.UnavailableError) as err:
        once.get("survivor:latest")
    assert err.value.status_code == grpc.StatusCode.UNAVAILABLE
    assert err.value.retryable is True
    assert "gave up after 1 attempt " in str(err.value)
    after = scrape(ctx.metrics_address)
    assert val(after, "tc_store_operation_retries_total", verb="get") == val(
        mid, "tc_store_operation_retries_total", verb="get"
    )
    assert (
        val(after, "tc_store_operation_errors_total", verb="get", status="UNAVAILABLE")
        - val(mid, "tc_store_operation_errors_total", verb="get", status="UNAVAILABLE")
        == 1
    )
    # The default policy recovers from here.
    assert float(tc.get("survivor:latest")["w"].sum()) == 45.0


def test_client_is_a_daemon_session_again_after_a_restart(namespace: str) -> None:
    import torch

    ctx = tc.init(namespace=namespace, global_store_mode="none")
    w = tc.empty((4,), torch.float32)
    tc.register({"w": w}, key="s:v1")
    once = tc.store(opts=tc.StoreOptions(retry_overrides={"exists": tc.RetryPolicy(20.0, 1)}))
    kill_daemon_and_wait_dead(ctx, wait_restarted=True)
    with pytest.raises(tc.UnavailableError):
        once.exists("s:v1")  # meets the dead connection (any caller or thread could)
    assert tc.exists("s:v1")
    status = _actors.call(daemon_handle(ctx), "status")
    assert status["clients"] == 1, "this process is no longer a session of its daemon"


def test_daemon_and_global_store_metrics(namespace: str) -> None:
    import ray
    import torch

    ctx = tc.init(namespace=namespace)
    start = daemon_metrics(ctx)
    missing = [n for n in DAEMON_REQUIRED if n not in names(start)]
    assert not missing, f"missing daemon metrics: {missing}"
    for op in ("put", "register"):
        for status in ("OK", "DEGRADED", "FAILED"):
            assert val(start, "tc_local_stable_tier_seconds_count", op=op, status=status) == 0
            for requirement in ("must", "should", "may"):
                labels = {"op": op, "status": status, "requirement": requirement}
                assert val(start, "tc_local_stable_tier_total", **labels) == 0
    assert (
        val(
            start,
            "tc_store_materialize_into_target_total",
            result="success",
            reason="none",
            source="shm",
        )
        == 0
    )
    assert val(start, "tc_store_materialize_into_target_verification_skipped_total") == 0
    assert val(start, "tc_daemon_artifacts") == 0
    assert val(start, "tc_daemon_tier_bytes_used", **STABLE) == 0
    assert val(start, "tc_daemon_tier_bytes_capacity", **STABLE) == 2 * 1024**3  # tests/config
    assert val(start, "tc_daemon_clients") == 1

    tc.put({"w": torch.zeros(1024)}, key="m:v1")  # 4 KiB
    tc.register({"w": torch.ones(256)}, key="lease:v1")
    after_put = daemon_metrics(ctx)
    assert val(after_put, "tc_daemon_artifacts") == 2
    assert val(after_put, "tc_daemon_tier_bytes_used", **STABLE) >= 4096 + 1024
    assert val(after_put, "tc_daemon_leases") == val(start, "tc_daemon_leases") + 1
    assert total(after_put, "tc_local_stable_tier_total", op="put", status="OK") == 1
    assert total(after_put, "tc_local_stable_tier_total", op="register", status="OK") == 1
    assert val(after_put, "tc_local_stable_tier_seconds_count", op="put", status="OK") == 1
    assert total(after_put, "tc_daemon_rpc_total", method="CommitWrite", code="OK") >= 1
    assert total(after_put, "tc_daemon_rpc_latency_seconds_count", method="BeginWrite") >= 2

    # A second process connects: clients goes to 2, and back when it exits.
    @ray.remote(num_cpus=0)
    class Reader:
        def __init__(self, ns: str) -> None:
            import tensorcast_ray as tc

            tc.init(mode="connect", namespace=ns)

        def total(self, key: str) -> float:
            import tensorcast_ray as tc

            return float(tc.get(key)["w"].sum())

    reader = Reader.remote(namespace)  # type: ignore[attr-defined]
    assert ray.get(reader.total.remote("lease:latest"), timeout=120) == 256.0
    wait_for(lambda: val(daemon_metrics(ctx), "tc_daemon_clients") == 2, 30, "2 clients")
    ray.kill(reader)
    wait_for(lambda: val(daemon_metrics(ctx), "tc_daemon_clients") == 1, 60, "reader to go")

    assert tc.delete("m:v1")
    after_delete = daemon_metrics(ctx)
    assert val(after_delete, "tc_daemon_artifacts") == 1
    assert val(after_delete, "tc_daemon_tier_bytes_used", **STABLE) < val(
        after_put, "tc_daemon_tier_bytes_used", **STABLE
    )

    # Global Store: names from the start, daemons known, RPC latency per method over gRPC.
    gs_info = _actors.call(_actors.get_actor(_actors.GLOBAL_STORE_NAME, namespace), "info")
    gs_before = scrape(gs_info["metrics_address"])
    missing = [n for n in GS_REQUIRED if n not in names(gs_before)]
    assert not missing, f"missing Global Store metrics: {missing}"
    assert val(gs_before, "tc_global_store_daemons_known") == 1
    # The cluster catalog holds what the daemon committed and did not delete: lease:v1.
    assert val(gs_before, "tc_global_store_catalog_keys") == 1
    assert val(gs_before, "tc_global_store_catalog_artifacts") == 1
    for method in ("reserve", "commit"):
        assert val(gs_before, "tc_global_store_rpc_latency_seconds_count", method=method) == 2
    assert val(gs_before, "tc_global_store_rpc_latency_seconds_count", method="delete") == 1
    for method in ("Health", "Status"):
        assert (
            val(gs_before, "tc_global_store_rpc_errors_total", method=method, code="INTERNAL") == 0
        )
    from tensorcast_ray._auth import call_metadata, namespace_token
    from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2, global_store_pb2

    token = call_metadata(namespace_token(namespace))
    with grpc.insecure_channel(gs_info["address"]) as channel:
        channel.unary_unary(
            "/tensorcast_ray.v1.GlobalStore/Health",
            request_serializer=common_pb2.HealthRequest.SerializeToString,
            response_deserializer=common_pb2.HealthResponse.FromString,
        )(common_pb2.HealthRequest(), timeout=10, metadata=token)
        status = channel.unary_unary(
            "/tensorcast_ray.v1.GlobalStore/Status",
            request_serializer=global_store_pb2.GlobalStatusRequest.SerializeToString,
            response_deserializer=global_store_pb2.GlobalStatusResponse.FromString,
        )(global_store_pb2.GlobalStatusRequest(), timeout=10, metadata=token)
    assert [d.node_id for d in status.daemons] == [ctx.node_id]
    gs_after = scrape(gs_info["metrics_address"])
    for method in ("Health", "Status"):
        count = "tc_global_store_rpc_latency_seconds_count"
        assert val(gs_after, count, method=method) == val(gs_before, count, method=method) + 1
