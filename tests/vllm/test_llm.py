"""The ``"tensorcast"`` backend, the worker extension and the trainer engine on real
single-process vLLM engines: updates give exactly a fresh engine's greedy tokens, errors
reach the caller as ArtifactErrors and leave the engine serving its previous weights, and
the prefix cache never serves KV of the old weights."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import ray
import torch

# Not plain "vllm": with tests/ on sys.path, tests/vllm itself imports as a namespace package
# of that name where vLLM is not installed.
pytest.importorskip(
    "vllm.distributed.weight_transfer",
    reason="vLLM is not installed (scripts/ci_vllm.sh installs it in .venv-vllm)",
)

import tensorcast_ray as tc
from tensorcast_ray import ArtifactError
from tests.vllm.engines import PROMPTS, Engine, engine_env, kill


@dataclass
class Setup:
    engine: Any  # the Engine actor under test, started from W1
    w1_out: list[list[int]]  # greedy tokens of a fresh W1 engine
    w2_out: list[list[int]]  # greedy tokens of a fresh W2 engine
    pub: Any  # tc.weights.Publisher("policy") in the driver

    def gen(self) -> list[list[int]]:
        return ray.get(self.engine.generate.remote(PROMPTS), timeout=120)

    def to(self, state: dict[str, torch.Tensor]) -> str:
        """Publish ``state`` and apply it through the in-process client; the key."""
        key = self.pub.publish(state)
        assert ray.get(self.engine.client_update.remote(key), timeout=120) == key
        return key


@pytest.fixture(scope="module")
def setup(tiny_llama: Any, vllm_ns: str) -> Iterator[Setup]:
    engine = Engine.options(**engine_env(vllm_ns, 0)).remote(tiny_llama.w1_dir)
    fresh_w2 = Engine.options(**engine_env(vllm_ns, 1)).remote(tiny_llama.w2_dir, False)
    try:
        w1_out = ray.get(engine.generate.remote(PROMPTS), timeout=300)
        w2_out = ray.get(fresh_w2.generate.remote(PROMPTS), timeout=300)
    finally:
        kill(fresh_w2)
    # The test can only tell the weights apart if every prompt's tokens differ.
    assert all(a != b for a, b in zip(w1_out, w2_out, strict=True)), (w1_out, w2_out)
    # init_weight_transfer_engine({}): the namespace comes from TENSORCAST_RAY_NAMESPACE.
    ray.get(engine.client_init.remote({}), timeout=120)
    pub = tc.weights.Publisher("policy", keep_last=2)
    try:
        yield Setup(engine, w1_out, w2_out, pub)
    finally:
        pub.close()
        kill(engine)


def test_backend_update_matches_a_fresh_engine(setup: Setup, tiny_llama: Any) -> None:
    setup.to(tiny_llama.w1)
    assert setup.gen() == setup.w1_out
    key = setup.to(tiny_llama.w2)
    assert setup.gen() == setup.w2_out
    assert ray.get(setup.engine.weight_version.remote()) == key
    back = setup.to(tiny_llama.w1)
    assert setup.gen() == setup.w1_out
    assert ray.get(setup.engine.weight_version.remote()) == back


def test_worker_extension_update(setup: Setup, tiny_llama: Any, vllm_ns: str) -> None:
    assert ray.get(setup.engine.rpc.remote("tensorcast_init", vllm_ns)) == [vllm_ns]
    key = setup.pub.publish(tiny_llama.w2)
    assert ray.get(setup.engine.rpc_update.remote(key), timeout=120) == [key]
    assert setup.gen() == setup.w2_out
    newer = setup.pub.publish(tiny_llama.w1)
    # name:latest resolves inside the worker, to the version just published.
    assert ray.get(setup.engine.rpc_update.remote("policy:latest"), timeout=120) == [newer]
    assert setup.gen() == setup.w1_out
    assert ray.get(setup.engine.rpc.remote("tensorcast_version")) == [newer]


@pytest.mark.parametrize("path", ["backend", "extension"])
def test_missing_key_keeps_serving(setup: Setup, tiny_llama: Any, path: str) -> None:
    before = setup.to(tiny_llama.w2)
    call = setup.engine.client_update if path == "backend" else setup.engine.rpc_update
    with pytest.raises(ArtifactError) as info:
        ray.get(call.remote("policy:987654"), timeout=120)
    assert info.value.status_code == grpc.StatusCode.NOT_FOUND, info.value
    assert "policy:987654" in str(info.value)
    assert setup.gen() == setup.w2_out
    assert ray.get(setup.engine.weight_version.remote()) == before
    setup.to(tiny_llama.w1)  # and it still takes updates
    assert setup.gen() == setup.w1_out


def _broken(w2: dict[str, torch.Tensor], case: str) -> tuple[dict[str, torch.Tensor], str]:
    """W2 with one defect, and the tensor name the error must mention."""
    bad = dict(w2)
    name = "model.layers.1.mlp.down_proj.weight"
    if case == "shape":
        bad[name] = w2[name].t().contiguous()
    elif case == "dtype":
        bad[name] = w2[name].to(torch.int32)
    elif case == "unknown":
        name = "model.layers.1.mlp.extra.weight"
        bad[name] = torch.zeros(4)
    else:  # missing
        del bad[name]
    return bad, name


@pytest.mark.parametrize("case", ["shape", "dtype", "unknown", "missing"])
@pytest.mark.parametrize("path", ["backend", "extension"])
def test_mismatch_is_refused_before_loading(
    setup: Setup, tiny_llama: Any, case: str, path: str
) -> None:
    before = setup.to(tiny_llama.w1)
    bad, name = _broken(tiny_llama.w2, case)
    key = f"broken-{case}-{path}:1"
    tc.put(bad, key=key)
    try:
        call = setup.engine.client_update if path == "backend" else setup.engine.rpc_update
        with pytest.raises(ArtifactError) as info:
            ray.get(call.remote(key), timeout=120)
        assert info.value.status_code == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert name in str(info.value)
        # Every other tensor is W2's: a partial load would have changed the tokens.
        assert setup.gen() == setup.w1_out
        assert ray.get(setup.engine.weight_version.remote()) == before
    finally:
        tc.delete(key)
    setup.to(tiny_llama.w2)
    assert setup.gen() == setup.w2_out


def test_prefix_cache_is_reset_after_an_update(setup: Setup, tiny_llama: Any) -> None:
    setup.to(tiny_llama.w1)
    assert setup.gen() == setup.w1_out  # the prompts' blocks are now in the prefix cache
    key = setup.pub.publish(tiny_llama.w2)
    ray.get(setup.engine.client_update.remote(key, False), timeout=120)  # no reset
    stale = setup.gen()
    # Without the reset the cached W1 blocks are reused: the check below can fail.
    assert stale != setup.w2_out
    assert ray.get(setup.engine.reset_prefix_cache.remote())
    assert setup.gen() == setup.w2_out
    setup.to(tiny_llama.w1)  # the client resets after each update
    assert setup.gen() == setup.w1_out
    setup.to(tiny_llama.w2)
    assert setup.gen() == setup.w2_out


def test_trainer_engine_through_ray_handles(setup: Setup, tiny_llama: Any, vllm_ns: str) -> None:
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer import (
        ModuleSource,
        RayVLLMWeightSyncClient,
        WeightTransferTrainerFactory,
    )
    from vllm.plugins import load_general_plugins

    from tensorcast_ray.integrations.vllm import (
        TensorcastTrainerEngine,
        TensorcastTrainerInitInfo,
    )

    load_general_plugins()  # the entry point registers the trainer engine too
    setup.to(tiny_llama.w1)
    trainer_model = AutoModelForCausalLM.from_pretrained(tiny_llama.w2_dir)
    trainer = WeightTransferTrainerFactory.trainer_init(
        TensorcastTrainerInitInfo("trainer-policy", namespace=vllm_ns, keep_last=1),
        client=RayVLLMWeightSyncClient(setup.engine),
        source=ModuleSource(trainer_model),
    )
    try:
        assert isinstance(trainer, TensorcastTrainerEngine)
        key = trainer.send_weights()
        assert key == "trainer-policy:1"
        assert setup.gen() == setup.w2_out
        assert ray.get(setup.engine.weight_version.remote()) == key
        back = trainer.send_weights(tiny_llama.w1)
        assert back == "trainer-policy:2"
        assert setup.gen() == setup.w1_out
        assert ray.get(setup.engine.weight_version.remote()) == back
        assert tc.list_keys("trainer-policy:") == [back]  # keep_last=1 collected the first
    finally:
        trainer.shutdown()
        for key in tc.list_keys("trainer-policy:"):
            tc.delete(key)


def test_small_buckets_load_the_same_weights(setup: Setup, tiny_llama: Any, vllm_ns: str) -> None:
    # bucket_bytes=1: every load_weights call gets one tensor; layers still rebuild exactly.
    ray.get(setup.engine.client_init.remote({"namespace": vllm_ns, "bucket_bytes": 1}))
    try:
        setup.to(tiny_llama.w2)
        assert setup.gen() == setup.w2_out
        setup.to(tiny_llama.w1)
        assert setup.gen() == setup.w1_out
    finally:
        ray.get(setup.engine.client_init.remote({}))
    with pytest.raises(ArtifactError) as info:
        ray.get(setup.engine.client_init.remote({"bucket": 5}))
    assert info.value.status_code == grpc.StatusCode.INVALID_ARGUMENT


def test_plugin_registration_is_idempotent() -> None:
    from vllm.distributed.weight_transfer import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    from tensorcast_ray.integrations import vllm as integration

    for _ in range(3):
        integration.register_plugin()
    assert "tensorcast" in WeightTransferEngineFactory._registry
    assert WeightTransferEngineFactory._registry["tensorcast"]() is (
        integration.TensorcastWeightTransferEngine
    )
    assert WeightTransferTrainerFactory._registry["tensorcast"]() is (
        integration.TensorcastTrainerEngine
    )


def test_base_package_does_not_import_vllm() -> None:
    import subprocess
    import sys

    code = "import sys, tensorcast_ray; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors_are_rebuilt_from_their_text() -> None:
    from tensorcast_ray.integrations.vllm import as_artifact_error

    err = as_artifact_error(
        Exception("Call to collective_rpc method failed: [NOT_FOUND] policy:9 does not exist")
    )
    assert isinstance(err, tc.NotFoundError) and err.message == "policy:9 does not exist"
    assert as_artifact_error(RuntimeError("no code here")) is None
    inner = tc.InvalidArgumentError("bad")
    try:
        try:
            raise inner
        except Exception as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert as_artifact_error(outer) is inner
