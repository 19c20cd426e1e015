"""Engine actors of the vLLM tests (a module of its own: Ray workers import it by name)."""

from __future__ import annotations

import gc
import os
from typing import Any

import ray

EXTENSION = "tensorcast_ray.integrations.vllm.TensorcastWorkerExtension"
#: Every engine's arguments: eager, fp32, a 64 MiB KV cache in 32-token blocks (so 70-token
#: prompts leave two full blocks in the prefix cache), greedy sampling is deterministic.
ENGINE_ARGS: dict[str, Any] = {
    "skip_tokenizer_init": True,
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 128,
    "kv_cache_memory_bytes": 64 << 20,
    "block_size": 32,
    "seed": 0,
}
#: Prompts of 70 token ids (two full 32-token blocks each).
PROMPTS = [list(range(start, start + 70)) for start in (1, 100, 300)]


def engine_env(namespace: str, cpu: int) -> dict[str, Any]:
    """Actor options: its own worker process and CPU, the namespace in the environment."""
    return {
        "runtime_env": {
            "env_vars": {
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_OMP_THREADS_BIND": str(cpu % (os.cpu_count() or 1)),
                "TENSORCAST_RAY_NAMESPACE": namespace,
            }
        }
    }


def kill(actor: Any) -> None:
    """Let the actor free its engine, then end it."""
    try:
        ray.get(actor.close.remote(), timeout=60)
    except Exception:
        pass
    ray.kill(actor, no_restart=True)


@ray.remote(num_cpus=1, max_restarts=0)
class Engine:
    """One single-process ``vllm.LLM`` in its own Ray worker.

    Besides generating, it speaks the four methods of vLLM's ``RayVLLMWeightSyncClient``
    (``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
    ``finish_weight_update`` + ``update_weight_version``), so a trainer engine can drive it
    through a Ray handle; its ``finish_weight_update`` resets the prefix cache.
    """

    def __init__(self, model_dir: str, transfer: bool = True) -> None:
        from vllm import LLM

        from tensorcast_ray.integrations.vllm import LLMClient

        extra: dict[str, Any] = {}
        if transfer:
            extra = {"weight_transfer_config": {"backend": "tensorcast"}}
            extra["worker_extension_cls"] = EXTENSION
        self.llm = LLM(model=model_dir, **ENGINE_ARGS, **extra)
        self.client = LLMClient(self.llm)

    def generate(self, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    # -- through the in-process client (the native backend)
    def client_init(self, init_info: dict[str, Any]) -> None:
        self.client.init_weight_transfer_engine(init_info)

    def client_update(self, key: str, reset_prefix_cache: bool = True) -> str:
        self.client.reset_cache = reset_prefix_cache
        try:
            self.client.update(key)
        finally:
            self.client.reset_cache = True
        return str(self.llm.get_weight_version())

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def weight_version(self) -> str:
        return str(self.llm.get_weight_version())

    # -- through the worker extension
    def rpc(self, method: str, *args: Any) -> list[Any]:
        return list(self.llm.collective_rpc(method, args=args))

    def rpc_update(self, key: str) -> list[str]:
        from tensorcast_ray.integrations.vllm import as_artifact_error

        try:
            resolved = self.llm.collective_rpc("tensorcast_update", args=(key,))
        except Exception as exc:
            raise (as_artifact_error(exc) or exc) from None
        self.llm.reset_prefix_cache()
        return list(resolved)

    # -- vLLM's RayVLLMWeightSyncClient calls these
    def init_weight_transfer_engine(self, request: Any) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request: Any) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()

    def update_weight_version(self, version: str) -> None:
        self.llm.update_weight_version(version)

    def close(self) -> None:
        import tensorcast_ray as tc

        self.llm = None  # type: ignore[assignment]
        self.client = None  # type: ignore[assignment]
        gc.collect()
        tc.shutdown()


@ray.remote(num_cpus=1, max_restarts=0)
class AsyncEngine:
    """One ``AsyncLLM`` (always multi-process: its EngineCore and worker are children of
    this actor; ``RAY_ADDRESS`` in the environment lets the worker reach Ray)."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.client: Any = None

    async def start(self, model_dir: str) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from tensorcast_ray.integrations.vllm import AsyncLLMClient

        args = {**ENGINE_ARGS, "max_model_len": 256}
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=model_dir,
                weight_transfer_config={"backend": "tensorcast"},  # type: ignore[arg-type]
                **args,
            )
        )
        self.client = AsyncLLMClient(self.engine)
        await self.client.init_weight_transfer_engine({})

    async def generate(self, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
        import asyncio
        import uuid

        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )

        async def one(prompt: list[int]) -> list[int]:
            final = None
            async for out in self.engine.generate(
                {"prompt_token_ids": prompt}, params, request_id=uuid.uuid4().hex
            ):
                final = out
            assert final is not None
            return list(final.outputs[0].token_ids)

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def update(self, key: str) -> str:
        await self.client.update(key)
        return str(await self.engine.get_weight_version())

    async def weight_version(self) -> str:
        return str(await self.engine.get_weight_version())

    async def update_in_flight(
        self, prompt: list[int], max_tokens: int, key: str, clear_cache: bool = True
    ) -> dict[str, Any]:
        """Start a request; once it has produced tokens, pause with ``mode="keep"``,
        update to ``key``, resume; the request's tokens and weight-version spans."""
        import asyncio
        import uuid

        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )
        started = asyncio.Event()

        async def consume() -> Any:
            final = None
            async for out in self.engine.generate(
                {"prompt_token_ids": prompt}, params, request_id=uuid.uuid4().hex
            ):
                final = out
                if len(out.outputs[0].token_ids) >= 2:
                    started.set()
            return final

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), 120)
        await self.engine.pause_generation(mode="keep", clear_cache=clear_cache)
        paused = await self.engine.is_paused()
        self.client.last_reset = None
        await self.client.update(key)
        reset, preempted = self.client.last_reset, self.client.last_reset_preempted
        await self.engine.resume_generation()
        final = await asyncio.wait_for(task, 120)
        done = final.outputs[0]
        return {
            "paused": paused,
            "reset": reset,
            "preempted": preempted,
            "tokens": list(done.token_ids),
            "spans": [(s.version, s.start, s.end) for s in done.weight_versions or []],
        }

    async def close(self) -> None:
        import tensorcast_ray as tc

        if self.engine is not None:
            self.engine.shutdown()
        self.engine = self.client = None
        gc.collect()
        tc.shutdown()
