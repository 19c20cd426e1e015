"""Ray tensor transport ``"tensorcast"`` across simulated nodes: an actor method returning a
256 MiB state_dict with ``tensor_transport="tensorcast"`` is read by three actors on its node
(zero-copy: no private copy of the bytes in any of them) and one on another node (its daemon
pulls it; bit-exact), and by the driver's ``ray.get``; once the refs are dropped the version
is deleted and its shared memory freed. A producer of ``tc.empty`` tensors shares them with
no copy on its node (readers map its very buffer) and once per other node; a tensor that is
not on the CPU and a read after the producer died fail with clear errors; a killed producer
leaves nothing behind on any node."""

from __future__ import annotations

import gc
import hashlib
import os
import sys
from typing import Any

import pytest
import ray
import ray.cloudpickle

from tensorcast_ray import ArtifactError, FailedPreconditionError, NotFoundError
from tensorcast_ray.integrations import ray_transport
from tests.helpers import shm_prefix, wait_for
from tests.multinode.conftest import DAEMON_CONFIG, node_ids

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
# Before the classes below: Ray checks the transport name when @ray.method is applied.
ray_transport.register()

MiB = 1 << 20


def _state_dict(nbytes: int, tensors: int, empty: bool = False) -> dict[str, Any]:
    """About ``nbytes`` in ``tensors`` tensors, a model's mix: bf16 matrices and fp32 norms,
    every byte set (a seeded pattern). ``empty``: allocated with ``tc.empty``."""
    import torch

    import tensorcast_ray as tc

    norms = tensors // 4
    mats = tensors - norms
    cols = 256
    rows = max(1, (nbytes - norms * 1024 * 4) // (mats * cols * 2))
    gen = torch.Generator().manual_seed(nbytes + tensors)
    out: dict[str, Any] = {}
    for i in range(tensors):
        shape, dtype = ((rows, cols), torch.bfloat16) if i % 4 else ((1024,), torch.float32)
        t = tc.empty(shape, dtype) if empty else torch.empty(shape, dtype=dtype)
        t.view(-1).view(torch.uint8)[:] = torch.randint(
            0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=gen
        )
        out[f"layers.{i // 4}.{'wqkv'[i % 4]}.weight"] = t
    return out


def _digest(sd: dict[str, Any]) -> str:
    """Every tensor's name, dtype, shape and bytes (read in place: no copy)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(sd):
        t = sd[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _anon_bytes() -> int:
    """This process's anonymous memory (private heap: a copy of the bytes would land here;
    mapped shared memory does not)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous line in /proc/self/smaps_rollup")


def _backing_file(addr: int) -> str:
    """The file mapped at ``addr`` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return fields[5] if len(fields) > 5 else ""
    return ""


def _used_bytes(tc: Any) -> int:
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    return int(tc.store()._call("Status", daemon_pb2.StatusRequest(), 10).tiers[0].used_bytes)


def _shm_bytes(ns: str) -> int:
    """Bytes in the namespace's shared-memory files, every node (they share this host)."""
    prefix, total = shm_prefix(ns), 0
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            try:
                total += os.stat(f"/dev/shm/{name}").st_size
            except FileNotFoundError:
                pass
    return total


@ray.remote(num_cpus=0, enable_tensor_transport=True, max_restarts=0)
class Producer:
    def __init__(self, ns: str) -> None:
        import tensorcast_ray as tc

        tc.init(namespace=ns, daemon_config_path=DAEMON_CONFIG)
        self.tc = tc
        self.sd: dict[str, Any] = {}
        self.empty_sd: dict[str, Any] = {}

    def make(self, nbytes: int, tensors: int, empty: bool = False) -> str:
        sd = _state_dict(nbytes, tensors, empty)
        if empty:
            self.empty_sd = sd
        else:
            self.sd = sd
        return _digest(sd)

    @ray.method(tensor_transport="tensorcast")
    def state(self) -> dict[str, Any]:
        return {"sd": self.sd, "step": 7}

    @ray.method(tensor_transport="tensorcast")
    def empty_state(self) -> dict[str, Any]:
        return {"sd": self.empty_sd, "step": 8}

    @ray.method(tensor_transport="tensorcast")
    def not_on_cpu(self) -> dict[str, Any]:
        import torch

        return {"cpu": torch.ones(4), "meta": torch.empty(1024, device="meta")}

    def buffer_file(self) -> str:
        """The file under one of this actor's tc.empty tensors."""
        return _backing_file(next(iter(self.empty_sd.values())).data_ptr())

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


@ray.remote(num_cpus=0, enable_tensor_transport=True, max_restarts=0)
class Reader:
    def __init__(self, ns: str) -> None:
        import tensorcast_ray as tc

        tc.init(namespace=ns, daemon_config_path=DAEMON_CONFIG)
        self.tc = tc
        self.held: Any = None

    def anon(self) -> int:
        gc.collect()
        return _anon_bytes()

    def read(self, value: dict[str, Any]) -> dict[str, Any]:
        """``value`` arrived through the transport (Ray resolved the ref before this ran);
        hold it, so what the memory figures count is what holding it costs."""
        from tensorcast_ray._read_cache import in_read_only_mapping

        sd = value["sd"]
        self.held = value
        first = next(iter(sd.values()))
        gc.collect()
        return {
            "step": value["step"],
            "digest": _digest(sd),
            "tensors": len(sd),
            "read_only": all(in_read_only_mapping(t) for t in sd.values()),
            "anon": _anon_bytes(),
            "file": _backing_file(first.data_ptr()),
        }

    def drop(self) -> None:
        self.held = None
        gc.collect()

    def keys(self) -> list[str]:
        return list(self.tc.list_keys(ray_transport.KEY_PREFIX))

    def used(self) -> int:
        return _used_bytes(self.tc)

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


def _on(cls: Any, node: int, ns: str) -> Any:
    return cls.options(resources={f"tc_node_{node}": 0.01}).remote(ns)


def _kill(*actors: Any) -> None:
    for a in actors:
        ray.kill(a, no_restart=True)


def _cause(exc: BaseException) -> BaseException:
    """The error under Ray's wrappers (RayTaskError.cause, chained causes)."""
    seen = exc
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen or not isinstance(nxt, BaseException):
            return seen
        if isinstance(seen, ArtifactError):
            return seen
        seen = nxt


def _error_of(ref: Any) -> BaseException:
    try:
        ray.get(ref, timeout=120)
    except Exception as exc:
        return exc
    raise AssertionError("expected the call to fail")


def test_state_dict_through_tensorcast_zero_copy_on_node_one_pull_across_freed_with_refs(
    cluster: Any, ns: str
) -> None:
    import torch
    from ray.experimental import set_target_for_ref

    import tensorcast_ray as tc
    from tensorcast_ray import _bootstrap
    from tensorcast_ray._read_cache import in_read_only_mapping

    producer = _on(Producer, 0, ns)
    readers = [_on(Reader, 0, ns) for _ in range(3)]
    remote = _on(Reader, 1, ns)
    actors = [producer, *readers, remote]
    try:
        nodes = node_ids(cluster)
        assert ray.get([a.node.remote() for a in actors], timeout=120) == [nodes[0]] * 4 + [
            nodes[1]
        ]
        want = ray.get(producer.make.remote(256 * MiB, 320), timeout=120)
        used0 = ray.get([readers[0].used.remote(), remote.used.remote()], timeout=60)
        shm0 = _shm_bytes(ns)
        before = ray.get([r.anon.remote() for r in [*readers, remote]], timeout=60)

        ref = producer.state.remote()
        got = ray.get([r.read.remote(ref) for r in [*readers, remote]], timeout=180)
        for g in got:
            assert (g["step"], g["digest"], g["tensors"]) == (7, want, 320)
            assert g["read_only"]
        grown = [g["anon"] - b for g, b in zip(got, before, strict=True)]
        # Three readers on the producer's node map one copy: none holds the bytes privately.
        assert all(d < 32 * MiB for d in grown[:3]), [d // MiB for d in grown]
        assert len({g["file"] for g in got[:3]}) == 1
        # The other node's reader maps its own node's copy (pulled once by its daemon).
        assert got[3]["file"] != got[0]["file"] and grown[3] < 32 * MiB
        (key,) = ray.get(readers[0].keys.remote(), timeout=60)
        assert key.startswith(f"{ray_transport.KEY_PREFIX}/") and key.endswith(":0")
        used1 = ray.get([readers[0].used.remote(), remote.used.remote()], timeout=60)
        assert used1[0] - used0[0] >= 250 * MiB and used1[1] - used0[1] >= 250 * MiB
        assert _shm_bytes(ns) > shm0 + 500 * MiB  # one copy on each of the two nodes

        # The driver's ray.get reads through the transport too (tensorcast initialized on
        # demand, in the producer's namespace).
        assert not tc.is_initialized()
        try:
            value = ray.get(ref, timeout=120)
            assert _bootstrap.current().ctx.namespace == ns
            assert value["step"] == 7 and _digest(value["sd"]) == want
            # ... and into buffers of one's own (writable copies) when set on the ref.
            buffers = [torch.empty_like(t) for t in value["sd"].values()]
            del value
            set_target_for_ref(ref, buffers)
            copied = ray.get(ref, timeout=120)
            assert all(a is b for a, b in zip(copied["sd"].values(), buffers, strict=True))
            assert _digest(copied["sd"]) == want and not in_read_only_mapping(buffers[0])
            del copied, buffers
        finally:
            tc.shutdown()

        # Drop every ref and what readers hold: the version is deleted, its memory freed.
        ray.get([r.drop.remote() for r in [*readers, remote]], timeout=60)
        del ref
        gc.collect()
        wait_for(lambda: not ray.get(readers[0].keys.remote(), timeout=30), 60, "the key to go")
        wait_for(
            lambda: ray.get([readers[0].used.remote(), remote.used.remote()], timeout=30) == used0,
            60,
            "both daemons' used bytes to return",
        )
        # What is left is the daemons' pools and staging refilled (tens of MiB), not the two
        # 256 MiB copies.
        wait_for(lambda: _shm_bytes(ns) < shm0 + 64 * MiB, 60, "the shared memory to be freed")
    finally:
        _kill(*actors)


def test_tc_empty_zero_copy_errors_and_a_killed_producer_leaves_nothing(
    cluster: Any, ns: str
) -> None:
    producer = _on(Producer, 0, ns)
    local, remote = _on(Reader, 0, ns), _on(Reader, 1, ns)
    try:
        want_empty = ray.get(producer.make.remote(8 * MiB, 40, True), timeout=120)
        want = ray.get(producer.make.remote(8 * MiB, 40), timeout=120)
        used0 = ray.get([local.used.remote(), remote.used.remote()], timeout=60)

        # tc.empty tensors are shared with no copy: the reader maps the producer's buffer.
        zero_copy = producer.empty_state.remote()
        got = ray.get(local.read.remote(zero_copy), timeout=120)
        assert (got["step"], got["digest"]) == (8, want_empty) and got["read_only"]
        assert got["file"] == ray.get(producer.buffer_file.remote(), timeout=60)
        # On another node its daemon pulls the buffers' bytes once, into a copy of its own.
        far = ray.get(remote.read.remote(zero_copy), timeout=120)
        assert (far["step"], far["digest"]) == (8, want_empty) and far["read_only"]
        assert far["file"] != got["file"]
        # A copied object reaches the other node.
        copied = producer.state.remote()
        there, here = ray.get([remote.read.remote(copied), local.read.remote(copied)], timeout=120)
        assert there["digest"] == here["digest"] == want
        # the buffer, its copy on node 1, and the copied object's copy on each node
        files = {got["file"], far["file"], there["file"], here["file"]}
        assert len(files) == 4 and all(f.startswith(f"/dev/shm/{shm_prefix(ns)}") for f in files)

        # A tensor that is not on the CPU: refused with what to do.
        err = _cause(_error_of(producer.not_on_cpu.remote()))
        assert isinstance(err, FailedPreconditionError), repr(err)
        assert "moves CPU tensors only" in str(err) and "tensor 1" in str(err), repr(err)

        # The producer dies with refs alive: its leases end, every copy goes on every node.
        assert len(ray.get(local.keys.remote(), timeout=60)) == 2
        ray.get([local.drop.remote(), remote.drop.remote()], timeout=60)
        _kill(producer)
        wait_for(lambda: not ray.get(local.keys.remote(), timeout=30), 60, "the keys to go")
        wait_for(lambda: not any(os.path.exists(f) for f in files), 60, "the files to go")
        # Node 0 also frees the producer's tc.empty buffers (booked when allocated).
        used = ray.get([local.used.remote(), remote.used.remote()], timeout=30)
        assert used[0] <= used0[0] - 7 * MiB and used[1] == used0[1], (used0, used)
        err = _cause(_error_of(local.read.remote(copied)))
        assert isinstance(err, NotFoundError) and "exited" in str(err), repr(err)
        del zero_copy, copied
    finally:
        _kill(producer, local, remote)
