"""Cluster tier against Ray's object store, on simulated nodes, measured in one run.

    python benchmarks/cluster.py [--quick] [--json PATH] [--sizes-mib 256,1024] [--repeat 2]

Starts a ``ray.cluster_utils.Cluster`` of simulated nodes on this host (a head and three
added nodes, each with a custom resource ``tc_node_i``), one tensorcast daemon on each in a
fresh namespace ``bench-<hex>``, and a benchmark actor on each node (two on node 1). A
state_dict of 320 tensors of mixed sizes (bf16 matrices, fp32 norms) is built on node 0; for
each size (256 MiB and 1 GiB; ``--quick``: 64 and 256 MiB):

- remote get: ``tc.put`` on node 0, then ``tc.get`` in an actor on node 1 (the first read:
  node 1's daemon pulls the artifact through Ray's object store into its shared memory) and
  in a second actor on node 1 (warm: it maps node 1's copy, nothing moves). Against, in the
  same run: ``ray.put`` of the same dict on node 0 (as numpy arrays, zero-copy reads, and as
  torch tensors, a copy on every get), the ref passed to node 1, ``ray.get`` there by the
  first actor (the pull) and the second (the object already on node 1);
- replicate: ``tc.replicate(key, nodes=[...], transport=...)`` from node 0 to 1, 2 and 3
  target nodes, over ``object_store`` and over ``collective`` (gloo), against that many
  ``ray.get`` of the numpy dict, one on each target node, all at once. The source daemon's
  ``tc_transfer_bytes_total{direction="out"}`` (its Prometheus endpoint, scraped before and
  after) over the artifact's size says how many times the source sent the bytes (a chain:
  ~1x whatever the number of targets). Replicate to 2 nodes is the 2-hop chain that compares
  the two transports.

Every path is warmed once with a 1 MiB artifact first (the collective's pair groups formed,
Ray's and the daemons' first-use costs paid); figures are the best of ``--repeat`` runs,
each on a fresh key or object. Ratios are printed against the alternatives measured here;
nothing is asserted. Everything started is stopped at the end (the namespace's actors, Ray,
the cluster) and /dev/shm is checked for leftovers of the namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import shutil
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch
from _timing import finish  # benchmarks/ is on sys.path when run as a script

from tensorcast_ray._shm import segment_prefix

MiB = 1 << 20
NODES = 4  # the head (node 0, the source) and 3 added nodes
TENSORS = 320
SIZES_MIB = (256, 1024)
QUICK_SIZES_MIB = (64, 256)
TRANSPORTS = ("object_store", "collective")
FAST_HEALTH = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 500,
}


def state_dict(total_bytes: int, count: int = TENSORS) -> dict[str, torch.Tensor]:
    """About ``total_bytes`` in ``count`` tensors (blocks of 8: four bf16 attention
    matrices, two bf16 MLP matrices twice their size, two fp32 norm vectors of 4096)."""
    blocks = count // 8
    norm_bytes = blocks * 2 * 4096 * 4
    cols = 128
    unit = (total_bytes - norm_bytes) // (blocks * 16)  # 4 x 1 + 2 x 6 units a block
    rows = max(1, unit // (cols * 2))
    out: dict[str, torch.Tensor] = {}
    for b in range(blocks):
        for name in ("q", "k", "v", "o"):
            out[f"layers.{b}.attn.{name}.weight"] = torch.empty(rows, cols, dtype=torch.bfloat16)
        for name in ("up", "down"):
            out[f"layers.{b}.mlp.{name}.weight"] = torch.empty(6 * rows, cols, dtype=torch.bfloat16)
        for name in ("attn_norm", "mlp_norm"):
            out[f"layers.{b}.{name}.weight"] = torch.empty(4096, dtype=torch.float32)
    for i, t in enumerate(out.values()):
        t.fill_(float(i % 13) + 0.5)  # every page written (no zero pages), cheap
    return out


def as_numpy(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same bytes as numpy arrays (bf16 as int16: numpy has no bfloat16)."""
    return {
        k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()
    }


@ray.remote(num_cpus=0, max_restarts=0)
class Bench:
    """One benchmark process on one simulated node, connected to that node's daemon."""

    def __init__(self, namespace: str, config_path: str | None = None) -> None:
        import tensorcast_ray as tc

        self.tc = tc
        self.ctx = tc.init(namespace=namespace, daemon_config_path=config_path)
        key = f"warmup-{uuid.uuid4().hex[:8]}:v1"  # imports and first-use setup
        tc.put({"x": torch.zeros(1)}, key=key)
        tc.get(key)
        tc.delete(key)
        gc.collect()  # a new process's first full collection, out of the timings
        self.sd: dict[str, torch.Tensor] | None = None
        self.refs: dict[str, Any] = {}
        self.held: Any = None

    def node_id(self) -> str:
        return str(self.ctx.node_id)

    def make(self, nbytes: int) -> tuple[int, int]:
        self.sd = state_dict(nbytes)
        return sum(t.nbytes for t in self.sd.values()), len(self.sd)

    def tc_put(self, key: str) -> float:
        assert self.sd is not None
        start = time.perf_counter()
        self.tc.put(self.sd, key=key)
        return time.perf_counter() - start

    def ray_put(self, kind: str) -> list[Any]:
        """The dict in this node's object store, owned by this actor (the ref in a list, so
        Ray passes it on instead of resolving it)."""
        assert self.sd is not None
        ref = ray.put(as_numpy(self.sd) if kind == "numpy" else self.sd)
        self.refs[kind] = ref
        return [ref]

    def drop_refs(self) -> None:
        self.refs.clear()

    def tc_get(self, key: str) -> dict[str, Any]:
        start = time.perf_counter()
        self.held = self.tc.get(key)
        elapsed = time.perf_counter() - start
        # What this get recorded as its path, before tc.artifact() below (a read too) records
        # its own: the last entry of the SDK's served_by table.
        recorded = next(reversed(self.tc._store._served_by.values()), None)
        info = self.tc.artifact(key).info()
        return {
            "s": elapsed,
            "served_by_at_get": recorded,
            "served_by": info.served_by,
            "replicas": info.replica_kinds,
        }

    def ray_get(self, refs: list[Any]) -> float:
        start = time.perf_counter()
        self.held = ray.get(refs[0])
        return time.perf_counter() - start

    def drop(self) -> None:
        self.held = None
        gc.collect()
        # A torch dict from ray.get is private heap (tensors of a few MiB, below glibc's
        # mmap threshold): hand it back to the OS, or a 1 GiB case keeps GiBs per reader.
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def replicate(self, key: str, nodes: list[str], transport: str) -> dict[str, Any]:
        start = time.perf_counter()
        results = self.tc.replicate(key, nodes=nodes, transport=transport)
        elapsed = time.perf_counter() - start
        info = self.tc.artifact(key).info()
        return {
            "s": elapsed,
            "results": {n: [r.status, r.transport, r.reason] for n, r in results.items()},
            "replicas": info.replica_kinds,
        }

    def delete(self, key: str) -> bool:
        return bool(self.tc.delete(key))

    def close(self) -> None:
        self.held, self.sd = None, None
        self.refs.clear()
        self.tc.shutdown()


# ---- the cluster and its daemons ------------------------------------------------------------
def start_cluster(temp_dir: str, object_store_bytes: int, nodes: int = NODES) -> Any:
    """The head (node 0) and ``nodes - 1`` added nodes, each ``object_store_bytes`` of
    object store (they share this host's RAM with the daemons' shared memory)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"tc_node_0": 1},
            "object_store_memory": object_store_bytes,
            "_system_config": FAST_HEALTH,
            "include_dashboard": False,
            "temp_dir": temp_dir,
        },
    )
    for i in range(1, nodes):
        cluster.add_node(
            num_cpus=2, resources={f"tc_node_{i}": 1}, object_store_memory=object_store_bytes
        )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def on(node: int) -> Any:
    return Bench.options(resources={f"tc_node_{node}": 0.01})  # type: ignore[attr-defined]


def daemon(namespace: str, node_id: str) -> Any:
    return ray.get_actor(f"daemon:{node_id}", namespace=namespace)


def transfer_bytes(metrics_address: str) -> dict[str, float]:
    """``tc_transfer_bytes_total`` of one daemon, by ``direction/transport``."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("tc_transfer_bytes_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.index("}")]))
        out[f"{labels['direction']}/{labels['transport']}"] = float(line.rsplit(" ", 1)[1])
    return out


def delta(after: dict[str, float], before: dict[str, float], direction: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(direction))


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def stored_bytes(namespace: str, node_ids: list[str]) -> int:
    statuses = ray.get([daemon(namespace, n).status.remote() for n in node_ids], timeout=60)
    return sum(int(s.get("bytes", 0) or 0) for s in statuses)


# ---- the measurements ---------------------------------------------------------------------
class Run:
    def __init__(self, namespace: str, repeat: int, config_path: str | None = None) -> None:
        self.ns = namespace
        self.repeat = repeat
        # starts the Global Store and node 0's daemon
        self.src = on(0).remote(namespace, config_path)
        ray.get(self.src.node_id.remote(), timeout=240)
        self.readers = [on(i).remote(namespace, config_path) for i in range(1, NODES)]
        self.second = on(1).remote(namespace, config_path)  # a second reader on node 1
        self.ids = ray.get(
            [self.src.node_id.remote()]
            + [r.node_id.remote() for r in [*self.readers, self.second]],
            timeout=240,
        )[:NODES]
        self.metrics = [
            ray.get(daemon(namespace, n).info.remote(), timeout=60)["metrics_address"]
            for n in self.ids
        ]
        self.seq = 0
        self.need = 0  # bytes of RAM the next case needs free
        self.waited_s = 0.0  # time settle waited for RAM

    def actors(self) -> list[Any]:
        return [self.src, *self.readers, self.second]

    def key(self, tag: str) -> str:
        self.seq += 1
        return f"{tag}-{self.seq}:v1"

    def settle(self) -> None:
        """Every copy of the last case freed before the next (RAM is shared). The last node
        of a replicate chain keeps its copy mapped for its idle transfer (up to ~2 min after
        a delete): wait, up to 150 s, until the RAM the next case needs is available."""
        ray.get([a.drop.remote() for a in self.actors()])
        ray.get(self.src.drop_refs.remote())
        wait_for(lambda: stored_bytes(self.ns, self.ids) == 0, 60, "the daemons to free")
        start = time.monotonic()
        while available_bytes() < self.need and time.monotonic() - start < 150:
            time.sleep(1)
        self.waited_s += time.monotonic() - start

    def warmup(self) -> dict[str, float]:
        """Each path once with 1 MiB: Ray's pulls, the daemons' pulls, the pair groups
        (returns the first replicate's time over each transport: the collective's includes
        forming its pair groups)."""
        first: dict[str, float] = {}
        ray.get(self.src.make.remote(MiB))
        targets = self.ids[1:]
        ref = ray.get(self.src.ray_put.remote("numpy"))
        ray.get([r.ray_get.remote(ref) for r in [*self.readers, self.second]])
        del ref
        key = self.key("warm-get")
        ray.get(self.src.tc_put.remote(key))
        ray.get(self.readers[0].tc_get.remote(key))
        ray.get(self.src.delete.remote(key))
        for transport in TRANSPORTS:
            key = self.key(f"warm-{transport}")
            ray.get(self.src.tc_put.remote(key))
            answer = ray.get(self.src.replicate.remote(key, targets, transport))
            bad = {n: r for n, r in answer["results"].items() if r[0] != "ready"}
            if bad:
                raise RuntimeError(f"warm-up replicate over {transport} failed: {bad}")
            first[f"first_replicate_1mib_{transport}_s"] = answer["s"]
            ray.get(self.src.delete.remote(key))
        self.settle()
        return first

    def remote_get(self) -> dict[str, Any]:
        reader, second = self.readers[0], self.second
        best: dict[str, float] = {}
        seen: dict[str, Any] = {}
        samples: dict[str, list[float]] = {}

        def keep(name: str, value: float) -> None:
            best[name] = min(best.get(name, float("inf")), value)
            samples.setdefault(name, []).append(value)

        for _ in range(self.repeat):
            key = self.key("get")
            keep("tc_put", ray.get(self.src.tc_put.remote(key)))
            before = transfer_bytes(self.metrics[1])
            first = ray.get(reader.tc_get.remote(key))
            middle = transfer_bytes(self.metrics[1])
            warm = ray.get(second.tc_get.remote(key))
            after = transfer_bytes(self.metrics[1])
            keep("tc_get_pull", first["s"])
            keep("tc_get_second_reader", warm["s"])
            seen.update(
                pull_bytes_in=delta(middle, before, "in"),
                second_reader_bytes_in=delta(after, middle, "in"),
                pull_served_by_at_get=first["served_by_at_get"],
                pull_served_by_after_artifact=first["served_by"],
                second_reader_served_by_at_get=warm["served_by_at_get"],
                replicas_after_pull=sorted(first["replicas"].values()),
            )
            ray.get(self.src.delete.remote(key))
            self.settle()
            for kind in ("numpy", "torch"):
                ref = ray.get(self.src.ray_put.remote(kind))
                keep(f"ray_get_{kind}_pull", ray.get(reader.ray_get.remote(ref)))
                keep(f"ray_get_{kind}_second_reader", ray.get(second.ray_get.remote(ref)))
                del ref
                self.settle()
        return {**best, **seen, "samples": samples}

    def replicate(self, targets: int) -> dict[str, Any]:
        nodes = self.ids[1 : 1 + targets]
        out: dict[str, Any] = {"targets": targets}
        for transport in TRANSPORTS:
            times, sent, first = [], [], None
            for _ in range(self.repeat):
                key = self.key(f"rep-{transport}")
                ray.get(self.src.tc_put.remote(key))
                before = transfer_bytes(self.metrics[0])
                answer = ray.get(self.src.replicate.remote(key, nodes, transport), timeout=1200)
                after = transfer_bytes(self.metrics[0])
                bad = {n: r for n, r in answer["results"].items() if r[0] != "ready"}
                if bad:
                    raise RuntimeError(f"replicate over {transport} failed: {bad}")
                used = {r[1] for r in answer["results"].values()}
                times.append(answer["s"])
                sent.append(delta(after, before, "out"))
                first = first or answer
                ray.get(self.src.delete.remote(key))
                self.settle()
            out[f"{transport}_s"] = min(times)
            out[f"{transport}_samples"] = times
            out[f"{transport}_source_out_bytes"] = min(sent)
            out[f"{transport}_used"] = sorted(used)
            out[f"{transport}_replicas"] = sorted(first["replicas"].values()) if first else []
        times = []
        for _ in range(self.repeat):
            ref = ray.get(self.src.ray_put.remote("numpy"))
            start = time.perf_counter()
            ray.get([r.ray_get.remote(ref) for r in self.readers[:targets]])
            times.append(time.perf_counter() - start)
            del ref
            self.settle()
        out["ray_get_numpy_s"] = min(times)
        out["ray_get_numpy_samples"] = times
        return out

    def size(self, nbytes: int) -> dict[str, Any]:
        self.need = 4 * nbytes + 3 * 1024 * MiB
        total, count = ray.get(self.src.make.remote(nbytes))
        row: dict[str, Any] = {"bytes": total, "tensors": count}
        row["get"] = self.remote_get()
        print(f"  {total / MiB:.0f} MiB: remote get done", flush=True)
        row["replicate"] = []
        for targets in range(1, NODES):
            row["replicate"].append(self.replicate(targets))
            print(f"  {total / MiB:.0f} MiB: replicate to {targets} done", flush=True)
        return row


# ---- cleanup ------------------------------------------------------------------------------
def shm_leftovers(namespace: str) -> list[str]:
    """/dev/shm files and sockets of the namespace (any node: simulated nodes share a host)."""
    prefix = segment_prefix(namespace, "x")[: -len("x-")]  # every node's daemon
    found = [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    sock_dir = f"/tmp/tcr-{os.getuid()}"
    if os.path.isdir(sock_dir):
        found += [f"{sock_dir}/{n}" for n in os.listdir(sock_dir) if n.startswith(prefix)]
    return found


def named_actors(namespace: str) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace
    ]


def stop_namespace(namespace: str) -> None:
    """Stop each tensorcast actor of the namespace cleanly (frees its segments), then kill."""
    for name in named_actors(namespace):
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        try:
            ray.get(handle.stop.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(handle, no_restart=True)
    wait_for(lambda: not named_actors(namespace), 30, f"the actors of {namespace} to exit")


# ---- report -------------------------------------------------------------------------------
def report(results: dict[str, Any]) -> None:
    print(
        f"\nsimulated nodes on one host: {results['nodes']} ({results['cpus']} cores); "
        f"state_dicts of {TENSORS} tensors (bf16 matrices, fp32 norms); best of "
        f"{results['repeat']}"
    )
    print(
        "\nremote get: put on node 0, read on node 1 (s; MB/s; x: ray time / tc time); "
        f"the daemons' read_transport: {results.get('read_transport', 'object_store')}"
    )
    print(
        f"{'size':>8} | {'tc pull':>8} {'MB/s':>6} {'ray np':>8} {'MB/s':>6} {'ray pt':>8} "
        f"{'MB/s':>6} {'vs np':>6} {'vs pt':>6} | {'2nd reader: tc':>14} {'ray np':>8} "
        f"{'ray pt':>8} | {'pulled':>7} {'2nd in':>6}"
    )
    for row in results["sizes"]:
        g, n = row["get"], row["bytes"]
        pulls = ("tc_get_pull", "ray_get_numpy_pull", "ray_get_torch_pull")
        mbs = {k: n / g[k] / 1e6 for k in pulls}
        print(
            f"{n / MiB:>4.0f} MiB | {g['tc_get_pull']:>8.3f} {mbs['tc_get_pull']:>6.0f} "
            f"{g['ray_get_numpy_pull']:>8.3f} {mbs['ray_get_numpy_pull']:>6.0f} "
            f"{g['ray_get_torch_pull']:>8.3f} {mbs['ray_get_torch_pull']:>6.0f} "
            f"{g['ray_get_numpy_pull'] / g['tc_get_pull']:>5.2f}x "
            f"{g['ray_get_torch_pull'] / g['tc_get_pull']:>5.2f}x | "
            f"{g['tc_get_second_reader']:>14.4f} {g['ray_get_numpy_second_reader']:>8.4f} "
            f"{g['ray_get_torch_second_reader']:>8.3f} | "
            f"{g['pull_bytes_in'] / n:>6.2f}x {g['second_reader_bytes_in'] / n:>5.2f}x"
        )
    print(
        "tc pull: the first tc.get on node 1 (its daemon pulls the artifact); ray np / ray pt:"
        " the first ray.get\non node 1 of the numpy / torch dict ray.put on node 0; 2nd reader:"
        " another process on node 1\nreading the same afterwards; pulled / 2nd in: bytes into "
        "node 1's daemon / artifact size"
    )
    print(
        "\nreplicate from node 0 along a chain vs one ray.get of the numpy dict on each target "
        "at once\n(s; x: ray time / tc time; out: bytes the source daemon sent / artifact size)"
    )
    print(
        f"{'size':>8} {'nodes':>5} | {'object_store':>12} {'x':>6} {'out':>5} | "
        f"{'collective':>10} {'x':>6} {'out':>5} | {'ray.get np':>10} | {'os/coll':>7}"
    )
    for row in results["sizes"]:
        n = row["bytes"]
        for r in row["replicate"]:
            ray_s = r["ray_get_numpy_s"]
            print(
                f"{n / MiB:>4.0f} MiB {r['targets']:>5} | {r['object_store_s']:>12.3f} "
                f"{ray_s / r['object_store_s']:>5.2f}x "
                f"{r['object_store_source_out_bytes'] / n:>4.2f}x | "
                f"{r['collective_s']:>10.3f} {ray_s / r['collective_s']:>5.2f}x "
                f"{r['collective_source_out_bytes'] / n:>4.2f}x | {ray_s:>10.3f} | "
                f"{r['object_store_s'] / r['collective_s']:>6.2f}x"
            )
    print(
        "os/coll: object-store time / collective time (> 1: collective faster); 2 nodes is "
        "the 2-hop chain\nnode 0 -> 1 -> 2"
    )
    w = results.get("warmup", {})
    if w:
        print(
            "first replicate of 1 MiB to 3 nodes (warm-up): object_store "
            f"{w['first_replicate_1mib_object_store_s']:.3f} s, collective "
            f"{w['first_replicate_1mib_collective_s']:.3f} s (forms its pair groups)"
        )
    if results.get("waited_for_ram_s"):
        print(f"waited {results['waited_for_ram_s']:.0f} s in all for RAM between cases")
    if "load_after" in results:
        print(
            f"load average (1 min) {results['load_before'][0]:.1f} before, "
            f"{results['load_after'][0]:.1f} after"
        )
    print(f"\nleftovers in /dev/shm: {results['leftovers'] or 'none'}")


def teardown(actors: Any, namespace: str, cluster: Any, temp_dir: str) -> None:
    """Close the benchmark's actors, stop the namespace's daemons (their shared memory
    freed), then Ray and the simulated cluster; remove the temp dir."""
    if ray.is_initialized():
        for actor in actors:
            try:
                ray.get(actor.close.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(actor)
        stop_namespace(namespace)
        try:
            wait_for(lambda: not shm_leftovers(namespace), 30, "the daemons' shm to go")
        except RuntimeError:
            pass
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def add_run_args(parser: Any, sizes_mib: tuple[int, ...], *, repeat: int, quick: str) -> None:
    """The options the cluster-tier benchmarks share: sizes, repeats, --quick (``quick``
    says what it runs), --json and the daemons' read transport."""
    parser.add_argument(
        "--sizes-mib", default=",".join(map(str, sizes_mib)), help="state_dict sizes, MiB"
    )
    parser.add_argument(
        "--repeat", type=int, default=repeat, help="runs of each figure (best kept)"
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument(
        "--read-transport",
        choices=("object_store", "collective"),
        default="object_store",
        help="the daemons' read_transport: how a reader's daemon pulls another node's copy",
    )


def daemon_config(temp_dir: str, read_transport: str) -> str | None:
    """A daemon config file under ``temp_dir`` setting ``read_transport`` (None: the
    default, object_store, needs none)."""
    if read_transport == "object_store":
        return None
    path = os.path.join(temp_dir, "daemon.yaml")
    with open(path, "w") as f:
        f.write(f"read_transport: {read_transport}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_args(parser, SIZES_MIB, repeat=2, quick="64 and 256 MiB, 1 run each")
    args = parser.parse_args()
    sizes = QUICK_SIZES_MIB if args.quick else tuple(int(s) for s in args.sizes_mib.split(","))
    repeat = 1 if args.quick else args.repeat
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    temp_dir = tempfile.mkdtemp(prefix="tcbench-", dir="/tmp")
    results: dict[str, Any] = {
        "namespace": namespace,
        "nodes": NODES,
        "cpus": os.cpu_count(),
        "repeat": repeat,
        "read_transport": args.read_transport,
        "sizes": [],
    }
    config_path = daemon_config(temp_dir, args.read_transport)
    cluster = None
    run: Run | None = None
    started = time.perf_counter()
    try:
        # Room for one dict and the shards in flight: 1.5x the largest size, at least 512 MiB.
        cluster = start_cluster(temp_dir, max(512, int(1.5 * max(sizes))) * MiB)
        run = Run(namespace, repeat, config_path)
        results["load_before"] = os.getloadavg()
        results["warmup"] = run.warmup()
        print(f"cluster of {NODES} simulated nodes up, namespace {namespace}", flush=True)
        for size in sizes:
            results["sizes"].append(run.size(size * MiB))
        results["load_after"] = os.getloadavg()
        results["waited_for_ram_s"] = run.waited_s
    except Exception as exc:  # report what was measured, then fail
        results["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        teardown(run.actors() if run is not None else [], namespace, cluster, temp_dir)
    results["leftovers"] = shm_leftovers(namespace)
    results["wall_s"] = time.perf_counter() - started
    report(results)
    print(f"wall time {results['wall_s']:.0f} s")
    finish(results, args.json)


if __name__ == "__main__":
    main()
