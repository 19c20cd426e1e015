"""Ray Serve with shared weights (tensorcast_ray.integrations.serve), against a real Serve app
on a real local Ray: an HTTP ingress deployment that pins a version and calls a 4-replica
model deployment through a ``DeploymentHandle`` (model composition). The replicas add no
private copy of a 256 MiB model (anonymous memory measured in each replica after a forward
pass, and every replica's parameters mapped from the same shared-memory files); every
response comes from exactly one version while three new versions are published under a
client's request loop, the versions a client sees only increase, and no request fails;
scaling the model deployment down and up leaks no hold and no shared memory.

Serve runs in this module only (its controller and proxy are shut down at the end)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray
import ray.cloudpickle
import torch

import tensorcast_ray as tc
from tensorcast_ray import _bootstrap
from tests.helpers import leftovers, shm_prefix, stop_namespace, wait_for

serve = pytest.importorskip("ray.serve", reason="ray[serve] (the serve extra) is not installed")

pytestmark = pytest.mark.timeout(300)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LAYERS, WIDTH = 4, 4096  # 4 x 4096 x 4096 fp32: 256 MiB of weights
MODEL_BYTES = LAYERS * WIDTH * WIDTH * 4
NAME = "policy"
APP = "tc-serve-test"


def _make() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])


def _state_dict(version: int) -> dict[str, torch.Tensor]:
    # every weight v / WIDTH: a ones input gives v per unit after layer 1, v**LAYERS at the end,
    # and each layer names its version on its own (weight * WIDTH == v)
    return {f"{i}.weight": torch.full((WIDTH, WIDTH), version / WIDTH) for i in range(LAYERS)}


def _anon_bytes() -> int:
    """This process's anonymous memory: a private copy of the weights would land here, a mapping
    of the shared copy does not. (USS would also count shared pages that only this process has
    touched so far, so it depends on which replica reads first.)"""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous line in /proc/self/smaps_rollup")


def _backing_files(addrs: list[int]) -> list[str]:
    """The file mapped at each address in this process ("" for anonymous memory)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi, fields[5] if len(fields) > 5 else ""))
    return [next((path for lo, hi, path in spans if lo <= a < hi), "") for a in addrs]


@serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class Model:
    def __init__(self, namespace: str) -> None:
        from tensorcast_ray.integrations.serve import SharedWeights, module_builder

        tc.init(namespace=namespace, global_store_mode="none")
        self.before = _anon_bytes()
        self.weights = SharedWeights(NAME, build=module_builder(_make))

    async def __call__(self, version: str | None = None) -> dict[str, Any]:
        import asyncio

        async with self.weights.use_async(version=version) as w:
            seen = []
            for layer in w.model:  # read across awaits: a swap meanwhile must not show
                seen.append(float(layer.weight[0, 0]) * WIDTH)
                await asyncio.sleep(0.002)
            with torch.no_grad():
                out = w.model(torch.ones(1, WIDTH))
            return {
                "key": w.key,
                "layers": seen,
                "out": float(out[0, 0]),
                "pid": os.getpid(),
            }

    def info(self) -> dict[str, Any]:
        with self.weights.use() as w, torch.no_grad():
            w.model(torch.ones(1, WIDTH))  # touch every page of every weight
            files = _backing_files([p.data_ptr() for p in w.model.parameters()])
        return {
            "pid": os.getpid(),
            "anon_growth": _anon_bytes() - self.before,
            "files": files,
            **self.weights.info(),
        }

    def __del__(self) -> None:
        weights = getattr(self, "weights", None)
        if weights is not None:
            weights.close()


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Ingress:
    """Pins one version per request (at least the client's MIN_VERSION_HEADER) and has the
    model serve exactly that version."""

    def __init__(self, model: Any, namespace: str) -> None:
        from tensorcast_ray.integrations.serve import SharedWeights

        tc.init(namespace=namespace, global_store_mode="none")
        self.model = model
        self.weights = SharedWeights(NAME)  # tensors only: a mapping, no model

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        from tensorcast_ray.integrations.serve import MIN_VERSION_HEADER

        async with self.weights.use_async(at_least=request.headers.get(MIN_VERSION_HEADER)) as w:
            result = await self.model.remote(w.key)
            return JSONResponse({**result, "ingress": w.key}, headers=w.headers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app(ray_local: object) -> Iterator[dict[str, Any]]:
    ns = f"t-{uuid.uuid4().hex[:10]}"
    tc.init(namespace=ns, global_store_mode="none")
    pub = tc.weights.Publisher(NAME, keep_last=2)
    pub.publish(_state_dict(1))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model = Model.bind(ns)
    serve.run(Ingress.bind(model, ns), name=APP, route_prefix="/", blocking=False)
    wait_for(
        lambda: serve.status().applications[APP].status == "RUNNING", 240, "the Serve app to run"
    )
    try:
        yield {"ns": ns, "pub": pub, "url": f"http://127.0.0.1:{port}/"}
    finally:
        serve.shutdown()
        tc.shutdown()
        stop_namespace(ns)
        wait_for(lambda: not leftovers(ns), 60, "the namespace's shared memory to be freed")


def _holds() -> float:
    from prometheus_client.parser import text_string_to_metric_families

    address = _bootstrap.current().client.hello.metrics_address
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tc_daemon_reader_holds":
                return float(s.value)
    return 0.0


def _replica_infos(n: int) -> dict[int, dict[str, Any]]:
    handle = serve.get_deployment_handle("Model", APP)
    infos: dict[int, dict[str, Any]] = {}

    def all_seen() -> bool:
        for _ in range(8):
            info = handle.info.remote().result(timeout_s=60)
            infos[info["pid"]] = info
        return len(infos) >= n

    wait_for(all_seen, 120, f"answers from {n} model replicas")
    return infos


def _get(url: str, min_version: int | None = None) -> tuple[int, dict[str, Any], str]:
    from tensorcast_ray.integrations.serve import MIN_VERSION_HEADER, VERSION_HEADER

    headers = {} if min_version is None else {MIN_VERSION_HEADER: str(min_version)}
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.loads(r.read()), r.headers.get(VERSION_HEADER, "")


def _check_one_version(body: dict[str, Any], header: str) -> int:
    """The version a response came from; fails on any sign of a second version in it."""
    version = int(body["key"].split(":")[1])
    assert body["ingress"] == body["key"] == header, body
    assert body["layers"] == [float(version)] * LAYERS, body
    assert body["out"] == pytest.approx(float(version) ** LAYERS), body
    return version


def test_four_replicas_share_one_copy(app: dict[str, Any]) -> None:
    status, body, header = _get(app["url"])
    assert status == 200 and _check_one_version(body, header) == 1
    infos = _replica_infos(4)
    assert len(infos) == 4
    # a private copy would add 256 MiB of anonymous memory to each; the shared mapping adds none
    for pid, info in infos.items():
        grew = info["anon_growth"]
        assert grew < MODEL_BYTES // 8, f"replica {pid} grew {grew >> 20} MiB of private memory"
    assert all(i["key"] == f"{NAME}:1" for i in infos.values())
    # one copy on the node: every replica's parameters live in the same shared-memory files
    files = {tuple(i["files"]) for i in infos.values()}
    assert len(files) == 1, files
    (mapped,) = files
    assert all(f.startswith(f"/dev/shm/{shm_prefix(app['ns'])}") for f in mapped), mapped


def test_hot_swap_under_load_one_version_per_response(app: dict[str, Any]) -> None:
    pub, url = app["pub"], app["url"]
    start = int(pub.versions[-1].split(":")[1])
    results: list[tuple[int, int]] = []  # (version, replica pid) per response, in order
    free: list[int] = []  # a second client with no MIN_VERSION_HEADER: consistency only
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        highest: int | None = None
        while not stop.is_set():
            try:
                status, body, header = _get(url, highest)
                assert status == 200, status
                version = _check_one_version(body, header)
            except (AssertionError, urllib.error.URLError, OSError) as exc:
                failures.append(repr(exc))
                continue
            results.append((version, body["pid"]))
            highest = max(highest or 0, version)

    def free_client() -> None:
        while not stop.is_set():
            try:
                _, body, header = _get(url)
                free.append(_check_one_version(body, header))
            except (AssertionError, urllib.error.URLError, OSError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client), threading.Thread(target=free_client)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 5, 60, "the client's first responses")
        for v in range(start + 1, start + 4):
            pub.publish(_state_dict(v))
            wait_for(lambda v=v: any(r[0] == v for r in results), 60, f"a response from {v}")
        seen_last = len(results)
        wait_for(lambda: len(results) >= seen_last + 10, 60, "more responses after the last swap")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:5]
    versions = [v for v, _ in results]
    assert versions == sorted(versions), "a client's versions went back"
    assert set(versions) == set(range(start, start + 4))
    assert free and set(free) <= set(range(start, start + 4))
    # every replica moved forward only, whatever a request pinned
    infos = _replica_infos(4)
    assert {i["key"] for i in infos.values()} == {f"{NAME}:{start + 3}"}
    assert all(i["last_error"] is None for i in infos.values())
    # the publisher collected what nobody holds any more: two versions kept
    wait_for(lambda: (pub.gc(), len(tc.list_keys(f"{NAME}:")) <= 2)[1], 60, "old versions gone")


def test_scale_down_and_up_leaks_nothing(app: dict[str, Any]) -> None:
    ns = app["ns"]
    wait_for(lambda: _holds() == 5, 60, "one hold per replica (4 models + the ingress)")
    segments = len(leftovers(ns))

    def scale(n: int) -> None:
        model = Model.options(num_replicas=n).bind(ns)
        serve.run(Ingress.bind(model, ns), name=APP, route_prefix="/", blocking=False)

        def settled() -> bool:
            st = serve.status().applications[APP]
            dep = st.deployments["Model"]
            running = dep.replica_states.get("RUNNING", 0)
            return st.status == "RUNNING" and running == n and sum(dep.replica_states.values()) == n

        wait_for(settled, 240, f"the model deployment at {n} replicas")

    scale(1)
    wait_for(lambda: _holds() == 2, 60, "the stopped replicas' holds released")
    status, body, header = _get(app["url"])
    assert status == 200
    _check_one_version(body, header)
    scale(4)
    wait_for(lambda: _holds() == 5, 60, "a hold per new replica")
    assert len(_replica_infos(4)) == 4
    # the new replicas mapped the same copy: no segment was added
    assert len(leftovers(ns)) <= segments


def test_bad_requests_get_clear_errors(app: dict[str, Any]) -> None:
    from tensorcast_ray.integrations.serve import SharedWeights

    with SharedWeights(NAME, follow=False) as w:
        with pytest.raises(tc.ArtifactError) as bad:
            with w.use(at_least="not-a-version"):
                pass
        assert bad.value.status_code.name == "INVALID_ARGUMENT"
        with pytest.raises(tc.ArtifactError) as other:
            with w.use(version="someone-else:3"):
                pass
        assert other.value.status_code.name == "INVALID_ARGUMENT"
        with pytest.raises(tc.ArtifactError) as gone:
            with w.use(version=10**6):  # never published (or deleted): whatever ran before
                pass
        assert gone.value.status_code.name == "NOT_FOUND"
    with pytest.raises(tc.ArtifactError) as none:
        SharedWeights("never-published", timeout_s=0.5)
    assert none.value.status_code.name == "DEADLINE_EXCEEDED"


def test_a_replica_behind_swaps_forward_and_a_cancelled_load_releases_its_version(
    app: dict[str, Any],
) -> None:
    """``use(at_least=)`` on a replica that is behind swaps forward before the request runs;
    an async request cancelled while its pinned version loads (a client that went away)
    leaves that version released once the load ends: no hold kept for ever."""
    import asyncio
    import time

    from tensorcast_ray.integrations.serve import SharedWeights

    building, finish_build = threading.Event(), threading.Event()
    gated = threading.Event()  # set: a build waits for finish_build (a slow load)

    def build(tensors: Any) -> int:
        if gated.is_set():
            building.set()
            finish_build.wait(60)
        return len(tensors)

    pub = app["pub"]
    with SharedWeights(NAME, build=build, follow=False) as w:
        before = w.key
        new = pub.publish(_state_dict(int(before.split(":")[1]) + 1))
        assert w.key == before  # not following: behind
        with w.use(at_least=int(new.split(":")[1])) as got:
            assert got.key == new and w.key == new
        assert w.info()["held"] == [new]  # ``before`` released: no request uses it

        entered: list[str] = []

        async def request() -> None:
            async with w.use_async(version=before) as pinned:  # kept (keep_last=2): a load
                entered.append(pinned.key)

        async def until(done: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 30
            while not done():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.01)

        async def cancel_while_loading() -> list[str]:
            task = asyncio.ensure_future(request())
            await until(building.is_set, "the pinned version's build to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            finish_build.set()  # the load ends after its request is gone
            await asyncio.get_running_loop().shutdown_default_executor()  # (the load's thread)
            # the replica's loop runs on: what the load pinned is left and released
            await until(lambda: w.info()["held"] == [new], "the pinned version's release")
            return list(w.info()["held"])

        gated.set()
        assert asyncio.run(cancel_while_loading()) == [new]
        assert entered == []
        gated.clear()

        # at_least compares integer versions: a named latest is refused, not waited on
        named = pub.publish(_state_dict(9), version="best")
        with pytest.raises(tc.ArtifactError) as refused:
            with w.use(at_least=int(new.split(":")[1]) + 1):
                pass
        assert refused.value.status_code.name == "FAILED_PRECONDITION", refused.value
        assert named in str(refused.value) and w.key == new
