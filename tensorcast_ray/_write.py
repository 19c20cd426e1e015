"""One write pipeline for put, register and import: specs → BeginWrite → copy → commit.  [SDK]

One put, step by step: validate the key, tensors and policy here (fail fast, nothing sent);
describe the tensors as one compact table (:class:`~tensorcast_ray._layout.Columns`: names,
dtype codes and shapes, never a message per tensor) and ``BeginWrite`` → the daemon reserves
the version, admits the bytes, places every tensor and hands out pre-faulted segments (this
process's staged ones first, :mod:`tensorcast_ray._staging`); copy each tensor once into
them (:func:`copy_tensors`); ``CommitWrite`` publishes the version. Any failure in between
aborts the write, so the store never holds a half-written version. Every attempt of one
write carries the same request id, so a retry after a lost reply is safe.

Per-tensor costs are what real checkpoints (300-20,000 tensors) pay for, so the copy loop
does the least per tensor: a contiguous host tensor is one ``memmove`` by address; large
ones are split into chunks copied by a few threads (``ctypes.memmove`` releases the GIL),
as Ray copies large objects; anything else (strided, conjugate, on a GPU) takes
:func:`~tensorcast_ray._layout.copy_into`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensorcast_ray import _bootstrap
from tensorcast_ray._catalog import parse_key
from tensorcast_ray._errors import ArtifactError, InvalidArgumentError, UnimplementedError
from tensorcast_ray._layout import NO_SEGMENT, Columns, copy_into, describe
from tensorcast_ray._metrics import get_sdk_metrics
from tensorcast_ray._policy import StorePolicy, resolve_policy
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2
from tensorcast_ray._staging import Staged, Stager

if TYPE_CHECKING:
    from tensorcast_ray._store import Store

__all__ = ["PutResult", "copy_tensors", "put_result", "write", "write_segments"]

logger = logging.getLogger("tensorcast_ray.store")

#: below this a tensor is copied inline: handing it to a thread costs more than the copy.
_INLINE_BYTES = 4 << 20
#: large copies are cut into chunks of this size, spread over the copy threads.
_CHUNK_BYTES = 16 << 20

#: a register over tc.empty buffers: (buffer ids, buffer index per tensor, offset per tensor).
BufferRefs = tuple[list[str], list[int], list[int]]

#: ``fill(started, maps)``: write every tensor into ``maps[segment]`` at its offset, as
#: ``started.tensor_segments`` / ``started.tensor_offsets`` say (request order).
Fill = Callable[[daemon_pb2.BeginWriteResponse, Sequence[Any]], None]


@dataclass(frozen=True)
class PutResult:
    key: str
    artifact_id: str
    nbytes: int
    status: str
    degraded_reasons: tuple[str, ...] = ()
    persistence_task_id: str | None = None


def put_result(result: daemon_pb2.WriteResult) -> PutResult:
    return PutResult(
        key=result.key,
        artifact_id=result.artifact_id,
        nbytes=int(result.nbytes),
        status=result.status,
        degraded_reasons=tuple(result.degraded_reasons),
        persistence_task_id=result.persistence_task_id or None,
    )


def log_fallback(reason: str, message: str, *, key: str, mode: str, artifact_id: str = "") -> None:
    """A fallback to a slower path: counted, and logged with the fields operators filter on."""
    get_sdk_metrics().region_backed_fallback.labels(reason=reason).inc()
    logger.info(
        "%s (key %s)",
        message,
        key,
        extra={"tc.store.mode": mode, "tc.store.artifact_id": artifact_id, "tc.store.key": key},
    )


@functools.lru_cache(maxsize=64)
def policy_json(policy: StorePolicy | None) -> str:
    """The resolved policy as sent to the daemon, resolved once per distinct policy
    (StorePolicy is frozen and hashable)."""
    return json.dumps(resolve_policy(policy).to_dict())


def write(
    store: Store,
    verb: str,
    tensors: Mapping[str, Any],
    key: str,
    policy: StorePolicy | None,
    ttl_ms: int | None,
) -> PutResult:
    """put, or register (zero-copy when every tensor lies in a ``tc.empty`` buffer)."""
    parse_key(key, for_write=True)
    if not isinstance(tensors, Mapping):
        raise InvalidArgumentError(
            f"{verb} takes a mapping of name to tensor, got {type(tensors).__name__}"
        )
    if not tensors:
        raise InvalidArgumentError(
            f"{verb} of {key!r} got no tensors: an artifact holds at least one (a "
            "zero-size tensor counts)"
        )
    if policy is not None and not isinstance(policy, StorePolicy):
        raise InvalidArgumentError("policy must be a tensorcast_ray.StorePolicy or None")
    cols = describe(tensors)
    if verb == "register":
        cuda = [
            n
            for n, t in tensors.items()
            if getattr(getattr(t, "device", None), "type", "cpu") == "cuda"
        ]
        if cuda:
            raise UnimplementedError(
                f"register of CUDA tensors ({cuda[0]!r}, …) needs CUDA IPC, which is not built "
                "yet; use tc.put(), which copies them once into host shared memory"
            )
    pjson = policy_json(policy)
    store._require_same_host()
    if verb == "register":
        refs = _buffer_refs(store, tensors)
        if refs is None:
            log_fallback(
                "not_shared_memory",
                "register copies the tensors once: they are not all in tc.empty buffers",
                key=key,
                mode="copy",
            )
        if refs is not None:
            ids, index, offsets = refs
            request = daemon_pb2.RegisterBuffersRequest(
                key=key,
                request_id=uuid.uuid4().hex,
                tensors=cols.to_table(),
                buffer_ids=ids,
                buffer_index=index,
                buffer_offsets=offsets,
                policy_json=pjson,
                ttl_ms=ttl_ms or 0,
            )
            result = store._retrier.call(
                verb, lambda t: store._call_in_session("RegisterBuffers", request, t)
            )
            get_sdk_metrics().record_data_path("shm")
            return put_result(result)
    begin = daemon_pb2.BeginWriteRequest(
        key=key,
        kind=daemon_pb2.WRITE_KIND_REGISTER if verb == "register" else daemon_pb2.WRITE_KIND_PUT,
        tensors=cols.to_table(),
        policy_json=pjson,
        ttl_ms=ttl_ms or 0,
    )
    values = list(tensors.values())

    def fill(started: daemon_pb2.BeginWriteResponse, maps: Sequence[Any]) -> None:
        segments, offsets = placement(started, cols)
        copy_tensors(values, cols, segments, offsets, maps)

    result = write_segments(store, verb, begin, cols, fill)
    get_sdk_metrics().record_data_path("shm")
    return put_result(result)


def placement(started: daemon_pb2.BeginWriteResponse, cols: Columns) -> tuple[list[int], list[int]]:
    """The daemon's ``(segment, offset)`` of each tensor, in request order, checked to lie
    inside the segments it handed out (a bad reply must not make us write elsewhere)."""
    segments, offsets = list(started.tensor_segments), list(started.tensor_offsets)
    cols.placed(segments, offsets, [s.size for s in started.segments])
    return segments, offsets


def write_segments(
    store: Store, verb: str, begin: daemon_pb2.BeginWriteRequest, cols: Columns, fill: Fill
) -> daemon_pb2.WriteResult:
    """One write through the daemon's segments under ``verb``'s retry policy: offer staged
    segments → BeginWrite → a writable mapping per segment → ``fill(started, maps)`` →
    CommitWrite. Any failure after BeginWrite (mapping and ``fill`` included) sends
    AbortWrite and re-raises. put, register (copy) and import differ only in ``fill``."""

    if not begin.request_id:  # one id for every attempt of this write
        begin.request_id = uuid.uuid4().hex

    def attempt(timeout: float) -> Any:
        state = _bootstrap.current()
        stager = _stager(state)
        staged = stager.take(_segments_needed(cols, state)) if stager else []
        begin.session_id = state.client.session_hint
        begin.staged_segments[:] = [st.name for st in staged]
        try:
            started = store._call("BeginWrite", begin, timeout)
        except BaseException:
            if stager is not None:
                stager.give_back(staged, done=True)
            raise
        if started.HasField("committed"):  # an earlier attempt committed; its reply was lost
            if stager is not None:
                stager.give_back(staged, done=True)
            return started.committed
        if stager is not None:
            # staged for the next write, once this ends
            stager.expect(started.stageable, started.stageable_small)
            offered = {st.name for st in staged}
            used = sum(1 for seg in started.segments if seg.name in offered)
            stageable = started.stageable + started.stageable_small
            if used < stageable:
                log_fallback(
                    "staging_empty",
                    f"{verb} had {used} of {stageable} stageable segments staged; "
                    "the rest fault pages while copying",
                    key=begin.key,
                    mode="unstaged",
                    artifact_id=started.artifact_id,
                )
        maps: list[Any] = []
        try:
            maps = _map_for_write(started, staged, stager)
            fill(started, maps)
            return store._call(
                "CommitWrite", daemon_pb2.CommitWriteRequest(write_id=started.write_id), timeout
            )
        except BaseException:
            try:
                store._call(
                    "AbortWrite", daemon_pb2.AbortWriteRequest(write_id=started.write_id), 5.0
                )
            except ArtifactError:
                pass  # the daemon ends the write with our session anyway
            raise
        finally:
            _retire(maps, stager)

    result: daemon_pb2.WriteResult = store._retrier.call(verb, attempt)
    return result


# ---- the copy --------------------------------------------------------------------------------
_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _copy_pool() -> ThreadPoolExecutor:
    """This process's copy threads (made again in a forked child: threads do not fork)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            workers = max(2, min(4, os.cpu_count() or 2))
            _pool = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="tc-copy"))
        return _pool[1]


def _host_address(value: Any) -> int | None:
    """The address of ``value``'s bytes when they are one dense host block in stored order
    (what the bytes of the artifact are), else None."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_cpu and value.is_contiguous() and not (value.is_conj() or value.is_neg()):
            return int(value.data_ptr())
        return None
    if isinstance(value, np.ndarray) and value.flags.c_contiguous and value.dtype.isnative:
        return int(value.ctypes.data)
    return None


def copy_tensors(
    values: Sequence[Any],
    cols: Columns,
    segments: Sequence[int],
    offsets: Sequence[int],
    maps: Sequence[Any],
) -> None:
    """Copy ``values[i]`` to ``maps[segments[i]]`` at ``offsets[i]`` (placement already
    checked against the mappings' sizes)."""
    import torch

    bases = [(ctypes.c_char * len(m)).from_buffer(m) for m in maps]  # holds each export
    try:
        addrs = [ctypes.addressof(b) for b in bases]
        memmove = ctypes.memmove
        tensor_type = torch.Tensor
        chunks: list[tuple[int, int, int]] = []
        for value, nbytes, seg, off in zip(values, cols.nbytes, segments, offsets, strict=True):
            if nbytes == 0 or seg == NO_SEGMENT:
                continue
            # The common case inline (a call per tensor is measurable at 16,384 tensors).
            if (
                type(value) is tensor_type
                and value.is_cpu
                and value.is_contiguous()
                and not (value.is_conj() or value.is_neg())
            ):
                src: int | None = value.data_ptr()
            else:
                src = _host_address(value)
            if src is None:
                copy_into(value, maps[seg], off)
            elif nbytes < _INLINE_BYTES:
                memmove(addrs[seg] + off, src, nbytes)
            else:
                dst = addrs[seg] + off
                for start in range(0, nbytes, _CHUNK_BYTES):
                    chunks.append((dst + start, src + start, min(_CHUNK_BYTES, nbytes - start)))
        if chunks:
            # list() waits for every chunk and re-raises the first failure.
            list(_copy_pool().map(lambda c: memmove(*c), chunks))
    finally:
        del bases  # release the exports before the mappings are closed


# ---- register of tc.empty buffers ------------------------------------------------------------
def _buffer_refs(store: Store, tensors: Mapping[str, Any]) -> BufferRefs | None:
    """Where each tensor lies when every one is in a tc.empty buffer, else None: the
    distinct buffer ids, then per tensor (in order) its buffer's index and byte offset."""
    import torch

    registry = store._buffers
    ids: dict[str, int] = {}
    index: list[int] = []
    offsets: list[int] = []
    for t in tensors.values():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0:
            return None
        found = registry.find(t)
        if found is None:
            return None
        buffer_id, offset = found
        index.append(ids.setdefault(buffer_id, len(ids)))
        offsets.append(offset)
    return list(ids), index, offsets


# ---- staging -----------------------------------------------------------------------------------
_stager_lock = threading.Lock()


def _stager(state: Any) -> Stager | None:
    """This process's write stager, started at its first put when the daemon allows one."""
    if state.stager is not None:
        return state.stager
    with _stager_lock:  # two threads' first puts must not start two stagers
        return _start_stager(state)


def _start_stager(state: Any) -> Stager | None:
    hello = state.client.hello
    if state.stager is None and hello is not None and hello.staging_bytes and hello.segment_bytes:
        count = int(hello.staging_bytes // hello.segment_bytes)
        if count > 0:
            client = state.client
            state.stager = Stager(
                lambda method, request: client.call(method, request, timeout=30.0),
                lambda: client.session_hint,
                count,
                segment_bytes=int(hello.segment_bytes),
            )
    return state.stager


def _segments_needed(cols: Columns, state: Any) -> int:
    """How many staged whole segments to offer (every small one is offered too): enough for
    the bytes, plus one for alignment and a partly filled segment. The daemon decides which
    it uses, by size class, and the rest are given back at once, so this rule lives in one
    place, the daemon, and offering one too many costs nothing."""
    segment_bytes = int(state.client.hello.segment_bytes)
    return -(-sum(cols.nbytes) // segment_bytes) + 1


def _map_for_write(
    started: daemon_pb2.BeginWriteResponse, staged: list[Staged], stager: Stager | None
) -> list[Any]:
    """A writable mapping per segment: staged ones are already mapped; the rest are mapped
    now with MAP_POPULATE: filling the page table in one pass costs ~0.4 us a page, taking
    a fault per page during the copy ~2.5 us (measured: 10 ms of a 16 MiB put's 15)."""
    by_name = {st.name: st for st in staged}
    used = {seg.name for seg in started.segments}
    if stager is not None:
        stager.give_back([st for st in staged if st.name not in used])
    from tensorcast_ray._transport.shm import ShmTransport

    transport = ShmTransport(started.shm_dir)
    return [
        by_name[seg.name].mapping
        if seg.name in by_name
        else transport.map_for_write((seg.name, seg.size), prefault=True)
        for seg in started.segments
    ]


def _retire(maps: list[Any], stager: Stager | None) -> None:
    if stager is not None:
        stager.retire(maps)
        return
    for m in maps:
        try:
            m.close()
        except BufferError:
            pass  # a view is still referenced (e.g. by a traceback): unmapped when released
