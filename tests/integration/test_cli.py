"""The ``tensorcast-ray`` console script, run as a subprocess against this module's Ray.

Each invocation joins the fixture's cluster by address (``--address``) as its own driver,
so these tests see exactly what an operator sees: exit codes, stdout, stderr. Persistence:
``persist status`` (text, ``--json``, ``--wait`` to success and to a failed task) against a
daemon whose config sets ``persist_url`` (a file root in tmp_path), and the durability that
``ls`` / ``inspect`` show.
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

REPO = Path(__file__).resolve().parents[2]
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


# ---- persistence: persist status, and durability in ls / inspect ----------------------------
def _persist_config(tmp_path: Path, **fields: object) -> str:
    import yaml

    data = yaml.safe_load((REPO / "tests" / "config" / "daemon.yaml").read_text())
    data.update(fields)
    path = tmp_path / "daemon-persist.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_persist_status_wait_json_and_durability_in_ls_inspect(
    namespace: str, tmp_path: Path
) -> None:
    import ray
    import torch

    address = ray.get_runtime_context().gcs_address
    root = f"file://{tmp_path}/persist"
    tc.init(
        namespace=namespace,
        global_store_mode="start",
        daemon_config_path=_persist_config(tmp_path, persist_url=root),
    )
    ts = {f"layer.{i}.w": torch.full((4096,), float(i)) for i in range(40)}  # 640 KiB
    put = tc.put(ts, "p:v1", policy=tc.StorePolicy(profile="durable"))
    tc.put({"w": torch.zeros(16)}, "c:v1")  # memory only: no task
    assert put.persistence_task_id

    waited = ok(
        run_cli(
            "persist", "status", "p:v1", "--wait", "--timeout", "60",
            address=address, namespace=namespace,
        )
    )  # fmt: skip
    lines = waited.stdout.splitlines()
    assert f"task         {put.persistence_task_id}" in lines
    assert "state        success" in lines and "durable      yes" in lines
    assert "progress     100% (640.0KiB of 640.0KiB)" in lines
    assert "shards       1" in lines
    header = next(line for line in lines if line.lstrip().startswith("INDEX"))
    assert header.split() == ["INDEX", "TIER", "STATE", "PROGRESS", "ATTEMPTS", "SIZE", "TARGET"]
    [row] = [line.split() for line in lines if line.startswith("  0 ")]
    assert row[:6] == ["0", "shared_disk", "success", "100%", "1", "640.0KiB"]
    assert row[6].startswith(root)
    assert row[6].endswith(".safetensors")
    assert "persist p:v1" in waited.stderr  # the progress bar, on stderr

    def cli(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(len(commands)) as pool:
            futures = [
                pool.submit(run_cli, *c, address=address, namespace=namespace) for c in commands
            ]
            return [f.result() for f in futures]

    by_task, as_json, ls_text, ls_json, inspected, inspected_json, cache_json = cli(
        ("persist", "status", "--task", put.persistence_task_id),
        ("persist", "status", "p:latest", "--json"),
        ("ls",),
        ("ls", "--json"),
        ("inspect", "p:v1"),
        ("inspect", "p:v1", "--json"),
        ("inspect", "c:v1", "--json"),
    )
    assert "state        success" in ok(by_task).stdout.splitlines()
    status = json.loads(ok(as_json).stdout)
    assert status == json.loads(json.dumps(tc.persistence_status(key="p:v1").to_dict()))
    assert (status["state"], status["durable"], status["progress"]) == ("success", True, 1.0)
    assert status["key"] == "p:v1" and status["artifact_id"] == put.artifact_id
    assert [s["state"] for s in status["shards"]] == ["success"]

    header, *rows = ok(ls_text).stdout.splitlines()
    assert header.split() == ["KEY", "SIZE", "TENSORS", "DURABLE", "NODES"]
    assert [r.split()[:4] for r in rows] == [
        ["c:v1", "64B", "1", "no"],
        ["p:v1", "640.0KiB", "40", "yes"],
    ]
    entries = {e["key"]: e for e in json.loads(ok(ls_json).stdout)}
    assert entries["p:v1"]["durable"] is True and entries["c:v1"]["durable"] is False
    assert entries["p:v1"]["persist_task_id"] == put.persistence_task_id

    text = ok(inspected).stdout.splitlines()
    assert "durable      yes" in text
    assert f"persistence  success (task {put.persistence_task_id})" in text
    report = json.loads(ok(inspected_json).stdout)
    assert report["durable"] is True and report["persistence_state"] == "success"
    assert report["persistence_task_id"] == put.persistence_task_id
    assert report["persistence_error"] is None
    cache = json.loads(ok(cache_json).stdout)
    assert cache["durable"] is False and cache["persistence_task_id"] is None

    # Errors: a key without a task, a key that does not exist, bad usage.
    no_task, unknown, neither, both = cli(
        ("persist", "status", "c:v1"),
        ("persist", "status", "nope:v1", "--wait"),
        ("persist", "status"),
        ("persist", "status", "p:v1", "--task", "pt-x"),
    )
    for result in (no_task, unknown):
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.strip().splitlines()[-1].startswith("error: [NOT_FOUND] ")
    assert "no persistence task" in no_task.stderr
    assert "nope:v1" in unknown.stderr
    for result in (neither, both):
        assert result.returncode == 2 and "pass KEY or --task ID (exactly one)" in result.stderr


def test_persist_status_wait_reports_a_failed_task(namespace: str, tmp_path: Path) -> None:
    import ray
    import torch

    address = ray.get_runtime_context().gcs_address
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    tc.init(
        namespace=namespace,
        global_store_mode="none",
        daemon_config_path=_persist_config(
            tmp_path, persist_url=f"file://{blocker}/persist", persist_attempts=1
        ),
    )
    put = tc.put({"w": torch.ones(64)}, "f:v1", policy=tc.StorePolicy(profile="durable"))
    failed = run_cli(
        "persist", "status", "--task", str(put.persistence_task_id), "--wait", "--json",
        address=address, namespace=namespace,
    )  # fmt: skip
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    status = json.loads(failed.stdout)  # the final status still comes out
    assert status["state"] == "failed" and status["durable"] is False and status["last_error"]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [{status['last_error_code']}] persistence of f:v1 ")
