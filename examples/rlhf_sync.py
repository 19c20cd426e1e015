"""RLHF weight sync: a trainer on one node, real vLLM rollout engines on two others.

    python examples/rlhf_sync.py --steps 5      # in a virtualenv with vLLM (docs/vllm.md)

Starts a 3-node simulated Ray cluster on this machine (``ray.cluster_utils.Cluster``; every
node is treated as remote by tensorcast) and builds a tiny Llama offline. Each step:

1. the rollout actors on nodes 1 and 2 are waiting in ``tc.weights.Subscriber.wait_for``
   (woken by the store at the commit, not polling);
2. the trainer actor on node 0 takes an optimizer step and publishes its ``state_dict`` with
   ``tc.weights.Publisher`` (the version is replicated once to each subscriber node);
3. each rollout wakes, applies the version through vLLM's native weight-transfer API with
   the ``"tensorcast"`` backend (``LLM(..., weight_transfer_config={"backend":
   "tensorcast"})``: zero-copy read from its node's shared memory, layerwise reload), and
   generates with the new weights.

It prints, per step, the publish time, when each engine woke and had applied the version
(from the start of publish), and whether both engines produce the same tokens. Everything it
starts is shut down at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import ray

NAME = "policy"
PROMPTS = [list(range(start, start + 24)) for start in (1, 50, 200)]
ENGINE_ARGS: dict[str, Any] = {
    "skip_tokenizer_init": True,  # token-id prompts: no tokenizer needed
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 128,
    "kv_cache_memory_bytes": 64 << 20,  # always give the KV size on CPU (else 90 % of RAM)
    "seed": 0,
}


def build_model(root: str, hidden: int, layers: int) -> str:
    """A tiny Llama checkpoint (head_dim 32: the least vLLM's CPU attention supports)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    path = os.path.join(root, "policy-init")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return path


@ray.remote(num_cpus=0)
class Trainer:
    """The learner: an HF model, one optimizer step per call, then publish."""

    def __init__(self, namespace: str, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        import tensorcast_ray as tc

        tc.init(namespace=namespace)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.publisher = tc.weights.Publisher(NAME, keep_last=2)

    def step(self) -> dict[str, Any]:
        import torch

        batch = torch.randint(0, 512, (4, 32))
        t0 = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        trained = time.perf_counter() - t0
        started = time.time()
        key = self.publisher.publish(self.model.state_dict())
        return {
            "key": key,
            "loss": float(loss),
            "train_s": trained,
            "publish_started": started,
            "publish_s": time.time() - started,
        }

    def close(self) -> None:
        import tensorcast_ray as tc

        self.publisher.close()
        tc.shutdown()


@ray.remote(num_cpus=1)
class Rollout:
    """One single-process vLLM engine; follows the policy's versions."""

    def __init__(self, namespace: str, model_dir: str) -> None:
        from vllm import LLM

        import tensorcast_ray as tc
        from tensorcast_ray.integrations.vllm import LLMClient

        tc.init(namespace=namespace)
        self.llm = LLM(
            model=model_dir, weight_transfer_config={"backend": "tensorcast"}, **ENGINE_ARGS
        )
        self.client = LLMClient(self.llm)  # resets the prefix cache after each update
        self.client.init_weight_transfer_engine({"namespace": namespace})
        self.subscriber = tc.weights.Subscriber(NAME)
        self.node = ray.get_runtime_context().get_node_id()

    def ready(self) -> str:
        self.subscriber.latest()  # this node now subscribes: publish replicates here
        return self.node

    def follow_one(self, timeout: float) -> dict[str, Any]:
        """Wait for the next version, apply it, generate."""
        from vllm import SamplingParams

        key = self.subscriber.wait_for(timeout=timeout)
        woke = time.time()
        self.client.update(key)
        applied = time.time()
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return {
            "key": key,
            "version": str(self.llm.get_weight_version()),
            "woke": woke,
            "applied": applied,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
        }

    def close(self) -> None:
        import tensorcast_ray as tc

        self.llm = None  # vLLM's LLM has no shutdown(): drop it
        gc.collect()
        tc.shutdown()


def stop_tensorcast(namespace: str) -> None:
    """Stop the namespace's daemons (one per node, started by the first process there) and
    its Global Store cleanly: their shared memory is freed (as `tensorcast-ray daemon stop
    --all` and `tensorcast-ray global stop` do)."""
    from tensorcast_ray import _actors

    for node in [n["NodeID"] for n in ray.nodes() if n.get("Alive")]:
        handle = _actors.get_actor(_actors.daemon_name(node), namespace)
        if handle is not None:
            _actors.kill(handle)
    handle = _actors.get_actor(_actors.GLOBAL_STORE_NAME, namespace)
    if handle is not None:
        _actors.kill(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256, help="model width (a multiple of 32)")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    root = tempfile.mkdtemp(prefix="tc-rlhf-")
    namespace = f"rlhf-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"tc_node_0": 1}, "include_dashboard": False},
    )
    actors: list[Any] = []
    try:
        for i in (1, 2):
            cluster.add_node(num_cpus=2, resources={f"tc_node_{i}": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        model_dir = build_model(root, args.hidden, args.layers)
        trainer = Trainer.options(resources={"tc_node_0": 0.01}).remote(namespace, model_dir)
        rollouts = [
            Rollout.options(
                resources={f"tc_node_{i}": 0.01},
                runtime_env={
                    "env_vars": {
                        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # one process per engine
                        "VLLM_CPU_OMP_THREADS_BIND": str(i - 1),  # one core each
                    }
                },
            ).remote(namespace, model_dir)
            for i in (1, 2)
        ]
        actors = [trainer, *rollouts]
        nodes = ray.get([r.ready.remote() for r in rollouts], timeout=600)
        print(f"trainer on node 0, vLLM engines on {[n[:8] for n in nodes]}")
        print("step  version     loss   publish   woke (ms after publish)   applied     sync")
        syncs = []
        for step in range(1, args.steps + 1):
            follows = [r.follow_one.remote(120.0) for r in rollouts]  # waiting before publish
            pub = ray.get(trainer.step.remote(), timeout=300)
            got = ray.get(follows, timeout=300)
            start = pub["publish_started"]
            woke = [1e3 * (g["woke"] - start) for g in got]
            applied = [1e3 * (g["applied"] - start) for g in got]
            syncs.append(max(applied))
            same = got[0]["tokens"] == got[1]["tokens"]
            assert all(g["key"] == g["version"] == pub["key"] for g in got), got
            print(
                f"{step:>4}  {pub['key']:<10} {pub['loss']:6.3f} {1e3 * pub['publish_s']:7.1f} ms"
                f"   {' / '.join(f'{w:6.1f}' for w in woke):>22}   "
                f"{' / '.join(f'{a:6.1f}' for a in applied)}   {max(applied):6.1f} ms"
                f"{'' if same else '  (engines disagree!)'}"
            )
        ordered = sorted(syncs)
        median, low, high = ordered[len(ordered) // 2], ordered[0], ordered[-1]
        print(
            "per-step sync (publish start → both engines applied): "
            f"median {median:.1f} ms, min {low:.1f} ms, max {high:.1f} ms"
        )
    finally:
        for actor in actors:
            try:
                ray.get(actor.close.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(actor)
        if ray.is_initialized():
            stop_tensorcast(namespace)
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # vLLM on CPU spawns processes: keep the guard
    main()
