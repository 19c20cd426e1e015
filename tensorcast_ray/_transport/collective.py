"""Across nodes over a gloo collective between two daemons: both halves.  [daemon]

The path ``replicate(..., transport="collective")`` takes (``"auto"`` takes it when it can
run). Each pair of daemons gets its own two-rank ``torch.distributed`` gloo process group,
formed on first use and reused for every later transfer between them (the receiver hosts
the rendezvous store on its node's address, port chosen by the OS). Not
``ray.util.collective``: its gloo groups share one process-wide world, so a daemon could
not be in a group with each of its neighbours, and its operations have no timeout. Every
operation here has one (``op_timeout_s``): a peer that dies mid-transfer fails the transfer
within seconds, never hangs a daemon thread; a group that saw an error is discarded and the
next transfer forms a new one.

One transfer (a chain hop of replicate), step by step::

    [receiver] asks the node before it for the artifact's layout (transfer_open), lands the
               copy's segments, gets (or forms) its group with that node, and asks it to
               send (collective_serve), then receives shard by shard straight into its
               segments — no object store, no extra copy.
    [sender]   joins the group (first use only) and sends each shard from its segments as
               soon as it is in place (a node still landing its own copy forwards it as
               it arrives: the chain is pipelined).

Bytes are counted in ``tc_transfer_bytes_total{transport="collective"}`` on both ends.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tensorcast_ray._error_mapping import map_exception
from tensorcast_ray._errors import UnavailableError
from tensorcast_ray._transport.object_store import full_pieces, plan_shards

if TYPE_CHECKING:
    from tensorcast_ray.daemon.leases import Artifact
    from tensorcast_ray.daemon.remote import ClusterTier

__all__ = ["pull_chain", "serve", "unavailable_reason"]

logger = logging.getLogger("tensorcast_ray.daemon.collective")

_SETUP_TIMEOUT_S = 30.0
_OP_TIMEOUT_S = 120.0


def unavailable_reason() -> str:
    """Why this process cannot run the collective path ("" when it can)."""
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return f"torch.distributed cannot be imported ({exc})"
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return ""


@dataclass
class _Group:
    name: str
    pg: Any
    store: Any
    lock: threading.Lock
    join: dict[str, Any] = field(default_factory=dict)  # how the sender joins (receiver side)


class _Groups:
    """[daemon] This daemon's pair groups: as receiver (keyed by the sending node) and as
    sender (keyed by group name)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.recv: dict[str, _Group] = {}
        self.send: dict[str, _Group] = {}

    def drop(self, table: dict[str, _Group], key: str) -> None:
        with self._lock:
            group = table.pop(key, None)
        if group is not None:
            try:
                group.pg.abort()
            except Exception:  # already broken: dropping the references frees it
                pass

    def close(self) -> None:
        for table in (self.recv, self.send):
            for key in list(table):
                self.drop(table, key)


_groups = _Groups()


def close_all() -> None:
    """[daemon] Tear down every group (the daemon stops)."""
    _groups.close()


def _process_group(store: Any, name: str, rank: int, timeout_s: float) -> Any:
    import ray
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    # Bounds every send/recv wait: one piece of a shard, at most transfer_shard_bytes. A
    # peer gone mid-transfer frees this end's thread within it, never a whole transfer's.
    opts._timeout = timedelta(seconds=min(timeout_s, _OP_TIMEOUT_S))
    # Lazy: construction returns at once and connects on the first operation, so the two
    # ends need not construct at the same moment.
    opts._devices = [
        dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address(), lazy_init=True)
    ]
    return dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, 2, opts)


def _recv_group(tier: ClusterTier, peer: str) -> tuple[_Group, dict[str, Any]]:
    """[receiver] The group with ``peer`` (formed now on first use); and how it joins."""
    import ray
    import torch.distributed as dist

    with _groups._lock:
        group = _groups.recv.get(peer)
        if group is None:
            ip = ray.util.get_node_ip_address()
            store = dist.TCPStore(
                ip, 0, 2, True, timedelta(seconds=_SETUP_TIMEOUT_S), wait_for_workers=False
            )
            name = f"tc-{tier.namespace}-{peer[:8]}-{tier.node_id[:8]}-{uuid.uuid4().hex[:6]}"
            pg = _process_group(store, name, 0, tier.config.transfer_timeout_s)
            join = {"group": name, "ip": ip, "port": store.port}
            group = _Group(name, pg, store, threading.Lock(), join)
            _groups.recv[peer] = group
    return group, dict(group.join)


def _send_group(request: dict[str, Any], timeout_s: float) -> _Group:
    """[sender] The group a receiver named (joined now on first use)."""
    import torch.distributed as dist

    name = str(request["group"])
    with _groups._lock:
        group = _groups.send.get(name)
        if group is None:
            store = dist.TCPStore(
                str(request["ip"]),
                int(request["port"]),
                2,
                False,
                timedelta(seconds=_SETUP_TIMEOUT_S),
            )
            group = _Group(name, _process_group(store, name, 1, timeout_s), store, threading.Lock())
            _groups.send[name] = group
    return group


def _views(maps: list[Any]) -> list[Any]:
    import torch

    with warnings.catch_warnings():  # a read-only mapping: sent from, never written
        warnings.simplefilter("ignore", UserWarning)
        return [torch.frombuffer(m, dtype=torch.uint8) if len(m) else None for m in maps]


def serve(tier: ClusterTier, request: dict[str, Any]) -> dict[str, Any]:
    """[sender] Send every shard of an open transfer to the receiver that asked."""
    timeout = tier.config.transfer_timeout_s
    transfer_id = str(request["transfer_id"])
    shards = request["shards"]
    group = _send_group(request, timeout)
    sent = 0
    out = tier.metrics.transfer_bytes.labels(direction="out", transport="collective")
    try:
        with group.lock:  # one transfer at a time per group: messages match in order
            for k, pieces in enumerate(shards):
                maps = tier.source.wait_landed(transfer_id, k, timeout)
                views = _views(maps)
                for src_seg, src_off, length, _, _ in pieces:
                    group.pg.send([views[src_seg][src_off : src_off + length]], 0, 0).wait()
                    sent += length
                out.inc(sum(p[2] for p in pieces))
                del views
    except Exception as exc:
        _groups.drop(_groups.send, group.name)
        raise UnavailableError(f"collective send of {request.get('key')} failed: {exc}") from exc
    finally:
        tier.source.close(transfer_id)
    return {"sent": sent}


def _watch_sender(ref: Any, group: _Group, stop: threading.Event) -> threading.Thread:
    """[receiver] Abort the group if the sender's call ends in an error while receives are
    pending: a blocked receive then fails at once instead of waiting out its timeout."""
    import ray

    def watch() -> None:
        while not stop.is_set():
            done, _ = ray.wait([ref], timeout=0.2)
            if not done:
                continue
            try:
                ray.get(ref)
            except Exception:
                if not stop.is_set():
                    try:
                        group.pg.abort()
                    except Exception:
                        pass
            return

    thread = threading.Thread(target=watch, name="tc-collective-watch", daemon=True)
    thread.start()
    return thread


def pull_chain(
    tier: ClusterTier,
    entry: dict[str, Any],
    upstream: str,
    *,
    onward: bool = True,
    kind: str = "replica",
    upstream_wait_s: float = 30.0,
) -> Artifact:
    """[receiver] Land a copy of ``entry`` (``kind``: a kept ``replica`` for replicate, a
    ``cache`` copy for a read) from ``upstream`` over the pair group, serving it ``onward``
    to the next node of a chain as it lands."""
    import ray

    start = time.perf_counter()
    timeout = tier.config.transfer_timeout_s
    artifact_id = str(entry["artifact_id"])
    inbound = tier.metrics.transfer_bytes.labels(direction="in", transport="collective")
    handle: Any = None
    meta: dict[str, Any] = {}
    landing: Any = None
    group: _Group | None = None
    onward_id = ""
    served = False  # collective_serve was sent: the sender closes its transfer
    try:
        handle = tier.daemon(upstream)
        meta = ray.get(
            handle.transfer_open.remote(tier.token, artifact_id, upstream_wait_s), timeout=timeout
        )
        landing = tier.store.begin_landing(meta, kind=kind, served_by="collective")
        shards = plan_shards(full_pieces(meta["segments"]), tier.shard_bytes(meta))
        onward_id = tier.open_onward(artifact_id, meta, landing, len(shards)) if onward else ""
        group, join = _recv_group(tier, upstream)
        with group.lock:
            request = {**join, "transfer_id": meta["transfer_id"], "shards": shards}
            ref = handle.collective_serve.remote(tier.token, {**request, "key": entry["key"]})
            served = True
            views = _views(landing.maps)
            stop = threading.Event()
            watcher = _watch_sender(ref, group, stop)
            try:
                for k, pieces in enumerate(shards):
                    for _, _, length, dst_seg, dst_off in pieces:
                        target = views[dst_seg][dst_off : dst_off + length]
                        group.pg.recv([target], 1, 0).wait()
                    inbound.inc(sum(p[2] for p in pieces))
                    if onward_id:
                        tier.source.landed(onward_id, k)
            except Exception:
                ray.get(ref, timeout=timeout)  # the sender's error says more, if it had one
                raise
            finally:
                stop.set()
                watcher.join()
                del views
            ray.get(ref, timeout=timeout)
        artifact = tier.store.publish_landing(landing)
    except BaseException as exc:
        if group is not None:
            _groups.drop(_groups.recv, upstream)
        if handle is not None and meta and not served:
            handle.transfer_close.remote(tier.token, meta["transfer_id"])
        if landing is not None:
            tier.store.abort_landing(landing)
        if onward_id:
            why = map_exception(exc).message if isinstance(exc, Exception) else repr(exc)
            tier.source.landed(onward_id, -1, error=why)
        tier.metrics.transfers.labels(transport="collective", result="failed").inc()
        if not isinstance(exc, Exception):
            raise
        err = map_exception(exc)  # unwraps the sender's error from Ray's wrapper
        if err.status_code.name in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
            raise err from exc
        raise UnavailableError(
            f"collective pull of {entry['key']} from node {upstream[:12]} failed: {err.message}"
        ) from exc
    finally:
        if onward_id:
            tier.close_onward(artifact_id)
    tier.metrics.transfers.labels(transport="collective", result="ok").inc()
    tier.metrics.transfer_seconds.labels(transport="collective").observe(
        time.perf_counter() - start
    )
    return artifact  # the caller records the replica with the Global Store
