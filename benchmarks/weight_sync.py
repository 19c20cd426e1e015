"""Weight sync: tc.weights Publisher / Subscriber against Ray's object store and safetensors
bytes through actor calls, on simulated nodes, measured in one run.

    python benchmarks/weight_sync.py [--quick] [--sizes 256,1024] [--steps 5]
                                     [--scale-mib 256] [--json PATH] [--rlhf]

Starts a ``ray.cluster_utils.Cluster`` of 3 simulated nodes on this host (the head, node 0,
and 2 added nodes, each with a custom resource ``tc_node_i``), one tensorcast daemon on each
in a fresh namespace ``bench-<hex>``, a trainer actor on node 0 and 4 engine actors, 2 on
node 1 and 2 on node 2. Each engine holds a ``torch.nn.Module`` whose parameters match the
trainer's state_dict (Llama-like bf16 shapes: per layer q/k/v/o ``[h, h]``, gate/up ``[4h, h]``,
down ``[h, 4h]``, two norms ``[h]``; 36 layers and a final norm, 325 tensors; ``h`` set by the
size), preallocated and written once. For each size (256 MiB and 1 GiB; ``--quick``: 32 and
64 MiB), ``--steps`` times (the trainer changes a tensor between steps, so every version
differs; each engine checks it applied the step's value):

- tensorcast: the engines wait in ``Subscriber.wait_for`` (a held call, woken by the
  store), the trainer runs ``Publisher.publish(state_dict)`` (a put into node 0's shared
  memory, ``replicate`` to the subscriber nodes, GC of versions beyond ``keep_last=1``); each
  engine, once woken, ``Subscriber.pull(model, key=...)`` (a copy out of its node's shared
  memory into the module's parameters);
- (a) ``ray.put(state_dict)`` once in the trainer, the ref passed to each engine through an
  actor call (Ray resolves it: ``ray.get``), ``model.load_state_dict`` there;
- (b) ``safetensors.torch.save(state_dict)`` to bytes in the trainer, the bytes put once and
  sent to each engine through an actor call (what vLLM's ``collective_rpc`` does in
  multi-process mode: serialize once, send to every worker), ``safetensors.torch.load`` +
  ``load_state_dict`` there.

The sync time of a step is from the trainer starting (``publish`` / ``ray.put`` /
``safetensors.save``) to the last engine done applying (one host: the processes share a
clock). The engines subscribe (``Subscriber.latest``) before the first publish of a name, as
rollout engines do: their daemon tells the Global Store at once that the node subscribes.
The first step of a size is reported apart (cold: fresh segments, first pulls); the others
give median and min. Then node vs engine scaling at ``--scale-mib`` (default: the smallest
size): the same sync with 1 node x 1 engine, 1 node x 2, 2 nodes x 1, 2 nodes x 2 (each on
a name of its own, so only the nodes whose engines wait on it subscribe), tensorcast and
(a). For tensorcast the bytes each subscriber node's daemon took in
(``tc_transfer_bytes_total``, scraped) over the size say how many copies reached a node.

With sizes of 512 MiB and more each path runs on a cluster of its own (what one leaves in
RAM, the object stores' pages and the daemons' segment pools, stays out of the next one's
way), and a path whose copies would not fit in the RAM free now is skipped (this host is
shared; Ray kills workers above 95 %). Every path is warmed once with a 1 MiB state_dict
first. Ratios are printed against the alternatives measured here; nothing is asserted on
time. ``--rlhf`` then runs ``examples/rlhf_sync.py`` (when it exists and a Python with vllm
is found: this one or ``.venv-vllm``) and prints its per-step sync lines. Everything started
is stopped at the end (the namespace's actors, Ray, the cluster) and /dev/shm is checked for
leftovers of the namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch

# benchmarks/ is on sys.path when run as a script; driver-side helpers only
from _timing import finish
from cluster import (
    available_bytes,
    daemon,
    delta,
    shm_leftovers,
    stored_bytes,
    teardown,
    transfer_bytes,
    wait_for,
)
from cluster import (
    start_cluster as start_nodes,
)

MiB = 1 << 20
NODES = 3  # the head (node 0, the trainer) and 2 added nodes (the engines)
ENGINE_NODES = (1, 1, 2, 2)  # the node of each engine
LAYERS = 36
SIZES_MIB = (256, 1024)
QUICK_SIZES_MIB = (32, 64)
STEPS = 5
QUICK_STEPS = 3
#: a pause between subscribing and the first publish (0: a daemon announces its node at once)
SUBSCRIBE_S = 0.0
KEEP_LAST = 1  # the newest version only (RAM: a 1 GiB version on 3 nodes is 3 GiB)
#: RAM left free beyond a path's copies: Ray kills workers above 95 % of the host's RAM
HEADROOM = 2 << 30
#: (nodes, engines per node) of the scaling table: engine indices into ENGINE_NODES
SCALING = {(1, 1): [0], (1, 2): [0, 1], (2, 1): [0, 2], (2, 2): [0, 1, 2, 3]}
REPO = Path(__file__).resolve().parents[1]
PATHS = {"tc": "tensorcast", "ray": "(a) ray.put / ray.get", "st": "(b) safetensors bytes"}
SCALED = ("tc", "ray")  # the paths of the nodes-vs-engines table


def shapes(total_bytes: int) -> dict[str, tuple[int, ...]]:
    """Llama-like bf16 shapes of about ``total_bytes``: ``LAYERS`` layers of 4 ``[h, h]``
    attention matrices, gate/up ``[4h, h]``, down ``[h, 4h]``, two norms, and a final norm
    (``h`` a multiple of 16)."""
    h = max(16, int((total_bytes / (LAYERS * 32)) ** 0.5) // 16 * 16)  # 16 h^2 elements a layer
    out: dict[str, tuple[int, ...]] = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{name}.weight"] = (h, h)
        out[f"{p}.mlp.gate_proj.weight"] = (4 * h, h)
        out[f"{p}.mlp.up_proj.weight"] = (4 * h, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, 4 * h)
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    return out


FIRST = "model.layers.0.self_attn.q_proj.weight"  # the tensor each step changes


def state_dict(spec: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in spec.items()}
    for i, t in enumerate(out.values()):
        t.fill_(float(i % 13) + 0.5)  # every page written (no zero pages), cheap
    return out


def module(spec: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """A module whose ``state_dict`` has exactly ``spec``'s names and shapes (zeroed)."""
    root = torch.nn.Module()
    for name, shape in spec.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        param = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16), requires_grad=False)
        mod.register_parameter(leaf, param)
    return root


def copies(how: str, engines: int) -> int:
    """About how many copies of the state_dict a path adds at once beyond the trainer's and
    the engines' own (measured here at 1 GiB, 4 engines on 2 nodes: tensorcast 8.1, (a)
    10.2, (b) 10.4): tensorcast ``keep_last`` + 1 versions on each node before GC, and
    pooled segments; (a) and (b) one in each node's object store, and in each engine what it
    deserializes ((b): the bytes and the dict loaded from them), not all at once."""
    if how == "tc":
        return (KEEP_LAST + 1) * NODES + 2
    return NODES + (7 * engines + 3) // 4


class MemWatch:
    """The most RAM taken while inside (MemAvailable sampled every 20 ms, against its value
    at entry: other processes of the host count too)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._base - available_bytes())

    def __enter__(self) -> MemWatch:
        self._base = available_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def trim() -> None:
    """Hand freed heap back to the OS (a deserialized dict of tensors of a few MiB each is
    private heap, below glibc's mmap threshold)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@ray.remote(num_cpus=0, max_restarts=0)
class Trainer:
    """The trainer on node 0: its state_dict, a Publisher per name, the two alternatives."""

    def __init__(self, namespace: str) -> None:
        import tensorcast_ray as tc

        self.tc = tc
        self.ctx = tc.init(namespace=namespace)
        self.sd: dict[str, torch.Tensor] = {}
        self.pubs: dict[str, Any] = {}

    def node_id(self) -> str:
        return str(self.ctx.node_id)

    def make(self, spec: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        self.sd = {}
        trim()
        self.sd = state_dict(spec)
        return sum(t.nbytes for t in self.sd.values()), len(self.sd)

    def step(self, value: float) -> None:
        self.sd[FIRST].fill_(value)  # this step's weights: outside the timings

    def publish(self, name: str) -> dict[str, Any]:
        pub = self.pubs.get(name)
        if pub is None:
            pub = self.pubs[name] = self.tc.weights.Publisher(name, keep_last=KEEP_LAST)
        start = time.time()
        key = pub.publish(self.sd)
        return {
            "key": key,
            "t0": start,
            "publish_s": time.time() - start,
            "replication": dict(pub.last_replication),
        }

    def forget(self, name: str) -> None:
        """Delete every version of ``name`` this trainer published."""
        pub = self.pubs.pop(name, None)
        for key in pub.versions if pub is not None else []:
            try:
                self.tc.delete(key)
            except self.tc.NotFoundError:
                pass

    def ray_sync(self, engines: list[Any]) -> dict[str, Any]:
        """(a): ray.put once, each engine gets the ref through an actor call."""
        start = time.time()
        ref = ray.put(self.sd)
        put_s = time.time() - start
        done = ray.get([e.apply_state_dict.remote(ref) for e in engines])
        del ref
        return {"t0": start, "put_s": put_s, "done": done}

    def safetensors_sync(self, engines: list[Any]) -> dict[str, Any]:
        """(b): safetensors bytes, put once, sent to each engine through an actor call."""
        from safetensors.torch import save

        start = time.time()
        blob = save(self.sd)
        ref = ray.put(blob)
        put_s = time.time() - start
        del blob
        done = ray.get([e.apply_safetensors.remote(ref) for e in engines])
        del ref
        return {"t0": start, "put_s": put_s, "done": done}

    def drop(self) -> None:
        trim()

    def close(self) -> None:
        self.sd, self.pubs = {}, {}
        self.tc.shutdown()


@ray.remote(num_cpus=0, max_concurrency=2, max_restarts=0)  # type: ignore[call-overload]
class Engine:
    """A rollout engine on one node: a module with preallocated parameters, a Subscriber
    per name."""

    def __init__(self, namespace: str) -> None:
        import tensorcast_ray as tc

        self.tc = tc
        self.ctx = tc.init(namespace=namespace)
        self.model: torch.nn.Module | None = None
        self.subs: dict[str, Any] = {}
        self.waiting = 0

    def node_id(self) -> str:
        return str(self.ctx.node_id)

    def make(self, spec: dict[str, tuple[int, ...]]) -> int:
        self.model = None
        trim()
        self.model = module(spec)
        return sum(p.nbytes for p in self.model.parameters())

    def _applied(self) -> float:
        assert self.model is not None
        return float(self.model.get_parameter(FIRST)[0, 0])

    def wait_and_pull(self, name: str, after: str | None) -> dict[str, Any]:
        """tensorcast: wait for a version newer than ``after``, pull it into the module."""
        sub = self.subs.get(name)
        if sub is None:
            sub = self.subs[name] = self.tc.weights.Subscriber(name)
        self.waiting += 1
        try:
            key = sub.wait_for(newer_than=after, timeout=300)
        finally:
            self.waiting -= 1
        woke = time.time()
        sub.pull(self.model, key=key)
        return {"key": key, "woke": woke, "done": time.time(), "value": self._applied()}

    def subscribe(self, name: str) -> str | None:
        sub = self.subs.get(name)
        if sub is None:
            sub = self.subs[name] = self.tc.weights.Subscriber(name)
        return sub.latest()

    def waiters(self) -> int:
        return self.waiting

    def apply_state_dict(self, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
        """(a): the state_dict ray.get gave (Ray resolved the call's argument)."""
        assert self.model is not None
        self.model.load_state_dict(sd)
        return {"done": time.time(), "value": self._applied()}

    def apply_safetensors(self, blob: bytes) -> dict[str, Any]:
        """(b): the bytes the call carried, loaded with safetensors."""
        from safetensors.torch import load

        assert self.model is not None
        self.model.load_state_dict(load(blob))
        return {"done": time.time(), "value": self._applied()}

    def drop(self) -> None:
        trim()

    def close(self) -> None:
        self.model, self.subs = None, {}
        self.tc.shutdown()


# ---- the cluster --------------------------------------------------------------------------
def start_cluster(temp_dir: str, object_store_bytes: int) -> Any:
    """The trainer's node and the engines' nodes (benchmarks/cluster.py starts them)."""
    return start_nodes(temp_dir, object_store_bytes, NODES)


def on(cls: Any, node: int) -> Any:
    return cls.options(resources={f"tc_node_{node}": 0.01})


# ---- the measurements ---------------------------------------------------------------------
class Run:
    def __init__(self, namespace: str, steps: int) -> None:
        self.ns = namespace
        self.steps = steps
        self.trainer = on(Trainer, 0).remote(namespace)  # starts the Global Store, daemon 0
        ray.get(self.trainer.node_id.remote(), timeout=240)
        self.engines = [on(Engine, n).remote(namespace) for n in ENGINE_NODES]
        engine_ids = ray.get([e.node_id.remote() for e in self.engines], timeout=240)
        self.ids = [ray.get(self.trainer.node_id.remote()), engine_ids[0], engine_ids[2]]
        self.metrics = [
            ray.get(daemon(namespace, n).info.remote(), timeout=60)["metrics_address"]
            for n in self.ids
        ]
        self.seq = 0
        self.value = 0.0
        self.waited_s = 0.0

    def actors(self) -> list[Any]:
        return [self.trainer, *self.engines]

    def settle(self, stored: bool = False) -> None:
        """The last step's transient copies freed (RAM is shared); ``stored``: also every
        daemon's bytes."""
        ray.get([a.drop.remote() for a in self.actors()])
        if stored:
            wait_for(lambda: stored_bytes(self.ns, self.ids) == 0, 60, "the daemons to free")

    def make(self, nbytes: int) -> tuple[int, int]:
        spec = shapes(nbytes)
        total, count = ray.get(self.trainer.make.remote(spec))
        ray.get([e.make.remote(spec) for e in self.engines])
        return total, count

    def next_value(self) -> float:
        self.value = self.value % 200 + 1.0  # exact in bf16
        ray.get(self.trainer.step.remote(self.value))
        return self.value

    def tc_sync(self, name: str, engines: list[int], after: str | None) -> dict[str, Any]:
        value = self.next_value()
        refs = [self.engines[i].wait_and_pull.remote(name, after) for i in engines]
        wait_for(
            lambda: all(ray.get([self.engines[i].waiters.remote() for i in engines])),
            60,
            "the engines to wait",
        )
        time.sleep(0.2)  # the held calls reach the daemons
        before = [transfer_bytes(m) for m in self.metrics]
        pub = ray.get(self.trainer.publish.remote(name), timeout=600)
        got = ray.get(refs, timeout=600)
        after_ = [transfer_bytes(m) for m in self.metrics]
        self.settle()
        return {
            "key": pub["key"],
            "sync_s": max(g["done"] for g in got) - pub["t0"],
            "publish_s": pub["publish_s"],
            "wake_s": min(g["woke"] for g in got) - pub["t0"],
            "replicated_to": len(pub["replication"].get("nodes", [])),
            "replication_failed": pub["replication"].get("failed", {}),
            "bytes_in": [delta(a, b, "in") for a, b in zip(after_, before, strict=True)],
            "source_out": delta(after_[0], before[0], "out"),
            "ok": all(g["key"] == pub["key"] and g["value"] == value for g in got),
            "engines": [(g["woke"] - pub["t0"], g["done"] - pub["t0"]) for g in got],
        }

    def other_sync(self, how: str, engines: list[int]) -> dict[str, Any]:
        value = self.next_value()
        handles = [self.engines[i] for i in engines]
        method = self.trainer.ray_sync if how == "ray" else self.trainer.safetensors_sync
        r = ray.get(method.remote(handles), timeout=600)
        self.settle()
        return {
            "sync_s": max(d["done"] for d in r["done"]) - r["t0"],
            "put_s": r["put_s"],
            "ok": all(d["value"] == value for d in r["done"]),
        }

    def tc_steps(
        self, name: str, engines: list[int], steps: int, settle_s: float = SUBSCRIBE_S
    ) -> list[dict[str, Any]]:
        # The engines subscribe first, as rollout engines do before the first publish: their
        # daemon tells the Global Store the node subscribes, so publish replicates there.
        ray.get([self.engines[i].subscribe.remote(name) for i in engines])
        if settle_s:
            time.sleep(settle_s)
        out, key = [], None
        for _ in range(steps):
            r = self.tc_sync(name, engines, key)
            key = r["key"]
            out.append(r)
        ray.get(self.trainer.forget.remote(name))
        self.settle(stored=True)
        return out

    def other_steps(self, how: str, engines: list[int], steps: int) -> list[dict[str, Any]]:
        out = [self.other_sync(how, engines) for _ in range(steps)]
        self.settle(stored=True)
        return out

    def guarded(
        self, how: str, nbytes: int, engines: list[int], steps: int, name: str = ""
    ) -> dict[str, Any]:
        """``steps`` syncs of one path, if this host has the RAM its copies need (else
        skipped: this host is shared), with the RAM they took at most (MemAvailable
        sampled)."""
        need = copies(how, len(engines)) * nbytes + HEADROOM
        start = time.monotonic()
        while available_bytes() < need and time.monotonic() - start < 150:
            time.sleep(1)
        self.waited_s += time.monotonic() - start
        free = available_bytes()
        if free < need:
            print(f"  {how}: skipped, needs {need / 2**30:.1f} GiB free, {free / 2**30:.1f} there")
            return {"rows": [], "skipped": f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free"}
        with MemWatch() as mem:
            if how == "tc":
                rows = self.tc_steps(name, engines, steps)
            else:
                rows = self.other_steps(how, engines, steps)
        print(
            f"    {how} x {len(engines)}: {free / 2**30:.1f} GiB free before, took at most "
            f"{mem.peak / 2**30:.1f}",
            flush=True,
        )
        return {"rows": rows, "peak_ram": mem.peak, "free_before": free}

    def warmup(self, how: str) -> None:
        """The path once with 1 MiB, all engines: imports, first pulls, first watches (and
        the daemons' pair groups)."""
        self.make(MiB)
        everyone = list(range(len(self.engines)))
        if how == "tc":
            self.tc_steps("warm", everyone, 2, settle_s=0.0)
        else:
            self.other_steps(how, everyone, 1)

    def size(self, mib: int, how: str) -> tuple[int, int, dict[str, Any]]:
        """``steps`` syncs of ``mib`` to every engine: (bytes, tensors, the case)."""
        total, count = self.make(mib * MiB)
        case = self.guarded(how, total, list(range(len(self.engines))), self.steps, f"w{mib}")
        print(f"  {total / MiB:.0f} MiB: {PATHS[how]} done", flush=True)
        return total, count, case

    def scaling(self, mib: int, how: str) -> tuple[int, int, list[dict[str, Any]]]:
        """For each (nodes, engines a node) of SCALING: the case, on a name of its own."""
        total, _ = self.make(mib * MiB)
        steps = max(2, self.steps - 1)
        cases = []
        for (nodes, per), engines in SCALING.items():
            cases.append(self.guarded(how, total, engines, steps, f"s{mib}-{nodes}x{per}"))
            print(f"  scaling {nodes} node(s) x {per} engine(s): {PATHS[how]} done", flush=True)
        return total, steps, cases

    def drop_models(self) -> None:
        ray.get([self.trainer.make.remote({})] + [e.make.remote({}) for e in self.engines])


# ---- report -------------------------------------------------------------------------------
def warm(rows: list[dict[str, Any]], field: str = "sync_s") -> list[float]:
    """The steps after the first (all of them if there is only one)."""
    values = [r[field] for r in rows]
    return values[1:] or values


def med(rows: list[dict[str, Any]], field: str = "sync_s") -> float:
    return statistics.median(warm(rows, field)) if rows else float("nan")


def best(rows: list[dict[str, Any]], field: str = "sync_s") -> float:
    return min(warm(rows, field)) if rows else float("nan")


def ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    return f"{med(a) / med(b):>5.2f}x" if a and b else f"{'-':>6}"


def case(row: dict[str, Any], how: str) -> dict[str, Any]:
    """One path's case of a row ({"rows": []} when it did not run)."""
    return row.get(how) or {"rows": [], "skipped": "not run"}


def cells(measured: dict[str, Any]) -> str:
    rows = measured["rows"]
    if not rows:
        return f"{'skipped (RAM)':^20}"
    return f"{rows[0]['sync_s']:>6.2f} {med(rows):>6.2f} {best(rows):>6.2f}"


def outliers(cases: Iterable[tuple[str, list[dict[str, Any]]]]) -> str:
    """The warm steps over 3x their case's median (a stall), as one line."""
    return "; ".join(
        f"{label} step {i + 1}: {r['sync_s']:.2f} s"
        for label, rows in cases
        for i, r in enumerate(rows)
        if i and r["sync_s"] > 3 * med(rows)
    )


def report(results: dict[str, Any]) -> None:
    print(
        f"\nsimulated nodes on one host: {NODES} ({results['cpus']} cores); trainer on node 0, "
        f"engines on nodes {', '.join(map(str, ENGINE_NODES))}; {results['steps']} steps a size "
        "(the first cold, then median / min of the rest)"
    )
    print(
        "\nsync: trainer start -> every engine applied (s); x: alternative / tensorcast (medians)"
    )
    print(
        f"{'size':>8} {'tensors':>7} | {'tensorcast':^20} | {'(a) ray.put/get':^20} | "
        f"{'(b) safetensors rpc':^20} | {'(a)/tc':>6} {'(b)/tc':>6}"
    )
    sub = f"{'cold':>6} {'median':>6} {'min':>6}"
    print(f"{'':>16} | {sub} | {sub} | {sub} |")
    sizes = [row for row in results["sizes"] if "bytes" in row]
    for row in sizes:
        tc_rows, ray_rows, st_rows = (case(row, k)["rows"] for k in ("tc", "ray", "st"))
        print(
            f"{row['bytes'] / MiB:>4.0f} MiB {row['tensors']:>7} | "
            + " | ".join(cells(case(row, k)) for k in ("tc", "ray", "st"))
            + f" | {ratio(ray_rows, tc_rows)} {ratio(st_rows, tc_rows)}"
        )
    print("target: (a)/tc >= 3x at 4 engines on 2 nodes")
    slow = outliers(
        (f"{row['bytes'] / MiB:.0f} MiB {PATHS[k]}", case(row, k)["rows"])
        for row in sizes
        for k in PATHS
    )
    if slow:
        print(f"outliers (> 3x the median): {slow}")
    print(
        "\ndetails (medians of warm steps): publish = the trainer's publish call (put, "
        "replicate, GC); wake =\npublish start -> first engine woken; in n1 / n2 = bytes into "
        "each engine node's daemon / size; src out\n= bytes node 0's daemon sent / size; put ="
        " (a) ray.put, (b) safetensors.save + ray.put; RAM = the\nmost RAM the path took "
        "beyond the trainer's and the engines' tensors (GiB)"
    )
    print(
        f"{'size':>8} | {'publish':>7} {'wake':>6} {'in n1':>6} {'in n2':>6} {'src out':>7} "
        f"{'RAM':>5} | {'(a) put':>7} {'RAM':>5} | {'(b) put':>7} {'RAM':>5} | checks"
    )
    for row in sizes:
        n = row["bytes"]
        tc_rows, ray_rows, st_rows = (case(row, k)["rows"] for k in ("tc", "ray", "st"))
        ram = {k: case(row, k).get("peak_ram", float("nan")) / 2**30 for k in PATHS}
        if tc_rows:
            ins = [statistics.median([r["bytes_in"][i] for r in tc_rows]) / n for i in (1, 2)]
            out = statistics.median([r["source_out"] for r in tc_rows]) / n
            tc_cell = (
                f"{med(tc_rows, 'publish_s'):>7.3f} {med(tc_rows, 'wake_s'):>6.3f} "
                f"{ins[0]:>5.2f}x {ins[1]:>5.2f}x {out:>6.2f}x {ram['tc']:>5.2f}"
            )
        else:
            tc_cell = f"{'skipped':^43}"
        checks = all(r["ok"] for rows in (tc_rows, ray_rows, st_rows) for r in rows)
        failed = [r["replication_failed"] for r in tc_rows if r["replication_failed"]]
        print(
            f"{n / MiB:>4.0f} MiB | {tc_cell} | {med(ray_rows, 'put_s'):>7.3f} {ram['ray']:>5.2f}"
            f" | {med(st_rows, 'put_s'):>7.3f} {ram['st']:>5.2f} | "
            f"{'values ok' if checks else 'WRONG VALUES'}"
            + (f"; replication failed: {failed[0]}" if failed else "")
        )
    sc = results.get("scaling")
    if sc and "bytes" in sc:
        print(
            f"\nnodes vs engines, {sc['bytes'] / MiB:.0f} MiB, {sc['steps']} steps each (s: "
            "median of warm steps, min;\nin: bytes into the engine nodes' daemons / size)"
        )
        print(
            f"{'nodes x engines':>15} | {'tensorcast':>10} {'min':>6} {'in':>5} | "
            f"{'(a) ray':>7} {'min':>6} | {'(a)/tc':>6}"
        )
        for r in sc["rows"]:
            tc_rows, ray_rows = case(r, "tc")["rows"], case(r, "ray")["rows"]
            node_in = (
                statistics.median(sum(x["bytes_in"][1:]) for x in tc_rows) / sc["bytes"]
                if tc_rows
                else float("nan")
            )
            print(
                f"{r['nodes']:>7} x {r['per_node']:<5} | {med(tc_rows):>10.3f} "
                f"{best(tc_rows):>6.3f} {node_in:>4.2f}x | {med(ray_rows):>7.3f} "
                f"{best(ray_rows):>6.3f} | {ratio(ray_rows, tc_rows)}"
            )
        slow = outliers(
            (f"{r['nodes']} x {r['per_node']} {PATHS[k]}", case(r, k)["rows"])
            for r in sc["rows"]
            for k in SCALED
        )
        if slow:
            print(f"outliers (> 3x the median): {slow}")
        by = {(r["nodes"], r["per_node"]): med(case(r, "tc")["rows"]) for r in sc["rows"]}
        if {(1, 1), (1, 2), (2, 1), (2, 2)} <= set(by):
            print(
                f"tensorcast: a second engine on the node adds {by[(1, 2)] - by[(1, 1)]:+.3f} s,"
                f" a second node {by[(2, 1)] - by[(1, 1)]:+.3f} s; 2 x 2 vs 2 x 1: "
                f"{by[(2, 2)] - by[(2, 1)]:+.3f} s"
            )
    if results.get("waited_for_ram_s"):
        print(f"waited {results['waited_for_ram_s']:.0f} s in all for RAM between cases")
    if "load_after" in results:
        print(
            f"load average (1 min) {results['load_before'][0]:.1f} before, "
            f"{results['load_after'][0]:.1f} after"
        )
    print(f"\nleftovers in /dev/shm: {results['leftovers'] or 'none'}")


# ---- the RLHF example -----------------------------------------------------------------------
def vllm_python() -> str | None:
    """This Python if it imports vllm, else the repo's .venv-vllm one if that does."""
    for python in (sys.executable, str(REPO / ".venv-vllm" / "bin" / "python")):
        if not os.path.exists(python):
            continue
        probe = subprocess.run(
            [python, "-c", "import vllm"], capture_output=True, timeout=300, check=False
        )
        if probe.returncode == 0:
            return python
    return None


def rlhf(timeout_s: float, steps: int) -> dict[str, Any]:
    example = REPO / "examples" / "rlhf_sync.py"
    if not example.exists():
        print(f"\n--rlhf: skipped, {example.relative_to(REPO)} does not exist")
        return {"skipped": "no example"}
    python = vllm_python()
    if python is None:
        print("\n--rlhf: skipped, no Python here imports vllm (this one, .venv-vllm)")
        return {"skipped": "no vllm"}
    print(f"\n--rlhf: {python} {example.relative_to(REPO)} (up to {timeout_s:.0f} s)", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [python, str(example), "--steps", str(steps)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"--rlhf: the example ran past {timeout_s:.0f} s, stopped")
        return {"error": "timeout"}
    # The example prints its per-step table (publish, woke, applied, sync) and a summary.
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    for ln in lines:
        print(f"  {ln}")
    print(f"--rlhf: exit {proc.returncode} after {time.perf_counter() - start:.0f} s")
    if proc.returncode != 0:
        print("\n".join(f"  ! {ln}" for ln in proc.stderr.splitlines()[-15:]))
    return {"rc": proc.returncode, "lines": lines}


def session(
    paths: tuple[str, ...],
    sizes: tuple[int, ...],
    scale_mib: int,
    steps: int,
    results: dict[str, Any],
) -> None:
    """``paths`` on a cluster of their own: each size, then the scaling table (the SCALED
    paths); into ``results``."""
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    results["namespaces"].append(namespace)
    temp_dir = tempfile.mkdtemp(prefix="tcbench-", dir="/tmp")
    cluster = None
    run: Run | None = None
    try:
        # Room for one state_dict and the shards in flight on each node.
        cluster = start_cluster(temp_dir, max(512, int(1.5 * max(*sizes, scale_mib))) * MiB)
        run = Run(namespace, steps)
        for how in paths:
            run.warmup(how)
        names = ", ".join(PATHS[how] for how in paths)
        print(f"{names}: {NODES} simulated nodes up, namespace {namespace}", flush=True)
        for row, mib in zip(results["sizes"], sizes, strict=True):
            for how in paths:
                row["bytes"], row["tensors"], row[how] = run.size(mib, how)
        for how in paths:
            if scale_mib and how in SCALED:
                sc = results["scaling"]
                sc["bytes"], sc["steps"], cases = run.scaling(scale_mib, how)
                for row, case in zip(sc["rows"], cases, strict=True):
                    row[how] = case
        run.drop_models()
        results["waited_for_ram_s"] = results.get("waited_for_ram_s", 0.0) + run.waited_s
    except Exception as exc:  # report what was measured, then fail
        results["error"] = f"{'/'.join(paths)}: {type(exc).__name__}: {exc}"[:2000]
    finally:
        teardown(run.actors() if run is not None else [], namespace, cluster, temp_dir)
    results["leftovers"] += shm_leftovers(namespace)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES_MIB)), help="state_dict sizes, MiB"
    )
    parser.add_argument("--steps", type=int, default=None, help=f"steps a size (default {STEPS})")
    parser.add_argument(
        "--scale-mib",
        type=int,
        default=None,
        help="size of the nodes-vs-engines table, MiB (default: the smallest size; 0: none)",
    )
    parser.add_argument("--quick", action="store_true", help="32 and 64 MiB, 3 steps")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH")
    parser.add_argument("--rlhf", action="store_true", help="also run examples/rlhf_sync.py")
    parser.add_argument("--rlhf-timeout", type=float, default=1200, help="seconds")
    args = parser.parse_args()
    sizes = QUICK_SIZES_MIB if args.quick else tuple(int(s) for s in args.sizes.split(","))
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    if steps < 2:
        parser.error("--steps must be >= 2 (the first step is reported as cold)")
    scale_mib = args.scale_mib if args.scale_mib is not None else min(sizes)
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "steps": steps,
        "sizes": [{"mib": mib} for mib in sizes],
        "namespaces": [],
        "leftovers": [],
    }
    if scale_mib:
        results["scaling"] = {
            "mib": scale_mib,
            "rows": [{"nodes": n, "per_node": p} for n, p in SCALING],
        }
    started = time.perf_counter()
    results["load_before"] = os.getloadavg()
    # Big sizes: each path on a cluster of its own (what one leaves in RAM, the object
    # stores' pages, the daemons' segment pools, stays out of the next one's way).
    alone = max(*sizes, scale_mib) >= 512
    for paths in [(how,) for how in PATHS] if alone else [tuple(PATHS)]:
        session(paths, sizes, scale_mib, steps, results)
        if "error" in results:
            break
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    if any("bytes" in row for row in results["sizes"]):
        report(results)
    print(f"wall time {results['wall_s']:.0f} s")
    if args.rlhf and "error" not in results:
        results["rlhf"] = rlhf(args.rlhf_timeout, steps)
    finish(results, args.json)


if __name__ == "__main__":
    main()
