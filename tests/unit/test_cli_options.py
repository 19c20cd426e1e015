"""``--address`` / ``--namespace`` are accepted before the command group, after it, and after
the command; the one given last wins. No Ray: the Ray connection is stood in for."""

from __future__ import annotations

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
