"""``--address`` / ``--namespace`` are accepted before the command group, after it, and after
the command; the one given last wins. ``persist status``: its usage errors, its text and exit
codes. No Ray: the Ray connection (and the daemon) is stood in for."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner

from tensorcast_ray import cli


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str]]:
    """Every Ray connection the CLI would open, as (address, namespace); no daemons found."""
    seen: list[tuple[str | None, str]] = []

    @contextmanager
    def ray(self: cli.Ctx) -> Iterator[Any]:
        seen.append((self.address, self.namespace))
        yield None

    monkeypatch.setattr(cli.Ctx, "ray", ray)
    monkeypatch.setattr(cli, "_daemon_statuses", lambda ray, namespace, all_nodes: [])
    monkeypatch.setattr(cli, "_this_node", lambda ray: "n" * 56)
    monkeypatch.setattr(cli._actors, "get_actor", lambda name, namespace: None)
    monkeypatch.delenv("TENSORCAST_RAY_NAMESPACE", raising=False)
    return seen


@pytest.mark.parametrize(
    "args",
    [
        ["--address", "10.0.0.1:6379", "--namespace", "prod", "daemon", "status"],
        ["daemon", "--namespace", "prod", "--address", "10.0.0.1:6379", "status"],
        ["daemon", "status", "--namespace", "prod", "--address", "10.0.0.1:6379"],
        [
            "--namespace",
            "dev",
            "daemon",
            "status",
            "--address",
            "10.0.0.1:6379",
            "--namespace",
            "prod",
        ],
    ],
    ids=["before", "after the group", "after the command", "last wins"],
)
def test_connection_options_anywhere(no_ray: list[tuple[str | None, str]], args: list[str]) -> None:
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == cli.EXIT_FAILED, result.output
    assert "no tensorcast daemon in namespace 'prod'" in result.output
    assert no_ray == [("10.0.0.1:6379", "prod")]


@pytest.mark.parametrize(
    "args",
    [
        ["daemon", "stop", "--namespace", "prod"],
        ["global", "status", "--namespace", "prod"],
        ["global", "stop", "--namespace", "prod"],
    ],
)
def test_every_ray_command_takes_them(
    no_ray: list[tuple[str | None, str]], args: list[str]
) -> None:
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == cli.EXIT_FAILED, result.output
    assert "namespace 'prod'" in result.output
    assert no_ray == [(None, "prod")]


def test_default_namespace_without_the_option(no_ray: list[tuple[str | None, str]]) -> None:
    CliRunner().invoke(cli.cli, ["daemon", "status"])
    assert no_ray == [(None, cli._actors.DEFAULT_NAMESPACE)]


def test_an_unreachable_address_after_the_command_is_used() -> None:
    result = CliRunner().invoke(cli.cli, ["daemon", "status", "--address", "127.0.0.1:1"])
    assert result.exit_code == cli.EXIT_NO_RAY
    assert "no Ray cluster reachable at '127.0.0.1:1'" in result.output


# ---- persist status: usage, rendering and exit codes, with the daemon stood in for ----------
def _status(state: str, **fields: Any) -> Any:
    from tensorcast_ray._persistence import PersistenceStatus, ShardStatus

    shard = ShardStatus(
        index=0,
        tier="shared_disk",
        target="file:///root/m@v1-x/shard-00000-of-00001.safetensors",
        state="success" if state == "success" else "failed",
        progress=1.0 if state == "success" else 0.5,
        done_bytes=2048 if state == "success" else 1024,
        total_bytes=2048,
        attempts=1 if state == "success" else 3,
        error="" if state == "success" else "disk full",
    )
    base: dict[str, Any] = {
        "task_id": "pt-abc",
        "key": "m:v1",
        "artifact_id": "abc",
        "state": state,
        "progress": shard.progress,
        "degraded_reason": "",
        "last_error": "" if state == "success" else "disk full",
        "last_error_code": "" if state == "success" else "RESOURCE_EXHAUSTED",
        "durable": state == "success",
        "nbytes": 2048,
        "node_id": "n" * 56,
        "created_unix_ms": 0,
        "started_unix_ms": 0,
        "finished_unix_ms": 0,
        "shards": (shard,),
    }
    base.update(fields)
    return PersistenceStatus(**base)


@pytest.fixture
def daemon_says(no_ray: list[tuple[str | None, str]], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``persist status`` against a stand-in store; append the status it should answer."""
    answers: list[Any] = []
    asked: list[tuple[str | None, str | None]] = []

    class FakeStore:
        def persistence_status(self, task_id: str | None = None, *, key: str | None = None) -> Any:
            asked.append((task_id, key))
            return answers[-1]

    class FakeTc:
        @staticmethod
        def store() -> FakeStore:
            return FakeStore()

    @contextmanager
    def client(obj: cli.Ctx) -> Iterator[Any]:
        with obj.ray():
            yield FakeTc

    monkeypatch.setattr(cli, "_client", client)
    answers.append(asked)  # index 0: what was asked (answers[-1] is the status)
    return answers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["persist", "status"], "pass KEY or --task ID (exactly one)"),
        (["persist", "status", "m:v1", "--task", "pt-x"], "pass KEY or --task ID (exactly one)"),
        (["persist", "status", "m:v1", "--timeout", "5"], "--timeout goes with --wait"),
        (["persist", "status", "m:v1", "--wait", "--timeout", "-1"], "seconds >= 0"),
    ],
)
def test_persist_status_usage(
    no_ray: list[tuple[str | None, str]], args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert no_ray == []  # refused before joining Ray


def test_persist_status_text_and_namespace(
    daemon_says: list[Any], no_ray: list[tuple[str | None, str]]
) -> None:
    daemon_says.append(_status("success"))
    result = CliRunner().invoke(cli.cli, ["persist", "status", "m:v1", "--namespace", "prod"])
    assert result.exit_code == 0, result.output
    assert no_ray == [(None, "prod")] and daemon_says[0] == [(None, "m:v1")]
    lines = result.output.splitlines()
    assert "state        success" in lines and "durable      yes" in lines
    assert "progress     100% (2.0KiB of 2.0KiB)" in lines
    [row] = [line.split() for line in lines if line.startswith("  0 ")]
    assert row[:6] == ["0", "shared_disk", "success", "100%", "1", "2.0KiB"]


def test_persist_status_of_a_failed_task_exits_1_with_its_error(daemon_says: list[Any]) -> None:
    daemon_says.append(_status("failed"))
    result = CliRunner().invoke(cli.cli, ["persist", "status", "--task", "pt-abc", "--json"])
    assert result.exit_code == cli.EXIT_FAILED
    assert daemon_says[0] == [("pt-abc", None)]
    out, _, err = result.output.rpartition("}")

    assert json.loads(out + "}")["state"] == "failed"
    assert (
        err.strip() == "error: [RESOURCE_EXHAUSTED] persistence of m:v1 (pt-abc) failed: disk full"
    )


def test_persist_status_degraded_but_durable_exits_0(daemon_says: list[Any]) -> None:
    daemon_says.append(
        _status(
            "degraded",
            durable=True,
            last_error="",
            last_error_code="",
            degraded_reason="no cluster",
        )
    )
    result = CliRunner().invoke(cli.cli, ["persist", "status", "m:v1"])
    assert result.exit_code == 0, result.output
    assert "degraded     no cluster" in result.output.splitlines()
