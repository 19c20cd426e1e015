"""Persistence as the SDK sees it: a task's status, and waiting until a version is durable.  [SDK]

A put or register whose policy names shared disk or a remote stable tier returns once the
local copy is in; the daemon's persistence task places the rest in the background and its
id comes back in ``PutResult.persistence_task_id``. :func:`tensorcast_ray.persistence_status`
reads the task's state, :func:`tensorcast_ray.wait_persisted` blocks until it ends. Any node
can ask: a daemon that does not run the task asks the one that does (through the Global
Store), or reads what shared disk holds once that daemon is gone. See docs/persistence.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from tensorcast_ray._catalog import parse_key
from tensorcast_ray._errors import (
    ArtifactError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    error_for_code,
)
from tensorcast_ray._proto.tensorcast_ray.v1 import daemon_pb2

if TYPE_CHECKING:
    from tensorcast_ray._store import Store

__all__ = ["PersistenceStatus", "ShardStatus", "persistence_status", "wait_persisted"]

#: how long one status call asks the daemon to wait for the task to end (it caps at 10 s)
_POLL_WAIT_S = 10.0
#: the shortest round of wait_persisted when the daemon answers without waiting
_MIN_ROUND_S = 0.25


@dataclass(frozen=True)
class ShardStatus:
    """One unit a persistence task places: a shard file on shared disk (``tier``
    ``"shared_disk"``, ``target`` its URL) or a stable copy on another node (``tier``
    ``"stable_dram"``, ``target`` the node id)."""

    index: int
    tier: str
    target: str
    state: str  # pending | running | retrying | success | failed
    progress: float  # 0..1
    done_bytes: int
    total_bytes: int
    attempts: int
    error: str = ""


@dataclass(frozen=True)
class PersistenceStatus:
    """A persistence task's state: ``pending`` → ``running`` → ``success`` | ``degraded`` |
    ``failed``. ``durable``: a complete copy is on shared disk. ``last_error_code`` is the
    gRPC status code name of ``last_error`` ("" when none)."""

    task_id: str
    key: str
    artifact_id: str
    state: str
    progress: float
    degraded_reason: str
    last_error: str
    last_error_code: str
    durable: bool
    nbytes: int
    node_id: str
    created_unix_ms: int
    started_unix_ms: int
    finished_unix_ms: int
    shards: tuple[ShardStatus, ...]

    @property
    def done(self) -> bool:
        """The task ended (success, degraded or failed)."""
        return self.state in ("success", "degraded", "failed")

    def error(self) -> ArtifactError | None:
        """The task's failure as an ``ArtifactError`` with its status code (None if none)."""
        if not self.last_error_code:
            return None
        code = getattr(grpc.StatusCode, self.last_error_code, grpc.StatusCode.UNKNOWN)
        return error_for_code(
            code, f"persistence of {self.key} ({self.task_id}) {self.state}: {self.last_error}"
        )

    @classmethod
    def from_pb(cls, msg: daemon_pb2.PersistenceStatusResponse) -> PersistenceStatus:
        return cls(
            task_id=msg.task_id,
            key=msg.key,
            artifact_id=msg.artifact_id,
            state=msg.state,
            progress=float(msg.progress),
            degraded_reason=msg.degraded_reason,
            last_error=msg.last_error,
            last_error_code=msg.last_error_code,
            durable=msg.durable,
            nbytes=int(msg.nbytes),
            node_id=msg.node_id,
            created_unix_ms=int(msg.created_unix_ms),
            started_unix_ms=int(msg.started_unix_ms),
            finished_unix_ms=int(msg.finished_unix_ms),
            shards=tuple(
                ShardStatus(
                    index=int(s.index),
                    tier=s.tier,
                    target=s.target,
                    state=s.state,
                    progress=float(s.progress),
                    done_bytes=int(s.done_bytes),
                    total_bytes=int(s.total_bytes),
                    attempts=int(s.attempts),
                    error=s.error,
                )
                for s in msg.shards
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _request(task_id: str | None, key: str | None) -> daemon_pb2.PersistenceStatusRequest:
    if (task_id is None) == (key is None):
        raise InvalidArgumentError(
            "pass exactly one of task_id= (PutResult.persistence_task_id) or key="
        )
    if task_id is not None:
        if not isinstance(task_id, str) or not task_id:
            raise InvalidArgumentError(f"task_id must be a non-empty str, got {task_id!r}")
        return daemon_pb2.PersistenceStatusRequest(task_id=task_id)
    parse_key(key)
    return daemon_pb2.PersistenceStatusRequest(key=key)


def persistence_status(
    store: Store, task_id: str | None = None, key: str | None = None, *, wait_s: float = 0.0
) -> PersistenceStatus:
    """The state of the persistence task named by ``task_id``, or of ``key``'s version."""
    request = _request(task_id, key)
    request.wait_s = wait_s
    resp = store._retrier.call(
        "persistence_status",
        lambda t: store._call("PersistenceStatus", request, t + wait_s),
    )
    return PersistenceStatus.from_pb(resp)


def wait_persisted(
    store: Store,
    key: str | None = None,
    *,
    task_id: str | None = None,
    timeout: float | None = None,
) -> PersistenceStatus:
    """Block until the task ends. Returns its status when the version is placed (state
    ``success``, or ``degraded`` with a complete disk copy); raises the task's error (an
    ``ArtifactError`` with its code) when it failed or its disk tier did not finish, and
    DEADLINE_EXCEEDED after ``timeout`` seconds (None: no limit)."""
    _request(task_id, key)
    if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
        raise InvalidArgumentError(f"timeout must be a number >= 0 or None, got {timeout!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = _POLL_WAIT_S if deadline is None else max(0.0, deadline - time.monotonic())
        asked = time.monotonic()
        status = persistence_status(store, task_id, key, wait_s=min(left, _POLL_WAIT_S))
        if status.done:
            error = status.error()
            if status.state == "failed" or (error is not None and not status.durable):
                raise error or InternalError(f"persistence of {status.key} failed")
            return status
        if deadline is None or time.monotonic() < deadline:
            # The daemon answered before its wait (it lets only a few calls wait at once):
            # pace the next question instead of spinning.
            if time.monotonic() - asked < _MIN_ROUND_S:
                time.sleep(min(_MIN_ROUND_S, max(0.0, left - (time.monotonic() - asked))))
            continue
        raise DeadlineExceededError(
            f"persistence of {status.key} ({status.task_id}) is still {status.state} after "
            f"{timeout} s ({status.progress:.0%} done); wait longer, or see "
            "tc.persistence_status for its shards"
        )
