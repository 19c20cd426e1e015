"""init / shutdown against a real local Ray: modes, convergence, failures, restart, ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import grpc
import pytest

import tensorcast_ray as tc
from tensorcast_ray import _actors
from tests.helpers import named_actors, wait_for

pytestmark = pytest.mark.timeout(240)


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_auto_converges_on_one_daemon_and_one_global_store(namespace: str) -> None:
    import ray

    @ray.remote(num_cpus=1)
    def boot(ns: str) -> tuple[str, str]:
        import tensorcast_ray as tc

        ctx = tc.init(namespace=ns)
        out = (ctx.node_id, ctx.daemon_address)
        tc.shutdown()
        return out

    results = ray.get([boot.remote(namespace) for _ in range(8)], timeout=180)
    assert len({r[0] for r in results}) == 1
    assert len({r[1] for r in results}) == 1, "every task must reach the same daemon"
    names = named_actors(namespace)
    assert sorted(names) == sorted([_actors.GLOBAL_STORE_NAME, _actors.daemon_name(results[0][0])])


def test_context_versions_ports_and_metrics(namespace: str) -> None:
    ctx = tc.init(namespace=namespace, port_config=tc.PortConfig(0, 0, 0, 0))
    assert ctx.mode == "auto" and ctx.namespace == namespace
    assert ctx.versions.sdk == ctx.versions.daemon == ctx.versions.global_store == tc.__version__
    assert ctx.transport == "local"
    host, port = ctx.daemon_address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert ctx.global_store_address is not None
    daemon = _actors.get_actor(_actors.daemon_name(ctx.node_id), namespace)
    info = _actors.call(daemon, "info")
    text = scrape(info["metrics_address"])
    assert "tc_daemon_info" in text and "tc_local_stable_tier_total" in text
    gs_info = _actors.call(_actors.get_actor(_actors.GLOBAL_STORE_NAME, namespace), "info")
    assert "tc_global_store_daemons_known 1.0" in scrape(gs_info["metrics_address"])
    # The gRPC endpoint answers Health over the wire too, given the namespace's token.
    from tensorcast_ray._auth import call_metadata, namespace_token
    from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2

    with grpc.insecure_channel(ctx.daemon_address) as channel:
        health = channel.unary_unary(
            "/tensorcast_ray.v1.StoreDaemon/Health",
            request_serializer=common_pb2.HealthRequest.SerializeToString,
            response_deserializer=common_pb2.HealthResponse.FromString,
        )(
            common_pb2.HealthRequest(),
            timeout=10,
            metadata=call_metadata(namespace_token(namespace)),
        )
    assert health.ok and health.version == tc.__version__


def test_connect_without_daemon_is_unavailable(namespace: str) -> None:
    with pytest.raises(tc.UnavailableError) as err:
        tc.init(mode="connect", namespace=namespace)
    assert "tensorcast-ray daemon start" in str(err.value)
    with pytest.raises(tc.UnavailableError):
        tc.init(mode="connect", address="127.0.0.1:1")
    assert not named_actors(namespace)


def test_create_when_one_exists_fails_and_create_cleans_up(namespace: str) -> None:
    ctx = tc.init(mode="create", namespace=namespace, global_store_mode="none")
    assert named_actors(namespace) == [_actors.daemon_name(ctx.node_id)]
    tc.shutdown()
    wait_for(lambda: not named_actors(namespace), 30, "the create-mode daemon to go")
    tc.init(mode="auto", namespace=namespace, global_store_mode="none")
    tc.shutdown()
    with pytest.raises(tc.FailedPreconditionError) as err:
        tc.init(mode="create", namespace=namespace, global_store_mode="none")
    assert err.value.status_code == grpc.StatusCode.FAILED_PRECONDITION


def test_global_store_modes(namespace: str) -> None:
    with pytest.raises(tc.FailedPreconditionError):
        tc.init(namespace=namespace, global_store_mode="connect")
    tc.init(namespace=namespace, global_store_mode="start")
    tc.shutdown()
    with pytest.raises(tc.FailedPreconditionError) as err:
        tc.init(namespace=namespace, global_store_mode="start")
    assert "already runs" in str(err.value)
    ctx = tc.init(namespace=namespace, global_store_mode="connect")
    assert ctx.global_store_address


def test_bad_config_path_and_bad_args(namespace: str, tmp_path: object) -> None:
    with pytest.raises(tc.InvalidArgumentError) as err:
        tc.init(namespace=namespace, daemon_config_path="/no/such/file.yaml")
    assert "/no/such/file.yaml" in str(err.value)
    bad = os.path.join(str(tmp_path), "bad.yaml")
    with open(bad, "w") as f:
        f.write("listen_port: not-a-port\n")
    with pytest.raises(tc.InvalidArgumentError) as err:
        tc.init(namespace=namespace, daemon_config_path=bad)
    assert "listen_port" in str(err.value) and bad in str(err.value)
    with pytest.raises(tc.InvalidArgumentError):
        tc.init(mode="sideways", namespace=namespace)
    with pytest.raises(tc.InvalidArgumentError):
        tc.init(namespace=namespace, global_store_mode="maybe")
    assert not named_actors(namespace), "a failed init must not leave actors behind"


def test_version_mismatch_names_all_three(namespace: str) -> None:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    handle = _actors.create_daemon(
        node_id,
        namespace,
        tc.DaemonConfig().model_dump(mode="json") | {"shm_pool_bytes": 0},
        detached=True,
        get_if_exists=False,
        global_store_mode="none",
        global_store_address=None,
        version_override="9.9.0",
    )
    _actors.call(handle, "info")
    with pytest.raises(tc.FailedPreconditionError) as err:
        tc.init(mode="connect", namespace=namespace)
    message = str(err.value)
    assert f"SDK {tc.__version__}" in message and "daemon 9.9.0" in message
    assert "Global Store" in message


def test_second_address_refused_and_fork_child_reinits(namespace: str) -> None:
    ctx = tc.init(namespace=namespace, global_store_mode="none")
    assert tc.init(namespace=namespace) is ctx  # same endpoint: the same context
    with pytest.raises(tc.FailedPreconditionError) as err:
        tc.init(mode="connect", address="127.0.0.1:9")
    assert "client already initialized for address" in str(err.value)
    tc.put({"x": __import__("torch").arange(4)}, key="fork:v1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: init again, read through a fresh connection
        try:
            os.close(read)
            child_ctx = tc.init(mode="connect", address=ctx.daemon_address)
            value = int(tc.get("fork:v1")["x"].sum())
            os.write(write, json.dumps([child_ctx.daemon_address, value]).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    payload = os.read(read, 4096)
    os.close(read)
    assert status == 0
    assert json.loads(payload) == [ctx.daemon_address, 6]
    assert int(tc.get("fork:v1")["x"].sum()) == 6  # the parent's connection still works


def test_process_outside_ray_connects_by_address(namespace: str) -> None:
    ctx = tc.init(namespace=namespace, global_store_mode="none")
    tc.put({"w": __import__("torch").ones(3, 3)}, key="outside:v1")
    script = textwrap.dedent(
        f"""
        import sys, json, tensorcast_ray as tc
        ctx = tc.init(mode="connect", address={ctx.daemon_address!r})
        assert "ray" not in sys.modules, "a connect-by-address client must not need Ray"
        w = tc.get("outside:v1")["w"]
        tc.put({{"y": w * 2}}, key="outside:v2")
        print(json.dumps([float(w.sum()), ctx.node_id]))
        tc.shutdown()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    total, node_id = json.loads(out.stdout.strip().splitlines()[-1])
    assert total == 9.0 and node_id == ctx.node_id
    assert float(tc.get("outside:v2")["y"].sum()) == 18.0


def test_killed_daemon_restarts_and_client_reconnects(namespace: str) -> None:
    import ray
    import torch

    ctx = tc.init(namespace=namespace, global_store_mode="none")
    tc.put({"w": torch.arange(10.0)}, key="survivor:v1")
    handle = _actors.get_actor(_actors.daemon_name(ctx.node_id), namespace)
    before = _actors.call(handle, "info")
    ray.kill(handle, no_restart=False)
    after = wait_for(lambda: _try_info(handle, before["instance_id"]), 120, "the daemon to restart")
    assert after["address"] == before["address"], "a restarted daemon keeps its port"
    # The data survived in shared memory and the client reconnects through its retry loop.
    assert float(tc.get("survivor:v1")["w"].sum()) == 45.0
    tc.put({"w": torch.ones(2)}, key="survivor:v2")
    assert tc.list_keys("survivor") == ["survivor:v1", "survivor:v2"]


def _try_info(handle: object, old_instance: str) -> dict | None:
    try:
        info = _actors.call(handle, "info", timeout=5)
    except tc.ArtifactError:
        return None
    return info if info["instance_id"] != old_instance else None


def test_auto_with_another_explicit_config_fails_implicit_warns(
    namespace: str, tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    first = os.path.join(str(tmp_path), "first.yaml")
    with open(first, "w") as f:
        f.write("stable_dram_capacity_bytes: 1GiB\nshm_pool_bytes: 0\n")
    ctx = tc.init(namespace=namespace, daemon_config_path=first, global_store_mode="none")
    tc.shutdown()
    # Explicitly asking for another config: refused, the caller would not get it.
    with pytest.raises(tc.FailedPreconditionError) as err:
        tc.init(namespace=namespace, global_store_mode="none", port_config=tc.PortConfig(0, 0))
    assert "another config" in str(err.value)
    # The same explicit config attaches; relying on the defaults attaches with a warning.
    assert (
        tc.init(namespace=namespace, daemon_config_path=first).daemon_address == ctx.daemon_address
    )
    tc.shutdown()
    caplog.set_level(logging.WARNING, logger="tensorcast_ray._bootstrap")
    assert tc.init(namespace=namespace).daemon_address == ctx.daemon_address
    assert any("another config" in r.getMessage() for r in caplog.records)


def test_shutdown_of_a_process_that_joined_a_running_cluster_leaves_its_daemons(
    namespace: str,
) -> None:
    """A job's driver joins the cluster through $RAY_ADDRESS (what job submission sets) and
    lets tc.init() call ray.init(); its tc.shutdown() must not stop the cluster's daemons."""
    import ray

    ctx = tc.init(namespace=namespace, global_store_mode="none")
    daemons = named_actors(namespace)
    assert daemons
    script = textwrap.dedent(
        f"""
        import torch, tensorcast_ray as tc
        tc.init(namespace={namespace!r}, global_store_mode="none")
        tc.put({{"w": torch.ones(4)}}, key="job:v1")
        tc.shutdown()
        print("done")
        """
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("done")
    assert named_actors(namespace) == daemons, "the joined cluster's daemons must stay"
    assert tc.exists("job:v1") and float(tc.get("job:v1")["w"].sum()) == 4.0
    assert tc.init(namespace=namespace, global_store_mode="none").daemon_address == (
        ctx.daemon_address
    )


def test_failed_init_leaves_nothing_it_started(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from tensorcast_ray._metrics import get_sdk_metrics

    def busy(port: int, host: str = "127.0.0.1") -> int:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(get_sdk_metrics(), "serve", busy)
    with pytest.raises(tc.FailedPreconditionError, match="metrics_port"):
        tc.init(mode="create", namespace=namespace, global_store_mode="none", metrics_port=1)
    monkeypatch.undo()
    wait_for(lambda: not named_actors(namespace), 60, "the created daemon to be stopped")
    # Nothing half-initialized is left either: a plain retry works.
    ctx = tc.init(mode="create", namespace=namespace, global_store_mode="none")
    assert ctx.mode == "create" and len(named_actors(namespace)) == 1


def test_client_follows_a_daemon_that_was_stopped_and_started_again(namespace: str) -> None:
    """`tensorcast-ray daemon stop` then `start` (here: another job's init): the node's
    daemon is a new actor; a long-running process reconnects to it on its own."""
    import ray

    from tests.helpers import stop_namespace

    tc.init(namespace=namespace, global_store_mode="none")
    tc.put({"w": __import__("torch").ones(2)}, key="old:v1")
    stop_namespace(namespace)
    script = textwrap.dedent(
        f"""
        import tensorcast_ray as tc
        tc.init(namespace={namespace!r}, global_store_mode="none")
        print(tc.init(namespace={namespace!r}, global_store_mode="none").daemon_address)
        tc.shutdown()
        """
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    new_address = out.stdout.strip().splitlines()[-1]
    # The old version went with the stopped daemon; the verbs work against the new one.
    assert not tc.exists("old:v1")
    tc.put({"w": __import__("torch").ones(2)}, key="new:v1")
    assert tc.list_keys() == ["new:v1"]
    assert _bootstrap_client_address() == new_address


def _bootstrap_client_address() -> str:
    from tensorcast_ray import _bootstrap

    return str(_bootstrap.current().client.address)
