"""The public surface: ``__all__``, import weight, name guards, docs and generated code."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tensorcast_ray as tc

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


# ---- __all__ ----------------------------------------------------------------------------------
def test_all_is_sorted_and_unique() -> None:
    # Plain (case-sensitive, code point) order: classes, then dunders, then functions.
    assert tc.__all__ == sorted(tc.__all__)
    assert len(set(tc.__all__)) == len(tc.__all__)


def test_all_is_complete_and_exists() -> None:
    missing = [name for name in tc.__all__ if not hasattr(tc, name)]
    assert not missing, f"listed in __all__ but not defined: {missing}"
    public = {
        name
        for name, value in vars(tc).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    unlisted = sorted(public - set(tc.__all__))
    assert not unlisted, f"public names not in __all__: {unlisted}"


def test_documented_verbs_are_exported() -> None:
    verbs = {
        "init",
        "shutdown",
        "put",
        "register",
        "empty",
        "empty_like",
        "artifact",
        "get",
        "get_into",
        "exists",
        "delete",
        "list_keys",
        "store",
    }
    assert verbs <= set(tc.__all__)
    assert all(callable(getattr(tc, v)) for v in verbs)
    assert issubclass(tc.NotFoundError, tc.ArtifactError)


# ---- import weight and name guards ------------------------------------------------------------
def test_import_loads_neither_torch_nor_ray() -> None:
    proc = run_python(
        "import sys, tensorcast_ray\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(filter(None, proc.stdout.strip().split(",")))
    assert "torch" not in loaded and "ray" not in loaded, loaded


def test_daemon_package_does_not_import_torch() -> None:
    proc = run_python(
        "import sys, tensorcast_ray.daemon, tensorcast_ray.daemon.local_store\n"
        "print('torch' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("bare", ["daemon", "global_store"])
def test_bare_folder_import_is_refused(bare: str) -> None:
    proc = run_python(
        f"try:\n    import {bare}\n"
        "except ImportError as exc:\n    print('refused', type(exc).__name__, exc)\n"
        "else:\n    print('imported')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused"), proc.stdout
    assert f"tensorcast_ray.{bare}" in proc.stdout


# ---- docs match the code ----------------------------------------------------------------------
@pytest.mark.parametrize("model", [tc.DaemonConfig, tc.GlobalStoreConfig])
def test_configuration_doc_lists_every_field(model: type) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    fields = list(model.model_fields)  # type: ignore[attr-defined]
    assert fields
    missing = [f for f in fields if f"`{f}`" not in text]
    assert not missing, f"docs/configuration.md does not mention {model.__name__}: {missing}"


def _cli_commands() -> list[tuple[str, object]]:
    import click

    from tensorcast_ray.cli import cli

    found: list[tuple[str, object]] = []

    def walk(group: click.Group, path: str) -> None:
        for name, cmd in group.commands.items():
            full = f"{path} {name}".strip()
            if isinstance(cmd, click.Group):
                walk(cmd, full)
            else:
                found.append((full, cmd))

    walk(cli, "")
    return found


def test_cli_doc_lists_every_command_and_option() -> None:
    import click

    text = (ROOT / "docs" / "cli.md").read_text()
    commands = _cli_commands()
    assert {c for c, _ in commands} >= {"daemon start", "daemon stop", "global start"}
    missing = [c for c, _ in commands if f"`tensorcast-ray {c}`" not in text]
    assert not missing, f"docs/cli.md does not list: {missing}"
    flags = [
        (c, opt)
        for c, cmd in commands
        for param in cmd.params  # type: ignore[attr-defined]
        if isinstance(param, click.Option)
        for opt in param.opts
        if opt.startswith("--") and opt != "--help"
    ]
    undocumented = [(c, o) for c, o in flags if not re.search(re.escape(o) + r"\b", text)]
    assert not undocumented, f"docs/cli.md does not mention options: {undocumented}"


# ---- generated protobuf code ------------------------------------------------------------------
def test_generated_proto_code_is_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
