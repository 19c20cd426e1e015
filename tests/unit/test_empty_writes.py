"""An artifact holds at least one tensor: an empty put or register is INVALID_ARGUMENT, in the
SDK before any request, and in the daemon for a client that sends one anyway. No Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tensorcast_ray.daemon.local_store import LocalStore
from tensorcast_ray.daemon.metrics import DaemonMetrics

import tensorcast_ray as tc
from tensorcast_ray._config import DaemonConfig
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2


@pytest.mark.parametrize("verb", [tc.put, tc.register, tc.store().put, tc.store().register])
def test_the_sdk_refuses_an_empty_mapping_before_asking_anyone(verb: object) -> None:
    # No tc.init() in this process: the argument is checked first.
    with pytest.raises(tc.InvalidArgumentError, match="no tensors") as err:
        verb({}, "empty:v1")  # type: ignore[operator]
    assert not err.value.retryable


def test_the_daemon_refuses_a_write_of_no_tensors(tmp_path: Path) -> None:
    prefix = "tcr-unittest-000000000000-"
    config = DaemonConfig(shm_dir=str(tmp_path), shm_pool_bytes=0, client_staging_bytes=0)
    store = LocalStore(config, prefix=prefix, metrics=DaemonMetrics())
    try:
        store.bind_session_pid("s1", os.getpid(), store.hostname, pid_verified=True)
        for kind in (daemon_pb2.WRITE_KIND_PUT, daemon_pb2.WRITE_KIND_REGISTER):
            request = daemon_pb2.BeginWriteRequest(key="e:v1", kind=kind, session_id="s1")
            with pytest.raises(tc.InvalidArgumentError, match="no tensors"):
                store.rpc_BeginWrite(request, "")
        with pytest.raises(tc.InvalidArgumentError, match="no tensors"):
            store.rpc_RegisterBuffers(
                daemon_pb2.RegisterBuffersRequest(key="e:v1", session_id="s1"), ""
            )
        assert store.stats()["artifacts"] == 0
    finally:
        store.close(unlink=True)
