"""Fallbacks to slower paths are counted and logged with tc.store.* fields; staging works."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import tensorcast_ray as tc
from tensorcast_ray import _bootstrap
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(180)


def fallbacks(reason: str) -> float:
    from tensorcast_ray._metrics import get_sdk_metrics

    value = get_sdk_metrics().sample("tc_store_region_backed_fallback_total", {"reason": reason})
    return value or 0.0


def records(caplog: pytest.LogCaptureFixture, mode: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "tc.store.mode", None) == mode]


def test_register_copy_fallback_is_logged_and_counted(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    caplog.set_level(logging.INFO, logger="tensorcast_ray.store")
    before = fallbacks("not_shared_memory")
    tc.register({"w": torch.ones(8)}, key="copy:v1")
    assert fallbacks("not_shared_memory") == before + 1
    (record,) = records(caplog, "copy")
    assert getattr(record, "tc.store.key") == "copy:v1"
    assert hasattr(record, "tc.store.artifact_id")
    # A tc.empty buffer is zero-copy: no fallback.
    buf = tc.empty((8,), torch.float32)
    tc.register({"w": buf}, key="copy:v2")
    assert fallbacks("not_shared_memory") == before + 1


def test_first_put_is_unstaged_later_puts_use_staged_segments(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    caplog.set_level(logging.INFO, logger="tensorcast_ray.store")
    tiny_before = fallbacks("staging_empty")
    tc.put({"t": torch.zeros(4)}, key="tiny:v1")  # too small to stage: not a fallback
    assert fallbacks("staging_empty") == tiny_before and not records(caplog, "unstaged")
    assert _bootstrap.current().stager.target == 0  # type: ignore[union-attr]
    data = {"w": torch.arange(1 << 20, dtype=torch.float32)}  # 4 MiB: one pooled segment
    tc.put(data, key="staged:v1")
    assert records(caplog, "unstaged"), "the first put of a process has nothing staged yet"
    stager = _bootstrap.current().stager
    assert stager is not None and stager.target == 1 and stager.wait_ready(timeout=60)
    caplog.clear()
    before = fallbacks("staging_empty")
    tc.put(data, key="staged:v2")
    assert fallbacks("staging_empty") == before, "the second put must use a staged segment"
    assert torch.equal(tc.get("staged:v2")["w"], data["w"])
    assert torch.equal(tc.get("staged:v1")["w"], data["w"])
    # The staged segment is a whole pooled segment (16 MiB in tests); the daemon trims it to
    # the 4 MiB the artifact uses, so memory and capacity accounting agree.
    info = tc.artifact("staged:v2")._entry.info
    (segment,) = info.segments
    assert segment.size == 4 << 20
    path = os.path.join(info.shm_dir, segment.name)
    wait_for(lambda: os.path.getsize(path) == 4 << 20, 30, "the staged segment to be trimmed")
    assert torch.equal(tc.get("staged:v2")["w"], data["w"])


def test_a_copy_failing_mid_put_aborts_the_write(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorcast_ray import _write

    tc.init(namespace=namespace, global_store_mode="none")
    written: list[str] = []
    real_map = _write._map_for_write

    def recording_map(started, staged, stager):  # type: ignore[no-untyped-def]
        written.extend(os.path.join(started.shm_dir, seg.name) for seg in started.segments)
        return real_map(started, staged, stager)

    def broken_copy(*args: object) -> None:
        raise RuntimeError("simulated failure while copying")

    monkeypatch.setattr(_write, "_map_for_write", recording_map)
    monkeypatch.setattr(_write, "copy_tensors", broken_copy)
    with pytest.raises(tc.ArtifactError) as err:
        tc.put({"w": torch.ones(1 << 20)}, key="broken:v1")
    assert written, "the failure must happen after BeginWrite, during the copy"
    assert err.value.status_code.name == "INTERNAL"
    monkeypatch.undo()
    assert not tc.exists("broken:v1")
    assert not [p for p in written if os.path.exists(p)], "aborted segments must be unlinked"
    tc.put({"w": torch.ones(4)}, key="broken:v1")  # the version is free again
    assert torch.equal(tc.get("broken:v1")["w"], torch.ones(4))


@pytest.mark.parametrize("transient", ["DeadlineExceededError", "AbortedError"])
def test_a_retried_error_on_a_live_connection_keeps_the_session(
    namespace: str, monkeypatch: pytest.MonkeyPatch, transient: str
) -> None:
    """A retry reconnects only when the session is gone: ending a live one would end this
    process's register leases and tc.empty buffers behind its back."""
    from tensorcast_ray import _errors

    tc.init(namespace=namespace, global_store_mode="none")
    buf = tc.empty((16,), torch.float32)
    buf.fill_(3.0)
    tc.register({"w": buf}, key="lease:v1")
    tc.register({"w": torch.ones(4)}, key="copied:v1")
    client = _bootstrap.current().client
    real_call = client.call
    failures = iter([getattr(_errors, transient)(f"{transient} (injected)", None, True)])

    def flaky(method: str, request: object, timeout: float | None = None) -> object:
        if method == "Exists":
            err = next(failures, None)
            if err is not None:
                raise err
        return real_call(method, request, timeout)

    monkeypatch.setattr(client, "call", flaky)
    assert tc.exists("lease:v1"), "the retry succeeds"
    assert next(failures, None) is None, "the injected error was raised and retried"
    monkeypatch.undo()
    assert not client.connection_lost()
    assert _bootstrap.current().client is client
    # Both leases are still there: the session was never closed.
    assert torch.equal(tc.get("lease:v1")["w"], torch.full((16,), 3.0))
    assert torch.equal(tc.get("copied:v1")["w"], torch.ones(4))
    assert sorted(tc.list_keys()) == ["copied:v1", "lease:v1"]


@pytest.mark.parametrize("lost_reply", ["BeginWrite", "CommitWrite"])
def test_a_put_whose_reply_is_lost_succeeds_once(
    namespace: str, monkeypatch: pytest.MonkeyPatch, lost_reply: str
) -> None:
    """The daemon did the work but the reply never came back: the retry must neither fail
    with ALREADY_EXISTS (commit) nor leave the unheard write holding the key (begin)."""
    from tensorcast_ray._errors import DeadlineExceededError

    tc.init(namespace=namespace, global_store_mode="none")
    client = _bootstrap.current().client
    real_call = client.call
    lost: list[str] = []

    def lossy(method: str, request: object, timeout: float | None = None) -> object:
        response = real_call(method, request, timeout)
        if method == lost_reply and not lost:
            lost.append(method)
            raise DeadlineExceededError(f"{method} reply lost (injected)", None, True)
        return response

    monkeypatch.setattr(client, "call", lossy)
    data = {"w": torch.arange(1024, dtype=torch.float32)}
    result = tc.put(data, key="lossy:v1")
    monkeypatch.undo()
    assert lost == [lost_reply]
    assert result.key == "lossy:v1" and result.status == "ready"
    assert tc.artifact("lossy:v1").artifact_id == result.artifact_id
    assert torch.equal(tc.get("lossy:v1")["w"], data["w"])
    assert tc.list_keys() == ["lossy:v1"]
    assert tc.delete("lossy:v1") and not tc.exists("lossy:v1")
