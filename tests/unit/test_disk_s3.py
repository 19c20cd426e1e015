"""Disk format on a real S3-compatible server (moto) on loopback: round trip, ranges, commit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tensorcast_ray._disk import (  # noqa: E402
    TensorSource,
    delete_artifact,
    list_artifacts,
    read_checkpoint_into,
    read_into,
    read_manifest,
    read_tensor_range,
    scan_checkpoint,
    write_artifact,
)
from tensorcast_ray._errors import DataLossError, NotFoundError, UnavailableError  # noqa: E402


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def test_round_trip_list_delete(s3_options: dict[str, Any], bucket: str) -> None:
    root = f"s3://{bucket}/store"
    ts = {
        "emb": torch.randn(300, 64).to(torch.bfloat16),
        "w": torch.randn(64, 64),
        "norm": torch.ones(64),
        "z": torch.randn(8, dtype=torch.complex64),
    }
    sources = [
        TensorSource(k, str(v.dtype).removeprefix("torch."), tuple(v.shape), as_bytes(v))
        for k, v in ts.items()
    ]
    # Sharded, with parts smaller than the tensors: multipart-free small uploads and
    # several ranged GETs per tensor.
    m = write_artifact(
        root,
        "llama:v1",
        sources,
        storage_options=s3_options,
        plan=[[0], [1, 2, 3]],
        max_buffer_bytes=16 << 10,
    )
    assert len(m.shards) > 1
    assert list_artifacts(root, storage_options=s3_options) == ["llama:v1"]
    got = read_manifest(root, "llama:v1", storage_options=s3_options)
    assert got == m
    out = {k: torch.empty_like(v) for k, v in ts.items()}
    done: list[int] = []
    read_into(
        root,
        got,
        lambda t: as_bytes(out[t.name]),
        storage_options=s3_options,
        max_buffer_bytes=16 << 10,
        parallelism=3,
        progress=lambda d, _: done.append(d),
    )
    assert all(torch.equal(out[k], v) for k, v in ts.items())
    assert max(done) == m.total_bytes
    rows = torch.empty(2, 64)
    read_tensor_range(root, got, "w", as_bytes(rows), start=10 * 64 * 4, storage_options=s3_options)
    assert torch.equal(rows, ts["w"][10:12])
    assert (
        write_artifact(
            root,
            "llama:v1",
            sources,
            storage_options=s3_options,
            plan=[[0], [1, 2, 3]],
        )
        == m
    )  # idempotent
    assert delete_artifact(root, "llama:v1", storage_options=s3_options)
    with pytest.raises(NotFoundError):
        read_manifest(root, "llama:v1", storage_options=s3_options)
    assert list_artifacts(root, storage_options=s3_options) == []


def test_corruption_detected_on_s3(s3_options: dict[str, Any], bucket: str) -> None:
    root = f"s3://{bucket}"
    t = torch.arange(1000, dtype=torch.int32)
    m = write_artifact(
        root, "c:1", [TensorSource("t", "int32", (1000,), as_bytes(t))], storage_options=s3_options
    )
    fs = s3fs.S3FileSystem(**s3_options)
    (shard,) = [p for p in fs.find(bucket) if p.endswith(".safetensors")]
    data = bytearray(fs.cat_file(shard))
    data[m.tensors[0].offset + 3] ^= 1
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(DataLossError, match="checksum mismatch"):
        read_into(root, m, lambda _: as_bytes(torch.empty_like(t)), storage_options=s3_options)


def test_scan_hf_checkpoint_on_s3(s3_options: dict[str, Any], bucket: str, tmp_path: Any) -> None:
    parts = [{"a": torch.randn(20, 3)}, {"b": torch.randn(7).half()}]
    fs = s3fs.S3FileSystem(**s3_options)
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, str(tmp_path / name))
        fs.put_file(str(tmp_path / name), f"{bucket}/ckpt/{name}")
        weight_map.update({k: name for k in part})
    fs.pipe_file(
        f"{bucket}/ckpt/model.safetensors.index.json",
        json.dumps({"weight_map": weight_map}).encode(),
    )
    ck = scan_checkpoint(f"s3://{bucket}/ckpt", storage_options=s3_options)
    assert {t.name: t.dtype for t in ck.tensors} == {"a": "float32", "b": "float16"}
    out = {"a": torch.empty(20, 3), "b": torch.empty(7, dtype=torch.float16)}
    read_checkpoint_into(ck, lambda t: as_bytes(out[t.name]), storage_options=s3_options)
    assert torch.equal(out["a"], parts[0]["a"]) and torch.equal(out["b"], parts[1]["b"])


# --- storage that goes away and comes back (tests/s3_faults.py) ----------------------------


@pytest.fixture
def proxy(s3_options: dict[str, Any]) -> Iterator[Any]:
    from tests.s3_faults import FaultProxy

    host, port = s3_options["endpoint_url"].removeprefix("http://").rsplit(":", 1)
    with FaultProxy(host, int(port)) as p:
        yield p


def _through(proxy: Any, s3_options: dict[str, Any]) -> dict[str, Any]:
    """Options through the proxy, with botocore's own retries and timeouts kept short."""
    return {
        **s3_options,
        "endpoint_url": proxy.url,
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}},
    }


def _sources(n: int) -> tuple[dict[str, torch.Tensor], list[TensorSource]]:
    g = torch.Generator().manual_seed(7)
    ts = {
        f"w{i}": torch.randint(0, 255, (30_000,), dtype=torch.uint8, generator=g) for i in range(n)
    }
    return ts, [TensorSource(k, "uint8", tuple(v.shape), as_bytes(v)) for k, v in ts.items()]


def test_s3_down_during_an_export_then_back_is_retried_to_success(
    s3_options: dict[str, Any], bucket: str, proxy: Any
) -> None:
    from tensorcast_ray._disk import ShardEvent

    root = f"s3://{bucket}/store"
    ts, sources = _sources(3)
    events: list[ShardEvent] = []

    def on_shard(e: ShardEvent) -> None:
        events.append(e)
        if e.index == 1 and e.state == "running" and e.attempt == 1 and e.done_bytes == 0:
            proxy.down()  # storage goes away as shard 1 starts
        if e.state == "retrying" and e.attempt == 2:
            proxy.up()  # ...and comes back after two failed attempts

    m = write_artifact(
        root,
        "flaky:v1",
        sources,
        storage_options=_through(proxy, s3_options),
        plan=[[0], [1], [2]],
        max_buffer_bytes=8192,
        parallelism=1,
        shard_attempts=5,
        retry_wait_s=(0.05, 0.2),
        on_shard=on_shard,
    )
    retried = [e for e in events if e.state == "retrying"]
    assert [e.index for e in retried] == [1, 1]
    assert all(isinstance(e.error, UnavailableError) for e in retried)
    assert [e.index for e in events if e.state == "success"] == [0, 1, 2]
    assert read_manifest(root, "flaky:v1", storage_options=s3_options) == m
    out = {k: torch.empty_like(v) for k, v in ts.items()}
    read_into(root, m, lambda t: as_bytes(out[t.name]), storage_options=s3_options)
    assert all(torch.equal(out[k], v) for k, v in ts.items())  # bytes exact


def test_s3_down_for_good_fails_unavailable_after_the_attempts(
    s3_options: dict[str, Any], bucket: str, proxy: Any
) -> None:
    from tensorcast_ray._disk import ShardEvent

    root = f"s3://{bucket}/store"
    _, sources = _sources(2)
    events: list[ShardEvent] = []

    def on_shard(e: ShardEvent) -> None:
        events.append(e)
        if e.state == "running" and e.attempt == 1 and e.done_bytes == 0:
            proxy.down()

    with pytest.raises(UnavailableError, match="gave up after 3 attempts") as info:
        write_artifact(
            root,
            "gone:v1",
            sources,
            storage_options=_through(proxy, s3_options),
            plan=[[0], [1]],
            parallelism=1,
            shard_attempts=3,
            retry_wait_s=(0.05, 0.1),
            on_shard=on_shard,
        )
    assert info.value.retryable
    assert [(e.index, e.attempt) for e in events if e.state == "retrying"] == [(0, 1), (0, 2)]
    last = {e.index: e for e in events}
    assert last[0].state == last[1].state == "failed" and last[0].attempt == 3
    proxy.up()
    with pytest.raises(NotFoundError):
        read_manifest(root, "gone:v1", storage_options=s3_options)


def test_s3_connection_reset_mid_upload_is_retried(
    s3_options: dict[str, Any], bucket: str, proxy: Any
) -> None:
    from tensorcast_ray._disk import ShardEvent

    root = f"s3://{bucket}/store"
    ts, sources = _sources(2)
    events: list[ShardEvent] = []

    def on_shard(e: ShardEvent) -> None:
        events.append(e)
        if e.index == 0 and e.state == "running" and e.attempt == 1 and e.done_bytes == 0:
            proxy.down_after(10_000)  # resets the PUT of shard 0 part way through its body
        if e.state == "retrying":
            proxy.up()

    m = write_artifact(
        root,
        "reset:v1",
        sources,
        storage_options=_through(proxy, s3_options),
        plan=[[0], [1]],
        parallelism=1,
        shard_attempts=3,
        retry_wait_s=(0.05, 0.1),
        on_shard=on_shard,
    )
    (retry,) = [e for e in events if e.state == "retrying"]
    assert retry.index == 0 and retry.attempt == 1 and isinstance(retry.error, UnavailableError)
    out = {k: torch.empty_like(v) for k, v in ts.items()}
    read_into(root, m, lambda t: as_bytes(out[t.name]), storage_options=s3_options)
    assert all(torch.equal(out[k], v) for k, v in ts.items())
