"""The module-level verbs: ``tc.put``, ``tc.get`` and the rest, on the default store.  [SDK]

Each is one line over :func:`~tensorcast_ray._store.default_store` (a :class:`Store` with
default options, made on first use); ``tc.store(opts)`` makes a Store of its own. The
package re-exports these names; the work happens in :mod:`tensorcast_ray._store`,
:mod:`tensorcast_ray._write` and :mod:`tensorcast_ray._read_cache`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tensorcast_ray._artifact import Artifact
from tensorcast_ray._persistence import PersistenceStatus
from tensorcast_ray._policy import StorePolicy
from tensorcast_ray._store import ReplicaResult, Store, StoreOptions, default_store
from tensorcast_ray._write import PutResult

if TYPE_CHECKING:
    import torch

__all__ = [
    "artifact",
    "delete",
    "empty",
    "empty_like",
    "exists",
    "get",
    "get_into",
    "list_keys",
    "persistence_status",
    "put",
    "register",
    "replicate",
    "store",
    "wait_persisted",
]


def store(opts: StoreOptions | None = None) -> Store:
    """An explicit Store with its own options (source, retry overrides)."""
    return Store(opts)


def put(tensors: Mapping[str, Any], key: str, policy: StorePolicy | None = None) -> PutResult:
    """Copy ``tensors`` once into the node's shared memory as version ``key``."""
    return default_store().put(tensors, key, policy)


def register(
    tensors: Mapping[str, Any],
    key: str,
    policy: StorePolicy | None = None,
    ttl_ms: int | None = None,
) -> PutResult:
    """Lease ``tensors`` as ``key`` until delete, ``ttl_ms`` or this process exits."""
    return default_store().register(tensors, key, policy, ttl_ms)


def artifact(key: str | None = None, *, artifact_id: str | None = None) -> Artifact:
    """The artifact ``key`` (``name:version`` / ``name:latest``) or ``artifact_id``."""
    return default_store().artifact(key, artifact_id=artifact_id)


def get(
    key: str, device: Any = "cpu", names: Sequence[str] | None = None, copy: bool = False
) -> dict[str, torch.Tensor]:
    """``artifact(key).tensor_dict(device, names, copy)``."""
    return default_store().get(key, device, names, copy)


def get_into(
    key: str, targets: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
) -> None:
    """``artifact(key).tensor_dict_into(targets, names)``."""
    default_store().get_into(key, targets, names)


def exists(key: str) -> bool:
    return default_store().exists(key)


def delete(key: str, *, unless_held: bool = False) -> bool:
    """Delete one version; readers keep what they hold, new readers get NOT_FOUND.
    ``unless_held``: FAILED_PRECONDITION (nothing deleted) while a ``tc.weights`` subscriber
    holds the version to copy it."""
    return default_store().delete(key, unless_held=unless_held)


def list_keys(prefix: str = "") -> list[str]:
    return default_store().list_keys(prefix)


def empty(shape: Sequence[int], dtype: Any = None) -> torch.Tensor:
    """A writable CPU tensor in shared memory; ``register`` shares it with no copy."""
    return default_store().empty(shape, dtype)


def empty_like(tensor: torch.Tensor) -> torch.Tensor:
    return default_store().empty_like(tensor)


def replicate(
    key: str, nodes: str | Sequence[str] = "all", transport: str = "auto"
) -> dict[str, ReplicaResult]:
    """Put a kept copy of ``key`` on each target node (``"all"``: every alive node;
    ``"subscribers"``: the other nodes where a ``tc.weights.Subscriber`` of its name waited or
    read in the last minute).

    The bytes travel along a chain (source → t1 → t2 …, shard by shard), so the source
    sends them about once whatever the number of targets. ``transport``: ``"object_store"``
    (Ray's object store), ``"collective"`` (a gloo group between the daemons, formed on
    first use and reused) or ``"auto"`` (collective when it can run, else the object store,
    saying why in each result's ``reason``). Returns ``{node_id: ReplicaResult}``; a node
    that already holds it is ``ready`` with nothing moved. See docs/cluster.md."""
    return default_store().replicate(key, nodes, transport)


def persistence_status(task_id: str | None = None, *, key: str | None = None) -> PersistenceStatus:
    """The state of a persistence task: by ``task_id`` (``PutResult.persistence_task_id``) or
    by ``key`` (that version's task; ``name:latest`` allowed). Any node may ask."""
    return default_store().persistence_status(task_id, key=key)


def wait_persisted(
    key: str | None = None, *, task_id: str | None = None, timeout: float | None = None
) -> PersistenceStatus:
    """Block until ``key``'s (or ``task_id``'s) persistence task ends; its status on success,
    its error (an ``ArtifactError``) on failure, DEADLINE_EXCEEDED after ``timeout`` s."""
    return default_store().wait_persisted(key, task_id=task_id, timeout=timeout)
