"""Disk format on a real S3-compatible server (moto) on loopback: round trip, ranges, commit."""

from __future__ import annotations

import json
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
from tensorcast_ray._errors import DataLossError, NotFoundError  # noqa: E402


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
        shard_bytes=40_000,
        shard_threshold=0,
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
            shard_bytes=40_000,
            shard_threshold=0,
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
