"""Shared fixtures. Ray settings from ../shared/RAY_NOTES.md are applied before Ray loads.

- ``ray_local`` (module scope): one local Ray instance per test module.
- ``namespace`` (function scope): a fresh tensorcast namespace; afterwards every named
  actor in it is stopped, and the test FAILS if any actor, shared-memory segment or socket
  it created was left behind.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import leftovers, stop_namespace, wait_for

HERE = Path(__file__).parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["TENSORCAST_RAY_DAEMON_CONFIG"] = str(HERE / "config" / "daemon.yaml")
os.environ["TENSORCAST_RAY_GLOBAL_STORE_CONFIG"] = str(HERE / "config" / "global_store.yaml")
os.environ.pop("TENSORCAST_RAY_NAMESPACE", None)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    import psutil
    import ray

    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    temp_dir = tempfile.mkdtemp(prefix="rtc-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()

    def no_new_children() -> bool:
        now = {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()}
        return not (now - children_before)

    wait_for(no_new_children, 60, "Ray processes started by this module to exit")


@pytest.fixture
def namespace(ray_local: object) -> Iterator[str]:
    import tensorcast_ray as tc

    ns = f"t-{uuid.uuid4().hex[:10]}"
    yield ns
    tc.shutdown()
    stop_namespace(ns)
    left = leftovers(ns)
    for path in left:
        os.unlink(path)
    assert not left, f"test leaked shared memory or sockets: {left}"
