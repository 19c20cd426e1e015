"""Capacity pressure on a daemon with 64 MiB of local stable DRAM and no segment pool:
each overflow policy (evict / reject / spill), requirement levels, tiers that need
persistence, and policy validation before anything is sent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import tensorcast_ray as tc
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tests.helpers import SMALL_DAEMON_CONFIG, shm_prefix

pytestmark = pytest.mark.timeout(240)

MiB = 1 << 20
CAPACITY = 64 * MiB


@pytest.fixture
def small(namespace: str, tmp_path: Path) -> str:
    """This test's daemon, with 64 MiB of capacity; the test process is connected to it."""
    path = tmp_path / "daemon.yaml"
    path.write_text(SMALL_DAEMON_CONFIG)
    tc.init(namespace=namespace, daemon_config_path=str(path), global_store_mode="none")
    assert daemon_status().tiers[0].capacity_bytes == CAPACITY
    return namespace


def daemon_status() -> Any:
    client = tc._bootstrap.current().client
    return client.call("Status", daemon_pb2.StatusRequest(), 10)


def blob(mib: int, fill: int) -> dict[str, torch.Tensor]:
    return {"t": torch.full((mib * MiB // 4,), fill, dtype=torch.int32)}


def holds(key: str, fill: int) -> bool:
    t = tc.get(key)["t"]
    return bool((t[:: 1 << 12] == fill).all()) and int(t[-1]) == fill


def assert_gone(key: str) -> None:
    assert not tc.exists(key)
    with pytest.raises(tc.NotFoundError) as err:
        tc.get(key)
    assert err.value.status_code == grpc.StatusCode.NOT_FOUND


def assert_exhausted(fn: Any, *args: Any, **kwargs: Any) -> tc.ArtifactError:
    with pytest.raises(tc.ResourceExhaustedError) as err:
        fn(*args, **kwargs)
    assert err.value.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return err.value


def used() -> tuple[int, int]:
    status = daemon_status()
    return status.artifacts, status.tiers[0].used_bytes


CACHE = tc.StorePolicy(profile="cache")
WARM = tc.StorePolicy(profile="warm")
PINNED = tc.StorePolicy(profile="pinned")


# ---- may + evict (profile cache) ------------------------------------------------------------
def test_cache_evicts_least_recently_used(small: str) -> None:
    assert tc.put(blob(24, 1), key="a:v1", policy=CACHE).status == "ready"
    assert tc.put(blob(24, 2), key="b:v1").status == "ready"  # no policy = cache
    a_tensors = tc.get("a:v1")  # a read: a is now more recent than b
    assert holds("a:v1", 1)
    result = tc.put(blob(24, 3), key="c:v1", policy=CACHE)  # 72 MiB > 64: evict b
    assert result.status == "ready" and result.nbytes == 24 * MiB
    assert_gone("b:v1")
    assert holds("a:v1", 1) and holds("c:v1", 3)
    assert tc.list_keys() == ["a:v1", "c:v1"]
    assert used() == (2, 48 * MiB)
    # Now a is the least recently used (c was written after a's read): it goes next,
    # while the tensors this process still holds keep their bytes.
    tc.put(blob(24, 4), key="d:v1", policy=CACHE)
    assert_gone("a:v1")
    assert tc.list_keys() == ["c:v1", "d:v1"]
    assert int(a_tensors["t"][0]) == 1 and int(a_tensors["t"][-1]) == 1


def test_eviction_never_takes_pinned_entries(small: str) -> None:
    tc.put(blob(40, 1), key="pin:v1", policy=PINNED)
    tc.put(blob(16, 2), key="c:v1", policy=CACHE)
    # 40 pinned + 30 > 64 even once the cache entry is gone: nothing is evicted.
    assert_exhausted(tc.put, blob(30, 3), key="c:v2", policy=CACHE)
    assert tc.list_keys() == ["c:v1", "pin:v1"]
    # 'reject' (the pinned profile's rule) evicts nothing, not even cache entries.
    assert_exhausted(tc.put, blob(16, 3), key="pin:v2", policy=PINNED)
    assert tc.list_keys() == ["c:v1", "pin:v1"]
    # With 'evict', 40 + 16 + 16 > 64 evicts the cache entry, never the pin.
    pin_evict = tc.StorePolicy(profile="pinned", overflow_policy="evict")
    assert tc.put(blob(16, 3), key="pin:v2", policy=pin_evict).status == "ready"
    assert tc.list_keys() == ["pin:v1", "pin:v2"]
    assert used() == (2, 56 * MiB)
    assert holds("pin:v1", 1) and holds("pin:v2", 3)


# ---- should + reject (profile warm) ---------------------------------------------------------
def test_warm_rejects_when_full_and_changes_nothing(small: str) -> None:
    tc.put(blob(40, 1), key="w:v1", policy=WARM)
    before = used()
    err = assert_exhausted(tc.put, blob(40, 2), key="w:v2", policy=WARM)
    assert "w:v2" in str(err)
    assert used() == before == (1, 40 * MiB)
    assert tc.list_keys() == ["w:v1"] and holds("w:v1", 1)
    assert_gone("w:v2")
    # The rejected version was never reserved: once there is room it can be written.
    tc.delete("w:v1")
    assert tc.put(blob(40, 2), key="w:v2", policy=WARM).status == "ready"
    assert holds("w:v2", 2)


# ---- must + reject (profile pinned) ---------------------------------------------------------
def test_pinned_rejects_when_full(small: str) -> None:
    tc.put(blob(40, 1), key="p:v1", policy=PINNED)
    assert_exhausted(tc.put, blob(40, 2), key="p:v2", policy=PINNED)
    assert used() == (1, 40 * MiB)
    assert tc.list_keys() == ["p:v1"]
    # A register lease is pinned too; so is a tc.empty buffer.
    assert_exhausted(tc.register, blob(30, 3), key="p:r1")
    assert_exhausted(tc.empty, (30 * MiB // 4,), dtype=torch.int32)
    assert used() == (1, 40 * MiB)
    buf = tc.empty((20 * MiB // 4,), dtype=torch.int32)  # 40 + 20 fits
    buf.fill_(5)
    tc.register({"t": buf}, key="p:r1")
    assert holds("p:r1", 5)
    assert tc.list_keys() == ["p:r1", "p:v1"]


@pytest.mark.parametrize("policy", [CACHE, WARM, PINNED], ids=["cache", "warm", "pinned"])
def test_bigger_than_capacity_is_resource_exhausted(small: str, policy: tc.StorePolicy) -> None:
    tc.put(blob(8, 1), key="small:v1", policy=CACHE)
    err = assert_exhausted(tc.put, blob(80, 2), key="huge:v1", policy=policy)
    assert str(80 * MiB) in str(err) or "huge:v1" in str(err)
    assert tc.list_keys() == ["small:v1"]  # nothing was evicted for a hopeless request
    assert_gone("huge:v1")


# ---- spill: needs durable copies, and there are none yet -----------------------------------
def test_spill_without_durable_entries_rejects(small: str) -> None:
    policy = tc.StorePolicy(
        must=[],
        should=[tc.TierSpec("shared_disk", "any")],
        may=[tc.TierSpec("stable_dram", "local", retention_policy="best_effort")],
        overflow_policy="spill",
    )
    first = tc.put(blob(40, 1), key="s:v1", policy=policy)
    assert first.status == "degraded" and first.degraded_reasons
    # Spill may only evict entries already safe on shared disk; none are.
    assert_exhausted(tc.put, blob(40, 2), key="s:v2", policy=policy)
    assert tc.list_keys() == ["s:v1"] and holds("s:v1", 1)


# ---- tiers that need persistence ------------------------------------------------------------
@pytest.mark.parametrize("profile", ["durable", "ha", "cold"])
def test_shared_disk_in_must_is_failed_precondition(small: str, profile: str) -> None:
    with pytest.raises(tc.FailedPreconditionError, match="persistence not configured") as err:
        tc.put(blob(1, 1), key="d:v1", policy=tc.StorePolicy(profile=profile))
    assert err.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert tc.list_keys() == [] and used() == (0, 0)
    assert_gone("d:v1")


def test_shared_disk_in_should_is_degraded(small: str) -> None:
    policy = tc.StorePolicy(
        must=[],
        should=[tc.TierSpec("shared_disk", "any")],
        may=[tc.TierSpec("stable_dram", "local", retention_policy="best_effort")],
    )
    result = tc.put(blob(1, 7), key="deg:v1", policy=policy)
    assert result.status == "degraded"
    assert any("shared_disk" in r for r in result.degraded_reasons), result.degraded_reasons
    assert holds("deg:v1", 7)
    ok = tc.put(blob(1, 8), key="deg:v2", policy=CACHE)
    assert ok.status == "ready" and ok.degraded_reasons == ()


# ---- validation happens before anything is sent ---------------------------------------------
def test_invalid_policies_fail_before_sending(small: str) -> None:
    bad_builders = [
        lambda: tc.StorePolicy(profile="fastest"),
        lambda: tc.StorePolicy(profile="cache", must=[tc.TierSpec("stable_dram")]),
        lambda: tc.StorePolicy(overflow_policy="drop"),
        lambda: tc.StorePolicy(layout="striped"),
        lambda: tc.StorePolicy(
            must=[tc.TierSpec("stable_dram", retention_policy="best_effort")],
            overflow_policy="spill",  # spill needs shared_disk in must or should
        ),
        lambda: tc.StorePolicy(must=tc.TierSpec("stable_dram")),  # type: ignore[arg-type]
        lambda: tc.TierSpec("shared_disk", "local"),
        lambda: tc.TierSpec("stable_dram", retention_policy="ttl"),
        lambda: tc.TierSpec("stable_dram", min_replicas=0),
        lambda: tc.TierSpec("nvme"),
    ]
    for build in bad_builders:
        with pytest.raises(tc.InvalidArgumentError) as err:
            build()
        assert err.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    bad_values: list[Any] = ["cache", {"profile": "cache"}, tc.TierSpec("stable_dram")]
    for policy in bad_values:
        with pytest.raises(tc.InvalidArgumentError):
            tc.put(blob(1, 1), key="v:v1", policy=policy)
        with pytest.raises(tc.InvalidArgumentError):
            tc.register(blob(1, 1), key="v:v1", policy=policy)
    assert tc.list_keys() == [] and used() == (0, 0)
    # Not even a connection is needed to refuse them: nothing is sent.
    tc.shutdown()
    with pytest.raises(tc.InvalidArgumentError):
        tc.put(blob(1, 1), key="v:v1", policy="cache")  # type: ignore[arg-type]
    with pytest.raises(tc.FailedPreconditionError):
        tc.put(blob(1, 1), key="v:v1", policy=CACHE)  # a valid one does need the daemon


def test_small_artifacts_hold_no_more_memory_than_capacity_accounts(small: str) -> None:
    for i in range(8):
        stager = getattr(tc._bootstrap.current(), "stager", None)
        if stager is not None:  # tiny puts: nothing to stage, nothing to wait for
            assert stager.target == 0 and stager.wait_ready(timeout=60)
        tc.put({"t": torch.full((1024,), i, dtype=torch.int32)}, key=f"tiny:v{i}")
    assert used() == (8, 8 * 4096)
    prefix = shm_prefix(small)
    held = 0
    for i in range(8):
        for seg in tc.artifact(f"tiny:v{i}")._entry.info.segments:
            assert seg.name.startswith(prefix)
            held += os.stat(f"/dev/shm/{seg.name}").st_blocks * 512
    # 8 artifacts of 4 KiB: whatever the rounding, far below the 64 MiB capacity.
    assert held <= CAPACITY, f"{held / MiB:.0f} MiB of /dev/shm for 32 KiB of artifacts"
