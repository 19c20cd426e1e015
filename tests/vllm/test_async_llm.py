"""The ``"tensorcast"`` backend on a multi-process ``AsyncLLM``: an update while a request is
in flight (``pause_generation(mode="keep")``) finishes that request with both versions in its
``weight_versions``; errors from the engine's own process still reach the caller as
ArtifactErrors with their codes, and the engine keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import ray

# Not plain "vllm": with tests/ on sys.path, tests/vllm itself imports as a namespace package
# of that name where vLLM is not installed.
pytest.importorskip(
    "vllm.distributed.weight_transfer",
    reason="vLLM is not installed (scripts/ci_vllm.sh installs it in .venv-vllm)",
)

import tensorcast_ray as tc
from tensorcast_ray import ArtifactError
from tests.vllm.engines import PROMPTS, AsyncEngine, engine_env, kill


@pytest.fixture(scope="module")
def engine(tiny_llama: Any, vllm_ns: str) -> Iterator[Any]:
    options = engine_env(vllm_ns, 0)
    env = options["runtime_env"]["env_vars"]
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    actor = AsyncEngine.options(**options).remote()
    try:
        ray.get(actor.start.remote(tiny_llama.w1_dir), timeout=300)
        yield actor
    finally:
        kill(actor)


@pytest.fixture(scope="module")
def pub(vllm_ns: str) -> Iterator[Any]:
    publisher = tc.weights.Publisher("policy", keep_last=2)
    yield publisher
    publisher.close()


@pytest.mark.parametrize("clear_cache", [True, False])
def test_update_while_a_request_is_in_flight(
    engine: Any, pub: Any, tiny_llama: Any, clear_cache: bool
) -> None:
    before = pub.publish(tiny_llama.w1)
    assert ray.get(engine.update.remote(before), timeout=120) == before
    first = ray.get(engine.generate.remote(PROMPTS), timeout=120)
    key = pub.publish(tiny_llama.w2)
    max_tokens = 240
    got = ray.get(
        engine.update_in_flight.remote(PROMPTS[0][:8], max_tokens, key, clear_cache),
        timeout=300,
    )
    assert got["paused"]
    # pause(clear_cache=True) preempted the kept request already; with False it still holds
    # KV blocks of the old weights, and the client preempts it to reset the cache.
    assert got["reset"] is True
    assert got["preempted"] is (not clear_cache)
    assert len(got["tokens"]) == max_tokens
    spans = got["spans"]
    assert [s[0] for s in spans] == [before, key], spans
    assert spans[0][1] == 0 and spans[0][2] == spans[1][1] and spans[1][2] == max_tokens
    assert 0 < spans[0][2] < max_tokens
    assert ray.get(engine.weight_version.remote()) == key
    assert ray.get(engine.generate.remote(PROMPTS), timeout=120) != first
    # W1 again: exactly the first tokens (the multi-process reload is exact too).
    back = pub.publish(tiny_llama.w1)
    assert ray.get(engine.update.remote(back), timeout=120) == back
    assert ray.get(engine.generate.remote(PROMPTS), timeout=120) == first


def test_errors_cross_the_engine_process(engine: Any, pub: Any, tiny_llama: Any) -> None:
    before = pub.publish(tiny_llama.w1)
    ray.get(engine.update.remote(before), timeout=120)
    first = ray.get(engine.generate.remote(PROMPTS), timeout=120)
    with pytest.raises(ArtifactError) as info:
        ray.get(engine.update.remote("policy:987654"), timeout=120)
    assert info.value.status_code == grpc.StatusCode.NOT_FOUND, info.value
    bad = dict(tiny_llama.w2)
    name = "model.layers.0.self_attn.k_proj.weight"
    bad[name] = bad[name][:32].contiguous()
    tc.put(bad, key="broken:1")
    try:
        with pytest.raises(ArtifactError) as info:
            ray.get(engine.update.remote("broken:1"), timeout=120)
        assert info.value.status_code == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert name in str(info.value)
    finally:
        tc.delete("broken:1")
    assert ray.get(engine.generate.remote(PROMPTS), timeout=120) == first
    assert ray.get(engine.weight_version.remote()) == before
