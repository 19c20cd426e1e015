"""Careless inputs that reach the storage or a callback: an ArtifactError with its code,
never INTERNAL ("this is a bug") or a plain Python exception. Against a real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import tensorcast_ray as tc

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def driver(namespace: str) -> Iterator[str]:
    tc.init(namespace=namespace, global_store_mode="none")
    tc.put({"w": torch.arange(8.0)}, key="bad:v1")
    yield namespace


def test_export_to_a_file_path_is_failed_precondition(driver: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(tc.FailedPreconditionError) as err:
        tc.export("bad:v1", str(tmp_path / "file"))
    assert err.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert "directory" in str(err.value)


def test_a_raising_progress_callback_cancels_the_verb(driver: str, tmp_path: Path) -> None:
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        raise RuntimeError("stop here")

    exported = tc.export("bad:v1", str(tmp_path / "ok"))
    runs = {
        "export": lambda: tc.export("bad:v1", str(tmp_path / "out"), progress=progress),
        "import": lambda: tc.import_checkpoint(exported, "bad:v2", progress=progress),
    }
    for verb, run in runs.items():
        with pytest.raises(tc.ArtifactError) as err:
            run()
        assert err.value.status_code == grpc.StatusCode.CANCELLED, verb
        assert "progress callback raised RuntimeError: stop here" in str(err.value)
        assert isinstance(err.value.__cause__, RuntimeError)
    assert len(calls) == 2, "called once per verb: a raising callback is not retried"
    assert not tc.exists("bad:v2")


def test_s3_without_credentials_is_unauthenticated(
    driver: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {k: v for k, v in s3_options.items() if k not in ("key", "secret")}
    for run in (
        lambda: tc.export("bad:v1", "s3://no-creds/store", storage_options=options),
        lambda: tc.import_checkpoint("s3://no-creds/ckpt", "bad:v3", storage_options=options),
    ):
        with pytest.raises(tc.ArtifactError) as err:
            run()
        assert err.value.status_code == grpc.StatusCode.UNAUTHENTICATED
        assert "storage_options" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)
