"""The control plane against a real local Ray: ports that must not collide across namespaces.

One Ray per module (``ray_local``); each test uses fresh namespaces whose actors are stopped
afterwards.
"""

from __future__ import annotations

import socket
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tensorcast_ray import _actors
from tensorcast_ray._config import DEFAULT_GLOBAL_STORE_METRICS_PORT, GlobalStoreConfig
from tests.helpers import stop_namespace

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
