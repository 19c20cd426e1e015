"""The node-local data plane against a real local Ray: the verbs across 4 actors, every dtype,
zero-copy reads, register leases, get_into validation, views, and a non-Ray client.

The daemon's pool is small in tests (tests/config/daemon.yaml: 32 MiB pool, 16 MiB segments).
Never write to a tensor returned without ``copy=True``: its pages are mapped read-only and a
write is a segmentation fault. Read-only-ness is checked through /proc/self/maps instead.
"""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch

import tensorcast_ray as tc
from tests.helpers import python_child, shm_prefix, wait_for

pytestmark = pytest.mark.timeout(300)
# pytest imports this file under a name Ray's workers cannot import: ship its code by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
Digest = dict[str, tuple[str, tuple[int, ...], str]]


# ---- helpers used in the driver and in the actors ---------------------------------------------
def digest(tensors: dict[str, torch.Tensor]) -> Digest:
    """``{name: (dtype, shape, sha256 of the raw bytes)}``; reads every byte."""
    out = {}
    for name, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        out[name] = (str(t.dtype), tuple(t.shape), hashlib.sha256(raw.numpy()).hexdigest())
    return out


def sample(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randint(-1000, 1000, (17,), generator=g),
        "h": torch.randn(8, 8, generator=g).to(torch.bfloat16),
    }


def mapping_of(ptr: int) -> tuple[str, str]:
    """``(permissions, path)`` of this process's mapping that contains address ``ptr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[1], parts[5].strip() if len(parts) > 5 else ""
    raise AssertionError(f"address {ptr:#x} is in no mapping")


def rss_anon() -> int:
    """This process's resident anonymous (private) memory, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def error_of(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, str] | None:
    """``(class name, status code name)`` of the ArtifactError ``fn`` raises, else None."""
    try:
        fn(*args, **kwargs)
    except tc.ArtifactError as exc:
        return type(exc).__name__, exc.status_code.name
    return None


def ns_segments(namespace: str) -> dict[str, int]:
    """This namespace's files in /dev/shm and the bytes each really holds (allocated)."""
    prefix = shm_prefix(namespace)
    out = {}
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            try:
                out[name] = os.stat(f"/dev/shm/{name}").st_blocks * 512
            except FileNotFoundError:
                pass
    return out


@ray.remote(num_cpus=0)
class Worker:
    """One process on the node: a producer or a reader."""

    def __init__(self) -> None:
        self.held: dict[str, Any] = {}
        # tc.empty buffers stay alive for the actor's life: their address ranges are never
        # reused (see test_register_after_buffer_address_reuse for why that matters today).
        self.buffers: list[torch.Tensor] = []

    def init(self, namespace: str) -> int:
        tc.shutdown()
        self.held.clear()
        ctx = tc.init(namespace=namespace, global_store_mode="none")
        assert ctx.transport == "local"
        return os.getpid()

    def put(self, key: str, seed: int) -> str:
        return tc.put(sample(seed), key=key).artifact_id

    def put_error(self, key: str, seed: int) -> tuple[str, str] | None:
        return error_of(tc.put, sample(seed), key=key)

    def digest(self, key: str, names: list[str] | None = None) -> Digest:
        return digest(tc.get(key, names=names))

    def into_and_view(self, key: str) -> tuple[Digest, Digest]:
        """``get_into`` fresh targets, and a zero-copy row view of ``w``."""
        specs = tc.artifact(key).specs()
        targets = {
            n: torch.empty(shape, dtype=getattr(torch, dt)) for n, (dt, shape) in specs.items()
        }
        tc.get_into(key, targets)
        rows = tc.artifact(key).view({"w": (slice(8, 16),)}).tensor_dict(names=["w"])
        return digest(targets), digest(rows)

    def get_error(self, key: str) -> tuple[str, str] | None:
        return error_of(tc.get, key)

    def latest(self, name: str) -> str:
        return tc.artifact(f"{name}:latest").key

    def exists(self, key: str) -> bool:
        return tc.exists(key)

    def list_keys(self, prefix: str = "") -> list[str]:
        return tc.list_keys(prefix)

    def delete(self, key: str) -> bool:
        return tc.delete(key)

    def delete_error(self, key: str) -> tuple[str, str] | None:
        return error_of(tc.delete, key)

    def hold(self, key: str, with_digest: bool = True) -> dict[str, Any]:
        """Get ``key``, read every byte and keep the tensors; where they live, what they hold
        and how much private (anonymous) memory this process gained meanwhile."""
        anon_before = rss_anon()
        tensors = tc.get(key)
        self.held[key] = tensors
        first = next(iter(tensors.values()))
        perms, path = mapping_of(first.data_ptr())
        checksum = sum(
            int(t.sum(dtype=torch.int64)) for t in tensors.values() if t.dtype == torch.int32
        )
        return {
            "digest": digest(tensors) if with_digest else None,
            "perms": perms,
            "path": path,
            "int_sum": checksum,
            "anon_growth": rss_anon() - anon_before,
        }

    def held_digest(self, key: str) -> Digest:
        return digest(self.held[key])

    def held_value(self, key: str, name: str, index: int) -> float:
        return float(self.held[key][name].reshape(-1)[index])

    def release(self) -> None:
        self.held.clear()

    # ---- producer side of register ----
    def register_empty(self, key: str, n: int, like: bool = False) -> dict[str, Any]:
        if like:
            buf = tc.empty_like(torch.zeros(n, dtype=torch.float32))
        else:
            buf = tc.empty((n,), dtype=torch.float32)
        buf.copy_(torch.arange(n, dtype=torch.float32))
        self.buffers.append(buf)
        self.held[key] = {"w": buf}
        result = tc.register({"w": buf}, key=key)
        return {"status": result.status, "nbytes": result.nbytes}

    def register_slice(self, key: str, inner: bool) -> int:
        big = tc.empty((10, 10), dtype=torch.float32)
        big.copy_(torch.arange(100, dtype=torch.float32).reshape(10, 10))
        self.buffers.append(big)
        part = big[2:4] if inner else big[:, 0]  # rows: contiguous; a column: not
        self.held[key] = {"big": big}
        return tc.register({"w": part}, key=key).nbytes

    def register_plain(self, key: str, ttl_ms: int | None = None) -> str:
        t = torch.arange(16, dtype=torch.float32)
        self.held[key] = {"w": t}
        return tc.register({"w": t}, key=key, ttl_ms=ttl_ms).artifact_id

    def write(self, key: str, name: str, index: int, value: float) -> None:
        self.held[key][name].reshape(-1)[index] = value

    def segments_of(self, key: str) -> list[str]:
        info = tc.artifact(key)._entry.info
        return [s.name for s in info.segments]


@pytest.fixture(scope="module")
def workers(ray_local: object) -> Iterator[list[Any]]:
    pool = [Worker.remote() for _ in range(4)]
    yield pool
    for w in pool:
        ray.kill(w)


@pytest.fixture
def driver(namespace: str) -> str:
    """The test process, initialized in this test's namespace."""
    tc.init(namespace=namespace, global_store_mode="none")
    return namespace


@pytest.fixture
def nodes(driver: str, workers: list[Any]) -> list[Any]:
    """The driver and the 4 workers, all initialized in this test's namespace."""
    namespace = driver
    pids = ray.get([w.init.remote(namespace) for w in workers], timeout=180)
    assert len(set(pids) | {os.getpid()}) == 5
    return workers


def expected(seed: int) -> Digest:
    return digest(sample(seed))


# ---- 1. the verbs across actors ---------------------------------------------------------------
def test_put_visible_to_every_actor_once_put_returns(nodes: list[Any]) -> None:
    for i in range(8):
        writer = nodes[i % 4]
        key = f"m:v{i}"
        ray.get(writer.put.remote(key, i), timeout=60)
        # Read-your-writes: the put returned, so every other process sees it now.
        readers = [w for w in nodes if w is not writer]
        got = ray.get([r.digest.remote(key) for r in readers], timeout=60)
        assert all(d == expected(i) for d in got)
        assert all(ray.get([r.exists.remote(key) for r in readers], timeout=60))
    assert digest(tc.get("m:v3")) == expected(3)
    keys = [f"m:v{i}" for i in range(8)]
    assert ray.get(nodes[2].list_keys.remote("m:"), timeout=60) == sorted(keys)
    assert tc.list_keys("m:v1") == ["m:v1"]
    assert tc.list_keys("zz") == []
    # get_into and view from another process.
    into, rows = ray.get(nodes[3].into_and_view.remote("m:v2"), timeout=60)
    assert into == expected(2)
    assert rows == digest({"w": sample(2)["w"][8:16]})
    # names= selects a subset.
    assert ray.get(nodes[1].digest.remote("m:v5", ["b"]), timeout=60) == {"b": expected(5)["b"]}


def test_latest_is_commit_order_and_versions_are_immutable(nodes: list[Any]) -> None:
    ray.get(nodes[0].put.remote("p:v10", 10), timeout=60)
    ray.get(nodes[1].put.remote("p:v9", 9), timeout=60)
    latest = ray.get([w.latest.remote("p") for w in nodes], timeout=60)
    assert latest == ["p:v9"] * 4  # commit order, not lexical order
    assert digest(tc.get("p:latest")) == expected(9)
    # Writing an existing version again fails from any process and changes nothing.
    err = ray.get(nodes[2].put_error.remote("p:v10", 99), timeout=60)
    assert err == ("AlreadyExistsError", "ALREADY_EXISTS")
    with pytest.raises(tc.AlreadyExistsError) as exc:
        tc.put(sample(98), key="p:v9")
    assert exc.value.status_code == grpc.StatusCode.ALREADY_EXISTS
    assert ray.get(nodes[3].digest.remote("p:v10"), timeout=60) == expected(10)
    assert ray.get(nodes[3].latest.remote("p"), timeout=60) == "p:v9"
    # 'latest' can be neither written nor deleted.
    with pytest.raises(tc.InvalidArgumentError):
        tc.put(sample(1), key="p:latest")
    assert ray.get(nodes[1].delete_error.remote("p:latest"), timeout=60) == (
        "InvalidArgumentError",
        "INVALID_ARGUMENT",
    )
    assert tc.exists("p:v9") and tc.exists("p:v10")
    # After the newest goes, latest falls back to the previous commit.
    assert tc.delete("p:v9") is True
    assert ray.get(nodes[0].latest.remote("p"), timeout=60) == "p:v10"
    assert tc.artifact("p:latest").key == "p:v10"


def test_delete_while_readers_hold_tensors(nodes: list[Any]) -> None:
    ray.get(nodes[0].put.remote("d:v1", 7), timeout=60)
    held = ray.get([w.hold.remote("d:v1") for w in nodes[1:3]], timeout=60)
    assert all(h["digest"] == expected(7) for h in held)
    art = tc.artifact("d:v1")  # opened before the delete
    assert ray.get(nodes[0].delete.remote("d:v1"), timeout=60) is True
    # Once delete returned: nobody finds it, in any process, cached layout or not.
    assert ray.get(nodes[1].get_error.remote("d:v1"), timeout=60) == ("NotFoundError", "NOT_FOUND")
    assert ray.get(nodes[3].get_error.remote("d:v1"), timeout=60) == ("NotFoundError", "NOT_FOUND")
    with pytest.raises(tc.NotFoundError):
        art.tensor_dict()
    with pytest.raises(tc.NotFoundError):
        tc.get("d:v1")
    assert not any(ray.get([w.exists.remote("d:v1") for w in nodes], timeout=60))
    assert "d:v1" not in tc.list_keys()
    # ... but the tensors readers already hold keep their bytes.
    assert (
        ray.get([w.held_digest.remote("d:v1") for w in nodes[1:3]], timeout=60) == [expected(7)] * 2
    )
    # Deleting again, or a version never written: NOT_FOUND.
    assert ray.get(nodes[2].delete_error.remote("d:v1"), timeout=60) == (
        "NotFoundError",
        "NOT_FOUND",
    )
    with pytest.raises(tc.NotFoundError) as err:
        tc.delete("d:never")
    assert err.value.status_code == grpc.StatusCode.NOT_FOUND
    # The version can be written again, with new content, and the old holders still see theirs.
    tc.put(sample(8), key="d:v1")
    assert ray.get(nodes[3].digest.remote("d:v1"), timeout=60) == expected(8)
    assert ray.get(nodes[1].held_digest.remote("d:v1"), timeout=60) == expected(7)
    ray.get([w.release.remote() for w in nodes], timeout=60)


def test_bad_keys_are_invalid_argument(driver: str) -> None:
    for key in ("nocolon", ":v1", "x:", "x\n:v1", "n" * 1030 + ":v1"):
        with pytest.raises(tc.InvalidArgumentError):
            tc.put(sample(0), key=key)
        with pytest.raises(tc.InvalidArgumentError):
            tc.get(key)
    with pytest.raises(tc.InvalidArgumentError):
        tc.put([torch.zeros(2)], key="x:v1")  # type: ignore[arg-type]
    with pytest.raises(tc.InvalidArgumentError):
        tc.put({"x": [1, 2, 3]}, key="x:v1")
    with pytest.raises(tc.InvalidArgumentError):
        tc.put({"x": torch.zeros(3).to_sparse()}, key="x:v1")
    with pytest.raises(tc.InvalidArgumentError):
        tc.register({"x": torch.zeros(3)}, key="x:v1", ttl_ms=0)
    assert tc.list_keys() == []


# ---- 2. every dtype, bit-exact ----------------------------------------------------------------
DTYPES = [
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
]
TORCH_DTYPES = [
    getattr(torch, n) for n in DTYPES if isinstance(getattr(torch, n, None), torch.dtype)
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random raw bytes (NaN payloads included) of ``dtype``; bools are 0/1."""
    g = torch.Generator().manual_seed(seed)
    numel = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = dtype.itemsize
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_every_dtype_round_trips_bit_exact(nodes: list[Any]) -> None:
    assert len(TORCH_DTYPES) >= 20, [str(d) for d in TORCH_DTYPES]
    tensors: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(TORCH_DTYPES):
        name = str(dt).removeprefix("torch.")
        tensors[f"{name}/2d"] = random_tensor(dt, (5, 7), i)
        tensors[f"{name}/0d"] = random_tensor(dt, (), 100 + i)
        tensors[f"{name}/empty"] = random_tensor(dt, (0, 3), 0)
        base = random_tensor(dt, (6, 8), 200 + i)
        tensors[f"{name}/strided"] = base[:, 1::3]  # non-contiguous
        tensors[f"{name}/transposed"] = base.t()
    assert not tensors["float32/strided"].is_contiguous()
    tc.put(tensors, key="dtypes:v1")
    want = digest(tensors)
    got = tc.get("dtypes:v1")
    assert digest(got) == want
    for name, t in got.items():
        assert t.is_contiguous(), name
        assert t.shape == tensors[name].shape and t.dtype == tensors[name].dtype
        if t.numel():
            raw = tensors[name].contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(t.reshape(-1).view(torch.uint8), raw), name
    # Another process reads the same bytes.
    assert ray.get(nodes[2].digest.remote("dtypes:v1"), timeout=120) == want
    assert digest(tc.get("dtypes:v1", copy=True)) == want


def test_numpy_inputs_come_back_as_torch(driver: str) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, size=(3, 3)),
        "u16": rng.integers(0, 2**16, size=9).astype(np.uint16),
        "b": rng.integers(0, 2, size=6).astype(bool),
        "c64": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 2), dtype=np.int32),
        "strided": rng.standard_normal((6, 6))[::2, ::-1],  # negative stride
        "big_endian": np.arange(5, dtype=">i4"),
    }
    tc.put(arrays, key="np:v1")
    got = tc.get("np:v1")
    for name, arr in arrays.items():
        t = got[name]
        assert isinstance(t, torch.Tensor), name
        native = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
        assert t.dtype == torch.from_numpy(native).dtype, name
        assert tuple(t.shape) == arr.shape, name
        np.testing.assert_array_equal(t.numpy(), native, err_msg=name)


# ---- 3. zero-copy -----------------------------------------------------------------------------
def test_reads_are_zero_copy_and_read_only(driver: str) -> None:
    namespace = driver
    tc.put(sample(3), key="z:v1")
    first, second = tc.get("z:v1"), tc.get("z:v1")
    via_artifact = tc.artifact("z:v1").tensor_dict()
    for name in first:
        assert first[name].data_ptr() == second[name].data_ptr() == via_artifact[name].data_ptr()
        perms, path = mapping_of(first[name].data_ptr())
        assert "w" not in perms and perms.endswith("s"), (name, perms)
        assert path.startswith(f"/dev/shm/{shm_prefix(namespace)}"), path
    latest = tc.get("z:latest")
    assert latest["w"].data_ptr() == first["w"].data_ptr()
    private = tc.get("z:v1", copy=True)
    assert digest(private) == digest(first) == expected(3)
    for name, t in private.items():
        assert t.data_ptr() != first[name].data_ptr()
        perms, path = mapping_of(t.data_ptr())
        assert "w" in perms and not path.startswith("/dev/shm"), (name, perms, path)
    private["w"].add_(1)  # a private copy is writable ...
    assert digest(tc.get("z:v1")) == expected(3)  # ... and the store is untouched


def settle_background_writes(namespace: str) -> None:
    """Wait until this process's write staging and the daemon's pool are full, so the bytes
    in /dev/shm change only with what the test does next."""
    from tensorcast_ray._config import from_env, load_daemon_config
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    state = tc._bootstrap.current()
    hello = state.client.hello
    stager = getattr(state, "stager", None)
    if stager is not None and hello.staging_bytes:
        assert stager.wait_ready(timeout=120)
    pool = int(load_daemon_config(None, from_env()).shm_pool_bytes)
    wait_for(
        lambda: state.client.call("Status", daemon_pb2.StatusRequest(), 10).shm_pool_bytes >= pool,
        60,
        "the daemon's segment pool to refill",
    )


def test_four_readers_share_one_copy(nodes: list[Any], namespace: str) -> None:
    size = 256 * MiB
    tc.put({"x": torch.zeros(4)}, key="warmup:v1")  # connects; too small to start staging
    payload = {"big": torch.arange(size // 4, dtype=torch.int32) % 1009}
    want_sum = int(payload["big"].sum(dtype=torch.int64))
    settle_background_writes(namespace)
    before = sum(ns_segments(namespace).values())
    tc.put(payload, key="big:v1")
    del payload
    after_put = sum(ns_segments(namespace).values())
    held = ray.get([w.hold.remote("big:v1", False) for w in nodes], timeout=240)
    after_readers = sum(ns_segments(namespace).values())
    print(
        f"\n/dev/shm for a {size / MiB:.0f} MiB artifact: +{(after_put - before) / MiB:.1f} MiB "
        f"after put, +{(after_readers - before) / MiB:.1f} MiB with 4 readers holding it; "
        f"readers' private memory grew by {[round(h['anon_growth'] / MiB, 1) for h in held]} MiB"
    )
    paths = {h["path"] for h in held}
    assert len(paths) == 1 and next(iter(paths)).startswith(f"/dev/shm/{shm_prefix(namespace)}")
    assert all("w" not in h["perms"] and h["perms"].endswith("s") for h in held)
    assert all(h["int_sum"] == want_sum for h in held)  # every page was read
    assert size <= after_put - before <= 1.25 * size  # the bytes are in shared memory ...
    assert after_readers - before <= 1.25 * size  # ... once, whatever the number of readers
    assert all(h["anon_growth"] < size // 4 for h in held)  # and no reader made a copy
    # Deleted while every reader holds its tensors: they keep reading the same bytes.
    assert tc.delete("big:v1")
    assert ray.get(nodes[3].held_value.remote("big:v1", "big", 1008), timeout=60) == 1008.0
    ray.get([w.release.remote() for w in nodes], timeout=60)
    wait_for(
        lambda: sum(ns_segments(namespace).values()) - before < size,
        60,
        "the deleted artifact's segment to leave /dev/shm",
    )


# ---- 4. register ------------------------------------------------------------------------------
def test_register_of_empty_buffer_is_zero_copy(nodes: list[Any]) -> None:
    producer, reader = nodes[0], nodes[1]
    for like, key in ((False, "r:empty"), (True, "r:empty_like")):
        out = ray.get(producer.register_empty.remote(key, 1024, like), timeout=60)
        assert out == {"status": "ready", "nbytes": 4096}
        first = ray.get(reader.hold.remote(key), timeout=60)
        assert first["digest"] == digest({"w": torch.arange(1024, dtype=torch.float32)})
        assert first["perms"].endswith("s") and "w" not in first["perms"]
        # The reader maps the producer's own pages: a later write by the producer shows.
        ray.get(producer.write.remote(key, "w", 5, -42.0), timeout=60)
        assert ray.get(reader.held_value.remote(key, "w", 5), timeout=60) == -42.0
        assert float(tc.get(key)["w"][5]) == -42.0
    ray.get([producer.release.remote(), reader.release.remote()], timeout=60)


def test_register_slice_inside_buffer_is_zero_copy(nodes: list[Any]) -> None:
    producer, reader = nodes[2], nodes[3]
    assert ray.get(producer.register_slice.remote("s:rows", True), timeout=60) == 2 * 10 * 4
    assert tc.get("s:rows")["w"].tolist() == [list(range(20, 30)), list(range(30, 40))]
    ray.get(reader.hold.remote("s:rows"), timeout=60)
    ray.get(producer.write.remote("s:rows", "big", 21, -1.0), timeout=60)  # row 2, col 1
    assert float(tc.get("s:rows")["w"][0, 1]) == -1.0
    assert ray.get(reader.held_value.remote("s:rows", "w", 1), timeout=60) == -1.0
    # A column is not contiguous: it is copied once, so later writes do not show.
    assert ray.get(producer.register_slice.remote("s:col", False), timeout=60) == 10 * 4
    assert tc.get("s:col")["w"].tolist() == [float(10 * i) for i in range(10)]
    ray.get(producer.write.remote("s:col", "big", 10, -5.0), timeout=60)  # (1, 0)
    assert float(tc.get("s:col")["w"][1]) == 10.0
    ray.get([producer.release.remote(), reader.release.remote()], timeout=60)


def test_register_of_plain_tensor_copies_once_and_ttl_expires(nodes: list[Any]) -> None:
    producer, reader = nodes[1], nodes[3]
    ray.get(producer.register_plain.remote("c:v1"), timeout=60)
    ray.get(producer.register_plain.remote("ttl:v1", 300), timeout=60)
    ray.get(producer.write.remote("c:v1", "w", 0, 99.0), timeout=60)
    assert tc.get("c:v1")["w"].tolist() == [float(i) for i in range(16)]  # it was copied
    wait_for(
        lambda: not ray.get(reader.exists.remote("ttl:v1"), timeout=60),
        30,
        "the registered artifact to expire after ttl_ms",
    )
    assert ray.get(reader.get_error.remote("ttl:v1"), timeout=60) == ("NotFoundError", "NOT_FOUND")
    with pytest.raises(tc.NotFoundError):
        tc.get("ttl:v1")
    ray.get(producer.release.remote(), timeout=60)
    assert tc.exists("c:v1")  # no TTL: the lease outlives the producer's tensor
    for bad in (0, -5, 1.5, "100"):
        with pytest.raises(tc.InvalidArgumentError):
            tc.register(sample(0), key="ttl:v2", ttl_ms=bad)  # type: ignore[arg-type]
    assert not tc.exists("ttl:v2")


def test_register_ttl_ms_bool_is_invalid_argument() -> None:
    assert not tc.is_initialized()  # validation alone must reject it: nothing is sent
    with pytest.raises(tc.InvalidArgumentError, match="ttl_ms"):
        tc.register({"w": torch.zeros(2)}, key="ttl:v3", ttl_ms=True)


def test_register_after_buffer_address_reuse(driver: str) -> None:
    import gc

    first = tc.empty((1024,), dtype=torch.float32)
    first.fill_(1.0)
    old = first.data_ptr()
    del first
    gc.collect()
    keep = []
    for _ in range(4):  # the kernel hands the freed range back to the next mapping
        second = tc.empty((1024,), dtype=torch.float32)
        keep.append(second)
        if second.data_ptr() == old:
            break
    assert second.data_ptr() == old, "the address was not reused; the scenario did not occur"
    second.fill_(2.0)
    tc.register({"w": second}, key="reuse:v1")
    assert tc.get("reuse:v1")["w"].tolist() == [2.0] * 1024


def test_a_fresh_buffer_per_step_does_not_leak(driver: str) -> None:
    """The documented publish loop: a fresh tc.empty buffer per step, registered under a
    new version, the old version deleted. The old code kept every buffer leased (and its
    bytes booked) until the process exited."""
    import gc

    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    client = tc._bootstrap.current().client

    def status() -> Any:
        return client.call("Status", daemon_pb2.StatusRequest(), 10)

    before = status()
    for step in range(3):
        buf = tc.empty((1 << 18,), dtype=torch.float32)  # 1 MiB
        buf.fill_(float(step))
        tc.register({"w": buf}, key=f"loop:v{step}")
        del buf
        gc.collect()
        if step:
            tc.delete(f"loop:v{step - 1}")
    assert tc.get("loop:v2")["w"][0].item() == 2.0, "the live version keeps its buffer"
    tc.delete("loop:v2")
    tc.exists("loop:v2")  # the next verb sends what this process no longer maps
    after = status()
    assert after.leases == before.leases
    assert after.tiers[0].used_bytes == before.tiers[0].used_bytes, "no bytes still booked"


def test_killed_producer_loses_its_leases(nodes: list[Any], namespace: str) -> None:
    producer = Worker.remote()
    reader = nodes[2]
    try:
        ray.get(producer.init.remote(namespace), timeout=120)
        ray.get(producer.register_empty.remote("lease:buf", 4096), timeout=60)
        ray.get(producer.register_plain.remote("lease:copy"), timeout=60)
        ray.get(nodes[0].put.remote("lease:put", 1), timeout=60)  # a put is not a lease
        segments = set(ray.get(reader.segments_of.remote("lease:buf"), timeout=60))
        segments |= set(ray.get(reader.segments_of.remote("lease:copy"), timeout=60))
        assert len(segments) == 2 and segments <= set(ns_segments(namespace))
        held = ray.get(reader.hold.remote("lease:buf"), timeout=60)
    finally:
        ray.kill(producer)
    wait_for(
        lambda: not tc.exists("lease:buf") and not tc.exists("lease:copy"),
        60,
        "the killed producer's leases to end",
    )
    for key in ("lease:buf", "lease:copy"):
        assert ray.get(reader.get_error.remote(key), timeout=60) == ("NotFoundError", "NOT_FOUND")
    wait_for(
        lambda: not segments & set(ns_segments(namespace)),
        60,
        "the killed producer's segments to leave /dev/shm",
    )
    # The reader that held the registered tensors still reads the bytes it mapped.
    assert ray.get(reader.held_digest.remote("lease:buf"), timeout=60) == held["digest"]
    assert tc.exists("lease:put")
    assert tc.list_keys("lease:") == ["lease:put"]
    ray.get(reader.release.remote(), timeout=60)


# ---- 5. get_into ------------------------------------------------------------------------------
def _targets(fill: float = -7.0) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((64, 32), fill),
        "b": torch.full((17,), int(fill), dtype=torch.int64),
        "h": torch.full((8, 8), fill, dtype=torch.bfloat16),
    }


def test_get_into_fills_targets_and_names_subset(driver: str) -> None:
    tc.put(sample(4), key="gi:v1")
    targets = _targets()
    assert tc.get_into("gi:v1", targets) is None
    assert digest(targets) == expected(4)
    only_b = {"b": torch.zeros(17, dtype=torch.int64)}
    tc.get_into("gi:v1", only_b)
    assert torch.equal(only_b["b"], sample(4)["b"])
    partial = _targets()
    tc.get_into("gi:v1", partial, names=["h"])
    assert torch.equal(partial["h"], sample(4)["h"])
    assert bool((partial["w"] == -7.0).all())  # not named: untouched
    art = tc.artifact("gi:v1")
    again = _targets()
    art.tensor_dict_into(again, names=["w", "b"])
    assert torch.equal(again["w"], sample(4)["w"]) and torch.equal(again["b"], sample(4)["b"])


def _inference_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode():
        return torch.zeros(shape, dtype=dtype)


def test_get_into_model_parameters(driver: str) -> None:
    """The common case: load pushed weights into a live model's parameters in place."""
    model = torch.nn.Linear(8, 4)
    pushed = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    tc.put(pushed, key="policy:v1")
    params = dict(model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    tc.get_into("policy:latest", params)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), pushed[name]) and p.requires_grad
        assert p.data_ptr() == ptrs[name], "in place"
    view_targets = {"weight": torch.nn.Parameter(torch.zeros(2, 8))}
    tc.artifact("policy:v1").view(slices={"weight": (slice(0, 2),)}).tensor_dict_into(view_targets)
    assert torch.equal(view_targets["weight"].detach(), pushed["weight"][:2])
    assert list(tc.get("policy:v1", names=(n for n in ["bias"]))) == ["bias"]


def test_get_into_validates_before_copying(driver: str) -> None:
    tc.put(sample(5), key="gi:v2")
    cases = {
        "shape": ("h", torch.zeros((8, 9), dtype=torch.bfloat16)),
        "dtype": ("h", torch.zeros((8, 8), dtype=torch.float16)),
        "numpy": ("h", np.zeros((8, 8))),
        "unknown-name": ("extra", torch.zeros(3)),
        # Right name, shape and dtype, but not writable in place:
        "expanded": ("h", torch.zeros((1, 8), dtype=torch.bfloat16).expand(8, 8)),
        "inference": ("h", _inference_tensor((8, 8), torch.bfloat16)),
    }
    for case, (bad_name, bad_target) in cases.items():
        targets: dict[str, Any] = _targets()
        targets[bad_name] = bad_target  # after "w" and "b", which are right
        with pytest.raises(tc.InvalidArgumentError, match=f"'{bad_name}'") as err:
            tc.get_into("gi:v2", targets)
        assert err.value.status_code == grpc.StatusCode.INVALID_ARGUMENT, case
        # Nothing was copied, not even into the targets checked before the bad one.
        assert bool((targets["w"] == -7.0).all()) and bool((targets["b"] == -7).all()), case
        with pytest.raises(tc.InvalidArgumentError, match=f"'{bad_name}'"):
            tc.artifact("gi:v2").tensor_dict_into(targets)
        assert bool((targets["w"] == -7.0).all()), case


def test_get_into_bad_names_and_deleted(driver: str) -> None:
    tc.put(sample(6), key="gi:v3")
    targets = _targets()
    with pytest.raises(tc.InvalidArgumentError, match="'nope'"):
        tc.get_into("gi:v3", targets, names=["w", "nope"])
    with pytest.raises(tc.InvalidArgumentError):
        tc.get_into("gi:v3", targets, names="w")  # a single str is not a list of names
    with pytest.raises(tc.InvalidArgumentError, match="'b'"):
        tc.get_into("gi:v3", {"w": targets["w"]}, names=["w", "b"])  # no target for b
    with pytest.raises(tc.InvalidArgumentError):
        tc.get_into("gi:v3", [targets["w"]])  # type: ignore[arg-type]
    with pytest.raises(tc.InvalidArgumentError):
        tc.get("gi:v3", names=["nope"])
    assert bool((targets["w"] == -7.0).all())
    art = tc.artifact("gi:v3")
    tc.delete("gi:v3")
    with pytest.raises(tc.NotFoundError):
        art.tensor_dict_into(targets)
    with pytest.raises(tc.NotFoundError):
        tc.get_into("gi:v3", targets)
    assert bool((targets["w"] == -7.0).all())


# ---- 6. views ---------------------------------------------------------------------------------
def test_views(driver: str) -> None:
    w = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    v = torch.arange(4 * 5 * 3, dtype=torch.int16).reshape(4, 5, 3)
    tc.put({"w": w, "v": v, "other": torch.ones(3)}, key="view:v1")
    art = tc.artifact("view:v1")
    base = art.tensor_dict()
    base_ptr = base["w"].data_ptr()

    rows = art.view({"w": (slice(2, 5),)}).tensor_dict()
    assert torch.equal(rows["w"], w[2:5])
    assert rows["w"].data_ptr() == base_ptr + 2 * 6 * 4  # zero-copy, in place
    assert torch.equal(rows["v"], v) and rows["v"].data_ptr() == base["v"].data_ptr()
    assert rows["other"].data_ptr() == base["other"].data_ptr()

    plain = art.view({"w": slice(-3, None)}).tensor_dict(names=["w"])
    assert list(plain) == ["w"] and torch.equal(plain["w"], w[5:])
    assert plain["w"].data_ptr() == base_ptr + 5 * 6 * 4
    full_rows = art.view({"w": (slice(1, 3), slice(0, 6))}).tensor_dict()["w"]
    assert torch.equal(full_rows, w[1:3]) and full_rows.data_ptr() == base_ptr + 6 * 4

    cols = art.view({"w": [(1, slice(1, 4))]}).tensor_dict()["w"]
    assert torch.equal(cols, w[:, 1:4]) and cols.is_contiguous()
    perms, _ = mapping_of(cols.data_ptr())
    assert "w" in perms  # a private copy, not the shared pages
    pairs = art.view({"v": [(-1, slice(0, 3, 2)), (0, slice(1, 3))]}).tensor_dict()["v"]
    assert torch.equal(pairs, v[1:3, :, 0:3:2])
    stepped = art.view({"w": (slice(0, 8, 3),)}).tensor_dict()["w"]
    assert torch.equal(stepped, w[0:8:3])

    copied = art.view({"w": (slice(2, 5),)}).tensor_dict(copy=True)["w"]
    assert copied.data_ptr() != rows["w"].data_ptr() and torch.equal(copied, w[2:5])

    view = art.view({"w": [(0, slice(2, 4)), (1, slice(0, 2))]})
    into = {"w": torch.zeros(2, 2), "v": torch.zeros(4, 5, 3, dtype=torch.int16)}
    view.tensor_dict_into(into)
    assert torch.equal(into["w"], w[2:4, 0:2]) and torch.equal(into["v"], v)
    wrong = {"w": torch.zeros(8, 6)}  # the unsliced shape
    with pytest.raises(tc.InvalidArgumentError, match="'w'"):
        view.tensor_dict_into(wrong)
    assert bool((wrong["w"] == 0).all())


BAD_VIEWS: list[Any] = [
    {"w": (slice(0, 9),)},  # past the end: not clamped
    {"w": (slice(-9, None),)},
    {"w": (slice(5, 2),)},  # start after stop
    {"w": (slice(0, 4, -1),)},
    {"w": (slice(0, 4, 0),)},
    {"w": (2,)},  # ints are not accepted
    {"w": (slice(0, 1), slice(0, 1), slice(0, 1))},  # too many dims
    {"w": [(2, slice(0, 1))]},  # no dim 2
    {"w": [(0, slice(0, 1)), (-2, slice(0, 1))]},  # dim 0 twice
    {"w": [(0, 1)]},
    {"w": (slice(0.0, 2),)},
    {"nope": (slice(0, 1),)},  # not a tensor of the artifact
    {"w": "0:2"},
    [("w", slice(0, 1))],  # not a mapping
]


def test_bad_views_are_invalid_argument(driver: str) -> None:
    tc.put({"w": torch.zeros(8, 6)}, key="view:bad")
    art = tc.artifact("view:bad")
    for spec in BAD_VIEWS:
        with pytest.raises(tc.InvalidArgumentError) as err:
            art.view(spec)
        assert err.value.status_code == grpc.StatusCode.INVALID_ARGUMENT, spec


# ---- 7. a process outside Ray -----------------------------------------------------------------
def test_non_ray_process_connected_by_address(nodes: list[Any], namespace: str) -> None:
    address = tc.init(namespace=namespace, global_store_mode="none").daemon_address
    tc.put(sample(11), key="ext:from-ray")
    script = textwrap.dedent(
        f"""
        import hashlib, json, sys
        import torch
        import tensorcast_ray as tc
        ctx = tc.init(mode="connect", address={address!r})
        out = {{"mode": ctx.mode, "transport": ctx.transport}}
        t = torch.arange(12, dtype=torch.float64).reshape(3, 4)
        out["put"] = tc.put({{"t": t}}, key="ext:v1").status
        out["get"] = tc.get("ext:v1")["t"].tolist()
        out["seen"] = hashlib.sha256(
            tc.get("ext:from-ray")["w"].contiguous().view(torch.uint8).numpy()
        ).hexdigest()
        buf = tc.empty((4,), dtype=torch.int32)
        buf.copy_(torch.tensor([1, 2, 3, 4], dtype=torch.int32))
        out["register"] = tc.register({{"b": buf}}, key="ext:lease").status
        tc.put({{"x": torch.ones(2)}}, key="ext:keep")
        out["deleted"] = tc.delete("ext:v1")
        try:
            tc.get("ext:v1")
        except tc.NotFoundError:
            out["after_delete"] = "NOT_FOUND"
        out["keys"] = tc.list_keys("ext:")
        out["ray_loaded"] = "ray" in sys.modules
        print(json.dumps(out))
        sys.stdout.flush()
        sys.stdin.readline()  # hold the session open until the test has looked
        """
    )
    with python_child(script) as (proc, out):
        assert proc.stdin is not None
        assert out["mode"] == "connect"
        assert out["put"] == "ready" and out["register"] == "ready"
        assert out["get"] == torch.arange(12, dtype=torch.float64).reshape(3, 4).tolist()
        w = sample(11)["w"]
        assert out["seen"] == hashlib.sha256(w.view(torch.uint8).numpy()).hexdigest()
        assert out["deleted"] is True and out["after_delete"] == "NOT_FOUND"
        assert out["keys"] == ["ext:from-ray", "ext:keep", "ext:lease"]
        assert out["ray_loaded"] is False
        # While it runs, its lease is visible to Ray processes.
        assert tc.get("ext:lease")["b"].tolist() == [1, 2, 3, 4]
        assert ray.get(nodes[0].digest.remote("ext:keep"), timeout=60) == digest(
            {"x": torch.ones(2)}
        )
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    # Its process exited: the lease ended, the put stays.
    wait_for(lambda: not tc.exists("ext:lease"), 60, "the exited process's lease to end")
    assert tc.list_keys("ext:") == ["ext:from-ray", "ext:keep"]
    with pytest.raises(tc.NotFoundError):
        tc.get("ext:v1")


def test_a_warm_get_hands_back_the_same_tensors_in_a_new_dict(driver: str) -> None:
    """Per-tensor work happens once per process and artifact generation: a second get of a
    known version returns the tensors the first one wrapped, in a dict of its own."""
    data = {f"t{i}": torch.full((4, 8), float(i)) for i in range(300)}
    data["empty"] = torch.zeros(0, 3)
    data["mixed"] = torch.arange(10, dtype=torch.int16)
    tc.put(data, key="warm:v1")
    first, second = tc.get("warm:v1"), tc.get("warm:v1")
    assert first is not second and list(first) == list(data)
    assert all(first[n] is second[n] for n in data), "the same cached tensors"
    first.clear()  # a caller's dict is its own
    assert len(tc.get("warm:v1")) == len(data)
    for name, tensor in data.items():
        assert torch.equal(second[name], tensor) and second[name].is_contiguous()
    subset = tc.get("warm:v1", names=["t7", "mixed"])
    assert list(subset) == ["t7", "mixed"] and subset["t7"] is second["t7"]
    copies = tc.get("warm:v1", copy=True)
    assert copies["t1"] is not second["t1"] and torch.equal(copies["t1"], data["t1"])
    tc.delete("warm:v1")
    with pytest.raises(tc.NotFoundError):
        tc.get("warm:v1")
