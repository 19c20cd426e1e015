"""Node-local data plane against Ray's object store, by tensor count, measured in one run.

    python benchmarks/local.py [--quick] [--json] [--plot docs/img/local-bench.png]

A 256 MiB state_dict is split into 16, 256, 1024, 4096 and 16384 tensors (real ones hold
300-20,000); for each count, in one process:

- get: ``tc.get`` warm (a version this process already read: no RPC, cached tensors);
  first in a fresh process (a new Ray actor, its imports, connection and first full garbage
  collection done, timing its first get of the key: the Lookup, the mappings, the page
  faults of a new process and the wrapping); and again after clearing this process's read
  cache; against ``ray.get`` of the numpy dict (zero-copy) and of the torch dict (a copy
  every time);
- put: ``tc.put`` in steady state (this process's write staging and the daemon's pool
  refilled, as between two weight pushes) against ``ray.put`` of the numpy and the torch
  dict, and a warm memcpy (one copy of the same bytes between two already-faulted buffers);
  the same again at 16 MiB;
- control: ``tc.exists`` p50;
- memory: 4 reader actors holding the whole 256 MiB (1024 tensors), ``tc.get`` (one shared
  copy) against ``ray.get`` of the torch dict (a private copy each);
- GPU: pinned host-to-device GB/s when CUDA is present (skipped otherwise).

Ratios are printed against the alternatives measured here; nothing is asserted. ``--plot``
needs matplotlib (``pip install 'tensorcast_ray[bench]'``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
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
COUNTS = (16, 256, 1024, 4096, 16384)
DAEMON_YAML = """
listen_host: 127.0.0.1
stable_dram_capacity_bytes: 4GiB
shm_segment_bytes: 256MiB
shm_pool_bytes: 512MiB  # = POOL_BYTES
client_staging_bytes: 1280MiB
"""


def state_dict(total_bytes: int, count: int) -> dict[str, torch.Tensor]:
    """``count`` bf16 tensors of ``total_bytes`` in all, 2-d like transformer weights."""
    per = total_bytes // count // 2  # elements per tensor
    cols = 64 if per % 64 == 0 else 1
    return {
        f"layers.{i // 8}.w{i % 8}.weight": torch.randn(per // cols, cols).to(torch.bfloat16)
        for i in range(count)
    }


def as_numpy(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: v.view(torch.int16).numpy() for k, v in sd.items()}


def p50(fn: Callable[[], Any], n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def wait_pool_full(state: Any, timeout: float = 60.0) -> None:
    """Poll the daemon's Status until its pre-faulted pool is back to its reserve."""
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = state.client.call("Status", daemon_pb2.StatusRequest(), timeout=10)
        if status.shm_pool_bytes >= POOL_BYTES:
            return
        time.sleep(0.05)


def warm_memcpy(total: int, repeat: int) -> float:
    src = torch.ones(total, dtype=torch.uint8)
    dst = torch.empty(total, dtype=torch.uint8)
    dst.fill_(0)  # every page faulted in before timing
    return timed(lambda: dst.copy_(src), max(repeat, 5))


def bench_put(sd: dict[str, torch.Tensor], tag: str, repeat: int) -> dict[str, float]:
    np_sd = as_numpy(sd)
    total = sum(t.nbytes for t in sd.values())
    state = tc._bootstrap.current()
    tc.put(sd, key=f"warmup-{tag}:v0")  # the first put of a shape starts this process's staging
    tc.delete(f"warmup-{tag}:v0")
    puts = []
    for i in range(repeat):
        if state.stager is not None:
            state.stager.wait_ready(timeout=60)
        wait_pool_full(state)
        start = time.perf_counter()
        tc.put(sd, key=f"put-{tag}:v{i}")
        puts.append(time.perf_counter() - start)
        tc.delete(f"put-{tag}:v{i}")
    return {
        "tc_put": min(puts),
        "ray_put_numpy": timed(lambda: ray.put(np_sd), repeat),
        "ray_put_torch": timed(lambda: ray.put(sd), repeat),
        "memcpy": warm_memcpy(total, repeat),
    }


def bench_get(sd: dict[str, torch.Tensor], tag: str, repeat: int) -> dict[str, float]:
    key = f"get-{tag}:v1"
    tc.put(sd, key=key)
    wait_pool_full(tc._bootstrap.current())  # the daemon's refill would compete with the reads
    tc.get(key)
    out = {"tc_get_warm": p50(lambda: tc.get(key), 50)}

    def first() -> None:
        tc._store._process_caches()[0].clear()  # this process forgets the artifact
        tc.get(key)

    out["tc_get_cleared"] = timed(first, repeat)
    first()  # the validity table is mapped again for the next count
    out["tc_get_first"] = fresh_first_get(key, repeat)
    np_ref, torch_ref = ray.put(as_numpy(sd)), ray.put(sd)
    out["ray_get_numpy"] = p50(lambda: ray.get(np_ref), 20)
    out["ray_get_torch"] = timed(lambda: ray.get(torch_ref), repeat)
    tc.delete(key)
    return out


@ray.remote(num_cpus=0)
class Reader:
    """Holds what it read, so its private memory (USS) shows what the read cost."""

    def __init__(self) -> None:
        tc.init(mode="connect", namespace=NAMESPACE)
        key = f"warmup-{os.getpid()}:v1"  # imports and first-use setup, before measuring
        tc.put({"x": torch.zeros(1)}, key=key)
        tc.get(key)
        tc.delete(key)
        # A new process's first burst of allocations triggers Python's first full collection
        # of everything imported (torch, Ray: ~80 ms here), whatever allocates; a process
        # that has run a while has had it. Have it now, so a first get times the get.
        gc.collect()
        self.held: Any = None

    def uss(self) -> int:
        import psutil

        return int(psutil.Process().memory_full_info().uss)

    def tc_get(self, key: str) -> None:
        self.held = tc.get(key)

    def first_get(self, key: str) -> float:
        start = time.perf_counter()
        self.held = tc.get(key)
        return time.perf_counter() - start

    def ray_get(self, refs: list[Any]) -> None:
        self.held = ray.get(refs[0])

    def drop(self) -> None:
        self.held = None


def fresh_first_get(key: str, repeat: int) -> float:
    """The best of ``repeat`` first gets, each in a new reader process (its imports and
    daemon connection done, nothing of ``key`` read)."""
    samples = []
    for _ in range(repeat):
        reader = Reader.remote()
        try:
            samples.append(ray.get(reader.first_get.remote(key)))
        finally:
            ray.kill(reader)
    return min(samples)


def readers_memory(count: int = 4) -> dict[str, float]:
    """MiB in use for ``count`` readers holding a 256 MiB state_dict: the stored copy plus
    what the readers added to their private memory."""
    sd = state_dict(256 * MiB, 1024)
    total = sum(t.nbytes for t in sd.values())
    tc.put(sd, key="readers:v1")
    refs = [ray.put(sd)]
    readers = [Reader.remote() for _ in range(count)]
    out = {}
    try:
        for label, read in (
            ("tc", lambda r: r.tc_get.remote("readers:v1")),
            ("ray_torch", lambda r: r.ray_get.remote(refs)),
        ):
            before = sum(ray.get([r.uss.remote() for r in readers]))
            ray.get([read(r) for r in readers])
            added = sum(ray.get([r.uss.remote() for r in readers])) - before
            out[f"readers{count}_{label}_mib"] = (total + added) / MiB
            ray.get([r.drop.remote() for r in readers])
    finally:
        for r in readers:
            ray.kill(r)
        tc.delete("readers:v1")
    return out


def gpu_figures() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"gpu": "no CUDA device: GPU figures skipped"}
    host = torch.empty(256 * MiB, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return {"h2d_pinned_gbps": 10 * 256 * MiB / (time.perf_counter() - start) / 1e9}


def run(counts: tuple[int, ...], repeat: int) -> dict[str, Any]:
    rows = []
    for count in counts:
        sd = state_dict(256 * MiB, count)
        row: dict[str, Any] = {"tensors": count}
        row.update(bench_get(sd, f"{count}", repeat))
        row.update(bench_put(sd, f"{count}", repeat))
        small = state_dict(16 * MiB, count)
        row.update({f"{k}_16m": v for k, v in bench_put(small, f"s{count}", repeat).items()})
        rows.append(row)
        print(f"  {count} tensors done", flush=True)
    return {
        "rows": rows,
        "tc_exists_p50": p50(lambda: tc.exists("nothing:v1"), 2000, warmup=100),
        **readers_memory(),
        **gpu_figures(),
    }


def report(results: dict[str, Any]) -> None:
    ms = 1e3
    print("\n256 MiB state_dict, latency in ms (x: how many times faster tc is)")
    print(
        f"{'tensors':>7} | {'get warm':>8} {'first':>7} {'cleared':>7} {'ray np':>7} {'ray pt':>7} "
        f"{'vs np':>6} | {'tc.put':>7} {'ray np':>7} {'ray pt':>7} {'vs np':>6} "
        f"{'memcpy':>7} {'/memcpy':>7} | {'16MiB put':>9} {'ray np':>7} {'/memcpy':>7}"
    )
    for r in results["rows"]:
        print(
            f"{r['tensors']:>7} | {r['tc_get_warm'] * ms:>8.3f} {r['tc_get_first'] * ms:>7.2f} "
            f"{r['tc_get_cleared'] * ms:>7.2f} "
            f"{r['ray_get_numpy'] * ms:>7.2f} {r['ray_get_torch'] * ms:>7.1f} "
            f"{r['ray_get_numpy'] / r['tc_get_warm']:>5.1f}x | "
            f"{r['tc_put'] * ms:>7.1f} {r['ray_put_numpy'] * ms:>7.1f} "
            f"{r['ray_put_torch'] * ms:>7.1f} {r['ray_put_numpy'] / r['tc_put']:>5.2f}x "
            f"{r['memcpy'] * ms:>7.1f} {r['memcpy'] / r['tc_put']:>6.2f}x | "
            f"{r['tc_put_16m'] * ms:>9.2f} {r['ray_put_numpy_16m'] * ms:>7.2f} "
            f"{r['memcpy_16m'] / r['tc_put_16m']:>6.2f}x"
        )
    print(
        "get warm: p50 of a version this process already read; first: the first get in a "
        "fresh process;\ncleared: after clearing this process's read cache (Lookup + mappings "
        "+ wrapping); vs np: ray.get(numpy) /\ntc.get warm; /memcpy: warm memcpy time / tc.put "
        "time"
    )
    for r in results["rows"]:
        n = r["tensors"]
        print(
            f"  {n:>5} tensors: first get {r['tc_get_first'] / n * 1e6:.2f} us a tensor "
            f"(fresh process; {r['tc_get_cleared'] / n * 1e6:.2f} cleared), "
            f"put {r['tc_put'] / n * 1e6:.2f} us a tensor (256 MiB), "
            f"{r['tc_put_16m'] / n * 1e6:.2f} us a tensor (16 MiB)"
        )
    print(f"control round trip: tc.exists p50 {results['tc_exists_p50'] * 1e6:.0f} us")
    print(
        f"4 readers holding 256 MiB: {results['readers4_tc_mib']:.0f} MiB with tc.get, "
        f"{results['readers4_ray_torch_mib']:.0f} MiB with ray.get of the torch dict"
    )
    print(f"gpu: {results.get('h2d_pinned_gbps', results.get('gpu'))}")


def plot(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'tensorcast_ray[bench]' (or matplotlib)"
        ) from None
    rows = results["rows"]
    n = [r["tensors"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (
            "get of a 256 MiB state_dict",
            (
                ("tc.get (warm)", "tc_get_warm", "o-"),
                ("tc.get (first, fresh process)", "tc_get_first", "o--"),
                ("ray.get numpy dict", "ray_get_numpy", "s-"),
                ("ray.get torch dict", "ray_get_torch", "s--"),
            ),
        ),
        (
            "put of the same",
            (
                ("tc.put", "tc_put", "o-"),
                ("ray.put numpy dict", "ray_put_numpy", "s-"),
                ("ray.put torch dict", "ray_put_torch", "s--"),
                ("memcpy (warm)", "memcpy", "k:"),
            ),
        ),
    )
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for label, key, style in lines:
            ax.plot(n, [r[key] * 1e3 for r in rows], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tensors in the state_dict")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="tensor counts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="counts 16,1024,16384; 2 repeats")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE", help="draw latency against tensor count")
    args = parser.parse_args()
    counts = (16, 1024, 16384) if args.quick else tuple(int(c) for c in args.counts.split(","))
    repeat = 2 if args.quick else args.repeat
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(DAEMON_YAML)
        config = f.name
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            num_cpus=2,
            object_store_memory=3 * 1024 * MiB,
        )
        tc.init(
            mode="create", namespace=NAMESPACE, global_store_mode="none", daemon_config_path=config
        )
        results = run(counts, repeat)
    finally:
        tc.shutdown()
        ray.shutdown()
        os.unlink(config)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
