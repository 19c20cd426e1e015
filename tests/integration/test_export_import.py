"""tc.export / tc.import_checkpoint / the CLI against a real local Ray and daemon.

Round trips through file://, memory:// and S3 (a moto server on loopback), Hugging Face style
safetensors checkpoints, and the failure paths: corrupt shard → DATA_LOSS with nothing left
behind, uncommitted or missing export → NOT_FOUND, existing key → ALREADY_EXISTS before any
disk read, hostile keys stay inside the root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import grpc
import pytest
import torch
from safetensors.torch import save_file

import tensorcast_ray as tc
from tensorcast_ray._disk import artifact_path, list_artifacts, read_manifest
from tensorcast_ray._dtypes import ITEMSIZE, torch_dtype
from tensorcast_ray._store import default_store

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental"),
]

REPO = Path(__file__).resolve().parents[2]


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel()) * ITEMSIZE[dtype]
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(torch_dtype(dtype)).reshape(shape)


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], ordered: bool = True
) -> None:
    assert list(got) == list(want) if ordered else sorted(got) == sorted(want)
    for name, t in want.items():
        g = got[name]
        assert (g.dtype, tuple(g.shape)) == (t.dtype, tuple(t.shape)), name
        assert raw(g) == raw(t), name


def metric(name: str, **labels: str) -> float:
    """One sample of this process's SDK metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in tc.metrics_text().splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def every_dtype() -> dict[str, torch.Tensor]:
    ts = {f"t.{d}": random_tensor(d, (3, 5), seed=i) for i, d in enumerate(sorted(ITEMSIZE))}
    ts["scalar"] = random_tensor("float32", ())
    ts["empty"] = random_tensor("bfloat16", (0, 4))
    return ts


def daemon_used_bytes(namespace: str) -> int:
    """Bytes the daemon's tiers hold, pending (uncommitted) writes included."""
    from tensorcast_ray import _actors

    ctx = tc.init(namespace=namespace)
    status = _actors.call(_actors.get_actor(_actors.daemon_name(ctx.node_id), namespace), "status")
    return sum(int(t["used_bytes"]) for t in status["tiers"])


@pytest.fixture(params=["file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path}/store"
        return
    url = f"memory://tc-xfer-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


# ---- round trips ------------------------------------------------------------------------------
def test_round_trip_every_dtype(namespace: str, root: str) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    ts = every_dtype()
    put = tc.put(ts, "model:v1")
    exports_before = metric("tc_store_operation_latency_seconds_count", verb="export")
    seen: list[tuple[int, int]] = []
    # latest resolves once, to the exact key, and the directory is the one for that key.
    path = tc.export("model:latest", root, progress=lambda d, t: seen.append((d, t)))
    assert path == artifact_path(root, "model:v1")
    manifest = read_manifest(root, "model:v1")
    assert manifest.key == "model:v1" and manifest.artifact_id == put.artifact_id
    assert [t.name for t in manifest.tensors] == list(ts)
    assert seen[-1] == (put.nbytes, put.nbytes) == (manifest.total_bytes,) * 2
    assert metric("tc_store_operation_latency_seconds_count", verb="export") == exports_before + 1
    # Re-export of the same version is a no-op: the manifest is not rewritten.
    assert tc.export("model:v1", root) == path
    assert read_manifest(root, "model:v1").created_at == manifest.created_at

    done: list[tuple[int, int]] = []
    result = tc.import_checkpoint(path, "model:v2", progress=lambda d, t: done.append((d, t)))
    assert (result.key, result.nbytes, result.status) == ("model:v2", put.nbytes, put.status)
    assert result.artifact_id != put.artifact_id
    assert done[-1] == (put.nbytes, put.nbytes)
    assert_same(tc.get("model:v2"), ts)
    # names= imports a subset, in checkpoint order.
    tc.import_checkpoint(path, "model:v3", names=["scalar", "t.bfloat16"])
    assert_same(tc.get("model:v3"), {"t.bfloat16": ts["t.bfloat16"], "scalar": ts["scalar"]})
    assert metric("tc_store_operation_latency_seconds_count", verb="import") >= 2


def test_import_safetensors_file_and_sharded_index(namespace: str, tmp_path: Path) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    sd = {
        "embed.weight": torch.randn(64, 32).to(torch.bfloat16),
        "layers.0.w": torch.randn(32, 32),
        "layers.0.norm": torch.ones(32, dtype=torch.float16),
        "layers.1.w": torch.randn(32, 32),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    single = tmp_path / "model.safetensors"
    save_file(sd, str(single), metadata={"format": "pt"})
    tc.import_checkpoint(str(single), "st:single")
    assert_same(tc.get("st:single"), sd, ordered=False)  # safetensors sorts by dtype, name

    # Sharded the way transformers writes it: two files + model.safetensors.index.json.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    parts = [["embed.weight", "layers.0.w"], ["layers.0.norm", "layers.1.w", "step"]]
    weight_map = {}
    for i, names in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in names}, str(sharded / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    tc.import_checkpoint(f"file://{sharded}", "st:sharded")
    assert_same(tc.get("st:sharded"), sd, ordered=False)
    # A name the checkpoint lacks: INVALID_ARGUMENT (as for get's names=), no key written.
    with pytest.raises(tc.InvalidArgumentError) as err:
        tc.import_checkpoint(str(sharded), "st:partial", names=["layers.1.w", "nope"])
    assert err.value.status_code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in str(err.value)
    assert not tc.exists("st:partial")
    with pytest.raises(tc.InvalidArgumentError) as get_err:
        tc.get("st:sharded", names=["nope"])
    assert get_err.value.status_code == err.value.status_code
    # No names at all (e.g. `--names ""`): refused, not an empty artifact.
    with pytest.raises(tc.InvalidArgumentError, match="at least one tensor"):
        tc.import_checkpoint(str(sharded), "st:none", names=[])
    assert not tc.exists("st:none")


def test_s3_round_trip(namespace: str, s3_options: dict[str, Any], bucket: str) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    ts = {"w": torch.randn(128, 64), "b": torch.randn(64).to(torch.bfloat16)}
    tc.put(ts, "s3m:v1")
    path = tc.export("s3m:v1", f"s3://{bucket}/store", storage_options=s3_options)
    assert path == artifact_path(f"s3://{bucket}/store", "s3m:v1")
    assert list_artifacts(f"s3://{bucket}/store", storage_options=s3_options) == ["s3m:v1"]
    tc.import_checkpoint(path, "s3m:v2", storage_options=s3_options)
    assert_same(tc.get("s3m:v2"), ts)


# ---- failure paths ----------------------------------------------------------------------------
def test_corrupt_shard_is_data_loss_and_leaves_nothing(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    ts = {"a": torch.randn(1000), "b": torch.randn(500).to(torch.bfloat16)}
    tc.put(ts, "bad:v1")
    root = str(tmp_path / "store")
    path = tc.export("bad:v1", root)
    manifest = read_manifest(root, "bad:v1")
    shard = os.path.join(path, manifest.shards[0].file)
    victim = manifest.tensors[1]  # a byte inside "b"'s data, not the header
    with open(shard, "r+b") as f:
        f.seek(victim.offset + 3)
        byte = f.read(1)
        f.seek(victim.offset + 3)
        f.write(bytes([byte[0] ^ 0xFF]))

    # Record the segments the daemon hands the import (staged or fresh ones).
    store = default_store()
    began: list[Any] = []
    real_call = store._call

    def recording(method: str, request: Any, timeout: float) -> Any:
        out = real_call(method, request, timeout)
        if method == "BeginWrite":
            began.append(out)
        return out

    monkeypatch.setattr(store, "_call", recording)
    bytes_before = daemon_used_bytes(namespace)
    errors_before = metric("tc_store_operation_errors_total", status="DATA_LOSS", verb="import")
    with pytest.raises(tc.DataLossError) as err:
        tc.import_checkpoint(path, "bad:v2")
    assert err.value.status_code == grpc.StatusCode.DATA_LOSS
    assert "'b'" in str(err.value) and "re-export" in str(err.value)
    segments = [os.path.join(b.shm_dir, seg.name) for b in began for seg in b.segments]
    assert len(began) == 1 and segments, "the import got as far as BeginWrite, once"
    assert not [p for p in segments if os.path.exists(p)], "aborted segments must be unlinked"
    assert not tc.exists("bad:v2") and tc.list_keys("bad:") == ["bad:v1"]
    assert daemon_used_bytes(namespace) == bytes_before
    assert (
        metric("tc_store_operation_errors_total", status="DATA_LOSS", verb="import")
        == errors_before + 1
    )
    # The abort released the key: a good import of it now succeeds.
    tc.delete("bad:v1")
    fresh = str(tmp_path / "fresh")
    tc.put(ts, "bad:v1")
    tc.import_checkpoint(tc.export("bad:v1", fresh), "bad:v2")
    assert_same(tc.get("bad:v2"), ts)


def test_export_and_import_are_store_methods_under_its_options(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorcast_ray._disk as disk

    tc.init(namespace=namespace, global_store_mode="none")
    ts = {"w": torch.arange(64, dtype=torch.float32)}
    tc.put(ts, "opts:v1")
    # The store's read options apply to the artifact export reads: a disk read of a version
    # not on this node needs persistence, which this daemon has not.
    disk_only = tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source="disk")))
    with pytest.raises(tc.FailedPreconditionError, match="source='disk'"):
        disk_only.export("elsewhere:v1", str(tmp_path / "a"))
    path = tc.store().export("opts:v1", str(tmp_path / "a"))
    # The store's retry overrides apply: a storage hiccup on the first scan is retried by
    # default, and not by a store allowed one attempt.
    real_scan = disk.scan_checkpoint
    failures: list[int] = []

    def flaky_scan(*args: Any, **kwargs: Any) -> Any:
        if len(failures) % 2 == 0:
            failures.append(1)
            raise tc.UnavailableError("storage hiccup (test)")
        failures.append(0)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(disk, "scan_checkpoint", flaky_scan)
    once = tc.RetryPolicy(deadline_seconds=30, max_attempts=1)
    one_try = tc.store(tc.StoreOptions(retry_overrides={"import": once}))
    with pytest.raises(tc.UnavailableError, match="hiccup"):
        one_try.import_checkpoint(path, "opts:v2")
    assert not tc.exists("opts:v2")
    failures.clear()
    assert tc.import_checkpoint(path, "opts:v2").key == "opts:v2"
    assert failures == [1, 0]
    assert_same(tc.get("opts:v2"), ts)


def test_missing_manifest_missing_url_existing_key(namespace: str, tmp_path: Path) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    tc.put({"w": torch.randn(16)}, "m:v1")
    root = str(tmp_path / "store")
    path = tc.export("m:v1", root)
    os.unlink(os.path.join(path, "manifest.json"))  # as a crashed export leaves it
    with pytest.raises(tc.NotFoundError) as err:
        tc.import_checkpoint(path, "m:v2")
    assert err.value.status_code == grpc.StatusCode.NOT_FOUND
    assert "manifest.json" in str(err.value)
    with pytest.raises(tc.NotFoundError):
        tc.import_checkpoint(str(tmp_path / "nowhere"), "m:v2")
    assert not tc.exists("m:v2")
    # An existing key fails before any disk read: the URL does not even exist.
    with pytest.raises(tc.AlreadyExistsError) as exists_err:
        tc.import_checkpoint(str(tmp_path / "nowhere"), "m:v1")
    assert exists_err.value.status_code == grpc.StatusCode.ALREADY_EXISTS
    # Export of an unknown key; bad arguments.
    with pytest.raises(tc.NotFoundError):
        tc.export("m:v9", root)
    with pytest.raises(tc.InvalidArgumentError):
        tc.import_checkpoint(path, "m:latest")
    with pytest.raises(tc.InvalidArgumentError):
        tc.import_checkpoint(path, "m:v3", names="w")  # type: ignore[arg-type]
    with pytest.raises(tc.InvalidArgumentError):
        tc.export("m:v1", "")
    # The export directory stays re-exportable: the next export commits it again.
    assert tc.export("m:v1", root) == path
    tc.import_checkpoint(path, "m:v2")
    assert tc.exists("m:v2")


def test_hostile_keys_stay_inside_root(namespace: str, tmp_path: Path) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    keys = [
        "../../escape:v1",
        "/etc/passwd:v1",
        "a/b:c",
        "a_b:c",
        "..:..",
        "x" * 900 + ":" + "y" * 100,
        "\u00e9t\u00e9/\u2603:v1",
    ]
    root = tmp_path / "root"
    for i, key in enumerate(keys):
        tc.put({"w": torch.full((4,), float(i))}, key)
        path = tc.export(key, str(root))
        assert path == artifact_path(str(root), key)
        real = os.path.realpath(path)
        assert os.path.dirname(real) == os.path.realpath(root), key
    assert os.listdir(tmp_path) == ["root"], "nothing may land outside the root"
    assert len(os.listdir(root)) == len(keys)  # distinct keys never share a directory
    assert sorted(list_artifacts(str(root))) == sorted(keys)
    for i, key in enumerate(keys):
        tc.import_checkpoint(artifact_path(str(root), key), f"back:{i}")
        assert torch.equal(tc.get(f"back:{i}")["w"], torch.full((4,), float(i)))


# ---- CLI --------------------------------------------------------------------------------------
def cli(ray_address: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tensorcast_ray.cli", "--address", ray_address]
    return subprocess.run(
        [*cmd, "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )


def test_cli_export_import(namespace: str, tmp_path: Path) -> None:
    import ray

    tc.init(namespace=namespace, global_store_mode="none")
    ts = {"w": torch.randn(256, 64), "b": torch.randn(64), "n": torch.arange(10)}
    tc.put(ts, "cli:v1")
    address = ray.get_runtime_context().gcs_address
    root = f"file://{tmp_path}/store"

    out = cli(address, namespace, "export", "cli:latest", root)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip()
    assert path == artifact_path(root, "cli:v1")
    assert "export cli:latest" in out.stderr and "100%" in out.stderr  # the tqdm bar

    out = cli(address, namespace, "import", path, "cli:v2", "--names", "w,n")
    assert out.returncode == 0, out.stderr
    assert re.match(r"^cli:v2 [0-9a-f]+ \d+ bytes ", out.stdout), out.stdout
    assert_same(tc.get("cli:v2"), {"w": ts["w"], "n": ts["n"]})

    # An existing key: one error line and exit code 1.
    out = cli(address, namespace, "import", path, "cli:v2")
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and "already exists" in out.stderr
    # A malformed --storage-option is a usage error (2) before Ray is contacted.
    out = cli(address, namespace, "export", "cli:v1", root, "--storage-option", "novalue")
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr
