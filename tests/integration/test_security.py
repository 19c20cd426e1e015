"""The control plane against a real local Ray: the namespace token on the daemon and the
Global Store (in Ray, by address from outside Ray, overridden by the environment), and ports
that must not collide across namespaces. The checks against another Unix user run on an
in-process daemon in tests/unit/test_auth.py.

One Ray per module (``ray_local``); each test uses fresh namespaces whose actors are stopped
afterwards.
"""

from __future__ import annotations

import os
import socket
import stat
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

import tensorcast_ray as tc
from tensorcast_ray import _actors, _auth
from tensorcast_ray._config import DEFAULT_GLOBAL_STORE_METRICS_PORT, GlobalStoreConfig
from tensorcast_ray._proto.tensorcast_ray.v1 import global_store_pb2
from tests.helpers import python_child, self_signed, shm_prefix, stop_namespace

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def default_port_taken() -> Iterator[None]:
    """Hold the Global Store's default metrics port (unless something else already does)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", DEFAULT_GLOBAL_STORE_METRICS_PORT))
        sock.listen()
    except OSError:
        pass  # taken already: by another Global Store on this host, which is the point
    try:
        yield
    finally:
        sock.close()


def test_two_global_stores_with_the_default_config_both_start(
    ray_local: object, default_port_taken: None
) -> None:
    """The default metrics port is a preference: a second namespace's Global Store (or a
    second Ray cluster's) on the host takes a free port instead of failing its constructor."""
    namespaces = [f"t-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    config = GlobalStoreConfig().model_dump(mode="json")
    try:
        handles = [  # kept: an actor whose last handle goes away is killed
            _actors.create_global_store(ns, config, detached=False, get_if_exists=False)
            for ns in namespaces
        ]
        infos = [_actors.call(handle, "info") for handle in handles]
        ports = [int(info["metrics_address"].rsplit(":", 1)[1]) for info in infos]
        assert len(set(ports)) == 2 and DEFAULT_GLOBAL_STORE_METRICS_PORT not in ports
        for info, ns in zip(infos, namespaces, strict=True):
            url = f"http://{info['metrics_address']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert b"tc_global_store_daemons_known" in response.read()
            assert info["namespace"] == ns
    finally:
        for ns in namespaces:
            stop_namespace(ns)


def test_an_explicit_busy_metrics_port_still_fails(ray_local: object) -> None:
    """Only the default is a preference: a port the config names is that port or an error."""
    import tensorcast_ray as tc

    ns = f"t-{uuid.uuid4().hex[:10]}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        config = GlobalStoreConfig(metrics_port=busy).model_dump(mode="json")
        try:
            handle = _actors.create_global_store(ns, config, detached=False, get_if_exists=False)
            with pytest.raises(tc.ArtifactError, match=f"cannot bind .*{busy}"):
                _actors.call(handle, "info")
        finally:
            stop_namespace(ns)


CONNECT_SCRIPT = """
import json, os, sys
import tensorcast_ray as tc

address, token = sys.argv[1], sys.argv[2]
if token:
    os.environ["TENSORCAST_RAY_TOKEN"] = token
try:
    tc.init(mode="connect", address=address)
    out = {"keys": tc.list_keys("sec"), "ray_loaded": "ray" in sys.modules}
except tc.ArtifactError as exc:
    out = {"error": type(exc).__name__, "code": exc.status_code.name, "message": exc.message}
print(json.dumps(out), flush=True)
tc.shutdown()
"""


@pytest.mark.parametrize("token", ["", "not-the-token"])
def test_connect_by_address_takes_the_token_from_the_file_or_the_environment(
    namespace: str, token: str
) -> None:
    ctx = tc.init(namespace=namespace, global_store_mode="none")
    tc.put({"t": torch.ones(4)}, key="sec:v1")
    name = f"{shm_prefix(namespace)}{ctx.node_id[:12]}-token"
    path = os.path.join(_auth.default_socket_dir(), name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with python_child(textwrap.dedent(CONNECT_SCRIPT), ctx.daemon_address, token) as (proc, out):
        assert proc.wait(timeout=60) == 0
    if not token:  # the owner outside Ray: the daemon's token file
        assert out == {"keys": ["sec:v1"], "ray_loaded": False}
    else:  # a wrong $TENSORCAST_RAY_TOKEN is used, and refused
        assert out["error"] == "PermissionDeniedError" and out["code"] == "UNAUTHENTICATED"
        assert _auth.TOKEN_ENV in out["message"]
    tc.shutdown()
    stop_namespace(namespace)
    assert not os.path.exists(path), "the token file goes with its daemon"


def test_the_global_store_needs_the_token(namespace: str) -> None:
    tc.init(namespace=namespace)
    info = _actors.call(_actors.get_actor(_actors.GLOBAL_STORE_NAME, namespace), "info")
    with grpc.insecure_channel(info["address"]) as channel:
        status = channel.unary_unary(
            "/tensorcast_ray.v1.GlobalStore/Status",
            request_serializer=global_store_pb2.GlobalStatusRequest.SerializeToString,
            response_deserializer=global_store_pb2.GlobalStatusResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            status(global_store_pb2.GlobalStatusRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = _auth.call_metadata(_auth.namespace_token(namespace))
        answer = status(global_store_pb2.GlobalStatusRequest(), timeout=10, metadata=token)
    assert answer.namespace == namespace


def test_namespaces_have_their_own_tokens(ray_local: object) -> None:
    first, second = (f"t-{uuid.uuid4().hex[:10]}" for _ in range(2))
    token = _auth.namespace_token(first)
    assert token == _auth.namespace_token(first), "created once, then read back"
    assert len(token) >= 43 and _auth.namespace_token(second) != token


def test_a_tls_daemon_is_reached_through_ray_and_by_address(namespace: str, tmp_path: Path) -> None:
    """Ray-connected clients trust the certificate the daemon actor publishes; a process of
    its user outside Ray finds it in the token file."""
    cert_file, key_file = self_signed(str(tmp_path), "daemon")
    config = yaml.safe_load((Path(__file__).parents[1] / "config" / "daemon.yaml").read_text())
    config.update(tls_cert_file=cert_file, tls_key_file=key_file)
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(config))
    ctx = tc.init(namespace=namespace, global_store_mode="none", daemon_config_path=str(path))
    info = _actors.call(_actors.get_actor(_actors.daemon_name(ctx.node_id), namespace), "info")
    assert info["tls_cert_pem"] == Path(cert_file).read_text()
    tc.put({"t": torch.ones(4)}, key="sec:v1")
    with python_child(textwrap.dedent(CONNECT_SCRIPT), ctx.daemon_address, "") as (proc, out):
        assert proc.wait(timeout=60) == 0
    assert out == {"keys": ["sec:v1"], "ray_loaded": False}
