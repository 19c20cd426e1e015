"""Ray tensor transport: ``tensor_transport="tensorcast"`` against Ray's object store and
Ray's GLOO transport, for an actor method returning a state_dict, on simulated nodes,
measured in one run.

    python benchmarks/ray_transport.py [--quick] [--sizes-mib 256,1024] [--repeat 3]
                                       [--json PATH]

Starts a ``ray.cluster_utils.Cluster`` of 2 simulated nodes on this host (benchmarks/cluster.py
``start_cluster``), one tensorcast daemon on each in a fresh namespace ``bench-<hex>``, a
source actor on node 0 and a reader actor on each node, all created with
``enable_tensor_transport=True``, and one gloo collective group over the three
(``ray.experimental.collective.create_collective_group``). The source builds a state_dict of
320 tensors (bf16 matrices, fp32 norms; benchmarks/cluster.py ``state_dict``) of each size
(256 MiB and 1 GiB; ``--quick``: 256 MiB, best of 2), and for each reader (same node,
other node) and each path, the driver times ``ray.get(reader.take.remote(src.method.remote()))``:
the source's method returning the dict, Ray moving it, and the reader having it, then again
with the reader summing every tensor (each byte touched):

- ``tensorcast``: ``@ray.method(tensor_transport="tensorcast")`` (one copy into the source
  node's shared memory; readers there map it, read-only; a reader on another node has its
  daemon pull it once);
- ``tensorcast tc.empty``: the same, the dict allocated with ``tc.empty`` (no copy on the
  source's node; a reader on another node has its daemon pull the buffers' bytes once);
- ``object store``: the method's default return (torch tensors pickled into Ray's object
  store, a copy out on every get);
- ``gloo``: ``@ray.method(tensor_transport="gloo")`` (the tensors sent over the gloo group,
  into new tensors in the reader).

Each path is warmed once with a 1 MiB dict first (the gloo group formed, the daemons' first
pulls), and each case once more at each size (that run discarded: fresh object-store and
shared memory pages). ``--read-transport collective`` runs the daemons with
``read_transport: collective`` (a reader's daemon pulls over a gloo pair group between the
daemons instead of Ray's object store). Every ref and every tensor is dropped between runs,
and the next run waits until the previous object's tensorcast version is deleted. Ratios are
the other path's time over tensorcast's; nothing is asserted. Everything started is stopped
at the end (the actors, the namespace's daemons, Ray, the cluster) and /dev/shm is checked
for leftovers.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import cluster  # benchmarks/ is on sys.path when run as a script
import ray
import ray.cloudpickle
import torch
from _timing import finish
from cluster import (
    add_run_args,
    daemon_config,
    shm_leftovers,
    start_cluster,
    teardown,
    wait_for,
)

from tensorcast_ray.integrations import ray_transport

ray.cloudpickle.register_pickle_by_value(cluster)  # its state_dict runs in the source actor
# Before the classes below: Ray checks the transport name when @ray.method is applied.
ray_transport.register()

MiB = 1 << 20
NODES = 2
SIZES_MIB = (256, 1024)
QUICK_SIZES_MIB = (256,)
PATHS = ("tensorcast", "tensorcast tc.empty", "object store", "gloo")


@ray.remote(num_cpus=0, enable_tensor_transport=True, max_restarts=0)
class Source:
    def __init__(self, namespace: str, config_path: str | None) -> None:
        import tensorcast_ray as tc

        self.tc = tc
        tc.init(namespace=namespace, daemon_config_path=config_path)
        self.sd: dict[str, torch.Tensor] = {}
        self.empty_sd: dict[str, torch.Tensor] = {}

    def make(self, nbytes: int) -> tuple[int, int]:
        self.sd = {}
        self.empty_sd = {}
        gc.collect()
        self.sd = cluster.state_dict(nbytes)
        self.empty_sd = {k: self.tc.empty_like(v).copy_(v) for k, v in self.sd.items()}
        return sum(t.nbytes for t in self.sd.values()), len(self.sd)

    @ray.method(tensor_transport="tensorcast")
    def tensorcast(self) -> dict[str, torch.Tensor]:
        return self.sd

    @ray.method(tensor_transport="tensorcast")
    def tensorcast_empty(self) -> dict[str, torch.Tensor]:
        return self.empty_sd

    def object_store(self) -> dict[str, torch.Tensor]:
        return self.sd

    @ray.method(tensor_transport="gloo")
    def gloo(self) -> dict[str, torch.Tensor]:
        return self.sd

    def keys(self) -> list[str]:
        return list(self.tc.list_keys(ray_transport.KEY_PREFIX))

    def close(self) -> None:
        self.sd = {}
        self.empty_sd = {}
        self.tc.shutdown()


@ray.remote(num_cpus=0, enable_tensor_transport=True, max_restarts=0)
class Reader:
    def __init__(self, namespace: str, config_path: str | None) -> None:
        import tensorcast_ray as tc

        self.tc = tc
        tc.init(namespace=namespace, daemon_config_path=config_path)

    def take(self, sd: dict[str, torch.Tensor], touch: bool) -> tuple[int, float]:
        """Has the tensors (Ray resolved the ref before this ran); with ``touch``, sums
        every one (each byte read). Returns the count and the seconds the sum took."""
        start = time.perf_counter()
        if touch:
            total = 0.0
            for t in sd.values():
                total += float(t.sum())
        return len(sd), time.perf_counter() - start

    def close(self) -> None:
        gc.collect()
        self.tc.shutdown()


METHODS = {
    "tensorcast": "tensorcast",
    "tensorcast tc.empty": "tensorcast_empty",
    "object store": "object_store",
    "gloo": "gloo",
}


class Run:
    def __init__(self, namespace: str, repeat: int, config_path: str | None) -> None:
        from ray.experimental.collective import create_collective_group

        self.repeat = repeat
        self.src = Source.options(resources={"tc_node_0": 0.01}).remote(namespace, config_path)
        ray.get(self.src.keys.remote(), timeout=240)  # node 0's daemon and the Global Store
        self.readers = [
            Reader.options(resources={f"tc_node_{i}": 0.01}).remote(namespace, config_path)
            for i in range(NODES)
        ]
        ray.get([r.take.remote({}, False) for r in self.readers], timeout=240)
        start = time.perf_counter()
        create_collective_group([self.src, *self.readers], backend="gloo")
        self.gloo_setup_s = time.perf_counter() - start

    def actors(self) -> list[Any]:
        return [self.src, *self.readers]

    def once(self, path: str, reader: Any, touch: bool) -> tuple[float, float]:
        """Driver wall time of one object: method → Ray → reader (and its sum)."""
        method = getattr(self.src, METHODS[path])
        start = time.perf_counter()
        ref = method.remote()
        _, touch_s = ray.get(reader.take.remote(ref, touch), timeout=600)
        elapsed = time.perf_counter() - start
        del ref
        gc.collect()
        if path.startswith("tensorcast"):
            wait_for(lambda: not ray.get(self.src.keys.remote()), 60, "the version to be freed")
        return elapsed, touch_s

    def warmup(self) -> None:
        ray.get(self.src.make.remote(MiB), timeout=120)
        for path in PATHS:
            for reader in self.readers:
                self.once(path, reader, True)

    def size(self, nbytes: int) -> dict[str, Any]:
        total, count = ray.get(self.src.make.remote(nbytes), timeout=600)
        row: dict[str, Any] = {"bytes": total, "tensors": count, "cases": {}}
        for node, reader in enumerate(self.readers):
            where = "same node" if node == 0 else "other node"
            for path in PATHS:
                self.once(path, reader, True)  # discarded: first-use costs at this size
                for touch in (False, True):
                    runs = [self.once(path, reader, touch) for _ in range(self.repeat)]
                    row["cases"][f"{where}|{path}|{'sum' if touch else 'have'}"] = {
                        "best_s": min(r[0] for r in runs),
                        "median_s": statistics.median(r[0] for r in runs),
                        "sum_s": min(r[1] for r in runs),
                        "samples_s": [r[0] for r in runs],
                    }
            print(f"  {total / MiB:.0f} MiB, {where}: done", flush=True)
        return row


def report(results: dict[str, Any]) -> None:
    print(
        f"\nsimulated nodes on one host: {NODES} ({results['cpus']} cores, load "
        f"{results.get('load_before', (0.0,))[0]:.1f} at start); state_dicts of "
        f"{cluster.TENSORS} tensors; best of {results['repeat']}; gloo group setup "
        f"{results.get('gloo_setup_s', 0.0):.2f} s; the daemons' read_transport: "
        f"{results['read_transport']}"
    )
    print(
        "time from calling the actor method to the reader having the tensors ('have'), and "
        "having and summing them ('+sum'), in ms; x: that path's time / tensorcast's"
    )
    for row in results["sizes"]:
        cases = row["cases"]
        print(f"\n{row['bytes'] / MiB:.0f} MiB, {row['tensors']} tensors")
        print(
            f"{'reader':>10} | {'path':<20} | {'have':>8} {'x':>6} | {'+sum':>8} {'x':>6} | "
            f"{'sum alone':>9}"
        )
        for where in ("same node", "other node"):
            base = cases.get(f"{where}|tensorcast|have", {}).get("best_s")
            base_sum = cases.get(f"{where}|tensorcast|sum", {}).get("best_s")
            for path in PATHS:
                have = cases.get(f"{where}|{path}|have")
                summed = cases.get(f"{where}|{path}|sum")
                if have is None or summed is None:
                    continue
                x1 = have["best_s"] / base if base else float("nan")
                x2 = summed["best_s"] / base_sum if base_sum else float("nan")
                print(
                    f"{where:>10} | {path:<20} | {have['best_s'] * 1e3:8.1f} {x1:6.2f} | "
                    f"{summed['best_s'] * 1e3:8.1f} {x2:6.2f} | {summed['sum_s'] * 1e3:9.1f}"
                )
    if results.get("leftovers"):
        print(f"\nLEFT IN /dev/shm: {results['leftovers']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(parser, SIZES_MIB, repeat=3, quick="256 MiB only, best of 2")
    args = parser.parse_args()
    sizes = QUICK_SIZES_MIB if args.quick else tuple(int(s) for s in args.sizes_mib.split(","))
    repeat = 2 if args.quick else args.repeat
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    temp_dir = tempfile.mkdtemp(prefix="tcbench-", dir="/tmp")
    results: dict[str, Any] = {
        "namespace": namespace,
        "cpus": os.cpu_count(),
        "repeat": repeat,
        "ray": ray.__version__,
        "read_transport": args.read_transport,
        "sizes": [],
    }
    config_path = daemon_config(temp_dir, args.read_transport)
    ray_cluster = None
    run: Run | None = None
    started = time.perf_counter()
    try:
        # Room for one dict in each node's object store and one in flight.
        ray_cluster = start_cluster(temp_dir, max(512, int(2.5 * max(sizes))) * MiB, NODES)
        run = Run(namespace, repeat, config_path)
        results["gloo_setup_s"] = run.gloo_setup_s
        results["load_before"] = os.getloadavg()
        run.warmup()
        print(f"cluster of {NODES} simulated nodes up, namespace {namespace}", flush=True)
        for size in sizes:
            results["sizes"].append(run.size(size * MiB))
        results["load_after"] = os.getloadavg()
    except Exception as exc:  # report what was measured, then fail
        results["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        teardown(run.actors() if run is not None else [], namespace, ray_cluster, temp_dir)
    results["leftovers"] = shm_leftovers(namespace)
    results["wall_s"] = time.perf_counter() - started
    report(results)
    print(f"wall time {results['wall_s']:.0f} s")
    finish(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
