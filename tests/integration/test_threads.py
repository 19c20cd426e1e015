"""Eight threads of one process doing put / get / get_into / delete at once, on keys they
share and keys of their own, for ``TC_THREADS_TEST_SECONDS`` (default 30 s). Every read is
checked byte for byte against what was written for that version: a version's content is a
pure function of its key, so whichever thread wrote it, a reader knows what it must hold."""

from __future__ import annotations

import os
import random
import threading
import time
import zlib
from collections import Counter
from functools import lru_cache

import pytest
import torch

import tensorcast_ray as tc

#: How long the threads run; CI may shorten it, a soak may lengthen it.
DURATION_S = float(os.environ.get("TC_THREADS_TEST_SECONDS", "30"))
THREADS = 8
SHARED_NAMES = ("s0", "s1", "s2")
SHARED_VERSIONS = 6

pytestmark = pytest.mark.timeout(int(DURATION_S) + 240)


@lru_cache(maxsize=256)
def content(key: str) -> dict[str, torch.Tensor]:
    """What version ``key`` holds: a few dtypes and sizes, one spanning many pages."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    size = 4096 * (1 + zlib.crc32(key.encode()) % 64)  # 16 KiB .. 1 MiB of float32
    return {
        "big": torch.randn(size // 4, generator=g),
        "ints": torch.randint(-(2**40), 2**40, (97,), generator=g),
        "half": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "none": torch.empty(0, 5),
    }


def check(key: str, got: dict[str, torch.Tensor], names: list[str] | None = None) -> None:
    want = content(key)
    assert sorted(got) == sorted(names or want), (key, sorted(got))
    for name, tensor in got.items():
        w = want[name]
        assert tensor.dtype == w.dtype and tensor.shape == w.shape, (key, name)
        assert torch.equal(tensor.view(torch.uint8), w.view(torch.uint8)), (key, name)


class Worker:
    def __init__(self, index: int, deadline: float) -> None:
        self.index = index
        self.deadline = deadline
        self.rng = random.Random(index)
        self.ops: Counter[str] = Counter()
        self.failures: list[str] = []
        self.version = 0
        self.mine: list[str] = []
        # Tensors read before a delete: they must keep their bytes after it.
        self.held: list[tuple[str, dict[str, torch.Tensor]]] = []

    def run(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                if self.rng.random() < 0.5:
                    self.private_step()
                else:
                    self.shared_step()
            for key, tensors in self.held:
                check(key, tensors)
                self.ops["held-after-delete"] += 1
            for key in self.mine:
                tc.delete(key)
        except BaseException as exc:  # the first failure ends this thread, reported below
            self.failures.append(f"thread {self.index}: {type(exc).__name__}: {exc}")

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """One read of ``key`` by a way picked at random; checked before it is returned."""
        how = self.rng.choice(["get", "names", "get_into", "artifact"])
        names = None
        if how == "get":
            got = tc.get(key)
        elif how == "names":
            names = ["ints", "big"]
            got = tc.get(key, names=names)
        elif how == "get_into":
            got = {n: torch.full_like(t, 3) for n, t in content(key).items()}
            tc.get_into(key, got)
        else:
            got = tc.artifact(key).tensor_dict(copy=self.rng.random() < 0.2)
        check(key, got, names)
        self.ops[how] += 1
        return got

    def private_step(self) -> None:
        self.version += 1
        key = f"p{self.index}:v{self.version}"
        tc.put(content(key), key=key)
        self.ops["put"] += 1
        self.mine.append(key)
        self.read(key)
        latest = tc.artifact(f"p{self.index}:latest")
        assert latest.key == key, (latest.key, key)  # nobody else writes this name
        check(key, latest.tensor_dict())
        self.ops["latest"] += 1
        while len(self.mine) > 3:
            old = self.mine.pop(0)
            if len(self.held) < 4 and self.rng.random() < 0.3:
                self.held.append((old, tc.get(old)))
            assert tc.delete(old)
            self.ops["delete"] += 1
            with pytest.raises(tc.NotFoundError):
                tc.get(old)

    def shared_step(self) -> None:
        name = self.rng.choice(SHARED_NAMES)
        key = f"{name}:v{self.rng.randrange(SHARED_VERSIONS)}"
        op = self.rng.random()
        try:
            if op < 0.3:
                tc.put(content(key), key=key)
                self.ops["put"] += 1
            elif op < 0.45:
                tc.delete(key)
                self.ops["delete"] += 1
            elif op < 0.6:
                art = tc.artifact(f"{name}:latest")  # resolves to some committed version
                check(art.key, art.tensor_dict())
                self.ops["latest"] += 1
            else:
                self.read(key)
        except tc.AlreadyExistsError:
            self.ops["lost-race"] += 1  # another thread wrote this version first
        except tc.NotFoundError:
            self.ops["absent"] += 1  # not written yet, or deleted by another thread


def test_eight_threads_put_get_delete_at_once(namespace: str) -> None:
    tc.init(namespace=namespace, global_store_mode="none")
    deadline = time.monotonic() + DURATION_S
    workers = [Worker(i, deadline) for i in range(THREADS)]
    threads = [threading.Thread(target=w.run, name=f"tc-test-{w.index}") for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DURATION_S + 180)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    failures = [f for w in workers for f in w.failures]
    assert not failures, "\n".join(failures)
    ops = sum((w.ops for w in workers), Counter())
    for kind in ("put", "get", "names", "get_into", "artifact", "latest", "delete"):
        assert ops[kind] > 0, (kind, ops)
    # Every private key was deleted; only shared versions may remain, each still intact.
    left = tc.list_keys()
    assert all(k.split(":")[0] in SHARED_NAMES for k in left), left
    for key in left:
        check(key, tc.get(key))
        assert tc.delete(key)
    assert tc.list_keys() == []
