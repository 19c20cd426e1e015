"""Store: the verbs (put, register, artifact, get, get_into, exists, delete, list_keys,
empty) bound to options, and this process's caches.  [SDK]

A :class:`Store` binds the verbs to options (read source, retry overrides); the module-level
``tc.put`` and friends (:mod:`tensorcast_ray._api`) use a default one. Writes go
through the one write pipeline (:mod:`tensorcast_ray._write`); reads through this
process's read cache (:mod:`tensorcast_ray._read_cache`). Every verb runs under its retry
policy; between attempts the client reconnects (after a daemon restart the daemon's
address is re-resolved through Ray).
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensorcast_ray import _bootstrap
from tensorcast_ray._artifact import Artifact, _check_device
from tensorcast_ray._catalog import parse_key
from tensorcast_ray._errors import (
    ArtifactError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnimplementedError,
)
from tensorcast_ray._metrics import get_sdk_metrics
from tensorcast_ray._policy import StorePolicy
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tensorcast_ray._read_cache import ReadCache
from tensorcast_ray._retry import Retrier, RetryPolicy
from tensorcast_ray._write import PutResult, write

if TYPE_CHECKING:
    import torch

    from tensorcast_ray._persistence import PersistenceStatus

SOURCES = ("auto", "local_only", "remote", "disk")
_RELEASE_TIMEOUT_S = 2.0  # a best-effort call made ahead of a verb: never held up long


_SOURCE_CODES = {
    "auto": daemon_pb2.READ_SOURCE_AUTO,
    "local_only": daemon_pb2.READ_SOURCE_LOCAL_ONLY,
    "remote": daemon_pb2.READ_SOURCE_REMOTE,
    "disk": daemon_pb2.READ_SOURCE_DISK,
}
_SERVED_MAX = 4096  # artifacts whose last read's path this process remembers (ArtifactInfo)


@dataclass(frozen=True)
class GetArtifactOptions:
    """Where reads may come from (see docs/cluster.md).

    ``"auto"``: this node's copy, else pulled from the nearest node holding one (landing a
    replica here that every later reader on this node maps with no copy). ``"local_only"``:
    this node's copy or NOT_FOUND naming the nodes that hold it; nothing moves. ``"remote"``:
    the cluster's answer (the Global Store is always asked, even for a version this process
    has open), which needs a copy on another node (an artifact only this node holds is
    NOT_FOUND); it is served from this node's copy when there is one (the same immutable
    bytes), else pulled. ``"disk"``: this node's copy, else read back from shared disk
    (needs persistence: ``persist_url``; NOT_FOUND when no complete disk copy exists); it
    never pulls from another node. ``"auto"`` reads from disk too, when no node holds a
    copy of a durable version (see docs/persistence.md)."""

    source: str = "auto"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidArgumentError(
                f"GetArtifactOptions.source={self.source!r}; expected one of {', '.join(SOURCES)}"
            )


@dataclass(frozen=True)
class StoreOptions:
    get: GetArtifactOptions = field(default_factory=GetArtifactOptions)
    retry_overrides: Mapping[str, RetryPolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaResult:
    """One target node's outcome of :func:`tensorcast_ray.replicate`."""

    node_id: str
    status: str  # "ready" | "failed"
    transport: str  # "object_store" | "collective" | "" (nothing moved: already there)
    reason: str = ""


@dataclass(frozen=True)
class _Buffer:
    buffer_id: str
    start: int
    nbytes: int


class _BufferRegistry:
    """[SDK] tc.empty buffers of this process, found by address for zero-copy register."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[str, _Buffer] = {}
        # Buffers whose mapping is gone, for the daemon to free (take_released). Appended by
        # the finalizer, which may run inside any code (a GC pass): a deque append and a
        # dict pop take no lock, so it can never deadlock or call out.
        self._released: collections.deque[str] = collections.deque()

    def add(self, buf: _Buffer, mapping: Any) -> None:
        """Track ``buf`` while ``mapping`` lives: once every tensor over it is gone the
        address range may be reused by another mapping, which must not match this buffer,
        and the daemon may free the buffer (once no version is registered over it)."""
        with self._lock:
            self._buffers[buf.buffer_id] = buf
        weakref.finalize(mapping, self._unmapped, buf.buffer_id)

    def _unmapped(self, buffer_id: str) -> None:
        self._buffers.pop(buffer_id, None)
        self._released.append(buffer_id)

    def take_released(self) -> list[str]:
        """The buffers unmapped since the last call, to send in one ReleaseBuffers."""
        taken = []
        while self._released:
            taken.append(self._released.popleft())
        return taken

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._released.clear()  # the session that owned them ended: the daemon freed them

    def find(self, tensor: Any) -> tuple[str, int] | None:
        """``(buffer_id, offset)`` when ``tensor``'s bytes lie inside one tc.empty buffer."""
        if not tensor.is_contiguous():
            return None
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        with self._lock:
            for buf in list(self._buffers.values()):  # the finalizer pops without the lock
                if buf.start <= ptr and ptr + nbytes <= buf.start + buf.nbytes:
                    return buf.buffer_id, ptr - buf.start
        return None


_read_cache = ReadCache()
_buffers = _BufferRegistry()
_served_by: collections.OrderedDict[str, str] = collections.OrderedDict()


_served_lock = threading.Lock()


def _last_served(artifact_id: str) -> str | None:
    with _served_lock:
        return _served_by.get(artifact_id)


def served(artifact_id: str, how: str) -> None:
    """Remember how this process's last read of ``artifact_id`` was served (ArtifactInfo)."""
    with _served_lock:
        _served_by[artifact_id] = how
        _served_by.move_to_end(artifact_id)
        while len(_served_by) > _SERVED_MAX:
            _served_by.popitem(last=False)


_cache_pid = os.getpid()


def _process_caches() -> tuple[ReadCache, _BufferRegistry]:
    global _read_cache, _buffers, _cache_pid
    if _cache_pid != os.getpid():  # forked: the parent's mappings are not ours to trust
        _read_cache, _buffers, _cache_pid = ReadCache(), _BufferRegistry(), os.getpid()
    return _read_cache, _buffers


def _reconnect() -> None:
    """Between retry attempts: connect again if the session is gone (its staged segments went
    with it); a live session is kept, so a slow or aborted call never ends this process's
    leases."""
    state = _bootstrap.current()
    if not state.client.connection_lost():
        return
    if state.stager is not None:
        state.stager.close()
        state.stager = None
    state.client.reconnect()


class Store:
    """The verbs, bound to options. ``tc.store(opts=...)`` makes one; the module-level
    functions use a default one."""

    def __init__(self, opts: StoreOptions | None = None, *, retrier: Retrier | None = None) -> None:
        if opts is not None and not isinstance(opts, StoreOptions):
            raise InvalidArgumentError("opts must be a tensorcast_ray.StoreOptions")
        self.opts = opts or StoreOptions()
        metrics = get_sdk_metrics()
        self._retrier = retrier or Retrier(
            self.opts.retry_overrides,
            on_retry=metrics.record_retry,
            before_retry=lambda err: _reconnect(),
        )

    @property
    def _read_cache(self) -> ReadCache:
        return _process_caches()[0]

    @property
    def _buffers(self) -> _BufferRegistry:
        return _process_caches()[1]

    # ---- plumbing ----------------------------------------------------------------------
    @contextmanager
    def _verb(self, verb: str) -> Iterator[None]:
        from tensorcast_ray._tracing import span

        self._release_buffers()
        with get_sdk_metrics().observe(verb), span(verb):
            yield

    def _release_buffers(self) -> None:
        """Tell the daemon which tc.empty buffers this process no longer maps, so a loop
        that publishes each step from a fresh buffer does not keep every old one. Best
        effort: if the call fails the buffers are freed when this process's session ends."""
        released = self._buffers.take_released()
        if not released:
            return
        request = daemon_pb2.ReleaseBuffersRequest(buffer_ids=released)
        with suppress(ArtifactError):
            self._call_in_session("ReleaseBuffers", request, _RELEASE_TIMEOUT_S)

    def _call(self, method: str, request: Any, timeout: float) -> Any:
        return _bootstrap.current().client.call(method, request, timeout=max(timeout, 0.001))

    def _call_in_session(self, method: str, request: Any, timeout: float) -> Any:
        """``_call`` for a request that names its session: named afresh on every attempt,
        since a retry may have reconnected."""
        request.session_id = _bootstrap.current().client.session_hint
        return self._call(method, request, timeout)

    def _require_same_host(self) -> None:
        hello = _bootstrap.current().client.hello
        import socket

        if hello is not None and hello.hostname != socket.gethostname():
            raise UnimplementedError(
                f"this process runs on {socket.gethostname()} but its daemon on {hello.hostname}; "
                "a process maps its daemon's shared memory, so it must share the daemon's host — "
                "connect to the daemon of this host (daemons move bytes between nodes)"
            )

    # ---- writes -------------------------------------------------------------------------
    def put(
        self, tensors: Mapping[str, Any], key: str, policy: StorePolicy | None = None
    ) -> PutResult:
        """Copy ``tensors`` once into the node's shared memory as version ``key``."""
        with self._verb("put"):
            return write(self, "put", tensors, key, policy, None)

    def register(
        self,
        tensors: Mapping[str, Any],
        key: str,
        policy: StorePolicy | None = None,
        ttl_ms: int | None = None,
    ) -> PutResult:
        """Lease ``tensors`` as version ``key`` until delete, ``ttl_ms`` or this process exits.

        Tensors allocated with :func:`tensorcast_ray.empty` are shared with no copy; other CPU
        tensors are copied once."""
        with self._verb("register"):
            if ttl_ms is not None and (
                isinstance(ttl_ms, bool)
                or not isinstance(ttl_ms, int)
                or not 0 < ttl_ms <= MAX_TTL_MS
            ):
                raise InvalidArgumentError(
                    f"ttl_ms must be a positive int of at most {MAX_TTL_MS} (about 292 years) "
                    f"or None, got {ttl_ms!r}"
                )
            return write(self, "register", tensors, key, policy, ttl_ms)

    def empty(self, shape: Sequence[int], dtype: Any = None) -> torch.Tensor:
        """A writable CPU tensor in daemon-owned shared memory: ``register`` shares it with
        no copy. The memory lives until this process drops its last tensor over it and no
        version registered from it is left (or until this process exits)."""
        import torch

        from tensorcast_ray._dtypes import dtype_name, itemsize
        from tensorcast_ray._layout import TensorMeta, wrap_tensor

        dtype = dtype or torch.get_default_dtype()
        shape = _check_shape(shape)
        name = dtype_name(dtype)
        nbytes = itemsize(name) * _numel(shape)
        if nbytes > MAX_BUFFER_BYTES:
            raise InvalidArgumentError(
                f"tc.empty{shape} of {name} is {nbytes} bytes, more than any node can hold "
                f"(at most {MAX_BUFFER_BYTES}); ask for a smaller buffer"
            )
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        self._require_same_host()
        request = daemon_pb2.AllocateBufferRequest(nbytes=nbytes)
        with self._verb("register"):
            resp = self._retrier.call(
                "register", lambda t: self._call_in_session("AllocateBuffer", request, t)
            )
        from tensorcast_ray._transport.shm import ShmTransport

        mapping = ShmTransport(resp.shm_dir).map_for_write(
            (resp.segment.name, resp.segment.size), prefault=True
        )
        tensor = wrap_tensor(mapping, TensorMeta("empty", name, shape, 0, 0, nbytes))
        _process_caches()[1].add(
            _Buffer(resp.buffer_id, tensor.data_ptr(), resp.segment.size), mapping
        )
        return tensor

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.empty(tuple(tensor.shape), tensor.dtype)

    # ---- reads --------------------------------------------------------------------------
    def artifact(self, key: str | None = None, *, artifact_id: str | None = None) -> Artifact:
        """The artifact ``key`` (``name:version`` or ``name:latest``) or ``artifact_id``."""
        with self._verb("artifact"):
            return self._artifact(key, artifact_id, "artifact")

    def _artifact(self, key: str | None, artifact_id: str | None, verb: str) -> Artifact:
        if (key is None) == (artifact_id is None):
            raise InvalidArgumentError("pass exactly one of key or artifact_id")
        if artifact_id is not None and (not isinstance(artifact_id, str) or not artifact_id):
            raise InvalidArgumentError(
                f"artifact_id must be the non-empty str an Artifact or PutResult reports, got "
                f"{artifact_id!r}"
            )
        if key is not None:
            _, version = parse_key(key)
        source = self.opts.get.source
        cache = self._read_cache
        if key is not None and version != "latest" and source != "remote":
            entry = cache.lookup_key(key)
            if entry is not None:
                return Artifact(entry, self, served_by="local")
        self._require_same_host()
        request = daemon_pb2.LookupRequest(
            key=key or "",
            artifact_id=artifact_id or "",
            source=_SOURCE_CODES[source],
            # tc.artifact and get_into may need only some bytes of a remote artifact: ask
            # for its layout; a whole read pulls a replica then (Artifact._localize).
            metadata_only=verb in ("artifact", "get_into"),
        )
        info = self._retrier.call(verb, lambda t: self._call("Lookup", request, t))
        if info.remote:
            from tensorcast_ray._artifact import RemoteEntry

            return Artifact(RemoteEntry(info), self)
        return Artifact(self._admit(info), self, served_by=info.served_by or "local")

    def _admit(self, info: daemon_pb2.ArtifactInfo) -> Any:
        hello = _bootstrap.current().client.hello
        cache = self._read_cache
        if hello is not None:
            cache.attach_epochs(
                hello.shm_dir, hello.epoch_segment, hello.epoch_slots, hello.instance_id
            )
        return cache.admit(info)

    def _pull_replica(self, entry: Any) -> tuple[Any, str]:
        """[remote artifact] Land a replica on this node (one pull per node) and map it;
        returns the mapped entry and how the pull was served."""
        request = daemon_pb2.LookupRequest(
            artifact_id=entry.info.artifact_id, source=_SOURCE_CODES[self.opts.get.source]
        )
        info = self._retrier.call("get", lambda t: self._call("Lookup", request, t))
        if info.remote:  # pragma: no cover - the daemon answers metadata only when asked
            raise FailedPreconditionError(f"{info.key}: the daemon answered no copy")
        return self._admit(info), info.served_by or "local"

    def _read_ranges(self, entry: Any, metas: Sequence[Any]) -> dict[str, torch.Tensor]:
        """[remote artifact] Only the bytes of ``metas`` (whole tensors or contiguous
        parts), into a buffer the daemon leases to this process: no replica is made."""
        import torch

        from tensorcast_ray._dtypes import torch_dtype
        from tensorcast_ray._layout import TensorMeta, wrap_tensor
        from tensorcast_ray._read_cache import mark_read_only
        from tensorcast_ray._transport.shm import ShmTransport

        request = daemon_pb2.ReadRangesRequest(artifact_id=entry.info.artifact_id)
        placed: list[tuple[Any, int]] = []
        at = 0
        for meta in metas:
            if meta.nbytes:
                request.segment.append(meta.segment)
                request.offset.append(meta.offset)
                request.length.append(meta.nbytes)
            placed.append((meta, at))
            at += meta.nbytes
        out: dict[str, torch.Tensor] = {}
        if at:
            resp = self._retrier.call(
                "get", lambda t: self._call_in_session("ReadRanges", request, t)
            )
            mapping = ShmTransport(resp.shm_dir).map_for_read(
                (resp.segment.name, resp.segment.size)
            )
            start = mark_read_only(mapping)
            # Leased to this process like a tc.empty buffer: freed once the mapping goes.
            self._buffers.add(_Buffer(resp.buffer_id, start, resp.segment.size), mapping)
            for meta, offset in placed:
                if meta.nbytes:
                    out[meta.name] = wrap_tensor(
                        mapping,
                        TensorMeta(meta.name, meta.dtype, meta.shape, 0, offset, meta.nbytes),
                    )
        for meta, _ in placed:
            if not meta.nbytes:
                out[meta.name] = torch.empty(meta.shape, dtype=torch_dtype(meta.dtype))
        get_sdk_metrics().record_data_path("object_store")
        return out

    def _info(self, artifact_id: str) -> Any:
        from tensorcast_ray._artifact import ArtifactInfo

        request = daemon_pb2.InspectRequest(artifact_id=artifact_id)
        resp = self._retrier.call("artifact", lambda t: self._call("Inspect", request, t))
        return ArtifactInfo(
            key=resp.key,
            artifact_id=resp.artifact_id,
            nbytes=int(resp.nbytes),
            tensors=int(resp.tensors),
            kind=resp.kind,
            writer=resp.writer,
            replicas=[r.node_id for r in resp.replicas],
            replica_kinds={r.node_id: r.kind for r in resp.replicas},
            local=resp.local,
            local_kind=resp.local_kind or None,
            served_by=_last_served(resp.artifact_id),
            created_unix_ms=int(resp.created_unix_ms),
            durable=resp.durable,
            persistence_task_id=resp.persistence_task_id or None,
            persistence_state=resp.persistence_state or None,
            persistence_error=resp.persistence_error or None,
        )

    def replicate(
        self, key: str, nodes: str | Sequence[str] = "all", transport: str = "auto"
    ) -> dict[str, ReplicaResult]:
        """Put a kept copy of ``key`` on each target node (see :func:`tensorcast_ray.replicate`)."""
        with self._verb("replicate"):
            parse_key(key)
            if transport not in ("auto", "object_store", "collective"):
                raise InvalidArgumentError(
                    f"transport={transport!r}; expected 'auto', 'object_store' or 'collective'"
                )
            request = daemon_pb2.ReplicateRequest(key=key, transport=transport)
            if isinstance(nodes, str):
                if nodes not in ("all", "subscribers"):
                    raise InvalidArgumentError(
                        f"nodes={nodes!r}; pass 'all', 'subscribers' or a list of node ids"
                    )
                request.all_nodes = nodes == "all"
                request.subscribers = nodes == "subscribers"
            else:
                node_list = list(nodes)
                if not node_list or not all(isinstance(n, str) and n for n in node_list):
                    raise InvalidArgumentError(
                        "nodes must be 'all' or a non-empty list of node ids"
                    )
                request.nodes.extend(node_list)
            resp = self._retrier.call("replicate", lambda t: self._call("Replicate", request, t))
            return {
                r.node_id: ReplicaResult(r.node_id, r.status, r.transport, r.reason)
                for r in resp.results
            }

    def get(
        self, key: str, device: Any = "cpu", names: Sequence[str] | None = None, copy: bool = False
    ) -> dict[str, torch.Tensor]:
        """``artifact(key).tensor_dict(device, names, copy)``."""
        with self._verb("get"):
            _check_device(device)
            return self._artifact(key, None, "get").tensor_dict(device, names=names, copy=copy)

    def get_into(
        self, key: str, targets: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
    ) -> None:
        """``artifact(key).tensor_dict_into(targets, names)``."""
        with self._verb("get_into"):
            self._artifact(key, None, "get_into").tensor_dict_into(targets, names=names)

    def exists(self, key: str) -> bool:
        with self._verb("exists"):
            parse_key(key)
            request = daemon_pb2.ExistsRequest(key=key)
            return bool(
                self._retrier.call("exists", lambda t: self._call("Exists", request, t)).exists
            )

    def delete(self, key: str, *, unless_held: bool = False) -> bool:
        """Delete one version. Readers keep the tensors they hold; new readers get NOT_FOUND.
        ``unless_held``: FAILED_PRECONDITION while a subscriber holds it (``tc.weights``)."""
        with self._verb("delete"):
            parse_key(key)
            request = daemon_pb2.DeleteRequest(key=key, unless_held=unless_held)
            return bool(
                self._retrier.call("delete", lambda t: self._call("Delete", request, t)).deleted
            )

    def list_keys(self, prefix: str = "") -> list[str]:
        with self._verb("list_keys"):
            if not isinstance(prefix, str):
                raise InvalidArgumentError("prefix must be a str")
            request = daemon_pb2.ListKeysRequest(prefix=prefix)
            return list(
                self._retrier.call("list_keys", lambda t: self._call("ListKeys", request, t)).keys
            )

    # ---- persistence (tensorcast_ray._persistence) -------------------------------------
    def persistence_status(
        self, task_id: str | None = None, *, key: str | None = None
    ) -> PersistenceStatus:
        """:func:`tensorcast_ray.persistence_status` under this store's retry overrides."""
        from tensorcast_ray._persistence import persistence_status

        with self._verb("persistence_status"):
            return persistence_status(self, task_id, key)

    def wait_persisted(
        self, key: str | None = None, *, task_id: str | None = None, timeout: float | None = None
    ) -> PersistenceStatus:
        """:func:`tensorcast_ray.wait_persisted` under this store's retry overrides."""
        from tensorcast_ray._persistence import wait_persisted

        with self._verb("persistence_status"):
            return wait_persisted(self, key, task_id=task_id, timeout=timeout)

    # ---- checkpoint I/O (tensorcast_ray._checkpoint_io) ---------------------------------
    def export(
        self,
        key: str,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
        layout: str = "auto",
    ) -> str:
        """:func:`tensorcast_ray.export` under this store's options and retry overrides."""
        from tensorcast_ray._checkpoint_io import export_artifact

        return export_artifact(
            self, key, url, storage_options=storage_options, progress=progress, layout=layout
        )

    def import_checkpoint(
        self,
        url: str,
        key: str,
        *,
        names: Sequence[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        policy: StorePolicy | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> PutResult:
        """:func:`tensorcast_ray.import_checkpoint` under this store's options and retries."""
        from tensorcast_ray._checkpoint_io import import_into

        return import_into(
            self,
            url,
            key,
            names=names,
            storage_options=storage_options,
            policy=policy,
            progress=progress,
        )


#: the largest ``ttl_ms`` (the wire's int64).
MAX_TTL_MS = 2**63 - 1
#: the largest tc.empty buffer (the wire's int64 byte count).
MAX_BUFFER_BYTES = 2**63 - 1


def _check_shape(shape: Any) -> tuple[int, ...]:
    """A shape of non-negative ints (an int is a 1-d shape); floats, strs and bools are
    refused rather than truncated."""
    import operator

    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise InvalidArgumentError(
            f"shape must be a sequence of ints such as (4096, 4096), got {shape!r}"
        )
    dims = []
    for d in shape:
        if isinstance(d, bool):
            raise InvalidArgumentError(f"shape {tuple(shape)!r} holds a bool; dims are ints")
        try:
            dims.append(operator.index(d))
        except TypeError:
            raise InvalidArgumentError(
                f"shape {tuple(shape)!r}: dimension {d!r} is not an int"
            ) from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"shape {tuple(dims)} has a negative dimension")
    return tuple(dims)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_default: Store | None = None
_default_lock = threading.Lock()


def default_store() -> Store:
    global _default
    with _default_lock:
        if _default is None:
            _default = Store()
        return _default


def reset_process_state() -> None:
    """Forget cached mappings and the default store (``shutdown`` calls it)."""
    global _default
    with _default_lock:
        _default = None
    read_cache, buffers = _process_caches()
    read_cache.clear()
    buffers.clear()  # buffers belong to the daemon session that just ended
