"""Reads by real use against a real daemon: targets that must be refused, cached reads that
count as use, readers that let go of deleted memory, and buffers frozen by register.

Writes into read-only zero-copy tensors would kill the process, so they run in a child
interpreter (a crash there fails the test instead of killing pytest).
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import grpc
import pytest
import torch

import tensorcast_ray as tc
from tests.helpers import SMALL_DAEMON_CONFIG, python_child, shm_prefix, wait_for

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture
def driver(namespace: str) -> str:
    tc.init(namespace=namespace, global_store_mode="none")
    return namespace


# ---- 1. get_into targets -----------------------------------------------------------------------
def test_get_into_a_zero_copy_tensor_is_refused_not_a_crash(driver: str) -> None:
    """The old code copied into the read-only mapping: SIGSEGV in the child."""
    address = tc.init(namespace=driver, global_store_mode="none").daemon_address
    tc.put({"w": torch.arange(16.0), "b": torch.ones(4)}, key="ro:v1")
    script = textwrap.dedent(
        f"""
        import json, sys
        import torch
        import tensorcast_ray as tc
        tc.init(mode="connect", address={address!r})
        out = {{}}
        ro = tc.get("ro:v1")
        try:
            tc.get_into("ro:v1", ro)
            out["whole"] = "copied"
        except tc.ArtifactError as exc:
            out["whole"] = [exc.status_code.name, str(exc)]
        try:  # a view of a zero-copy tensor is as read-only as the tensor
            tc.get_into("ro:v1", {{"b": torch.zeros(4), "w": ro["w"][:]}})
            out["view"] = "copied"
        except tc.ArtifactError as exc:
            out["view"] = [exc.status_code.name, str(exc)]
        mine = tc.get("ro:v1", copy=True)
        tc.get_into("ro:v1", mine)
        out["copy"] = mine["w"].tolist()
        print(json.dumps(out))
        """
    )
    with python_child(script) as (proc, out):
        assert proc.wait(timeout=60) == 0
    code, message = out["whole"]
    assert code == "INVALID_ARGUMENT"
    assert "read-only" in message and "copy=True" in message
    assert out["view"][0] == "INVALID_ARGUMENT" and "'w'" in out["view"][1]
    assert out["copy"] == torch.arange(16.0).tolist()


def test_a_meta_or_sparse_target_is_refused(driver: str) -> None:
    tc.put({"w": torch.arange(4.0)}, key="meta:v1")
    for target in (torch.empty(4, device="meta"), torch.zeros(4).to_sparse()):
        with pytest.raises(tc.InvalidArgumentError) as err:
            tc.get_into("meta:v1", {"w": target})
        assert err.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'w'" in str(err.value)


# ---- 2. cached reads count as use --------------------------------------------------------------


def blob(mib: int, fill: int) -> dict[str, torch.Tensor]:
    return {"t": torch.full((mib * MiB // 4,), fill, dtype=torch.int32)}


def lookups() -> float:
    """Lookups this process had to send to the daemon (the read cache answered the rest)."""
    from tensorcast_ray._metrics import get_sdk_metrics

    value = get_sdk_metrics().registry.get_sample_value("tc_store_artifact_cache_misses_total")
    return value or 0.0


def test_reads_from_the_process_cache_restart_the_ttl(driver: str) -> None:
    """The old code expired the version 2 s after its one Lookup, however often it was read."""
    ttl = tc.StorePolicy(
        may=[tc.TierSpec("stable_dram", retention_policy="ttl", retention_ttl_ms=2000)]
    )
    tc.put({"w": torch.arange(8.0)}, key="ttl:v1", policy=ttl)
    assert tc.get("ttl:v1")["w"].sum() == 28.0  # one Lookup; later reads are cache hits
    misses = lookups()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # reads every 0.5 s for 2.5 TTLs: the behaviour under test
        assert tc.get("ttl:v1")["w"].sum() == 28.0
        time.sleep(0.5)
    assert lookups() == misses, "the reads were to come from the process cache"
    assert tc.exists("ttl:v1")
    # Unread, it expires as before.
    wait_for(lambda: not tc.exists("ttl:v1"), 30, "the unread version to expire")


def test_lru_counts_a_read_from_the_process_cache(namespace: str, tmp_path: Path) -> None:
    path = tmp_path / "daemon.yaml"
    path.write_text(SMALL_DAEMON_CONFIG)
    tc.init(namespace=namespace, daemon_config_path=str(path), global_store_mode="none")
    tc.put(blob(24, 1), key="a:v1")
    tc.put(blob(24, 2), key="b:v1")
    assert int(tc.get("a:v1")["t"][0]) == 1  # Lookup: a touched
    assert int(tc.get("b:v1")["t"][0]) == 2  # Lookup: b touched, a is now the older
    misses = lookups()
    assert int(tc.get("a:v1")["t"][-1]) == 1  # from the cache: a is the most recent again
    assert lookups() == misses
    tc.put(blob(24, 3), key="c:v1")  # 72 MiB > 64: the least recently used goes
    assert tc.list_keys() == ["a:v1", "c:v1"]


# ---- 3. an idle reader lets go of deleted memory -----------------------------------------------
def mapped_segments(pid: int, prefix: str) -> set[str]:
    """Paths of the segments under ``prefix`` that process ``pid`` maps."""
    with open(f"/proc/{pid}/maps") as f:
        return {
            line.split(maxsplit=5)[5].split(" (deleted)")[0].strip() for line in f if prefix in line
        }


def test_an_idle_reader_unmaps_a_deleted_artifact(driver: str) -> None:
    """The old code kept the segments mapped until the reader's next lookup."""
    address = tc.init(namespace=driver, global_store_mode="none").daemon_address
    tc.put({"big": torch.ones(64 * MiB // 4), "small": torch.zeros(3)}, key="gone:v1")
    tc.put({"x": torch.ones(4)}, key="kept:v1")
    script = textwrap.dedent(
        f"""
        import gc, json, sys
        import tensorcast_ray as tc
        tc.init(mode="connect", address={address!r})
        kept = tc.get("kept:v1")["x"]  # a tensor the reader still holds: it stays valid
        t = tc.get("gone:v1")
        total = float(t["big"].sum())
        del t
        gc.collect()
        print(json.dumps({{"sum": total}}))
        sys.stdout.flush()
        sys.stdin.readline()
        print(json.dumps({{"kept": kept.tolist()}}))
        """
    )
    prefix = shm_prefix(driver)
    with python_child(script) as (proc, out):
        assert out["sum"] == 64 * MiB // 4
        before = mapped_segments(proc.pid, prefix)
        gone = {s.name for s in tc.artifact("gone:v1")._entry.info.segments}
        assert {os.path.basename(p) for p in before} >= gone, "the reader maps the artifact"
        assert tc.delete("gone:v1")
        wait_for(
            lambda: not gone & {os.path.basename(p) for p in mapped_segments(proc.pid, prefix)},
            15,
            "the idle reader to unmap the deleted artifact's segments",
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"kept": [1.0] * 4}
        assert proc.wait(timeout=60) == 0


# ---- 4. a tc.empty buffer backs one version ----------------------------------------------------
def test_a_registered_buffer_backs_one_version(driver: str) -> None:
    """The old code accepted both and counted the buffer's bytes once per version."""
    buf = tc.empty((1024,), dtype=torch.float32)
    buf.copy_(torch.arange(1024.0))
    assert tc.register({"w": buf}, key="buf:v1").status == "ready"
    for tensors in ({"w": buf}, {"head": buf[:512]}):  # the same buffer, or a slice of it
        with pytest.raises(tc.FailedPreconditionError) as err:
            tc.register(tensors, key="buf:v2")
        assert err.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
        assert "buf:v1" in str(err.value) and "delete" in str(err.value)
    assert not tc.exists("buf:v2")
    assert tc.delete("buf:v1")
    # Free again once its version is gone; disjoint slices share it, overlapping ones do not.
    parts = {"head": buf[:512], "tail": buf[512:]}
    assert tc.register(parts, key="buf:v3").status == "ready"
    assert tc.get("buf:v3")["tail"][0] == 512.0
    other = tc.empty((64,), dtype=torch.float32)
    with pytest.raises(tc.InvalidArgumentError) as err:
        tc.register({"a": other[:40], "b": other[32:]}, key="buf:v4")
    assert "'a'" in str(err.value) and "'b'" in str(err.value) and "overlap" in str(err.value)
    assert tc.register({"a": other[:32], "b": other[32:]}, key="buf:v4").status == "ready"
