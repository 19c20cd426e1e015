"""Quickstart: load weights once per node, read them zero-copy from any process.

    python examples/quickstart.py

Starts a local Ray instance if none is running, then this node's tensorcast daemon; puts a
small model's state_dict; reads it back in this process and in a Ray task without copying;
prints the daemon's status; cleans up.
"""

from __future__ import annotations

import time

import ray
import torch

import tensorcast_ray as tc


@ray.remote
def reader(key: str) -> dict[str, object]:
    """Any process on the node: init() finds the daemon; get() maps the same memory."""
    import torch  # noqa: F401  (imported before timing: its first import takes seconds)

    import tensorcast_ray as tc

    tc.init()
    start = time.perf_counter()
    weights = tc.get(key)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    total = sum(float(t.float().sum()) for t in weights.values())
    tc.shutdown()
    return {"tensors": len(weights), "checksum": round(total, 3), "get_ms": round(elapsed_ms, 3)}


def main() -> None:
    ctx = tc.init()  # mode="auto": converge on one daemon per node
    print(
        f"tensorcast_ray {tc.__version__}: node {ctx.node_id[:12]}, daemon {ctx.daemon_address}"
        f" over {ctx.transport}"
    )

    model = torch.nn.Sequential(
        torch.nn.Embedding(1000, 256), torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)
    ).to(torch.bfloat16)
    state = model.state_dict()

    result = tc.put(state, key="demo:v1")
    print(f"put {result.key}: {result.nbytes / 2**20:.1f} MiB, status {result.status}")

    weights = tc.get("demo:latest")  # zero-copy, read-only views of shared memory
    assert all(torch.equal(weights[k], v) for k, v in state.items())
    checksum = round(sum(float(t.float().sum()) for t in weights.values()), 3)
    print(f"get demo:latest in this process: {len(weights)} tensors, checksum {checksum}")

    remote = ray.get(reader.remote("demo:latest"))
    print(f"get demo:latest in a Ray task: {remote}")
    assert remote["checksum"] == checksum

    status = tc.store().list_keys("demo")
    print(f"keys: {status}")
    tc.delete("demo:v1")
    tc.shutdown()  # stops Ray too, since init() started it
    print("done")


if __name__ == "__main__":
    main()
