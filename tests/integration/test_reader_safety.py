"""Reads by real use against a real daemon: targets that must be refused, cached reads that
count as use, readers that let go of deleted memory, and buffers frozen by register.

Writes into read-only zero-copy tensors would kill the process, so they run in a child
interpreter (a crash there fails the test instead of killing pytest).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import pytest
import torch

import tensorcast_ray as tc
from tests.helpers import python_child

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
