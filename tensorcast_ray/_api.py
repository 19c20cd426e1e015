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
from tensorcast_ray._policy import StorePolicy
from tensorcast_ray._store import Store, StoreOptions, default_store
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
    "put",
    "register",
    "store",
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


def delete(key: str) -> bool:
    """Delete one version; readers keep what they hold, new readers get NOT_FOUND."""
    return default_store().delete(key)


def list_keys(prefix: str = "") -> list[str]:
    return default_store().list_keys(prefix)


def empty(shape: Sequence[int], dtype: Any = None) -> torch.Tensor:
    """A writable CPU tensor in shared memory; ``register`` shares it with no copy."""
    return default_store().empty(shape, dtype)


def empty_like(tensor: torch.Tensor) -> torch.Tensor:
    return default_store().empty_like(tensor)
