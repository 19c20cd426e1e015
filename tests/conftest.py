"""Shared fixtures. Ray settings from ../shared/RAY_NOTES.md are applied before Ray loads.

- ``ray_local`` (module scope): one local Ray instance per test module.
- ``namespace`` (function scope): a fresh tensorcast namespace; afterwards every named
  actor in it is stopped, and the test FAILS if any actor, guardian process, shared-memory
  segment or socket it created was left behind.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import guardians, leftovers, stop_namespace, wait_for

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
    wait_for(lambda: not guardians(ns), 30, f"the guardians of {ns} to exit")
    left = leftovers(ns)
    for path in left:
        os.unlink(path)
    assert not left, f"test leaked shared memory or sockets: {left}"


# ---- S3: a real S3-protocol server (moto) on loopback, for the S3 path of the disk layer.
@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict[str, Any]]:
    """fsspec ``storage_options`` of a moto server started for this module (skips without
    moto[server] / s3fs, the ``s3`` extra)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {
            "endpoint_url": f"http://{host}:{port}",
            "key": "test",
            "secret": "test",
            "client_kwargs": {"region_name": "us-east-1"},
        }
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_options: dict[str, Any]) -> str:
    """A fresh bucket on the module's moto server."""
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")
    name = f"tc-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_options["endpoint_url"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)  # us-east-1: no location constraint
    return name
