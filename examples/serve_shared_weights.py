"""Ray Serve replicas that share one copy of a model's weights and hot-swap new versions.

A small torch model behind HTTP with 4 replicas on one node: a Publisher (this driver) puts
version 1; each replica maps it from the node's shared memory (no private copy) with
``SharedWeights``; then the driver publishes versions 2 and 3 while a client keeps sending
requests, and every response names the one version it was served with (the
``x-tensorcast-version`` header). Run: ``.venv/bin/python examples/serve_shared_weights.py``
(needs the ``serve`` extra).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.request

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch
from ray import serve

import tensorcast_ray as tc

NAME, WIDTH = "demo-policy", 1024


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 4)
    )


@serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0})
class Policy:
    def __init__(self) -> None:
        from tensorcast_ray.integrations.serve import SharedWeights, module_builder

        tc.init()
        # maps NAME:latest (no copy), builds the module over it, follows new versions
        self.weights = SharedWeights(NAME, build=module_builder(make_model))

    async def __call__(self, request: object) -> object:
        from starlette.responses import JSONResponse

        from tensorcast_ray.integrations.serve import MIN_VERSION_HEADER

        at_least = request.headers.get(MIN_VERSION_HEADER)  # type: ignore[attr-defined]
        async with self.weights.use_async(at_least=at_least) as w:  # one version throughout
            with torch.no_grad():
                logits = w.model(torch.ones(1, WIDTH))[0].tolist()
            return JSONResponse(
                {"version": w.key, "logits": logits, "pid": os.getpid()}, headers=w.headers
            )

    def __del__(self) -> None:
        if hasattr(self, "weights"):
            self.weights.close()


def main() -> None:
    ray.init(address="local", include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tcs-"))
    tc.init()
    publisher = tc.weights.Publisher(NAME, keep_last=2)
    torch.manual_seed(0)
    publisher.publish(make_model().state_dict())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    start = time.perf_counter()
    serve.run(Policy.bind(), name="policy", route_prefix="/")
    print(f"4 replicas up in {time.perf_counter() - start:.1f} s, sharing {NAME}:1")
    url = f"http://127.0.0.1:{port}/"
    highest, pids = 0, set()
    try:
        for step in range(2, 4):
            torch.manual_seed(step)
            publisher.publish(make_model().state_dict())
            print(f"published {NAME}:{step}")
            for _ in range(20):
                req = urllib.request.Request(
                    url, headers={"x-tensorcast-min-version": str(highest)}
                )
                with urllib.request.urlopen(req, timeout=60) as r:
                    body = json.loads(r.read())
                    version = r.headers["x-tensorcast-version"]
                highest = max(highest, int(version.split(":")[1]))
                pids.add(body["pid"])
            print(f"  responses now from {version} ({len(pids)} replicas answered so far)")
    finally:
        serve.shutdown()
        tc.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
