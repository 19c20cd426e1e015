"""Node-local data plane vs what a user would use instead, measured in one run.

    python benchmarks/local.py [--sizes 16,256,1024] [--json] [--repeat 3]

For state_dict-like artifacts (bf16 transformer layers + fp32 norms) of each size:
- put: tc.put (after a warm-up put, with this process's write staging ready) vs ray.put of
  the torch dict and of a numpy dict, and vs memcpy into fresh and into warm memory;
- get: tc.get of an explicit version (SDK cache hit: no RPC), of name:latest (one RPC),
  vs ray.get of the torch dict (a copy every time) and of the numpy dict (zero-copy);
- 4 readers: bytes added to memory by 4 actors holding the tensors, tc vs ray.get(torch);
- control round trip: tc.exists p50 vs a Ray actor call p50;
- GPU: IPC get latency and H2D GB/s when CUDA is present (skipped otherwise).
Ratios are printed against the alternatives measured here; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch
from _timing import timed  # benchmarks/ is on sys.path when run as a script

import tensorcast_ray as tc

MiB = 1 << 20
POOL_BYTES = 512 * MiB
NAMESPACE = "tc-bench-local"
DAEMON_YAML = """
listen_host: 127.0.0.1
stable_dram_capacity_bytes: 12GiB
shm_segment_bytes: 256MiB
shm_pool_bytes: 512MiB  # = POOL_BYTES
client_staging_bytes: 1280MiB
"""


def state_dict(total_bytes: int) -> dict[str, torch.Tensor]:
    """A transformer-like state_dict of about ``total_bytes`` (bf16 weights, fp32 norms)."""
    hidden = 256
    while 12 * (hidden * 2) ** 2 * 2 * 4 <= total_bytes:
        hidden *= 2
    vocab = 8 * hidden
    out: dict[str, torch.Tensor] = {"embed.weight": torch.randn(vocab, hidden).to(torch.bfloat16)}
    used = out["embed.weight"].nbytes
    layer = 0
    while used < total_bytes:
        for name, shape in (
            ("attn.qkv", (3 * hidden, hidden)),
            ("attn.o", (hidden, hidden)),
            ("mlp.up", (4 * hidden, hidden)),
            ("mlp.down", (hidden, 4 * hidden)),
        ):
            t = torch.randn(shape).to(torch.bfloat16)
            out[f"layers.{layer}.{name}.weight"] = t
            used += t.nbytes
        for norm in ("ln1", "ln2"):
            t = torch.ones(hidden)
            out[f"layers.{layer}.{norm}.weight"] = t
            used += t.nbytes
        layer += 1
    return out


def nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in sd.values())


def wait_pool_full(state: Any, timeout: float = 60.0) -> None:
    """Poll the daemon's Status until its pre-faulted pool is back to its reserve."""
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = state.client.call("Status", daemon_pb2.StatusRequest(), timeout=10)
        if status.shm_pool_bytes >= POOL_BYTES:
            return
        time.sleep(0.05)


@ray.remote(num_cpus=0)
class Reader:
    def __init__(self) -> None:
        import torch

        import tensorcast_ray as tc

        tc.init(mode="connect", namespace=NAMESPACE)
        tc.put({"x": torch.zeros(1)}, key=f"warmup-{id(self)}:v1")
        tc.get(f"warmup-{id(self)}:v1")
        self.held: Any = None

    def uss(self) -> int:
        import psutil

        return int(psutil.Process().memory_full_info().uss)

    def tc_get(self, key: str) -> int:
        import tensorcast_ray as tc

        self.held = tc.get(key)
        return sum(t.nbytes for t in self.held.values())

    def ray_get(self, refs: list[Any]) -> int:
        self.held = ray.get(refs[0])
        return sum(t.nbytes for t in self.held.values())

    def drop(self) -> None:
        self.held = None

    def ping(self) -> int:
        return 1


def bench_size(size_mib: int, repeat: int, readers: list[Any]) -> dict[str, Any]:
    sd = state_dict(size_mib * MiB)
    total = nbytes(sd)
    np_sd = {
        k: v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy()
        for k, v in sd.items()
    }
    r: dict[str, Any] = {"size_mib": round(total / MiB, 1), "tensors": len(sd)}

    # memcpy references: into fresh shared memory (page faults) and into warm memory.
    def fresh_copy() -> None:
        with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
            f.truncate(total)
            import mmap

            m = mmap.mmap(f.fileno(), total)
            dst = torch.frombuffer(m, dtype=torch.uint8)
            off = 0
            for t in sd.values():
                n = t.nbytes
                dst[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
                off += n
            del dst
            m.close()

    warm = torch.empty(total, dtype=torch.uint8)
    warm.fill_(1)

    def warm_copy() -> None:
        off = 0
        for t in sd.values():
            n = t.nbytes
            warm[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
            off += n

    r["memcpy_fresh_ms"] = timed(fresh_copy, repeat) * 1e3
    r["memcpy_warm_ms"] = timed(warm_copy, repeat) * 1e3
    warm = torch.empty(0, dtype=torch.uint8)  # free it: keep 1 GiB runs inside 24 GiB

    # tc.put: the first put of a process starts its write staging; measure the steady state.
    tc.put(sd, key=f"warmup{size_mib}:v0")
    tc.delete(f"warmup{size_mib}:v0")
    state = tc._bootstrap.current()
    puts = []
    for i in range(repeat):
        # Steady state: this process's staging and the daemon's pool are both refilled, as
        # they are between two weight pushes of a training loop.
        if state.stager is not None:
            state.stager.wait_ready(timeout=60)
        wait_pool_full(state)
        start = time.perf_counter()
        tc.put(sd, key=f"bench{size_mib}:v{i}")
        puts.append(time.perf_counter() - start)
        if i < repeat - 1:
            tc.delete(f"bench{size_mib}:v{i}")
    key = f"bench{size_mib}:v{repeat - 1}"
    r["tc_put_ms"] = min(puts) * 1e3
    r["ray_put_torch_ms"] = timed(lambda: ray.put(sd), repeat) * 1e3
    r["ray_put_numpy_ms"] = timed(lambda: ray.put(np_sd), repeat) * 1e3

    # get latency
    tc.get(key)
    r["tc_get_cached_ms"] = timed(lambda: tc.get(key), max(repeat, 20)) * 1e3
    name = key.split(":")[0]
    r["tc_get_latest_ms"] = timed(lambda: tc.get(f"{name}:latest"), max(repeat, 20)) * 1e3
    torch_ref, np_ref = ray.put(sd), ray.put(np_sd)
    r["ray_get_torch_ms"] = timed(lambda: ray.get(torch_ref), repeat) * 1e3
    r["ray_get_numpy_ms"] = timed(lambda: ray.get(np_ref), max(repeat, 20)) * 1e3
    np_ref = None  # free the object store copy before the readers

    # 4 readers holding the whole dict: tc = one shared copy + the readers' private memory
    # (USS); ray.get(torch) = the object store's copy + one private copy per reader.
    before_uss = sum(ray.get([a.uss.remote() for a in readers]))
    ray.get([a.tc_get.remote(key) for a in readers])
    tc_private = sum(ray.get([a.uss.remote() for a in readers])) - before_uss
    r["readers4_tc_mib"] = (total + tc_private) / MiB
    ray.get([a.drop.remote() for a in readers])
    before_uss = sum(ray.get([a.uss.remote() for a in readers]))
    ray.get([a.ray_get.remote([torch_ref]) for a in readers])
    ray_private = sum(ray.get([a.uss.remote() for a in readers])) - before_uss
    r["readers4_ray_mib"] = (total + ray_private) / MiB
    ray.get([a.drop.remote() for a in readers])
    tc.delete(key)
    return r


def control_round_trip(readers: list[Any]) -> dict[str, float]:
    def p50(fn: Any, n: int = 2000) -> float:
        for _ in range(100):
            fn()
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    actor = readers[0]
    return {
        "tc_exists_p50_ms": p50(lambda: tc.exists("nothing:v1")),
        "ray_actor_call_p50_ms": p50(lambda: ray.get(actor.ping.remote()), 500),
    }


def gpu_figures() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"gpu": "no CUDA device: GPU figures skipped"}
    host = torch.empty(256 * MiB, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return {"h2d_pinned_gbps": 10 * 256 * MiB / (time.perf_counter() - start) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="16,256,1024", help="artifact sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(DAEMON_YAML)
        config = f.name
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        num_cpus=4,
        object_store_memory=4 * 1024 * MiB,
    )
    try:
        tc.init(
            mode="create", namespace=NAMESPACE, global_store_mode="none", daemon_config_path=config
        )
        readers = [Reader.remote() for _ in range(4)]
        ray.get([a.ping.remote() for a in readers])
        results = {
            "sizes": [bench_size(int(s), args.repeat, readers) for s in args.sizes.split(",")]
        }
        results["control"] = control_round_trip(readers)
        results["gpu"] = gpu_figures()
        for a in readers:
            ray.kill(a)
    finally:
        tc.shutdown()
        ray.shutdown()
        os.unlink(config)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


def report(results: dict[str, Any]) -> None:
    print(
        f"{'size':>8} {'tc.put':>9} {'warm cp':>9} {'put/warm':>9} {'ray.put t':>10} "
        f"{'vs ray':>7} {'tc.get':>9} {'latest':>8} {'ray.get t':>10} {'ray.get np':>10} "
        f"{'4rd tc':>8} {'4rd ray':>8}"
    )
    for r in results["sizes"]:
        print(
            f"{r['size_mib']:>6.0f}Mi {r['tc_put_ms']:>7.1f}ms {r['memcpy_warm_ms']:>7.1f}ms "
            f"{r['memcpy_warm_ms'] / r['tc_put_ms']:>8.2f}x {r['ray_put_torch_ms']:>8.1f}ms "
            f"{r['ray_put_torch_ms'] / r['tc_put_ms']:>6.1f}x {r['tc_get_cached_ms']:>7.3f}ms "
            f"{r['tc_get_latest_ms']:>6.3f}ms {r['ray_get_torch_ms']:>8.1f}ms "
            f"{r['ray_get_numpy_ms']:>8.3f}ms "
            f"{r['readers4_tc_mib']:>6.0f}Mi {r['readers4_ray_mib']:>6.0f}Mi"
        )
    print("put/warm: tc.put throughput as a fraction of memcpy into warm memory (target >= 0.7)")
    print("vs ray: how many times faster tc.put is than ray.put of the torch dict")
    print("4rd: memory for 4 reader actors holding the whole artifact (shared copy + private USS)")
    for r in results["sizes"]:
        print(
            f"  {r['size_mib']:.0f} MiB: memcpy into fresh shm {r['memcpy_fresh_ms']:.1f} ms, "
            f"ray.put numpy {r['ray_put_numpy_ms']:.1f} ms, ray.get torch / tc.get = "
            f"{r['ray_get_torch_ms'] / r['tc_get_cached_ms']:.0f}x"
        )
    c = results["control"]
    print(
        f"control round trip p50: tc.exists {c['tc_exists_p50_ms'] * 1e3:.0f} us, Ray actor call "
        f"{c['ray_actor_call_p50_ms'] * 1e3:.0f} us (target <= 300 us)"
    )
    print(f"gpu: {results['gpu']}")


if __name__ == "__main__":
    main()
