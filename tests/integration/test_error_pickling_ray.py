"""Our errors cross a real Ray actor boundary intact, and Ray's own failures map as intended."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
import ray
import ray.exceptions

from tensorcast_ray._error_mapping import map_exception
from tensorcast_ray._errors import (
    AbortedError,
    ArtifactError,
    DataLossError,
    ResourceExhaustedError,
    UnavailableError,
)
from tests.helpers import wait_for

_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@ray.remote(num_cpus=0)
class Failer:
    def fail(self, cls_name: str, retryable: bool) -> None:
        from tensorcast_ray import _errors

        raise getattr(_errors, cls_name)(f"{cls_name} from the actor", None, retryable)

    def ping(self) -> str:
        return "pong"


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (ResourceExhaustedError, True),  # flag differs from the code's default
        (UnavailableError, False),
        (DataLossError, False),
        (AbortedError, True),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_artifact_error_from_actor_is_recovered_exactly(
    ray_local: None, cls: type[ArtifactError], retryable: bool
) -> None:
    actor = Failer.remote()  # type: ignore[attr-defined]
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(actor.fail.remote(cls.__name__, retryable), timeout=60)
        err = map_exception(info.value)
        assert type(err) is cls
        assert err.status_code is cls.default_code
        assert err.retryable is retryable
        assert err.message == f"{cls.__name__} from the actor"
    finally:
        ray.kill(actor)


def test_call_on_killed_actor_maps_to_unavailable_retryable(ray_local: None) -> None:
    actor = Failer.remote()  # type: ignore[attr-defined]
    assert ray.get(actor.ping.remote(), timeout=60) == "pong"
    ray.kill(actor, no_restart=True)
    # ray.kill is asynchronous: a call sent right after it may still be served. Call until
    # the death is visible (bounded), then map the error Ray raised.
    raised: list[ray.exceptions.RayActorError] = []

    def dead() -> bool:
        try:
            ray.get(actor.ping.remote(), timeout=60)
        except ray.exceptions.RayActorError as exc:
            raised.append(exc)
            return True
        return False

    wait_for(dead, timeout=60, what="the killed actor to refuse calls")
    err = map_exception(raised[0], context="get('llama')")
    assert isinstance(err, UnavailableError)
    assert err.status_code is grpc.StatusCode.UNAVAILABLE and err.retryable
    assert err.__cause__ is raised[0]
    assert "tensorcast-ray daemon status" in err.message
