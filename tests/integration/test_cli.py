"""The ``tensorcast-ray`` console script, run as a subprocess against this module's Ray.

Each invocation joins the fixture's cluster by address (``--address``) as its own driver,
so these tests see exactly what an operator sees: exit codes, stdout, stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tensorcast_ray as tc
from tensorcast_ray import _actors
from tests.helpers import named_actors

pytestmark = pytest.mark.timeout(300)

_SCRIPT = Path(sys.executable).with_name("tensorcast-ray")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tensorcast_ray.cli"]


def run_cli(
    *args: str, address: str | None, namespace: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    prefix = ["--address", address] if address else []
    return subprocess.run(
        [*COMMAND, *prefix, "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    return result


def test_global_and_daemon_lifecycle(namespace: str) -> None:
    import ray
    import torch

    address = ray.get_runtime_context().gcs_address

    def cli(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        """Run independent invocations side by side (each one pays for joining Ray)."""
        with ThreadPoolExecutor(len(commands)) as pool:
            futures = [
                pool.submit(run_cli, *c, address=address, namespace=namespace) for c in commands
            ]
            return [f.result() for f in futures]

    [started] = cli(("global", "start"))
    assert ok(started).stdout.startswith("Global Store: 127.0.0.1:")
    again, daemon = cli(("global", "start"), ("daemon", "start"))
    assert again.returncode == 1
    assert f"error: a Global Store already runs in namespace {namespace!r}" in again.stderr
    assert ok(daemon).stdout.startswith("daemon on node ")
    assert "(metrics 127.0.0.1:" in daemon.stdout

    # A client of the CLI-started daemon, with one artifact, shows up in its status.
    ctx = tc.init(mode="connect", namespace=namespace)
    tc.put({"w": torch.zeros(256)}, key="cli:v1")  # 1 KiB
    gs_json, daemon_json, table_out = cli(
        ("global", "status", "--json"), ("daemon", "status", "--json"), ("daemon", "status")
    )
    gs = json.loads(ok(gs_json).stdout)
    assert gs["namespace"] == namespace and gs["version"] == tc.__version__
    assert gs["address"].startswith("127.0.0.1:") and gs["metrics_address"].startswith("127.0.0.1:")
    assert isinstance(gs["uptime_s"], (int, float)) and gs["uptime_s"] >= 0
    assert [d["node_id"] for d in gs["daemons"]] == [ctx.node_id]

    statuses = json.loads(ok(daemon_json).stdout)
    assert isinstance(statuses, list) and len(statuses) == 1
    status = statuses[0]
    expected = {"node_id", "version", "address", "metrics_address", "uptime_s", "clients"}
    expected |= {"artifacts", "bytes", "leases", "tiers", "build"}
    assert expected <= set(status), sorted(expected - set(status))
    assert status["node_id"] == ctx.node_id and status["address"] == ctx.daemon_address
    assert status["version"] == tc.__version__ and tc.__version__ in status["build"]
    for key in ("clients", "artifacts", "bytes", "leases"):
        assert type(status[key]) is int, (key, status[key])  # JSON numbers, not strings
    assert status["clients"] == 1 and status["artifacts"] == 1 and status["bytes"] == 1024
    assert isinstance(status["uptime_s"], float)
    [tier] = status["tiers"]
    assert tier["tier"] == "stable_dram" and tier["used_bytes"] >= 1024
    assert type(tier["capacity_bytes"]) is int and tier["capacity_bytes"] == 2 * 1024**3

    table = ok(table_out).stdout.splitlines()
    assert table[0].split() == [
        "NODE_ID",
        "ADDRESS",
        "VERSION",
        "UPTIME_S",
        "CLIENTS",
        "ARTIFACTS",
        "BYTES",
        "LEASES",
        "TIER",
    ]
    row = table[1].split()
    assert row[0] == ctx.node_id[:12] and row[1] == ctx.daemon_address
    assert row[4:7] == ["1", "1", "1.0KiB"]
    assert table[-1].startswith("build: tensorcast_ray ")
    tc.shutdown()

    [stopped] = cli(("daemon", "stop"))
    assert ok(stopped).stdout.strip() == f"stopped daemon on node {ctx.node_id}"
    assert named_actors(namespace) == [_actors.GLOBAL_STORE_NAME]
    gone, gs_stopped = cli(("daemon", "status"), ("global", "stop"))
    assert gone.returncode == 1
    assert gone.stderr.strip().endswith(f"no tensorcast daemon in namespace {namespace!r}")
    assert gone.stdout.strip() == ""
    assert ok(gs_stopped).stdout.strip() == "stopped the Global Store"
    assert named_actors(namespace) == []


def test_no_ray_reachable_exits_3_with_a_message(namespace: str) -> None:
    result = run_cli("daemon", "status", address="127.0.0.1:1", namespace=namespace, timeout=15)
    assert result.returncode == 3
    assert "error: no Ray cluster reachable at '127.0.0.1:1'" in result.stderr
    assert "--address" in result.stderr
