"""Ray Serve replicas sharing one copy of the weights vs each replica loading its own.

    python benchmarks/serve.py [--quick] [--mib 256] [--replicas 4] [--requests 200]

For 1..``--replicas`` replicas of one deployment on this node, two ways to get a model's
weights into each replica, measured in the same run:

- ``shared``: ``SharedWeights`` maps ``name:latest`` from the node's shared memory and builds
  the module over it (``module_builder``: no copy);
- ``private``: what a replica does without tensorcast: ``safetensors.torch.load_file`` of the
  checkpoint (on local disk, page cache warm) and ``load_state_dict`` into a module it built.

Reported per replica: its cold start (``__init__`` start to weights ready), its private memory
(anonymous memory a replica added from ``__init__`` start to after a forward pass touched
every weight) and the node's total memory for the weights (the replicas' private memory plus
the one shared copy). Then, with the most
replicas sharing, request latency over HTTP (p50 / p99) in steady state vs while three new
versions are published and swapped in. Numbers vary with load: the
machine has 2 cores.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import ray.cloudpickle
import torch
from ray import serve

import tensorcast_ray as tc

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAME, LAYERS = "bench-serve", 16
APP = "bench-serve"


def make(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(LAYERS)])


def state_dict(width: int, version: int) -> dict[str, torch.Tensor]:
    return {f"{i}.weight": torch.full((width, width), version / width) for i in range(LAYERS)}


def anon() -> int:
    """This process's private anonymous memory (a private copy of the weights lands here; a
    mapping of the shared copy does not). USS would also count shared pages only this process
    has touched so far."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8)
class Replica:
    def __init__(self, mode: str, width: int, path: str, ns: str) -> None:
        start = time.perf_counter()
        self.before = anon()  # Python, torch, Ray and Serve: the same in both modes
        self.width = width
        self.weights: Any = None
        if mode == "shared":
            from tensorcast_ray.integrations.serve import SharedWeights, module_builder

            tc.init(namespace=ns, global_store_mode="none")
            self.weights = SharedWeights(NAME, build=module_builder(lambda: make(width)))
            self.model = None
        else:
            from safetensors.torch import load_file

            model = make(width)
            model.load_state_dict(load_file(path))
            self.model = model.eval().requires_grad_(False)
        self.ready_s = time.perf_counter() - start

    async def __call__(self, request: Any = None) -> dict[str, Any]:
        if self.weights is None:
            with torch.no_grad():
                out = self.model(torch.ones(1, self.width))
            return {"key": "private", "out": float(out[0, 0])}
        async with self.weights.use_async() as w:
            with torch.no_grad():
                out = w.model(torch.ones(1, self.width))
            return {"key": w.key, "out": float(out[0, 0])}

    def info(self) -> dict[str, Any]:
        model = self.model if self.weights is None else self.weights.current.model
        with torch.no_grad():
            model(torch.ones(1, self.width))
        return {"pid": os.getpid(), "ready_s": self.ready_s, "anon": anon() - self.before}


def deploy(mode: str, n: int, width: int, path: str, ns: str) -> dict[int, dict[str, Any]]:
    serve.run(
        Replica.options(num_replicas=n).bind(mode, width, path, ns),
        name=APP,
        route_prefix="/",
        blocking=False,
    )
    deadline = time.monotonic() + 300
    while serve.status().applications[APP].status != "RUNNING":
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not start")
        time.sleep(0.1)
    handle = serve.get_deployment_handle("Replica", APP)
    infos: dict[int, dict[str, Any]] = {}
    while len(infos) < n and time.monotonic() < deadline:
        info = handle.info.remote().result(timeout_s=120)
        infos[info["pid"]] = info
    return infos


def latencies(url: str, count: int, during: Any = None) -> tuple[list[float], set[str], int]:
    """``count`` sequential requests (``during`` runs on a thread meanwhile)."""
    out: list[float] = []
    keys: set[str] = set()
    errors = 0
    thread = threading.Thread(target=during) if during else None
    if thread:
        thread.start()
    i = 0
    while i < count or (thread is not None and thread.is_alive()):
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                import json

                keys.add(json.loads(r.read())["key"])
        except OSError:
            errors += 1
        out.append(time.perf_counter() - start)
        i += 1
    if thread:
        thread.join()
    return out, keys, errors


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 replicas, 60 requests")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    if args.quick:
        args.mib, args.replicas, args.requests = 64, 2, 60
    width = int((args.mib * 2**20 / LAYERS / 4) ** 0.5)
    model_bytes = LAYERS * width * width * 4
    ns = "bench-serve"
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="tcsb-", dir="/tmp"),
    )
    tc.init(namespace=ns, global_store_mode="none")
    folder = tempfile.mkdtemp(prefix="tcsb-ckpt-")
    path = os.path.join(folder, "model.safetensors")
    from safetensors.torch import save_file

    save_file(state_dict(width, 1), path)
    pub = tc.weights.Publisher(NAME, keep_last=2)
    pub.publish(state_dict(width, 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/"
    print(f"model: {LAYERS} x {width}x{width} fp32 = {model_bytes / 2**20:.0f} MiB; 2 cores")
    print(
        f"{'mode':8} {'replicas':>8} {'cold start s (mean)':>20} {'weights MiB/replica':>19} "
        f"{'node total MiB':>15}"
    )
    rows: dict[tuple[str, int], tuple[float, float, float]] = {}
    try:
        for n in range(1, args.replicas + 1):
            for mode in ("private", "shared"):
                infos = deploy(mode, n, width, path, ns)
                ready = statistics.mean(i["ready_s"] for i in infos.values())
                per = statistics.mean(i["anon"] for i in infos.values()) / 2**20
                total = per * n + (model_bytes / 2**20 if mode == "shared" else 0)
                rows[(mode, n)] = (ready, per, total)
                print(f"{mode:8} {n:8} {ready:20.3f} {per:19.0f} {total:15.0f}")
                serve.delete(APP)
        n = args.replicas
        private, shared = rows[("private", n)], rows[("shared", n)]
        print(
            f"at {n} replicas: weights' node memory {private[2] / shared[2]:.2f}x less shared; "
            f"cold start {private[0] / shared[0]:.1f}x faster shared"
        )
        deploy("shared", n, width, path, ns)
        latencies(url, 20)  # warm the proxy and the replicas
        steady, _, steady_errors = latencies(url, args.requests)

        def publish() -> None:
            for v in range(2, 5):
                pub.publish(state_dict(width, v))
                time.sleep(0.5)  # let requests run on each version (a benchmark, not a test)

        swap, keys, swap_errors = latencies(url, args.requests, during=publish)
        print(f"latency over HTTP, {n} shared replicas ({len(steady)} / {len(swap)} requests):")
        print(
            f"  steady     p50 {pct(steady, 0.5) * 1e3:7.1f} ms  p99 "
            f"{pct(steady, 0.99) * 1e3:7.1f} ms  errors {steady_errors}"
        )
        print(
            f"  hot swap   p50 {pct(swap, 0.5) * 1e3:7.1f} ms  p99 "
            f"{pct(swap, 0.99) * 1e3:7.1f} ms  errors {swap_errors}  versions {sorted(keys)}"
        )
    finally:
        serve.shutdown()
        tc.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
