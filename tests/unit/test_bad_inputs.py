"""Hostile and careless inputs refused in the caller's process, before any request: each is
an ArtifactError with its code, never INTERNAL, a plain Python exception or a silent bend.
No Ray: every check here runs before the SDK needs a daemon."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from click.testing import CliRunner

import tensorcast_ray as tc
from tensorcast_ray import cli
from tensorcast_ray._catalog import parse_key
from tensorcast_ray._disk import scan_checkpoint
from tensorcast_ray._error_mapping import map_exception

INVALID = grpc.StatusCode.INVALID_ARGUMENT
ONES = {"w": torch.ones(2)}

CASES: list[tuple[str, Callable[[], Any], grpc.StatusCode, str]] = [
    ("put: NUL in a tensor name", lambda: tc.put({"a\0b": torch.ones(1)}, "k:v1"), INVALID, "NUL"),
    (
        "put: a 100k-character name",
        lambda: tc.put({"a" * 100_000: torch.ones(1)}, "k:v1"),
        INVALID,
        "limit",
    ),
    (
        "put: a nested tensor",
        lambda: tc.put({"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, "k:v1"),
        INVALID,
        "nested",
    ),
    ("put: version LATEST", lambda: tc.put(ONES, "a:LATEST"), INVALID, "latest"),
    ("put: version Latest", lambda: tc.put(ONES, "a:Latest"), INVALID, "latest"),
    ("put: spaces around the key", lambda: tc.put(ONES, " a:v1 "), INVALID, "spaces"),
    ("put: a space before the version", lambda: tc.put(ONES, "a: v1"), INVALID, "spaces"),
    ("artifact(artifact_id=123)", lambda: tc.artifact(artifact_id=123), INVALID, "artifact_id"),  # type: ignore[arg-type]
    (
        "register: ttl_ms = 2**63",
        lambda: tc.register(ONES, "k:v1", ttl_ms=2**63),
        INVALID,
        "ttl_ms",
    ),
    ("empty('abc')", lambda: tc.empty("abc"), INVALID, "sequence of ints"),  # type: ignore[arg-type]
    ("empty((1.5,))", lambda: tc.empty((1.5,)), INVALID, "not an int"),  # type: ignore[arg-type]
    ("empty((True,))", lambda: tc.empty((True,)), INVALID, "bool"),
    ("empty((2**62, 2**62))", lambda: tc.empty((2**62, 2**62)), INVALID, "smaller"),
    ("export to a path with NUL", lambda: tc.export("k:v1", "/tmp/a\0b"), INVALID, "NUL"),
    (
        "import from a path with NUL",
        lambda: tc.import_checkpoint("/tmp/a\0b", "k:v1"),
        INVALID,
        "NUL",
    ),
]


@pytest.mark.parametrize(("fn", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_refused_with_its_code(fn: Callable[[], Any], code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(tc.ArtifactError) as err:
        fn()
    assert err.value.status_code == code
    assert words.lower() in str(err.value).lower()


def test_latest_is_still_read_and_other_versions_still_written() -> None:
    assert parse_key("a:latest") == ("a", "latest")
    assert parse_key("a:LATEST") == ("a", "LATEST"), "a read of it is a plain NOT_FOUND"
    assert parse_key("my model:v1", for_write=True) == ("my model", "v1")
    assert tuple(torch.Size([2, 3])) == (2, 3)
    assert tc.empty(0).shape == (0,) and tc.empty(torch.Size([0, 4])).shape == (0, 4)


@pytest.mark.parametrize("entry", [".", "..", ""])
def test_an_index_naming_the_directory_is_data_loss(tmp_path: Path, entry: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": entry}}))
    with pytest.raises(tc.DataLossError) as err:
        scan_checkpoint(str(tmp_path))
    assert "not a valid index" in str(err.value)


def test_a_file_where_a_directory_belongs_is_failed_precondition(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    try:
        open(tmp_path / "file" / "inner")
    except OSError as exc:
        mapped = map_exception(exc, context="export")
    assert mapped.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert "pass a directory" in str(mapped)


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "-inf"])
def test_gc_refuses_a_min_age_that_is_no_duration(value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.cli, ["gc", "--shm-dir", str(tmp_path), "--min-age", value])
    assert result.exit_code == 2, result.output
    assert "--min-age" in result.output and "seconds >= 0" in result.output


def test_gc_takes_a_min_age_of_zero(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.cli, ["gc", "--shm-dir", str(tmp_path), "--min-age", "0"])
    assert result.exit_code == 0, result.output
