"""The data path over gRPC: a daemon configured with ``local_socket: false`` serves put,
register, get, get_into and delete to a Ray driver, a Ray actor and a process outside Ray
(``init(mode="connect", address=...)``); a ``register`` lease lives exactly as long as the
client's ``Session`` stream (process exit, ``tc.shutdown()``, actor killed)."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch
import yaml

import tensorcast_ray as tc
from tests.helpers import python_child, wait_for

pytestmark = pytest.mark.timeout(300)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]


def sample(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(256, 64, generator=g),
        "b": torch.randint(-1000, 1000, (17,), generator=g),
        "h": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "z": torch.empty(0, 3),
    }


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    return {
        n: (
            str(t.dtype),
            tuple(t.shape),
            hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest(),
        )
        for n, t in tensors.items()
    }


@pytest.fixture(scope="module")
def grpc_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The suite's daemon config with the local socket off: every request goes over gRPC."""
    config = yaml.safe_load((ROOT / "tests" / "config" / "daemon.yaml").read_text())
    config["local_socket"] = False
    path = tmp_path_factory.mktemp("grpc") / "daemon.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def driver(namespace: str, grpc_config: str) -> tc.InitContext:
    ctx = tc.init(namespace=namespace, global_store_mode="none", daemon_config_path=grpc_config)
    assert ctx.transport == "grpc"
    return ctx


@ray.remote(num_cpus=0)
class Client:
    """A Ray actor on the node: connects through Ray, so over gRPC like the driver."""

    def init(self, namespace: str, config: str) -> str:
        return tc.init(
            namespace=namespace, global_store_mode="none", daemon_config_path=config
        ).transport

    def register(self, key: str) -> str:
        self.buf = tc.empty((1024,), dtype=torch.float32)
        self.buf.copy_(torch.arange(1024, dtype=torch.float32))
        self.plain = {"w": torch.full((33,), 7.0)}
        tc.register(self.plain, key=f"{key}-copy")
        return tc.register({"w": self.buf}, key=key).status

    def digest(self, key: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
        return digest(tc.get(key))


def test_every_verb_over_grpc(driver: tc.InitContext) -> None:
    from tensorcast_ray import _bootstrap
    from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

    assert _bootstrap.current().client.transport == "grpc"
    ts = sample(1)
    result = tc.put(ts, key="g:v1")
    assert (result.status, result.nbytes) == ("ready", sum(t.nbytes for t in ts.values()))
    assert tc.exists("g:v1") and tc.list_keys("g:") == ["g:v1"]
    got = tc.get("g:v1")
    assert digest(got) == digest(ts)
    assert digest(tc.get("g:latest", names=["b"])) == digest({"b": ts["b"]})
    targets = {n: torch.full_like(t, -1) for n, t in ts.items()}
    tc.get_into("g:v1", targets)
    assert digest(targets) == digest(ts)
    # register: tc.empty buffers with no copy, plain tensors copied once.
    buf = tc.empty((4, 4), dtype=torch.float64)
    buf.copy_(torch.arange(16, dtype=torch.float64).reshape(4, 4))
    assert tc.register({"m": buf}, key="g:lease").status == "ready"
    assert tc.register({"p": torch.ones(5)}, key="g:copy", ttl_ms=600_000).status == "ready"
    assert tc.get("g:lease")["m"].tolist() == buf.tolist()
    assert tc.get("g:copy")["p"].tolist() == [1.0] * 5
    # Errors come back with their class and code, from the SDK and from the daemon.
    with pytest.raises(tc.AlreadyExistsError):
        tc.put(ts, key="g:v1")
    with pytest.raises(tc.InvalidArgumentError, match="no tensors"):
        tc.put({}, key="g:empty")
    with pytest.raises(tc.InvalidArgumentError, match="no tensors"):
        _bootstrap.current().client.call(
            "BeginWrite", daemon_pb2.BeginWriteRequest(key="g:empty"), 30
        )
    with pytest.raises(tc.InvalidArgumentError):
        tc.get("g:v1", names=["nope"])
    assert tc.delete("g:v1")
    with pytest.raises(tc.NotFoundError):
        tc.get("g:v1")
    with pytest.raises(tc.NotFoundError):
        tc.delete("g:v1")
    assert digest(got) == digest(ts)  # tensors held before the delete keep their bytes
    assert sorted(tc.list_keys("g:")) == ["g:copy", "g:lease"]


def test_a_ray_actors_leases_end_with_its_session(
    driver: tc.InitContext, namespace: str, grpc_config: str
) -> None:
    client = Client.remote()
    try:
        assert ray.get(client.init.remote(namespace, grpc_config), timeout=120) == "grpc"
        assert ray.get(client.register.remote("actor:lease"), timeout=60) == "ready"
        want = digest({"w": torch.arange(1024, dtype=torch.float32)})
        assert digest(tc.get("actor:lease")) == want
        assert ray.get(client.digest.remote("actor:lease-copy"), timeout=60) == digest(
            {"w": torch.full((33,), 7.0)}
        )
    finally:
        ray.kill(client)
    wait_for(
        lambda: not tc.exists("actor:lease") and not tc.exists("actor:lease-copy"),
        60,
        "the killed actor's gRPC session to end its leases",
    )


CONNECT_SCRIPT = """
import json, sys
import torch
import tensorcast_ray as tc
ctx = tc.init(mode="connect", address=sys.argv[1])
out = {"transport": ctx.transport, "ray_loaded": "ray" in sys.modules}
buf = tc.empty((8,), dtype=torch.int32)
buf.copy_(torch.arange(8, dtype=torch.int32))
out["register"] = tc.register({"b": buf}, key="ext:lease").status
out["put"] = tc.put({"t": torch.arange(6.0)}, key="ext:keep").status
into = {"w": torch.zeros(256, 64)}
tc.get_into("ext:from-driver", into)
out["into"] = float(into["w"].sum())
out["deleted"] = tc.delete("ext:gone")
print(json.dumps(out), flush=True)
if sys.stdin.readline().strip() == "shutdown":
    tc.shutdown()  # ends the session while this process lives on
    print("closed", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("ending", ["exit", "shutdown"])
def test_a_process_outside_ray_over_grpc(driver: tc.InitContext, ending: str) -> None:
    tc.put(sample(2), key="ext:from-driver")
    tc.put({"x": torch.zeros(1)}, key="ext:gone")
    script = textwrap.dedent(CONNECT_SCRIPT)
    with python_child(script, driver.daemon_address) as (proc, out):
        assert proc.stdin is not None and proc.stdout is not None
        assert out == {
            "transport": "grpc",
            "ray_loaded": False,
            "register": "ready",
            "put": "ready",
            "into": pytest.approx(float(sample(2)["w"].sum()), rel=1e-5),
            "deleted": True,
        }
        assert tc.get("ext:lease")["b"].tolist() == list(range(8))
        assert not tc.exists("ext:gone")
        proc.stdin.write(f"{ending}\n")
        proc.stdin.flush()
        if ending == "shutdown":
            assert proc.stdout.readline().strip() == "closed"
            wait_for(lambda: not tc.exists("ext:lease"), 60, "tc.shutdown() to end the lease")
            assert proc.poll() is None  # the process still runs; only its session ended
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    wait_for(lambda: not tc.exists("ext:lease"), 60, "the exited process's lease to end")
    assert tc.get("ext:keep")["t"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
