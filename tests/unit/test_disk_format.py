"""Disk format: round trips, safetensors compatibility, integrity, atomic commit, keys, memory."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from tensorcast_ray._disk import (
    TensorSource,
    _writer,
    artifact_path,
    delete_artifact,
    list_artifacts,
    read_checkpoint_into,
    read_into,
    read_manifest,
    read_tensor_range,
    scan_checkpoint,
    write_artifact,
)
from tensorcast_ray._disk._checksum import Checksum, checksum_for, default_checksum
from tensorcast_ray._dtypes import ITEMSIZE, SAFETENSORS_NAME, torch_dtype
from tensorcast_ray._errors import (
    AlreadyExistsError,
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel()) * ITEMSIZE[dtype]
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(torch_dtype(dtype)).reshape(shape)


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def source(name: str, t: torch.Tensor) -> TensorSource:
    dtype = str(t.dtype).removeprefix("torch.")
    return TensorSource(name, dtype, tuple(t.shape), as_bytes(t))


def read_all(root: str, key: str, **kw: object) -> dict[str, torch.Tensor]:
    manifest = read_manifest(root, key, storage_options=kw.pop("storage_options", None))  # type: ignore[arg-type]
    out: dict[str, torch.Tensor] = {}

    def dest(t):  # type: ignore[no-untyped-def]
        out[t.name] = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        return as_bytes(out[t.name])

    read_into(root, manifest, dest, **kw)  # type: ignore[arg-type]
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(as_bytes(a)) == bytes(as_bytes(b))


@pytest.fixture(params=["file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path}/store"
        return
    url = f"memory://tc-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def shard_paths(root: str, key: str) -> list[str]:
    fs, base = fsspec.core.url_to_fs(artifact_path(root, key))
    return sorted(p for p in fs.ls(base, detail=False) if p.endswith(".safetensors"))


# --- round trips ---------------------------------------------------------------------------


def test_every_canonical_dtype_round_trips(root: str) -> None:
    tensors = {f"t.{d}": random_tensor(d, (3, 5), seed=i) for i, d in enumerate(sorted(ITEMSIZE))}
    tensors["scalar"] = random_tensor("float32", ())
    tensors["empty"] = random_tensor("bfloat16", (0, 4))
    seen: list[tuple[int, int]] = []
    m = write_artifact(
        root,
        "model:v1",
        [source(k, v) for k, v in tensors.items()],
        artifact_id="a1",
        progress=lambda d, t: seen.append((d, t)),
    )
    assert m.key == "model:v1" and m.artifact_id == "a1" and len(m.shards) == 1
    assert seen[-1] == (m.total_bytes, m.total_bytes)
    got = read_all(root, "model:v1")
    assert got.keys() == tensors.keys()
    assert all(same(got[k], v) for k, v in tensors.items())
    assert read_manifest(root, "model:v1") == m
    assert list_artifacts(root) == ["model:v1"]


def test_shards_split_in_order_and_big_tensor_alone(root: str) -> None:
    sizes = [3000, 3000, 9000, 1000, 1000, 1000]  # bytes (uint8)
    ts = {f"w{i}": random_tensor("uint8", (n,), seed=i) for i, n in enumerate(sizes)}
    m = write_artifact(
        root,
        "s:1",
        [source(k, v) for k, v in ts.items()],
        plan=[[0], [1], [2], [3, 4, 5]],
        max_buffer_bytes=4096,
    )
    layout = [[t.name for t in m.tensors if t.shard == s] for s in range(len(m.shards))]
    assert layout == [["w0"], ["w1"], ["w2"], ["w3", "w4", "w5"]]
    assert all(s.header_size % 8 == 0 for s in m.shards)
    assert m.shards[0].file == "shard-00000-of-00004.safetensors"
    got = read_all(root, "s:1", max_buffer_bytes=4096, parallelism=3)
    assert all(same(got[k], v) for k, v in ts.items())


def test_names_subset_and_byte_range(root: str) -> None:
    a, b = random_tensor("float32", (64, 32), 1), random_tensor("int64", (10,), 2)
    m = write_artifact(root, "x:1", [source("a", a), source("b", b)])
    got = read_all(root, "x:1", names=["b"])
    assert list(got) == ["b"] and same(got["b"], b)
    rows = torch.empty((4, 32), dtype=torch.float32)
    read_tensor_range(root, m, "a", as_bytes(rows), start=8 * 32 * 4)
    assert torch.equal(rows, a[8:12])
    with pytest.raises(NotFoundError, match="no tensors named"):
        read_all(root, "x:1", names=["nope"])
    with pytest.raises(InvalidArgumentError, match="outside"):
        read_tensor_range(root, m, "a", as_bytes(rows), start=a.nbytes)


def test_invalid_inputs_are_reported(root: str) -> None:
    t = random_tensor("float32", (4,))
    with pytest.raises(InvalidArgumentError, match="needs 20"):
        write_artifact(root, "k:1", [TensorSource("a", "float32", (5,), as_bytes(t))])
    with pytest.raises(InvalidArgumentError, match="unknown dtype"):
        write_artifact(root, "k:1", [TensorSource("a", "float31", (4,), as_bytes(t))])
    with pytest.raises(InvalidArgumentError, match="unique"):
        write_artifact(root, "k:1", [source("a", t), source("a", t)])
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        write_artifact(
            root, "k:1", [TensorSource("a", "float32", (2,), memoryview(t.numpy())[::2])]
        )
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        write_artifact(root, "", [source("a", t)])
    m = write_artifact(root, "k:1", [source("a", t)])
    with pytest.raises(InvalidArgumentError, match="exactly 16"):
        read_into(root, m, lambda _: memoryview(bytearray(8)))
    with pytest.raises(InvalidArgumentError, match="read-only"):
        read_into(root, m, lambda _: memoryview(bytes(16)))


# --- safetensors compatibility --------------------------------------------------------------


def test_safetensors_package_reads_our_shards(tmp_path: Path) -> None:
    root = str(tmp_path)
    ts = {d: random_tensor(d, (2, 3), i) for i, d in enumerate(sorted(ITEMSIZE))}
    write_artifact(root, "st:1", [source(k, v) for k, v in ts.items()], layout="sharded")
    (path,) = shard_paths(root, "st:1")
    loaded = load_file(path)
    for name, t in ts.items():
        if name in SAFETENSORS_NAME:
            assert same(loaded[name], t)
        else:  # raw-stored: uint8 with a trailing itemsize dimension
            assert loaded[name].dtype == torch.uint8
            assert loaded[name].shape == (2, 3, ITEMSIZE[name])
            assert bytes(loaded[name].numpy()) == bytes(as_bytes(t))
    f32, i64 = ts["float32"], ts["int64"]
    write_artifact(root, "np:1", [source("f", f32), source("i", i64)])
    (np_path,) = shard_paths(root, "np:1")
    np_loaded = np_load_file(np_path)  # numpy has no bf16 / float8: a numpy-only artifact
    assert np_loaded["f"].tobytes() == bytes(as_bytes(f32))  # bytes: random floats hold NaNs
    assert np_loaded["i"].tobytes() == bytes(as_bytes(i64))
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    raw = json.loads(meta["tensorcast.dtypes"])
    assert set(raw) == set(ITEMSIZE) - set(SAFETENSORS_NAME)
    assert meta["tensorcast.key"] == "st:1" and meta["format"] == "pt"


def test_scan_single_file_written_by_safetensors(tmp_path: Path) -> None:
    ts = {"emb": torch.randn(50, 8).to(torch.bfloat16), "norm": torch.ones(8), "i": torch.arange(7)}
    save_file(ts, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for url in (str(tmp_path), f"file://{tmp_path}/model.safetensors"):
        ck = scan_checkpoint(url)
        assert ck.kind == "safetensors" and ck.files == ("model.safetensors",)
        assert {t.name: (t.dtype, t.shape) for t in ck.tensors} == {
            "emb": ("bfloat16", (50, 8)),
            "norm": ("float32", (8,)),
            "i": ("int64", (7,)),
        }
        out = {t.name: torch.empty(t.shape, dtype=torch_dtype(t.dtype)) for t in ck.tensors}
        read_checkpoint_into(ck, lambda t: as_bytes(out[t.name]))  # noqa: B023
        assert all(same(out[k], v) for k, v in ts.items())


def test_scan_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    parts = [{"a": torch.randn(30, 4), "b": torch.randn(3)}, {"c": torch.randn(5, 5).half()}]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index")
    ck = scan_checkpoint(str(tmp_path))
    assert sorted(t.name for t in ck.tensors) == ["a", "b", "c"]
    assert len(ck.files) == 2
    out: dict[str, torch.Tensor] = {}

    def dest(t):  # type: ignore[no-untyped-def]
        out[t.name] = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        return as_bytes(out[t.name])

    read_checkpoint_into(ck, dest, names=["a", "c"], parallelism=2)
    assert (
        set(out) == {"a", "c"} and same(out["c"], parts[1]["c"]) and same(out["a"], parts[0]["a"])
    )
    weight_map["missing"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(DataLossError, match="missing"):
        scan_checkpoint(str(tmp_path))


def test_scan_tensorcast_export_and_truncated_checkpoint(tmp_path: Path) -> None:
    t = random_tensor("complex64", (4, 4))
    write_artifact(str(tmp_path), "e:1", [source("z", t)])
    ck = scan_checkpoint(artifact_path(str(tmp_path), "e:1"))
    assert ck.kind == "tensorcast" and ck.tensors[0].dtype == "complex64"
    got = torch.empty(4, 4, dtype=torch.complex64)
    read_checkpoint_into(ck, lambda _: as_bytes(got))
    assert torch.equal(got, t)
    # our shard scanned as plain safetensors restores the raw-stored dtype
    (shard,) = shard_paths(str(tmp_path), "e:1")
    (st,) = scan_checkpoint(shard).tensors
    assert (st.dtype, st.shape) == ("complex64", (4, 4))
    path = tmp_path / "cut" / "model.safetensors"
    path.parent.mkdir()
    save_file({"w": torch.randn(100)}, str(path))
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(DataLossError, match="truncated"):
        scan_checkpoint(str(path.parent))
    with pytest.raises(NotFoundError):
        scan_checkpoint(str(tmp_path / "nothing-here"))


# --- integrity ------------------------------------------------------------------------------


def _flip(path: str, offset: int) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    data = bytearray(fs.cat_file(p))
    data[offset] ^= 0xFF
    fs.pipe_file(p, bytes(data))


def test_corrupt_byte_is_data_loss(root: str) -> None:
    a, b = random_tensor("float32", (256,), 1), random_tensor("float32", (256,), 2)
    m = write_artifact(root, "c:1", [source("a", a), source("b", b)])
    (path,) = shard_paths(root, "c:1")
    proto = root.split("://")[0]
    _flip(f"{proto}://{path}", m.tensor("b").offset + 7)
    with pytest.raises(DataLossError, match=r"tensor 'b'.*re-export"):
        read_all(root, "c:1")
    assert same(read_all(root, "c:1", names=["a"])["a"], a)  # the intact tensor still reads
    assert not same(read_all(root, "c:1", verify=False)["b"], b)  # unverified: caller's choice
    _flip(f"{proto}://{path}", 20)  # inside the header JSON
    with pytest.raises(DataLossError, match="header checksum"):
        read_all(root, "c:1", names=["a"])


def test_truncated_shard_is_data_loss(root: str) -> None:
    write_artifact(root, "t:1", [source("a", random_tensor("int32", (1000,)))])
    (path,) = shard_paths(root, "t:1")
    fs, p = fsspec.core.url_to_fs(f"{root.split('://')[0]}://{path}")
    fs.pipe_file(p, bytes(fs.cat_file(p))[:-100])
    with pytest.raises(DataLossError, match="truncated"):
        read_all(root, "t:1")
    with pytest.raises(DataLossError, match="truncated"):
        read_all(root, "t:1", verify=False)


def test_missing_or_corrupt_manifest(root: str) -> None:
    with pytest.raises(NotFoundError, match="no committed manifest"):
        read_manifest(root, "absent:1")
    write_artifact(root, "m:1", [source("a", random_tensor("int8", (10,)))])
    fs, base = fsspec.core.url_to_fs(artifact_path(root, "m:1"))
    fs.pipe_file(f"{base}/manifest.json", b'{"format": "tensorcast-disk", "format_ver')
    with pytest.raises(DataLossError, match="not a valid manifest"):
        read_manifest(root, "m:1")
    doc = {"format": "tensorcast-disk", "format_version": 1, "shards": "x"}
    fs.pipe_file(f"{base}/manifest.json", json.dumps(doc).encode())
    with pytest.raises(DataLossError, match="re-export"):
        read_manifest(root, "m:1")
    assert list_artifacts(root) == []
    write_artifact(root, "m:1", [source("a", random_tensor("int8", (10,)))])  # repairs
    assert list_artifacts(root) == ["m:1"]


def test_checksum_combine_matches_whole_crc() -> None:
    algo = checksum_for("crc32")
    a, b = os.urandom(1000), os.urandom(777)
    assert algo.combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert algo.combine(zlib.crc32(a), 0, 0) == zlib.crc32(a)

    def crc32c(crc: int, data: bytes | memoryview) -> int:  # bitwise reference
        crc ^= 0xFFFFFFFF
        for byte in bytes(data):
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        return crc ^ 0xFFFFFFFF

    c = Checksum("crc32c", crc32c, 0x82F63B78)
    assert c.of(b"123456789") == 0xE3069283  # the standard check value
    assert c.combine(c.of(a[:100]), c.of(b[:50]), 50) == c.of(a[:100] + b[:50])


def test_crc32c_is_the_default_and_checksums_memoryviews_without_copies() -> None:
    crc32c = pytest.importorskip("crc32c")
    if not crc32c.hardware_based:
        pytest.skip("crc32c has no CPU support here: new exports use zlib's crc32")
    algo = default_checksum()
    assert algo.name == "crc32c"
    assert algo.of(b"123456789") == 0xE3069283  # the standard check value
    data = bytearray(os.urandom(100_000))
    view = memoryview(data)  # writable, as shared memory is: taken as it is
    assert algo.of(view) == crc32c.crc32c(bytes(data))
    assert algo.update(algo.of(view[:40_000]), view[40_000:]) == algo.of(view)
    assert algo.combine(algo.of(view[:123]), algo.of(view[123:]), len(view) - 123) == algo.of(view)
    assert algo.of(memoryview(bytes(0))) == 0


def test_new_exports_name_crc32c_and_verify(root: str) -> None:
    pytest.importorskip("crc32c")
    t = random_tensor("float32", (64, 33), 3)
    m = write_artifact(root, "c:1", [source("a", t)])
    assert m.checksum_algorithm == default_checksum().name
    assert same(read_all(root, "c:1")["a"], t)


def test_zlib_crc32_exports_still_verify(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exports made before crc32c was a dependency name "crc32": they read, verify, catch
    corruption and re-export idempotently, whatever the default is now."""
    ts = {f"w{i}": random_tensor("bfloat16", (300, 7), i) for i in range(3)}
    with monkeypatch.context() as m:
        m.setattr(_writer, "default_checksum", lambda: checksum_for("crc32"))
        old = write_artifact(root, "z:1", [source(k, v) for k, v in ts.items()])
    assert old.checksum_algorithm == "crc32"
    assert read_manifest(root, "z:1").checksum_algorithm == "crc32"
    assert int(old.tensors[0].checksum, 16) == zlib.crc32(as_bytes(ts["w0"]))
    got = read_all(root, "z:1")
    assert all(same(got[k], v) for k, v in ts.items())
    again = write_artifact(root, "z:1", [source(k, v) for k, v in ts.items()])  # idempotent
    assert again.checksum_algorithm == "crc32" and again.created_at == old.created_at
    (path,) = shard_paths(root, "z:1")
    fs, p = fsspec.core.url_to_fs(f"{root.split('://')[0]}://{path}")
    raw = bytearray(fs.cat_file(p))
    raw[-5] ^= 0xFF
    fs.pipe_file(p, bytes(raw))
    with pytest.raises(DataLossError, match="checksum mismatch"):
        read_all(root, "z:1")


def test_crc32c_export_without_the_library_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorcast_ray._disk import _checksum
    from tensorcast_ray._errors import FailedPreconditionError

    monkeypatch.setattr(_checksum, "_crc32c_module", lambda: None)
    assert default_checksum().name == "crc32"
    with pytest.raises(FailedPreconditionError, match="pip install crc32c"):
        checksum_for("crc32c")


# --- atomic commit --------------------------------------------------------------------------


def test_writer_failing_after_first_shard_leaves_nothing(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts = [source(f"w{i}", random_tensor("uint8", (5000,), i)) for i in range(3)]
    real = _writer._write_shard
    calls = 0

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(_writer, "_write_shard", failing)
    with pytest.raises(UnavailableError, match="disk went away"):
        write_artifact(root, "crash:1", ts, plan=[[0], [1], [2]], parallelism=1)
    assert shard_paths(root, "crash:1")  # the first shard did land...
    with pytest.raises(NotFoundError):  # ...but nothing is visible
        read_manifest(root, "crash:1")
    assert list_artifacts(root) == []
    monkeypatch.setattr(_writer, "_write_shard", real)
    m = write_artifact(root, "crash:1", ts, plan=[[0], [1], [2]])
    assert len(m.shards) == 3 and same(
        read_all(root, "crash:1")["w2"], random_tensor("uint8", (5000,), 2)
    )


def test_reexport_is_idempotent_and_versions_immutable(root: str) -> None:
    ts = [source("a", random_tensor("float16", (64,)))]
    m1 = write_artifact(root, "v:1", ts, artifact_id="id-1")
    assert write_artifact(root, "v:1", ts, artifact_id="id-1") == m1  # nothing rewritten
    with pytest.raises(AlreadyExistsError, match="immutable"):
        write_artifact(root, "v:1", [source("a", random_tensor("float16", (64,), seed=9))])
    assert delete_artifact(root, "v:1") is True
    assert delete_artifact(root, "v:1") is False
    with pytest.raises(NotFoundError):
        read_manifest(root, "v:1")
    write_artifact(root, "v:1", [source("a", random_tensor("float16", (64,), seed=9))])


_KILLED_WRITER = """
import os, sys
import numpy as np
from tensorcast_ray._disk import TensorSource, write_artifact
root = sys.argv[1]
data = np.random.default_rng(0).integers(0, 255, size=8 << 20, dtype=np.uint8)
ts = [TensorSource(f"w{i}", "uint8", (data.size,), memoryview(data)) for i in range(6)]
def progress(done, total):
    if done >= 12 << 20:  # inside the second shard: tell the parent, then hang until killed
        os.write(1, b"mid-write\\n")
        sys.stdin.read()
write_artifact(root, "big:1", ts, plan=[[0, 1], [2, 3], [4, 5]],
               max_buffer_bytes=1 << 20, parallelism=1, progress=progress)
"""


def test_writer_killed_mid_export_leaves_no_artifact(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, root],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"mid-write\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = sorted(os.listdir(artifact_path(root, "big:1")))
    assert "manifest.json" not in left and any(".tmp-" in n for n in left)
    with pytest.raises(NotFoundError):
        read_manifest(root, "big:1")
    assert list_artifacts(root) == []
    small = random_tensor("uint8", (100,))
    write_artifact(root, "big:1", [source("w0", small)])
    assert sorted(os.listdir(artifact_path(root, "big:1"))) == [
        "manifest.json",
        "shard-00000-of-00001.safetensors",
    ]  # leftovers cleared
    assert same(read_all(root, "big:1")["w0"], small)


# --- keys -----------------------------------------------------------------------------------

HOSTILE = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "..",
    ".",
    "x" * 10_000,
    "模型:版本/../v1",
    "nul\x00byte:v1",
    "a:b:c",
    "a/b:c",
    "a_b:c",
    "a?b:c",
    "llama:v1",
    "llama:v1 ",
    "\udcff-lone-surrogate",
    ":",
    "C:\\Windows\\system32",
]


def test_hostile_keys_stay_inside_root_and_stay_distinct(root: str) -> None:
    paths = {k: artifact_path(root, k) for k in HOSTILE}
    assert len(set(paths.values())) == len(HOSTILE)
    for p in paths.values():
        leaf = p.removeprefix(root + "/")
        assert p.startswith(root + "/") and "/" not in leaf and "\\" not in leaf
        assert leaf not in (".", "..") and not leaf.startswith(".") and len(leaf) < 140
        assert leaf.isascii() and "\x00" not in leaf
    assert artifact_path(root, "llama:v1").removeprefix(root + "/").startswith("llama@v1-")
    for i, k in enumerate(HOSTILE[:8]):
        write_artifact(root, k, [source("t", random_tensor("uint8", (4,), i))])
    assert list_artifacts(root) == sorted(HOSTILE[:8])
    assert same(read_all(root, "../x")["t"], random_tensor("uint8", (4,), 0))
    if root.startswith("file://"):
        base = Path(root.removeprefix("file://"))
        assert not (base.parent / "x").exists() and not (base.parent / "b").exists()


# --- memory bound ---------------------------------------------------------------------------

_MEASURE = """
import resource, sys, json
import numpy as np
from tensorcast_ray._disk import TensorSource, write_artifact, read_manifest, read_into
root, mib = sys.argv[1], int(sys.argv[2])
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
src = np.random.default_rng(0).integers(0, 255, size=mib << 20, dtype=np.uint8)
dst = np.zeros_like(src); dst[:] = 1  # fault both in before the baseline
parts = np.array_split(np.arange(src.size), 12)
ts = [TensorSource(f"w{i}", "uint8", (len(p),), memoryview(src[p[0]:p[-1] + 1]))
      for i, p in enumerate(parts)]
base = peak()
m = write_artifact(root, "mem:1", ts, max_buffer_bytes=8 << 20,
                   plan=[list(range(6)), list(range(6, 12))], parallelism=2)
after_write = peak()
offsets = {}
pos = 0
for t in m.tensors:
    offsets[t.name] = pos; pos += t.nbytes
read_into(root, read_manifest(root, "mem:1"),
          lambda t: memoryview(dst[offsets[t.name]:offsets[t.name] + t.nbytes]),
          max_buffer_bytes=8 << 20, parallelism=2)
after_read = peak()
assert (src == dst).all()
print(json.dumps({"write": after_write - base, "read": after_read - after_write,
                  "shards": len(m.shards)}))
"""


def test_memory_stays_bounded_for_a_96_mib_artifact(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path), "96"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    )
    grown = json.loads(out.stdout)
    # Peak RSS growth (ru_maxrss) of export and import: a few MiB of bookkeeping against a
    # 96 MiB artifact; the bound leaves room for 2 workers x 8 MiB buffers.
    print("peak RSS growth, MiB:", {k: v / 2**20 for k, v in grown.items() if k != "shards"})
    assert grown["shards"] == 2
    assert grown["write"] < 24 << 20, grown
    assert grown["read"] < 24 << 20, grown


def test_reexport_repairs_a_damaged_shard(root: str) -> None:
    """Every DATA_LOSS message says "re-export": doing so must fix the files."""
    a = random_tensor("float32", (256,), 3)
    m = write_artifact(root, "r:1", [source("a", a)])
    (path,) = shard_paths(root, "r:1")
    proto = root.split("://")[0]
    _flip(f"{proto}://{path}", m.tensor("a").offset + 3)
    with pytest.raises(DataLossError):
        read_all(root, "r:1")
    repaired = write_artifact(root, "r:1", [source("a", a)])
    assert repaired.tensors == m.tensors and repaired.shards == m.shards
    assert same(read_all(root, "r:1")["a"], a)


def test_an_unreadable_manifest_never_lets_an_export_replace_a_version(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorcast_ray._errors import PermissionDeniedError, UnavailableError

    a = random_tensor("int16", (32,), 4)
    m = write_artifact(root, "u:1", [source("a", a)], artifact_id="first")
    other = [source("a", random_tensor("int16", (32,), 5))]
    for err in (UnavailableError("storage is down (test)"), PermissionDeniedError("no (test)")):

        def unreadable(*_: object, err: Exception = err) -> object:
            raise err

        monkeypatch.setattr(_writer, "load_manifest", unreadable)
        with pytest.raises(type(err)):
            write_artifact(root, "u:1", other, artifact_id="second")
        monkeypatch.undo()
        assert read_manifest(root, "u:1") == m
        assert same(read_all(root, "u:1")["a"], a)


def test_a_copied_or_renamed_export_imports_from_where_it_is(tmp_path: Path) -> None:
    t = random_tensor("bfloat16", (8, 8), 6)
    write_artifact(str(tmp_path / "exports"), "m:v1", [source("w", t)])
    copied = tmp_path / "elsewhere" / "my-model"
    fs = fsspec.filesystem("file")
    fs.copy(artifact_path(str(tmp_path / "exports"), "m:v1"), str(copied), recursive=True)
    for url in (str(copied), os.path.relpath(copied)):
        ck = scan_checkpoint(url)
        got = torch.empty(8, 8, dtype=torch.bfloat16)
        read_checkpoint_into(ck, lambda _, got=got: as_bytes(got))
        assert same(got, t), url


def test_storage_errors_get_the_documented_codes() -> None:
    import errno

    import grpc

    from tensorcast_ray._disk._paths import map_os_error

    cases = [
        (FileNotFoundError(errno.ENOENT, "gone"), grpc.StatusCode.NOT_FOUND, False),
        (PermissionError(errno.EACCES, "no"), grpc.StatusCode.PERMISSION_DENIED, False),
        (FileExistsError(errno.EEXIST, "there"), grpc.StatusCode.ALREADY_EXISTS, False),
        (TimeoutError("slow"), grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (OSError(errno.ENOSPC, "full"), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
        (OSError(errno.EMFILE, "fds"), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
        (OSError("request failed"), grpc.StatusCode.UNAVAILABLE, True),  # fsspec remote
        (ConnectionResetError(errno.ECONNRESET, "reset"), grpc.StatusCode.UNAVAILABLE, True),
        (IsADirectoryError(errno.EISDIR, "dir"), grpc.StatusCode.FAILED_PRECONDITION, False),
        (NotADirectoryError(errno.ENOTDIR, "file"), grpc.StatusCode.FAILED_PRECONDITION, False),
        # How s3fs reports throttling (SlowDown), server errors and its fallback: retried.
        (OSError(errno.EBUSY, "SlowDown"), grpc.StatusCode.UNAVAILABLE, True),
        (OSError(errno.EREMOTEIO, "500"), grpc.StatusCode.UNAVAILABLE, True),
        (OSError(errno.EIO, "error"), grpc.StatusCode.UNAVAILABLE, True),
    ]
    for exc, code, retryable in cases:
        err = map_os_error(exc, "reading x")
        assert err.status_code is code, (exc, err)  # type: ignore[attr-defined]
        if retryable is not None:
            assert err.retryable is retryable, exc  # type: ignore[attr-defined]
        assert "reading x" in str(err)


def test_connection_failures_of_object_store_clients_are_unavailable() -> None:
    import grpc

    from tensorcast_ray._disk._paths import map_os_error

    botocore = pytest.importorskip("botocore.exceptions")
    cases = [
        botocore.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b/k"),  # refused
        botocore.ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k"),  # reset mid-upload
        botocore.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
        botocore.ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
        ConnectionRefusedError(111, "refused"),
    ]
    for exc in cases:
        err = map_os_error(exc, "writing x")
        assert err.status_code is grpc.StatusCode.UNAVAILABLE, (exc, err)  # type: ignore[attr-defined]
        assert err.retryable and "writing x" in str(err), exc  # type: ignore[attr-defined]
        assert err.__cause__ is exc or isinstance(exc, OSError)


# --- shard planning, per-shard events, retries, cancel -----------------------------------

MiB = 1 << 20


@pytest.mark.parametrize("layout,count", [("auto", 8), ("unsharded", 1), ("sharded", 16)])
def test_layout_picks_the_shard_count_through_the_one_planner(
    layout: str, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_artifact plans with _policy.plan_shards: a 1 GiB artifact of 1 MiB tensors
    (planned, not written: the plan is taken, then the write stopped)."""
    from tensorcast_ray import _policy

    sizes = [MiB] * 1024
    assert len(_policy.plan_shards(sum(sizes), sizes, layout)) == count
    seen: list[list[list[int]]] = []

    def spy(total: int, tensor_sizes: list[int], lay: str) -> list[list[int]]:
        assert lay == layout
        out = _policy.plan_shards(total * MiB, [n * MiB for n in tensor_sizes], lay)
        seen.append(out)
        return out

    monkeypatch.setattr(_writer, "plan_shards", spy)
    ts = [source(f"w{i}", random_tensor("uint8", (1,), i)) for i in range(1024)]
    m = write_artifact(f"memory://tc-plan-{uuid.uuid4().hex}", "p:1", ts, layout=layout)
    assert len(seen) == 1 and len(m.shards) == count == len(seen[0])
    assert [[t.name for t in m.tensors if t.shard == s] for s in range(count)] == [
        [f"w{i}" for i in shard] for shard in seen[0]
    ]


def test_an_explicit_plan_is_validated(root: str) -> None:
    ts = [source(f"w{i}", random_tensor("uint8", (10,), i)) for i in range(3)]
    for bad in (
        [[0, 1]],
        [[0], [2], [1]],
        [[0, 1, 2], []],
        [[0, 0, 1, 2]],
        "0,1,2",
        [[0, 1, True]],
    ):
        with pytest.raises(InvalidArgumentError, match="plan"):
            write_artifact(root, "p:1", ts, plan=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="layout"):
        write_artifact(root, "p:1", ts, layout="striped")
    for kw in ({"shard_attempts": 0}, {"retry_wait_s": (2.0, 1.0)}, {"deadline": "soon"}):
        with pytest.raises(InvalidArgumentError):
            write_artifact(root, "p:1", ts, **kw)  # type: ignore[arg-type]
    assert list_artifacts(root) == []
    m = write_artifact(root, "p:1", ts, plan=[[0, 1], [2]])
    assert [s.file for s in m.shards] == [
        "shard-00000-of-00002.safetensors",
        "shard-00001-of-00002.safetensors",
    ]
    assert len(write_artifact(root, "e:1", [], plan=[[]]).shards) == 1


class _Faults:
    """Wraps MemoryFileSystem.open: scripted failures per shard file and attempt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fsspec.implementations.memory import MemoryFileSystem

        self.opens: dict[str, int] = {}
        self.plan: dict[tuple[str, int], BaseException] = {}  # (shard name, open #) -> error
        self.write_delay = 0.0
        real = MemoryFileSystem.open
        faults = self

        def open_(fs: object, path: str, mode: str = "rb", **kw: object) -> object:
            f = real(fs, path, mode, **kw)  # type: ignore[arg-type]
            if "w" not in mode or "shard-" not in path:
                return f
            name = path.rsplit("/", 1)[-1].lstrip(".").split(".tmp-")[0]
            n = faults.opens[name] = faults.opens.get(name, 0) + 1
            return _FlakyFile(f, faults.plan.get((name, n)), faults.write_delay)

        monkeypatch.setattr(MemoryFileSystem, "open", open_)


class _FlakyFile:
    def __init__(self, f: object, error: BaseException | None, delay: float) -> None:
        self._f, self._error, self._delay, self._writes = f, error, delay, 0

    def write(self, data: object) -> object:
        self._writes += 1
        if self._delay:
            import time

            time.sleep(self._delay)
        if self._error is not None and self._writes == 3:  # header, a chunk, then this
            raise self._error
        return self._f.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)


def _mem_root() -> str:
    return f"memory://tc-faults-{uuid.uuid4().hex}"


def _events_of(events: list, index: int) -> list[tuple[str, int]]:  # type: ignore[type-arg]
    out: list[tuple[str, int]] = []
    for e in events:
        if e.index == index and (not out or out[-1] != (e.state, e.attempt)):
            out.append((e.state, e.attempt))
    return out


def test_on_shard_reports_each_shard_in_order() -> None:
    from tensorcast_ray._disk import ShardEvent

    root = _mem_root()
    ts = [source(f"w{i}", random_tensor("uint8", (10_000,), i)) for i in range(3)]
    events: list[ShardEvent] = []
    m = write_artifact(
        root, "ev:1", ts, plan=[[0], [1, 2]], max_buffer_bytes=4096, on_shard=events.append
    )
    assert [(e.index, e.state) for e in events[:2]] == [(0, "pending"), (1, "pending")]
    assert all(e.done_bytes == 0 and e.attempt == 0 for e in events[:2])
    for s, total in ((0, 10_000), (1, 20_000)):
        mine = [e for e in events if e.index == s]
        assert _events_of(events, s) == [("pending", 0), ("running", 1), ("success", 1)]
        running = [e.done_bytes for e in mine if e.state == "running"]
        assert running[0] == 0 and running[-1] == total and running == sorted(running)
        assert len(running) == 1 + math.ceil(total / 4096) + (s == 1)  # once per chunk
        assert all(e.total_bytes == total and e.error is None for e in mine)
        assert mine[-1].done_bytes == total
        assert mine[0].file == f"{artifact_path(root, 'ev:1')}/{m.shards[s].file}"
    again: list[ShardEvent] = []
    assert write_artifact(root, "ev:1", ts, plan=[[0], [1, 2]], on_shard=again.append) == m
    assert [(e.index, e.state) for e in again] == [
        (0, "pending"),
        (0, "success"),
        (1, "pending"),
        (1, "success"),
    ]  # idempotent re-export: nothing written


def test_a_transient_shard_failure_rewrites_only_that_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensorcast_ray._disk import ShardEvent

    faults = _Faults(monkeypatch)
    name = "shard-00001-of-00003.safetensors"
    faults.plan[(name, 1)] = ConnectionResetError(104, "reset (test)")
    faults.plan[(name, 2)] = OSError(5, "request failed (test)")  # s3fs-style: UNAVAILABLE
    root = _mem_root()
    ts = [source(f"w{i}", random_tensor("uint8", (20_000,), i)) for i in range(3)]
    events: list[ShardEvent] = []
    seen: list[int] = []
    m = write_artifact(
        root,
        "retry:1",
        ts,
        plan=[[0], [1], [2]],
        max_buffer_bytes=4096,
        parallelism=2,
        shard_attempts=3,
        retry_wait_s=(0.01, 0.05),
        on_shard=events.append,
        progress=lambda done, _total: seen.append(done),
    )
    assert faults.opens == {
        "shard-00000-of-00003.safetensors": 1,
        name: 3,
        "shard-00002-of-00003.safetensors": 1,
    }
    assert _events_of(events, 1) == [
        ("pending", 0),
        ("running", 1),
        ("retrying", 1),
        ("running", 2),
        ("retrying", 2),
        ("running", 3),
        ("success", 3),
    ]
    retrying = [e for e in events if e.state == "retrying"]
    assert [type(e.error).__name__ for e in retrying] == ["UnavailableError"] * 2
    assert _events_of(events, 0) == [("pending", 0), ("running", 1), ("success", 1)]
    assert seen == sorted(seen) and seen[-1] == m.total_bytes  # monotone despite rewrites
    got = read_all(root, "retry:1")
    assert all(same(got[f"w{i}"], random_tensor("uint8", (20_000,), i)) for i in range(3))


def test_a_permanent_shard_failure_fails_at_once_and_stops_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from tensorcast_ray._disk import ShardEvent
    from tensorcast_ray._errors import AbortedError, PermissionDeniedError

    faults = _Faults(monkeypatch)
    faults.write_delay = 0.002
    faults.plan[("shard-00000-of-00004.safetensors", 1)] = PermissionError(13, "denied (test)")
    root = _mem_root()
    ts = [source(f"w{i}", random_tensor("uint8", (400_000,), i)) for i in range(4)]
    events: list[ShardEvent] = []
    start = time.monotonic()
    with pytest.raises(PermissionDeniedError, match="denied"):
        write_artifact(
            root,
            "perm:1",
            ts,
            plan=[[0], [1], [2], [3]],
            max_buffer_bytes=4096,  # ~100 chunks of 2 ms per shard
            parallelism=3,
            shard_attempts=5,
            retry_wait_s=(1.0, 1.0),
            on_shard=events.append,
        )
    assert time.monotonic() - start < 1.0  # no backoff (1 s), no waiting for the others
    assert faults.opens["shard-00000-of-00004.safetensors"] == 1  # not retried
    last = {e.index: e for e in events}
    assert set(last) == {0, 1, 2, 3} and all(e.state == "failed" for e in last.values())
    assert isinstance(last[0].error, PermissionDeniedError)
    for s in (1, 2, 3):  # stopped early (3 never started), reported failed as aborted
        assert isinstance(last[s].error, AbortedError) and last[s].done_bytes < 400_000
    assert "shard-00003-of-00004.safetensors" not in faults.opens
    with pytest.raises(NotFoundError):
        read_manifest(root, "perm:1")


@pytest.mark.parametrize("parallelism", [1, 3])
def test_cancel_mid_write_leaves_no_files_and_no_manifest(root: str, parallelism: int) -> None:
    import threading

    from tensorcast_ray._disk import ShardEvent
    from tensorcast_ray._errors import AbortedError

    ts = [source(f"w{i}", random_tensor("uint8", (50_000,), i)) for i in range(4)]
    cancel = threading.Event()
    events: list[ShardEvent] = []

    def on_shard(e: ShardEvent) -> None:
        events.append(e)
        if e.index == 2 and e.state == "running" and e.done_bytes >= 20_000:
            cancel.set()  # shards 0 and 1 are already published by now

    with pytest.raises(AbortedError, match=r"export of c:1 was cancelled"):
        write_artifact(
            root,
            "c:1",
            ts,
            plan=[[0], [1], [2], [3]],
            max_buffer_bytes=4096,
            parallelism=parallelism,
            on_shard=on_shard,
            cancel=cancel,
        )
    last = {e.index: e for e in events}
    assert set(last) == {0, 1, 2, 3} and last[2].state == "failed"
    assert isinstance(last[2].error, AbortedError)
    if parallelism == 1:
        assert last[3].state == "failed" and isinstance(last[3].error, AbortedError)
        assert [e.index for e in events if e.state == "success"] == [0, 1]
    # In parallel, shard 3 may finish before the cancel reaches it: published or not, no
    # file of the export is left (the published ones are removed) and nothing commits.
    fs, base = fsspec.core.url_to_fs(artifact_path(root, "c:1"))
    assert not fs.exists(base) or fs.ls(base, detail=False) == []
    with pytest.raises(NotFoundError):
        read_manifest(root, "c:1")
    assert list_artifacts(root) == []
    cancel.clear()
    write_artifact(root, "c:1", ts, cancel=cancel)  # a later export of the key works


def test_the_deadline_bounds_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from tensorcast_ray._errors import DeadlineExceededError

    faults = _Faults(monkeypatch)
    for n in range(1, 50):
        faults.plan[("shard-00000-of-00001.safetensors", n)] = ConnectionResetError(104, "x")
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="deadline"):
        write_artifact(
            _mem_root(),
            "d:1",
            [source("w", random_tensor("uint8", (20_000,)))],
            max_buffer_bytes=4096,
            shard_attempts=50,
            retry_wait_s=(0.05, 0.1),
            deadline=time.monotonic() + 0.4,
        )
    assert time.monotonic() - start < 1.0
    assert 2 <= faults.opens["shard-00000-of-00001.safetensors"] < 50


def test_a_shard_removed_before_the_manifest_commits_fails_the_export(tmp_path: Path) -> None:
    """A delete of the key racing an export (its shard files removed after they were written)
    must not leave a committed manifest over missing bytes: ABORTED, nothing committed."""
    from tensorcast_ray._errors import AbortedError

    root = f"file://{tmp_path}/root"
    ts = [source(f"t{i}", random_tensor("float32", (256,), seed=i)) for i in range(3)]
    directory = artifact_path(root, "race:v1").removeprefix("file://")

    def remove_first_shard(event: object) -> None:
        if getattr(event, "state", "") == "success" and getattr(event, "index", -1) == 2:
            os.unlink(os.path.join(directory, sorted(os.listdir(directory))[0]))

    with pytest.raises(AbortedError, match="before the manifest was committed") as err:
        write_artifact(
            root, "race:v1", ts, plan=[[0], [1], [2]], parallelism=1, on_shard=remove_first_shard
        )
    assert not err.value.retryable
    with pytest.raises(NotFoundError):
        read_manifest(root, "race:v1")
