"""Persistence by StorePolicy on a real local Ray and daemon (no Global Store: a lone node).

File roots and S3 (the moto server on loopback, behind a toggleable proxy for outages): every
profile end to end, task states / progress / shards, storage that goes away and comes back
(retried to success) or never comes back (failed with the storage's error), spill under
pressure (only durable artifacts go; a read brings them back bit-exact), the cold profile's
TTL drop and rehydration, the layout's shard counts, delete removing the files (and stopping
a task in flight), a daemon that died for good serving its durable artifacts again, and the
daemon's tc_persist_* metrics scraped over HTTP. The cluster cases (another node reads from
disk, the Global Store's journal) are in tests/multinode/test_persistence_cluster.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

import tensorcast_ray as tc
from tensorcast_ray import _actors
from tensorcast_ray._disk import artifact_path, list_artifacts, read_manifest
from tests.helpers import wait_for
from tests.s3_faults import FaultProxy

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
DURABLE = tc.StorePolicy(profile="durable")


def daemon_config(tmp_path: Path, **fields: Any) -> str:
    """The suite's daemon config with ``fields`` on top, as a YAML file."""
    data = yaml.safe_load((REPO / "tests" / "config" / "daemon.yaml").read_text())
    data.update(fields)
    path = tmp_path / f"daemon-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def start(namespace: str, tmp_path: Path, **fields: Any) -> tc.InitContext:
    return tc.init(
        namespace=namespace,
        global_store_mode="none",
        daemon_config_path=daemon_config(tmp_path, **fields),
    )


def weights(n: int, numel: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.w": torch.randn(numel, generator=g) for i in range(n)}


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def daemon_metrics(ctx: tc.InitContext) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    info = _actors.call(_actors.get_actor(_actors.daemon_name(ctx.node_id), ctx.namespace), "info")
    with urllib.request.urlopen(f"http://{info['metrics_address']}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def files_under(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


@pytest.fixture(params=["file", "s3"])
def persist_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A persistence root and its storage options: a local directory, or a bucket on the
    moto S3 server (loopback)."""
    if request.param == "file":
        return f"file://{tmp_path}/persist", {}
    options = request.getfixturevalue("s3_options")
    return f"s3://{request.getfixturevalue('bucket')}/persist", options


# ---- profiles --------------------------------------------------------------------------------
def test_durable_put_returns_then_persists_with_status_metrics_and_files(
    namespace: str, tmp_path: Path, persist_root: tuple[str, dict[str, Any]]
) -> None:
    root, options = persist_root
    ctx = start(namespace, tmp_path, persist_url=root, persist_storage_options=options)
    before = daemon_metrics(ctx)
    ts = weights(300, 4096)  # 300 tensors, ~4.7 MiB
    put = tc.put(ts, "model:v1", policy=DURABLE)
    assert put.status == "ready" and put.persistence_task_id
    status = tc.wait_persisted("model:v1", timeout=60)
    assert (status.state, status.durable, status.progress) == ("success", True, 1.0)
    assert status.task_id == put.persistence_task_id and status.artifact_id == put.artifact_id
    [shard] = status.shards  # 4.7 MiB: one file (auto layout, under 128 MiB)
    assert shard.tier == "shared_disk" and shard.state == "success"
    assert shard.target.endswith(".safetensors") and shard.total_bytes == put.nbytes
    assert tc.persistence_status(put.persistence_task_id) == tc.persistence_status(key="model:v1")
    info = tc.artifact("model:v1").info()
    assert info.durable and info.persistence_state == "success" and not info.persistence_error
    # The files are the disk format: a manifest naming the same artifact, bytes exact.
    manifest = read_manifest(root, "model:v1", storage_options=options)
    assert manifest.artifact_id == put.artifact_id and len(manifest.tensors) == 300
    assert list_artifacts(root, storage_options=options) == ["model:v1"]
    after = daemon_metrics(ctx)
    assert (
        metric(after, "tc_persist_bytes_total", direction="write")
        - metric(before, "tc_persist_bytes_total", direction="write")
        == put.nbytes
    )
    assert metric(after, "tc_persist_tasks_active", state="success") == 1
    assert metric(after, "tc_persist_task_seconds_count", state="success") == 1
    assert metric(after, "tc_persist_progress_ratio") == 0  # nothing running now
    assert tc.delete("model:v1") and list_artifacts(root, storage_options=options) == []


def test_memory_only_profiles_have_no_task(namespace: str, tmp_path: Path) -> None:
    start(namespace, tmp_path, persist_url=f"file://{tmp_path}/persist")
    for profile in ("cache", "warm", "pinned"):
        put = tc.put({"w": torch.ones(8)}, f"{profile}:v1", policy=tc.StorePolicy(profile=profile))
        assert put.persistence_task_id is None and put.status == "ready"
        with pytest.raises(tc.NotFoundError, match="no persistence task"):
            tc.persistence_status(key=f"{profile}:v1")
        assert not tc.artifact(f"{profile}:v1").info().durable
    assert files_under(f"file://{tmp_path}/persist") == []


def test_without_persistence_must_fails_and_should_degrades(namespace: str, tmp_path: Path) -> None:
    start(namespace, tmp_path)  # no persist_url
    with pytest.raises(tc.FailedPreconditionError, match="persistence not configured"):
        tc.put({"w": torch.ones(4)}, "d:v1", policy=DURABLE)
    assert not tc.exists("d:v1")  # nothing half-written
    should = tc.StorePolicy(
        should=[tc.TierSpec("shared_disk", "any"), tc.TierSpec("stable_dram", "local")]
    )
    put = tc.put({"w": torch.ones(4)}, "s:v1", policy=should)
    assert put.status == "degraded" and put.persistence_task_id is None
    assert any("persistence not configured" in r for r in put.degraded_reasons)
    # ha on a lone node: the disk tier is refused first (must), with what to set.
    with pytest.raises(tc.FailedPreconditionError, match="persist_url"):
        tc.put({"w": torch.ones(4)}, "h:v1", policy=tc.StorePolicy(profile="ha"))
    disk = tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source="disk")))
    with pytest.raises(tc.FailedPreconditionError, match="persist_url"):
        disk.get("elsewhere:v1")  # not on this node, and no disk to read it from
    assert same(disk.get("s:v1"), {"w": torch.ones(4)})  # on this node: its copy serves


def test_ha_on_a_lone_node_persists_and_degrades_the_remote_tier(
    namespace: str, tmp_path: Path
) -> None:
    start(namespace, tmp_path, persist_url=f"file://{tmp_path}/persist")
    put = tc.put(weights(4, 256), "h:v1", policy=tc.StorePolicy(profile="ha"))
    # Known at the put: no cluster for the remote copy; the disk copy is still placed.
    assert put.status == "degraded" and any("no cluster" in r for r in put.degraded_reasons)
    status = tc.wait_persisted("h:v1", timeout=60)  # returns: the must tier (disk) is in
    assert status.state == "degraded" and status.durable
    assert "without a cluster" in status.degraded_reason
    assert [s.tier for s in status.shards] == ["shared_disk"]


def test_cold_copy_drops_after_its_ttl_and_the_next_get_rehydrates(
    namespace: str, tmp_path: Path, persist_root: tuple[str, dict[str, Any]]
) -> None:
    root, options = persist_root
    ctx = start(namespace, tmp_path, persist_url=root, persist_storage_options=options)
    cold = tc.StorePolicy.from_profile("cold")
    cold = dataclasses.replace(
        cold,
        should=(tc.TierSpec("stable_dram", "local", retention_policy="ttl", retention_ttl_ms=800),),
    )
    ts = weights(16, 1024, seed=3)
    tc.put(ts, "c:v1", policy=cold)
    tc.wait_persisted("c:v1", timeout=60)

    def dropped() -> bool:
        status = _actors.call(
            _actors.get_actor(_actors.daemon_name(ctx.node_id), namespace), "status"
        )
        return int(status["artifacts"]) == 0

    wait_for(dropped, 30, "the cold copy's TTL to drop it from memory")
    assert tc.exists("c:v1")  # still there: on disk
    got = tc.get("c:v1")
    assert same(got, ts)
    assert tc.artifact("c:v1").info().served_by == "disk"
    assert metric(daemon_metrics(ctx), "tc_persist_rehydrations_total", result="ok") == 1


# ---- spill -----------------------------------------------------------------------------------
def test_spill_evicts_only_durable_artifacts_and_reads_them_back(
    namespace: str, tmp_path: Path
) -> None:
    start(
        namespace,
        tmp_path,
        persist_url=f"file://{tmp_path}/persist",
        stable_dram_capacity_bytes=48 * MiB,
    )
    spill = tc.StorePolicy(profile="durable", overflow_policy="spill")
    durable = weights(4, 1 * MiB, seed=1)  # 16 MiB
    tc.put(durable, "d:v1", policy=spill)
    only_copy = weights(4, 1 * MiB, seed=2)  # 16 MiB, memory only
    tc.put(only_copy, "c:v1", policy=tc.StorePolicy(profile="pinned"))
    # A spill put that needs room before d:v1 is durable: nothing may go yet.
    status = tc.wait_persisted("d:v1", timeout=60)
    assert status.durable
    big = weights(6, 1 * MiB, seed=4)  # 24 MiB: only d:v1 (durable) can make room
    put = tc.put(big, "b:v1", policy=spill)
    assert put.status == "ready"
    assert tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source="local_only"))).exists("c:v1")
    with pytest.raises(tc.NotFoundError):  # evicted from memory...
        tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source="local_only"))).get("d:v1")
    tc.wait_persisted("b:v1", timeout=60)
    tc.delete("b:v1")  # room for d:v1 to come back
    got = tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source="disk"))).get("d:v1")
    assert same(got, durable)  # ...and read back from disk bit-exact
    assert same(tc.get("c:v1"), only_copy)  # the only copy was never evicted
    # Too few durable bytes to spill (d:v1's 16 MiB of the 40 needed): the put fails and
    # nothing goes, not even d:v1; the only copy stays.
    with pytest.raises(tc.ResourceExhaustedError, match="spill"):
        tc.put(weights(10, 1 * MiB, seed=5), "x:v1", policy=spill)
    local = tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source="local_only")))
    assert same(local.get("d:v1"), durable) and same(local.get("c:v1"), only_copy)
    assert not tc.exists("x:v1")


# ---- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "shards"), [("auto", 2), ("sharded", 3), ("unsharded", 1)])
def test_layout_sets_the_shard_count(
    namespace: str, tmp_path: Path, layout: str, shards: int
) -> None:
    """200 MiB: auto → ceil(200 / 128) = 2 shards; sharded → 200 // 64 = 3; unsharded → 1."""
    root = f"file://{tmp_path}/persist"
    start(namespace, tmp_path, persist_url=root)
    ts = {f"w{i}": torch.full((2 * MiB,), float(i)) for i in range(25)}  # 25 x 8 MiB
    policy = tc.StorePolicy(profile="durable", layout=layout)
    tc.put(ts, "big:v1", policy=policy)
    status = tc.wait_persisted("big:v1", timeout=120)
    assert len(status.shards) == shards
    assert len(read_manifest(root, "big:v1").shards) == shards
    sizes = [s.total_bytes for s in status.shards]
    assert sum(sizes) == 200 * MiB
    if shards > 1:
        assert all(64 * MiB <= s <= 256 * MiB for s in sizes), sizes


# ---- delete ----------------------------------------------------------------------------------
def test_delete_removes_the_files_of_that_version_only(namespace: str, tmp_path: Path) -> None:
    root = f"file://{tmp_path}/persist"
    start(namespace, tmp_path, persist_url=root)
    for v in (1, 2):
        tc.put(weights(3, 128, seed=v), f"m:v{v}", policy=DURABLE)
        tc.wait_persisted(f"m:v{v}", timeout=60)
    assert tc.delete("m:v1")
    assert list_artifacts(root) == ["m:v2"]
    assert not fsspec.core.url_to_fs(artifact_path(root, "m:v1"))[0].exists(
        artifact_path(root, "m:v1")
    )
    assert not tc.exists("m:v1")
    with pytest.raises(tc.NotFoundError):
        tc.get("m:v1")
    assert same(tc.get("m:v2"), weights(3, 128, seed=2))


def test_retained_files_survive_a_delete(namespace: str, tmp_path: Path) -> None:
    root = f"file://{tmp_path}/persist"
    start(namespace, tmp_path, persist_url=root, persist_on_delete="retain")
    tc.put(weights(2, 64), "r:v1", policy=DURABLE)
    tc.wait_persisted("r:v1", timeout=60)
    assert tc.delete("r:v1")
    assert list_artifacts(root) == ["r:v1"]


# ---- S3: outages ----------------------------------------------------------------------------
@pytest.fixture
def s3_proxy(s3_options: dict[str, Any], bucket: str) -> Any:
    host, port = s3_options["endpoint_url"].removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as proxy:
        options = {
            **s3_options,
            "endpoint_url": proxy.url,
            "config_kwargs": {
                "connect_timeout": 1,
                "read_timeout": 5,
                "retries": {"max_attempts": 1},
            },
        }
        yield proxy, options, f"s3://{bucket}/persist"


def test_s3_outage_is_retried_to_success(namespace: str, tmp_path: Path, s3_proxy: Any) -> None:
    proxy, options, root = s3_proxy
    ctx = start(
        namespace,
        tmp_path,
        persist_url=root,
        persist_storage_options=options,
        persist_attempts=30,
        persist_retry_min_s=0.2,
        persist_retry_max_s=0.5,
    )
    proxy.down_after(256 * 1024)  # S3 goes away in the middle of the upload
    ts = weights(8, 64 * 1024, seed=7)  # 2 MiB
    put = tc.put(ts, "s:v1", policy=DURABLE)
    assert put.status == "ready"  # the put never waits for the storage

    def retrying() -> bool:
        st = tc.persistence_status(put.persistence_task_id)
        return st.state == "running" and any(s.attempts >= 2 for s in st.shards)

    wait_for(retrying, 60, "the task to retry its shard while S3 is down")
    running = tc.persistence_status(put.persistence_task_id)
    assert not running.durable and running.progress < 1
    assert metric(daemon_metrics(ctx), "tc_persist_tasks_active", state="running") == 1
    errors = metric(
        daemon_metrics(ctx), "tc_persist_errors_total", stage="write", reason="UNAVAILABLE"
    )
    assert errors >= 1
    proxy.up()
    status = tc.wait_persisted("s:v1", timeout=90)
    assert status.state == "success" and status.durable
    assert read_manifest(root, "s:v1", storage_options=options).artifact_id == put.artifact_id
    tc.delete("s:v1")
    assert list_artifacts(root, storage_options=options) == []


def test_s3_that_never_comes_back_fails_the_task(
    namespace: str, tmp_path: Path, s3_proxy: Any
) -> None:
    proxy, options, root = s3_proxy
    start(
        namespace,
        tmp_path,
        persist_url=root,
        persist_storage_options=options,
        persist_attempts=2,
        persist_retry_min_s=0.1,
        persist_retry_max_s=0.2,
    )
    proxy.down_after(256 * 1024)  # mid-upload: the storage goes away for good
    put = tc.put(weights(8, 256 * 1024, seed=8), "f:v1", policy=DURABLE)  # 8 MiB
    with pytest.raises(tc.UnavailableError, match="unreachable") as err:
        tc.wait_persisted("f:v1", timeout=120)
    assert err.value.status_code.name == "UNAVAILABLE"
    status = tc.persistence_status(put.persistence_task_id)
    assert status.state == "failed" and not status.durable
    assert status.last_error_code == "UNAVAILABLE" and "unreachable" in status.last_error
    info = tc.artifact("f:v1").info()  # a must tier's failure shows on the artifact
    assert info.persistence_state == "failed" and "unreachable" in (info.persistence_error or "")
    assert same(tc.get("f:v1"), weights(8, 256 * 1024, seed=8))  # the local copy serves on


def test_delete_stops_a_task_in_flight(namespace: str, tmp_path: Path, s3_proxy: Any) -> None:
    proxy, options, root = s3_proxy
    start(
        namespace,
        tmp_path,
        persist_url=root,
        persist_storage_options=options,
        persist_attempts=100,
        persist_retry_min_s=0.2,
        persist_retry_max_s=0.3,
    )
    proxy.down()
    put = tc.put(weights(4, 1024), "d:v1", policy=DURABLE)
    wait_for(
        lambda: tc.persistence_status(put.persistence_task_id).state == "running",
        30,
        "the task to start",
    )
    # The task stops first; with the storage unreachable its files cannot go, so nothing
    # is deleted (a clear, retryable error) and the task runs again ...
    no_retry = tc.store(tc.StoreOptions(retry_overrides={"delete": tc.RetryPolicy(5.0, 1)}))
    with pytest.raises(tc.UnavailableError, match=r"retry tc\.delete"):
        no_retry.delete("d:v1")
    assert tc.exists("d:v1")
    status = tc.persistence_status(put.persistence_task_id)
    assert status.state in ("pending", "running") and status.last_error_code != "ABORTED"
    # ... and once it is back the delete goes through, files and all.
    proxy.up()
    assert tc.delete("d:v1")
    assert not tc.exists("d:v1")
    assert list_artifacts(root, storage_options=options) == []
    fs, _ = fsspec.core.url_to_fs(root, **options)
    assert not fs.exists(artifact_path(root, "d:v1"))


# ---- endings ---------------------------------------------------------------------------------
def test_a_daemon_that_died_for_good_serves_its_durable_artifacts_again(
    namespace: str, tmp_path: Path
) -> None:
    import ray

    from tests.helpers import guardians, leftovers

    root = f"file://{tmp_path}/persist"
    # No grace: its guardian frees its memory as soon as it is gone (Ray will not restart it).
    config = daemon_config(tmp_path, persist_url=root, guardian_grace_s=0)
    ctx = tc.init(namespace=namespace, global_store_mode="none", daemon_config_path=config)
    ts = weights(40, 2048, seed=11)
    tc.put(ts, "keep:v1", policy=DURABLE)
    tc.wait_persisted("keep:v1", timeout=60)
    tc.put({"x": torch.ones(3)}, "gone:v1")  # memory only: lost with the daemon
    tc.shutdown()
    daemon = _actors.get_actor(_actors.daemon_name(ctx.node_id), namespace)
    ray.kill(daemon, no_restart=True)
    wait_for(lambda: not leftovers(namespace) and not guardians(namespace), 60, "shm freed")
    ctx = tc.init(namespace=namespace, global_store_mode="none", daemon_config_path=config)
    assert tc.exists("keep:v1") and not tc.exists("gone:v1")
    assert same(tc.get("keep:v1"), ts)
    assert tc.artifact("keep:v1").info().served_by == "disk"
    status = tc.persistence_status(key="keep:v1")  # from what shared disk holds
    assert status.state == "success" and status.durable and status.shards
    assert json.loads(json.dumps(status.to_dict()))["key"] == "keep:v1"


def test_bad_status_requests_are_clear(namespace: str, tmp_path: Path) -> None:
    start(namespace, tmp_path, persist_url=f"file://{tmp_path}/persist")
    with pytest.raises(tc.InvalidArgumentError, match="exactly one"):
        tc.persistence_status()
    with pytest.raises(tc.InvalidArgumentError, match="exactly one"):
        tc.persistence_status("pt-x", key="a:v1")
    with pytest.raises(tc.NotFoundError, match="no persistence task"):
        tc.persistence_status("pt-" + uuid.uuid4().hex)
    with pytest.raises(tc.NotFoundError, match="shared disk"):
        tc.wait_persisted("never:v1", timeout=5)
    with pytest.raises(tc.InvalidArgumentError, match="timeout"):
        tc.wait_persisted("never:v1", timeout=-1)
    assert os.path.isdir(tmp_path)
