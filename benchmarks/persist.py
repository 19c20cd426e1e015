"""Persistence benchmark: durable puts, time to durable, and rehydration, against safetensors.

    python benchmarks/persist.py [--quick] [--size-mib 1024] [--tensors 320] [--repeat 3]
                                 [--url URL] [--json PATH]

Builds a state_dict of ``--tensors`` fp32 tensors totalling ``--size-mib`` MiB (default 320
tensors of 3.2 MiB = 1 GiB; ``--quick``: 256 MiB, 2 runs), starts a local Ray of its own
(``ray.init(address="local")``) and one daemon (``tc.init(mode="create",
global_store_mode="none")``) whose config sets ``persist_url`` (a local temp dir,
``file://``, unless ``--url`` is given) and a ``stable_dram_capacity_bytes`` of 1.25x the
state_dict, then measures in one run:

(a) put latency: ``tc.put`` with ``StorePolicy(profile="durable")`` vs ``profile="cache"``
    (target: durable <= 1.1x cache, since the disk copy is written in the background; the
    two interleaved, each durable put's task waited for and every version deleted before
    the next put);
(b) time to durable: from the start of a durable ``tc.put`` to ``tc.wait_persisted``
    returning success, vs ``safetensors.torch.save_file`` + fsync of the same tensors to the
    same local disk (target: ours no slower, ratio save ÷ ours >= 1.0; our writer fsyncs its
    shards and manifest too); each run also splits ours by the task's own times (created,
    started, finished): the put, the wait before the task started, its run, and the time
    until ``wait_persisted`` was told;
(c) rehydration: a durable ``overflow_policy="spill"`` put, persisted, is evicted from memory
    by a spill put of half its size (the daemon's capacity has no room for both; a spill put
    is durable too), the filler is persisted and deleted, and ``tc.get`` reads the version
    back from disk into shared memory (checked: ``served_by == "disk"``, bytes equal), vs
    ``safetensors.torch.load_file`` + a private copy (``{k: v.clone()}``) of the safetensors
    file written in (b) (target: ratio >= 1.0). Also shown: ``tc.get`` + touching one byte
    per page of what it returned.

Each figure is the best of ``--repeat`` runs, each on a fresh version. The page cache is not
dropped (no root here): both sides read files they just wrote, mostly from memory, so (c)
compares the software paths, and (b) the write paths including fsync. Ratios are printed
against the alternatives measured in the same run; nothing is asserted. Everything started
is stopped at the end and /dev/shm is checked for leftovers of the namespace.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch
from _timing import finish  # benchmarks/ is on sys.path when run as a script
from safetensors.torch import load_file, save_file

MiB = 1 << 20
TENSORS = 320
SIZE_MIB = 1024
QUICK_SIZE_MIB = 256
TARGETS = {  # name -> (ratio description, target, ratio is "at most" (True) / "at least")
    "put": ("durable put ÷ cache put", 1.1, True),
    "durable": ("save_file+fsync ÷ put-to-durable", 1.0, False),
    "rehydrate": ("load_file+clone ÷ rehydrating tc.get", 1.0, False),
}


def state_dict(size_mib: int, tensors: int) -> dict[str, torch.Tensor]:
    numel = size_mib * MiB // tensors // 4
    g = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}.weight": torch.randn(numel, generator=g, dtype=torch.float32)
        for i in range(tensors)
    }


def best(fn: Callable[[int], float], repeat: int) -> tuple[float, list[float]]:
    """Best of ``repeat`` runs of ``fn(i)``, which times itself and returns seconds."""
    runs = [fn(i) for i in range(repeat)]
    return min(runs), runs


def touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte per page of every tensor, so mapped bytes are faulted in."""
    for t in tensors.values():
        flat = t.reshape(-1).view(torch.uint8)
        if flat.numel():
            flat[::4096].sum()


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Bench:
    def __init__(self, tc: Any, sd: dict[str, torch.Tensor], tmp: str, repeat: int) -> None:
        self.tc = tc
        self.sd = sd
        self.tmp = tmp
        self.repeat = repeat
        self.durable = tc.StorePolicy(profile="durable")
        self.cache = tc.StorePolicy(profile="cache")

    def put_latency(self) -> dict[str, Any]:
        """Cache and durable puts interleaved, each on a fresh version deleted after (the
        durable one once its task ended), so both see the same recycled shared memory."""
        tc = self.tc
        runs: dict[str, list[float]] = {"cache": [], "durable": []}
        for i in range(self.repeat):
            for name, policy in (("cache", self.cache), ("durable", self.durable)):
                key = f"bench-{name}:v{i}"
                start = time.perf_counter()
                tc.put(self.sd, key, policy=policy)
                runs[name].append(time.perf_counter() - start)
                if policy is self.durable:
                    tc.wait_persisted(key, timeout=600)  # nothing in the background next
                tc.delete(key)
                time.sleep(0.5)  # the same settling time after either
        cache, durable = min(runs["cache"]), min(runs["durable"])
        return {
            "cache put s": cache,
            "durable put s": durable,
            "runs": runs,
            "ratio": durable / cache,
        }

    def time_to_durable(self) -> dict[str, Any]:
        tc = self.tc
        phases: list[dict[str, float]] = []

        def ours(i: int) -> float:
            key = f"bench-ttd:v{i}"
            wall0 = time.time()
            start = time.perf_counter()
            put = tc.put(self.sd, key, policy=self.durable)
            returned = time.perf_counter() - start
            status = tc.wait_persisted(key, timeout=600)
            took = time.perf_counter() - start
            assert status.state == "success" and status.durable, status
            # The task's own clock (the daemon's, the same host): when it was queued, started
            # and finished, so the time splits into put / queued / writing / told.
            created = status.created_unix_ms / 1000 - wall0
            started = status.started_unix_ms / 1000 - wall0
            finished = status.finished_unix_ms / 1000 - wall0
            phases.append(
                {
                    "put s": returned,
                    "total s": took,
                    "shards": len(status.shards),
                    "task queued at s": created,
                    "task started at s": started,
                    "task ran s": finished - started,
                    "told after s": took - finished,
                }
            )
            assert put.persistence_task_id == status.task_id
            tc.delete(key)
            return took

        st = os.path.join(self.tmp, "model.safetensors")

        def theirs(_: int) -> float:
            if os.path.exists(st):
                os.unlink(st)
            start = time.perf_counter()
            save_file(self.sd, st)
            fsync_file(st)
            return time.perf_counter() - start

        mine, mine_runs = best(ours, self.repeat)
        save, save_runs = best(theirs, self.repeat)  # leaves model.safetensors for (c)
        return {
            "put to durable s": mine,
            "save_file+fsync s": save,
            "runs": {"ours": mine_runs, "save_file+fsync": save_runs, "ours phases": phases},
            "ratio": save / mine,
        }

    def rehydrate(self) -> dict[str, Any]:
        tc = self.tc
        spill = tc.StorePolicy(profile="durable", overflow_policy="spill")
        # A spill put needs a disk tier itself: the filler is durable too; its task is
        # waited for before it is deleted, so nothing writes while the version is read.
        filler_policy = spill
        half = dict(list(self.sd.items())[: len(self.sd) // 2])
        key = "bench-spill:v1"
        tc.put(self.sd, key, policy=spill)
        tc.wait_persisted(key, timeout=600)
        local = tc.store(tc.StoreOptions(get=tc.GetArtifactOptions(source="local_only")))
        evict_s: list[float] = []
        touched: list[float] = []

        def ours(i: int) -> float:
            gc.collect()  # no reader of the last round holds the version
            start = time.perf_counter()
            tc.put(half, f"bench-filler:v{i}", policy=filler_policy)  # pushes the version out
            evict_s.append(time.perf_counter() - start)
            try:
                local.get(key)
            except tc.NotFoundError:
                pass  # evicted: only the disk copy is left
            else:
                raise RuntimeError(f"{key} was not evicted by the spill put")
            tc.wait_persisted(f"bench-filler:v{i}", timeout=600)
            tc.delete(f"bench-filler:v{i}")
            time.sleep(0.5)
            start = time.perf_counter()
            got = tc.get(key)
            took = time.perf_counter() - start
            touch(got)
            touched.append(time.perf_counter() - start)
            info = tc.artifact(key).info()
            if info.served_by != "disk":
                raise RuntimeError(f"{key} was served by {info.served_by!r}, not from disk")
            if i == 0:
                bad = [k for k, v in self.sd.items() if not torch.equal(got[k], v)]
                if bad:
                    raise RuntimeError(f"rehydrated tensors differ: {bad[:5]}")
            del got
            return took

        st = os.path.join(self.tmp, "model.safetensors")

        def theirs(_: int) -> float:
            start = time.perf_counter()
            copy = {k: v.clone() for k, v in load_file(st).items()}
            took = time.perf_counter() - start
            del copy
            return took

        mine, mine_runs = best(ours, self.repeat)
        gc.collect()
        tc.delete(key)
        load, load_runs = best(theirs, self.repeat)
        return {
            "rehydrating tc.get s": mine,
            "rehydrating tc.get + touch s": min(touched),
            "load_file+clone s": load,
            "runs": {
                "ours": mine_runs,
                "ours + touch": touched,
                "load_file+clone": load_runs,
                "evicting spill put": evict_s,
            },
            "ratio": load / mine,
            "ratio with touch": load / min(touched),
        }


def shm_leftovers(namespace: str, node_id: str) -> list[str]:
    from tensorcast_ray._shm import segment_prefix

    prefix = segment_prefix(namespace, node_id)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def run(size_mib: int, tensors: int, repeat: int, url: str | None) -> dict[str, Any]:
    import ray
    import yaml

    import tensorcast_ray as tc

    sd = state_dict(size_mib, tensors)
    total = sum(t.nbytes for t in sd.values())
    tmp = tempfile.mkdtemp(prefix="tc-persist-bench-", dir="/tmp")
    root = url or f"file://{tmp}/persist"
    config = os.path.join(tmp, "daemon.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"persist_url": root, "stable_dram_capacity_bytes": int(total * 1.25)}, f)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {
        "bytes": total,
        "tensors": len(sd),
        "repeat": repeat,
        "persist_url": root,
        "cpus": os.cpu_count(),
    }
    ray_tmp = tempfile.mkdtemp(prefix="rtc-bench-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace=namespace,
        _temp_dir=ray_tmp,
    )
    node_id = str(ray.get_runtime_context().get_node_id())
    started = time.perf_counter()
    try:
        tc.init(
            mode="create",
            namespace=namespace,
            global_store_mode="none",
            daemon_config_path=config,
        )
        # Warm the paths once (first-use costs of the daemon, the writer, the reader).
        warm = {"w": torch.zeros(1024)}
        tc.put(warm, "bench-warm:v1", policy=tc.StorePolicy(profile="durable"))
        tc.wait_persisted("bench-warm:v1", timeout=60)
        tc.delete("bench-warm:v1")
        tc.put(sd, "bench-warm:v2", policy=tc.StorePolicy(profile="cache"))  # full size
        tc.delete("bench-warm:v2")
        bench = Bench(tc, sd, tmp, repeat)
        results["load_before"] = os.getloadavg()
        results["put"] = bench.put_latency()
        print_case("put", results["put"], flush=True)
        results["durable"] = bench.time_to_durable()
        print_case("durable", results["durable"], flush=True)
        results["rehydrate"] = bench.rehydrate()
        print_case("rehydrate", results["rehydrate"], flush=True)
        results["load_after"] = os.getloadavg()
    except Exception as exc:  # report what was measured, then fail
        results["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        tc.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - started
    results["leftovers"] = shm_leftovers(namespace, node_id)
    return results


def verdict(case: str, ratio: float) -> str:
    what, target, at_most = TARGETS[case]
    met = ratio <= target if at_most else ratio >= target
    sign = "<=" if at_most else ">="
    return f"{what} = {ratio:.2f}x (target {sign} {target}x: {'met' if met else 'NOT met'})"


def print_case(case: str, res: dict[str, Any], flush: bool = False) -> None:
    lines = []
    for k, v in res.items():
        if k.endswith(" s"):
            lines.append(f"  {k:<32}{v:>8.3f} s")
    lines.append("  " + verdict(case, res["ratio"]))
    if "ratio with touch" in res:
        lines.append(f"  with touching every page of the result: {res['ratio with touch']:.2f}x")
    runs = {k: [round(x, 3) for x in v] for k, v in res["runs"].items() if k != "ours phases"}
    lines.append(f"  every run: {runs}")
    for p in res["runs"].get("ours phases", []):
        lines.append(
            "  phases: put {put s:.3f}, task queued at {task queued at s:.3f}, started at "
            "{task started at s:.3f}, ran {task ran s:.3f}, told {told after s:.3f} later; "
            "total {total s:.3f} s".format(**p)
        )
    print(f"({case})\n" + "\n".join(lines), flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=SIZE_MIB)
    parser.add_argument("--tensors", type=int, default=TENSORS)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each figure (best kept)")
    parser.add_argument("--quick", action="store_true", help="256 MiB, 2 runs each")
    parser.add_argument("--url", default=None, help="persist_url (default: a local temp dir)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    args = parser.parse_args()
    size = QUICK_SIZE_MIB if args.quick else args.size_mib
    repeat = 2 if args.quick else args.repeat
    print(
        f"state_dict: {size} MiB, {args.tensors} fp32 tensors; best of {repeat}; page cache "
        "not dropped",
        flush=True,
    )
    res = run(size, args.tensors, repeat, args.url)
    print(f"persist_url {res['persist_url']}; wall time {res['wall_s']:.0f} s")
    if res["leftovers"]:
        res.setdefault("error", f"shared memory left behind: {res['leftovers']}")
    finish(res, args.json)


if __name__ == "__main__":
    main()
